"""Accuracy of the GPU kernels' fast float32 product modes, known on CPU: WKD-L's Sinkhorn value and gradient with the
products emulated in TF32, 3xTF32 and 3xBF16, against float64.

The Triton kernels compute each half-iteration's product (u K, v K^T, and the final (K∘C) products, forward and
backward) with ``tl.dot(input_precision=...)``: "ieee" (float32 FMA), "tf32x3" (x = big + small with both parts in
TF32, x y ~ big big' + big small' + small big', float32 accumulation) or "tf32" (one TF32 product). This script runs
the same fixed-iteration loop (u0 = 1/|supp a|, v = b/(K^T u + eps), u = a/(K v + eps), value = sum u (K∘C) v) with
every product's operands rounded the same way (round to nearest, ties away, as cvt.rna.tf32.f32; the tensor core
may instead truncate the low mantissa bits: the "tf32 (truncated)" row) and float32 accumulation (products of the
rounded operands are exact in float32), and the exact backward of that loop with its products in the same mode
(an autograd Function whose backward products are emulated too: what the kernels' reverse sweep does). Everything
else (divisions, eps) is float32. Reference: the same loop in float64.

Problem: WKD-L's, B rows of softmax(student / 2) and softmax(teacher / 2) with the target class removed, the
released CKA cost sharpened with kappa 1 (c = relu(1 - exp(-d)) + 1e-8; a random stand-in, said in the table, when
the file is absent), reg 0.05, 10 iterations, eps 1e-8. err_value: max |v - v64| / max |v64| over the batch;
err_grad: max |g - g64| / max |g64| of the gradient w.r.t. the student distribution (grad_value = 1).

Usage: python bench/precision_emulation.py [--batch 256] [--classes 1000,100] [--json FILE]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import print_table, save, wkd_cost  # noqa: E402
from compare_pot import wkd_marginals  # noqa: E402


def round_mantissa(x: torch.Tensor, bits: int, truncate: bool = False) -> torch.Tensor:
    """float32 x rounded to `bits` explicit mantissa bits (TF32: 10, BF16: 7), exponent range kept (TF32/BF16 have
    float32's), round to nearest with ties away from zero (cvt.rna), or truncated."""
    assert x.dtype == torch.float32
    i = x.view(torch.int32)
    drop = 23 - bits
    if not truncate:
        i = i + (1 << (drop - 1))  # ties away: add half an ulp of the target, then clear (sign-magnitude format)
    i = i & ~((1 << drop) - 1)
    return i.view(torch.float32)


MODES = {
    "ieee (float32)": None,
    "tf32x3": ("split", 10),
    "bf16x3": ("split", 7),
    "tf32": ("one", 10, False),
    "tf32 (truncated)": ("one", 10, True),
}


def emulated_mm(x: torch.Tensor, y: torch.Tensor, mode) -> torch.Tensor:
    """x @ y in float32 with the operands rounded as the mode's tensor-core product does."""
    if mode is None:
        return x @ y
    if mode[0] == "one":
        return round_mantissa(x, mode[1], mode[2]) @ round_mantissa(y, mode[1], mode[2])
    bits = mode[1]
    xb, yb = round_mantissa(x, bits), round_mantissa(y, bits)
    xs, ys = round_mantissa(x - xb, bits), round_mantissa(y - yb, bits)
    return xb @ ys + xs @ yb + xb @ yb  # small terms first (the accumulation order of Triton's tf32x3)


class _EmulatedMM(torch.autograd.Function):
    """y = x @ M with the product emulated; backward dx = dy @ M^T with the same emulation (M is a constant)."""

    @staticmethod
    def forward(ctx, x, M, mode):
        ctx.save_for_backward(M)
        ctx.mode = mode
        return emulated_mm(x, M, mode)

    @staticmethod
    def backward(ctx, g):
        (M,) = ctx.saved_tensors
        return emulated_mm(g.contiguous(), M.T.contiguous(), ctx.mode), None, None


def sinkhorn_value(a, b, cost, reg, iters, eps, mode):
    """The kernels' fixed loop; products through _EmulatedMM (float64: exact products)."""
    K = torch.exp(-cost / reg)
    KC = K * cost
    supp = (a > 0).to(a.dtype)
    u = supp / supp.sum(1, keepdim=True)
    mm = (lambda x, M: x @ M) if a.dtype == torch.float64 else (lambda x, M: _EmulatedMM.apply(x, M, mode))
    v = None
    for _ in range(iters):
        v = b / (mm(u, K) + eps)
        u = a / (mm(v, K.T.contiguous()) + eps)
    return (u * mm(v, KC.T.contiguous())).sum(1)


def value_and_grad(a, b, cost, reg, iters, eps, mode):
    a = a.clone().requires_grad_()
    value = sinkhorn_value(a, b, cost, reg, iters, eps, mode)
    (ga,) = torch.autograd.grad(value.sum(), a)
    return value.detach(), ga


def rel(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256, help="rows B (default 256)")
    ap.add_argument("--classes", default="1000,100", help="comma-separated C (1000: ImageNet ResNet34 cost, 100: "
                    "CIFAR-100 resnet32x4 cost; default 1000,100)")
    ap.add_argument("--reg", type=float, default=0.05, help="entropic regularisation (default 0.05)")
    ap.add_argument("--iters", type=int, default=10, help="Sinkhorn iterations (default 10)")
    ap.add_argument("--eps", type=float, default=1e-8, help="denominator eps (default 1e-8, WKD-L's)")
    ap.add_argument("--seeds", type=int, default=3, help="random marginals per size; the max error is reported "
                    "(default 3)")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)

    rows = []
    for C in (int(c) for c in args.classes.split(",")):
        cost32, src = wkd_cost(C, 1.0, torch.float32)
        worst = {m: [0.0, 0.0] for m in MODES}
        for seed in range(args.seeds):
            a, b, _ = wkd_marginals(args.batch, C, torch.float32, "cpu", seed=seed)
            v64, g64 = value_and_grad(a.double(), b.double(), cost32.double(), args.reg, args.iters, args.eps, None)
            for name, mode in MODES.items():
                v, g = value_and_grad(a, b, cost32, args.reg, args.iters, args.eps, mode)
                worst[name][0] = max(worst[name][0], rel(v, v64))
                worst[name][1] = max(worst[name][1], rel(g, g64))
        for name in MODES:
            rows.append({"B": args.batch, "C": C, "cost": src, "products": name,
                         "err_value": f"{worst[name][0]:.1e}", "err_grad": f"{worst[name][1]:.1e}"})
            print(f"C={C} {name}: value {worst[name][0]:.1e}, grad {worst[name][1]:.1e}", flush=True)
    print()
    print_table(rows, ["B", "C", "cost", "products", "err_value", "err_grad"])
    print(f"\n(max over {args.seeds} seeds; reg {args.reg}, {args.iters} iterations, eps {args.eps}; "
          "errors relative to the float64 loop)")
    save(rows, vars(args), json_path=args.json)


if __name__ == "__main__":
    main()
