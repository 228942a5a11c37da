"""wkd_kernels.sqrtm per backend against plain PyTorch's eigendecomposition, on WKD-F's C x C covariances.

Each size B x n: B symmetric positive definite n x n matrices S = X X^T / (2n) + 1e-3 I (X seeded Gaussian
[n, 2n]: well-conditioned, like covariances of many positions plus WKD-F's eps I). The default sizes are the C x C
path of WKD-F on ResNet's first stage (C=64 channels, 56x56 positions): 256 covariances at grid 1, 256 * 16 at
grid 4. The backward differentiates S^1/2 w.r.t. S. Baseline "plain PyTorch (eigh)": V diag(sqrt(max(l, 0))) V^T
from torch.linalg.eigh with autograd. Reference: wkd_kernels.reference.sqrtm_reference (eigh in float64).

    python bench/bench_sqrtm.py                          # 256x64 and 4096x64, method newton_schulz
    python bench/bench_sqrtm.py --method eigh --smoke --out /tmp/b
"""
from __future__ import annotations

import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _opbench as ob  # noqa: E402

import wkd_kernels as wk  # noqa: E402
from wkd_kernels.reference import sqrtm_reference  # noqa: E402

BASELINES = ("eigh",)


def spd_batch(B, n, dtype, device, seed=0):
    """B seeded symmetric positive definite n x n matrices X X^T / (2n) + 1e-3 I."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, n, 2 * n, generator=g, dtype=torch.float64)
    S = X @ X.mT / (2 * n) + 1e-3 * torch.eye(n, dtype=torch.float64)
    return S.to(device, dtype)


def eigh_sqrt(S):
    """Plain PyTorch principal square root by eigendecomposition (autograd through eigh)."""
    L, V = torch.linalg.eigh(S)
    return (V * L.clamp_min(0).sqrt().unsqueeze(-2)) @ V.mT


def make_case(B, n, args):
    """The Case of one size: input S, differentiated."""
    S = spd_batch(B, n, args.torch_dtype, args.device)
    methods = [ob.Method(bk, functools.partial(wk.sqrtm, method=args.method, backend=bk), f"method={args.method}")
               for bk in args.backends]
    if "eigh" in args.baselines:
        methods.append(ob.Method("plain PyTorch (eigh)", eigh_sqrt))
    return ob.Case(shape=f"B={B} n={n}", inputs=(S,), grad_inputs=(0,), reference=sqrtm_reference,
                   methods=methods)


def main(argv=None):
    ap = ob.build_parser(__doc__, "256x64,4096x64", "4x8,3x16", "comma-separated Bxn (B matrices n x n)", BASELINES)
    ap.add_argument("--method", default="newton_schulz", choices=["newton_schulz", "eigh"],
                    help="our op's method; default: %(default)s")
    args = ob.resolve(ap.parse_args(argv), "sqrtm", has_cuda_cpp=False, baselines=BASELINES)
    sizes = ob.parse_sizes(args.sizes, 2, "256x64,4096x64")
    return ob.run((make_case(B, n, args) for B, n in sizes), args, meta={"method": args.method})


if __name__ == "__main__":
    main()
