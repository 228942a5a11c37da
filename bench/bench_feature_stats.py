"""wkd_kernels.feature_stats per backend against the published cell-slicing statistics, on ResNet feature maps.

Each size N x C x H x W, covariance (diag / full) and grid (1 / 4): seeded ReLU feature maps (like the teacher maps
of bench_gaussian_wasserstein.features); our op returns the per-sample (per-cell) mean and variance (diag) or C x C
covariance (full), unbiased. The backward differentiates both outputs (fixed seeded cotangents) w.r.t. the features.
Baseline "plain PyTorch (cell slicing)": the published code's loop, slicing every adaptive-pooling cell and taking
mean and (co)variance with ATen ops and autograd (wkd_kernels.reference.feature_stats_reference in the benchmark
dtype). Reference: the same in float64. The default sizes are WKD-F's ResNet feature maps: the last stage of
ResNet34/18 on ImageNet (256x512x7x7) and the first stage (256x64x56x56).

    python bench/bench_feature_stats.py                  # 256x512x7x7 and 256x64x56x56, diag and full, grid 1 and 4
    python bench/bench_feature_stats.py --smoke --out /tmp/b
"""
from __future__ import annotations

import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _opbench as ob  # noqa: E402

import wkd_kernels as wk  # noqa: E402
from wkd_kernels.reference import feature_stats_reference  # noqa: E402

BASELINES = ("slicing",)


def feature_map(N, C, H, W, dtype, device, seed=0):
    """Seeded non-negative feature map [N, C, H, W] (ReLU of a Gaussian, like post-activation features)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, C, H, W, generator=g).relu().to(device, dtype)


def slicing_stats(grid, full, dtype):
    """The published cell-slicing statistics in ``dtype``, shaped like our op's output (no cell axis at grid 1)."""
    def stats(x):
        mean, second = feature_stats_reference(x, grid, full, True, dtype=dtype)
        return (mean[:, 0], second[:, 0]) if grid == 1 else (mean, second)
    return stats


def make_cases(sizes, args):
    """One Case per size, covariance and grid (grids larger than the map are left out): input x, differentiated."""
    for N, C, H, W in sizes:
        x = feature_map(N, C, H, W, args.torch_dtype, args.device)
        for cov in args.covariances:
            for grid in args.grids:
                if grid > min(H, W):
                    continue
                full = cov == "full"
                methods = [ob.Method(bk, functools.partial(wk.feature_stats, grid=grid, covariance=cov, backend=bk))
                           for bk in args.backends]
                if "slicing" in args.baselines:
                    methods.append(ob.Method("plain PyTorch (cell slicing)", slicing_stats(grid, full, x.dtype)))
                yield ob.Case(shape=f"N={N} C={C} H={H} W={W} cov={cov} grid={grid}", inputs=(x,), grad_inputs=(0,),
                              reference=slicing_stats(grid, full, torch.float64), methods=methods)


def main(argv=None):
    ap = ob.build_parser(__doc__, "256x512x7x7,256x64x56x56", "4x16x4x4,3x8x6x6",
                         "comma-separated NxCxHxW feature-map shapes", BASELINES)
    ap.add_argument("--covariances", default="diag,full", help="comma-separated diag, full; default: %(default)s")
    ap.add_argument("--grids", default="1,4",
                    help="comma-separated cells per side; default: %(default)s (--smoke: 1,2)")
    args = ap.parse_args(argv)
    if args.smoke and args.grids == "1,4":
        args.grids = "1,2"
    args = ob.resolve(args, "feature_stats", has_cuda_cpp=False, baselines=BASELINES)
    args.covariances = ob.parse_list(args.covariances, "covariances", ("diag", "full"))
    args.grids = [int(g) for g in ob.parse_list(args.grids, "grids")]
    sizes = ob.parse_sizes(args.sizes, 4, "256x512x7x7,256x64x56x56")
    return ob.run(make_cases(sizes, args), args)


if __name__ == "__main__":
    main()
