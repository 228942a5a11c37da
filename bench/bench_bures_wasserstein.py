"""wkd_kernels.bures_wasserstein per backend against plain PyTorch (eigh) and POT, on WKD-F's C x C Gaussians.

Each size B x n: B pairs of Gaussians N(mu1, S1), N(mu2, S2) with seeded means and well-conditioned covariances
(bench_sqrtm.spd_batch; S2 from another seed). The default sizes are the C x C path of WKD-F on ResNet's first
stage (C=64 channels): 256 pairs at grid 1, 256 * 16 at grid 4. The backward differentiates the squared distance
w.r.t. the student's mu1 and S1. Baselines: "plain PyTorch (eigh)": |mu1 - mu2|^2 + tr S1 + tr S2
- 2 tr (S1^1/2 S2 S1^1/2)^1/2 with both roots by torch.linalg.eigh and autograd; "POT": the square of
ot.gaussian.bures_wasserstein_distance(..., paired=True) (torch backend; only when POT is installed).
Reference: wkd_kernels.reference.bures_wasserstein_reference (float64 eigh).

    python bench/bench_bures_wasserstein.py              # 256x64 and 4096x64, method newton_schulz
    python bench/bench_bures_wasserstein.py --smoke --out /tmp/b
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _opbench as ob  # noqa: E402
from bench_sqrtm import eigh_sqrt, spd_batch  # noqa: E402

import wkd_kernels as wk  # noqa: E402
from wkd_kernels.reference import bures_wasserstein_reference  # noqa: E402

BASELINES = ("eigh", "pot")


def eigh_bures(mu1, S1, mu2, S2):
    """Plain PyTorch squared Bures-Wasserstein distance with eigh square roots (autograd through eigh)."""
    R = eigh_sqrt(S1)
    cross = eigh_sqrt(R @ S2 @ R).diagonal(0, -2, -1).sum(-1)
    tr = lambda A: A.diagonal(0, -2, -1).sum(-1)  # noqa: E731
    return (mu1 - mu2).square().sum(-1) + tr(S1) + tr(S2) - 2 * cross


def pot_bures(mu1, S1, mu2, S2):
    """POT's paired Bures-Wasserstein distance, squared."""
    import ot

    return ot.gaussian.bures_wasserstein_distance(mu1, mu2, S1, S2, paired=True).square()


def make_case(B, n, args):
    """The Case of one size: inputs (mu1, S1, mu2, S2), mu1 and S1 differentiated."""
    g = torch.Generator().manual_seed(2)
    mu1 = torch.randn(B, n, generator=g).to(args.device, args.torch_dtype)
    mu2 = (0.5 * torch.randn(B, n, generator=g)).to(args.device, args.torch_dtype)
    S1 = spd_batch(B, n, args.torch_dtype, args.device, seed=0)
    S2 = spd_batch(B, n, args.torch_dtype, args.device, seed=1)
    methods = [ob.Method(bk, functools.partial(wk.bures_wasserstein, method=args.method, backend=bk),
                         f"method={args.method}") for bk in args.backends]
    skipped = []
    if "eigh" in args.baselines:
        methods.append(ob.Method("plain PyTorch (eigh)", eigh_bures))
    if "pot" in args.baselines:
        if importlib.util.find_spec("ot") is None:
            skipped.append(("POT (bures_wasserstein_distance)", "skipped: POT is not installed"))
        else:
            methods.append(ob.Method("POT (bures_wasserstein_distance)", pot_bures))
    return ob.Case(shape=f"B={B} n={n}", inputs=(mu1, S1, mu2, S2), grad_inputs=(0, 1),
                   reference=bures_wasserstein_reference, methods=methods, skipped=skipped)


def main(argv=None):
    ap = ob.build_parser(__doc__, "256x64,4096x64", "4x8,3x16", "comma-separated Bxn (B pairs of n-dim Gaussians)",
                         BASELINES)
    ap.add_argument("--method", default="newton_schulz", choices=["newton_schulz", "eigh"],
                    help="our op's method; default: %(default)s")
    args = ob.resolve(ap.parse_args(argv), "bures_wasserstein", has_cuda_cpp=False, baselines=BASELINES)
    sizes = ob.parse_sizes(args.sizes, 2, "256x64,4096x64")
    return ob.run((make_case(B, n, args) for B, n in sizes), args, meta={"method": args.method})


if __name__ == "__main__":
    main()
