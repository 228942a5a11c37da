"""wkd_kernels.nuclear_norm per backend against plain PyTorch's singular values, on WKD-F's low-rank path.

Each size B x p x q: B seeded matrices M = Xs^T Xt / c of correlated Gaussian feature matrices Xs, Xt [c, p|q],
c = 2 max(p, q) (cross-Grams like the m x m ones WKD-F's low-rank path takes the nuclear norm of; docs/design.md
section 4). They are not centred: centring makes M rank-deficient, where the gradient is a subgradient that the
error column could not compare with the reference's. The
default sizes are that path on ResNet's last stages: m = 7 x 7 = 49 positions (C=512 or 2048) and 14 x 14 = 196
(C=256), 256 samples. The backward differentiates |M|_* w.r.t. M. Baseline "plain PyTorch (svdvals)":
torch.linalg.svdvals(M).sum(-1) with autograd. Reference: wkd_kernels.reference.nuclear_norm_reference (float64).

    python bench/bench_nuclear_norm.py                   # 256x49x49 and 256x196x196
    python bench/bench_nuclear_norm.py --smoke --out /tmp/b
"""
from __future__ import annotations

import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _opbench as ob  # noqa: E402

import wkd_kernels as wk  # noqa: E402
from wkd_kernels.reference import nuclear_norm_reference  # noqa: E402

BASELINES = ("svdvals",)


def cross_grams(B, p, q, dtype, device, seed=0):
    """B seeded full-rank cross-Gram matrices Xs^T Xt / c [p, q] of correlated Gaussian features (c = 2 max(p, q))."""
    g = torch.Generator().manual_seed(seed)
    c = 2 * max(p, q)
    Xs = torch.randn(B, c, p, generator=g, dtype=torch.float64)
    Xt = 0.7 * Xs[..., :q] if q <= p else torch.randn(B, c, q, generator=g, dtype=torch.float64)
    Xt = Xt + 0.7 * torch.randn(B, c, q, generator=g, dtype=torch.float64)
    return (Xs.mT @ Xt / c).to(device, dtype)


def svdvals_nuclear(M):
    """Plain PyTorch nuclear norm: the sum of torch.linalg.svdvals (autograd through the SVD)."""
    return torch.linalg.svdvals(M).sum(-1)


def make_case(B, p, q, args):
    """The Case of one size: input M, differentiated."""
    M = cross_grams(B, p, q, args.torch_dtype, args.device)
    methods = [ob.Method(bk, functools.partial(wk.nuclear_norm, backend=bk)) for bk in args.backends]
    if "svdvals" in args.baselines:
        methods.append(ob.Method("plain PyTorch (svdvals)", svdvals_nuclear))
    return ob.Case(shape=f"B={B} p={p} q={q}", inputs=(M,), grad_inputs=(0,), reference=nuclear_norm_reference,
                   methods=methods)


def main(argv=None):
    ap = ob.build_parser(__doc__, "256x49x49,256x196x196", "4x8x8,3x5x7", "comma-separated Bxpxq (B matrices p x q)",
                         BASELINES)
    args = ob.resolve(ap.parse_args(argv), "nuclear_norm", has_cuda_cpp=False, baselines=BASELINES)
    sizes = ob.parse_sizes(args.sizes, 3, "256x49x49,256x196x196")
    return ob.run((make_case(B, p, q, args) for B, p, q in sizes), args)


if __name__ == "__main__":
    main()
