"""wkd_kernels.gaussian_wasserstein (WKD-F) per backend against the published and plain-PyTorch formulations.

Each size N x C x H x W, covariance (diag / full) and grid (1 / 4): seeded ReLU student and teacher feature maps
(the student correlated with the teacher); our op gives the squared 2-Wasserstein distance per sample (and cell),
eps 1e-5 (the published WKD-F value). The backward differentiates it w.r.t. the student features. Our op's path:
"diag"; "low-rank" (full covariance, every cell has m < C positions: the nuclear norm of the m x m cross-Gram,
exact, eps not used); "CxC" (full, m >= C: C x C covariances plus eps I and the Bures formula). Baselines:
  diag     published : the published WKD-F formula in plain PyTorch (slice every cell, mean/var, sqrt(var + eps)).
  full     eigh      : C x C covariances (plus eps I) and the Bures formula with torch.linalg.eigh square roots.
           pot       : POT's ot.gaussian.bures_wasserstein_distance (paired, torch backend) on the same covariances.
  low-rank svdvals   : the low-rank identity of docs/design.md 4 with torch.linalg.svdvals of the m x m cross-Gram.
           eigvalsh  : the same with torch.linalg.eigvalsh of M^T M.
           ns_matmul : the same with 20 coupled Newton-Schulz steps on M^T M as plain batched matmuls (autograd).
The C x C baselines (eigh, pot) run on every full-covariance case with eps I added, as our C x C path does (on the
low-rank path ours adds none: there they solve the regularised problem, and their max_rel_err includes that
difference); they are skipped (rows without times, the reason in "note") where N * cells * C^3 exceeds
--dense-max-work. --time-limit skips the sizes that would start after it (the rows measured so far are on disk).
Reference (the error column), float64:
diag: wkd_kernels.reference.published_wkd_feature_diag; CxC: wkd_kernels.reference.gaussian_wasserstein_reference
(eigh, eps I); low-rank: the svdvals baseline in float64 (the low-rank identity is exact; the C x C reference has an
unbounded gradient at these rank-deficient covariances, eps = 0).

    python bench/bench_gaussian_wasserstein.py           # 256x512x7x7 and 256x64x56x56, diag and full, grid 1 and 4
    python bench/bench_gaussian_wasserstein.py --device cuda --sizes 256x512x7x7 --reps 10 --time-limit 200
    python bench/bench_gaussian_wasserstein.py --smoke --out /tmp/b
"""
from __future__ import annotations

import functools
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _opbench as ob  # noqa: E402
from bench_sqrtm import eigh_sqrt  # noqa: E402

import wkd_kernels as wk  # noqa: E402
from wkd_kernels import reference as ref  # noqa: E402
from wkd_kernels.ops.checks import cell_sizes  # noqa: E402
from wkd_kernels.ops.gaussian_wasserstein import cell_gather_index  # noqa: E402

EPS = 1e-5


def features(N, C, H, W, dtype, device, seed=0):
    """Seeded student and teacher feature maps [N, C, H, W]: f_t = relu(g1), f_s = relu(0.7 g1 + 0.7 g2)."""
    g = torch.Generator().manual_seed(seed)
    f_t = torch.randn(N, C, H, W, generator=g).relu()
    f_s = (0.7 * f_t + 0.7 * torch.randn(N, C, H, W, generator=g)).relu()
    return f_s.to(device, dtype), f_t.to(device, dtype)


# ------------------------------------------------------------------------------------------------ baselines
def published_diag(f_s, f_t, grid):
    return ref.published_wkd_feature_diag(f_s, f_t, grid, eps=EPS)


def _dense_stats(f, grid):
    mu, S = ref.feature_stats_reference(f, grid, True, True, dtype=f.dtype)
    return mu, S + EPS * torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)


def eigh_full(f_s, f_t, grid):
    mu_s, S_s = _dense_stats(f_s, grid)
    mu_t, S_t = _dense_stats(f_t, grid)
    R = eigh_sqrt(S_s)
    cross = eigh_sqrt(R @ S_t @ R).diagonal(0, -2, -1).sum(-1)
    tr = lambda A: A.diagonal(0, -2, -1).sum(-1)  # noqa: E731
    return (mu_s - mu_t).square().sum(-1) + tr(S_s) + tr(S_t) - 2 * cross


def pot_full(f_s, f_t, grid):
    import ot

    mu_s, S_s = _dense_stats(f_s, grid)
    mu_t, S_t = _dense_stats(f_t, grid)
    N, P, C = mu_s.shape
    d = ot.gaussian.bures_wasserstein_distance(mu_s.reshape(N * P, C), mu_t.reshape(N * P, C),
                                               S_s.reshape(N * P, C, C), S_t.reshape(N * P, C, C), paired=True)
    return d.square().view(N, P)


def _cross_gram(f_s, f_t, grid):
    """Centred cell features -> (mean term, trace terms, M = Xs^T Xt, den): the low-rank identity in plain torch."""
    N, C, H, W = f_s.shape
    idx, mask, m = cell_gather_index(H, W, grid, f_s.device)
    mask, m = mask.to(f_s.dtype), m.to(f_s.dtype)
    Xs = f_s.flatten(2)[:, :, idx].permute(0, 2, 1, 3) * mask[None, :, None, :]
    Xt = f_t.flatten(2)[:, :, idx].permute(0, 2, 1, 3) * mask[None, :, None, :]
    mu_s, mu_t = Xs.sum(-1) / m[:, None], Xt.sum(-1) / m[:, None]
    Xs = (Xs - mu_s.unsqueeze(-1)) * mask[None, :, None, :]
    Xt = (Xt - mu_t.unsqueeze(-1)) * mask[None, :, None, :]
    return (mu_s - mu_t).square().sum(-1), Xs.square().sum((-1, -2)) + Xt.square().sum((-1, -2)), Xs.mT @ Xt, m - 1


def svdvals_lowrank(f_s, f_t, grid):
    mean_term, traces, M, den = _cross_gram(f_s, f_t, grid)
    return mean_term + (traces - 2 * torch.linalg.svdvals(M).sum(-1)) / den


def eigvalsh_lowrank(f_s, f_t, grid):
    mean_term, traces, M, den = _cross_gram(f_s, f_t, grid)
    nuc = torch.linalg.eigvalsh(M.mT @ M).clamp_min(0).sqrt().sum(-1)
    return mean_term + (traces - 2 * nuc) / den


def ns_matmul_lowrank(f_s, f_t, grid, iters=20):
    mean_term, traces, M, den = _cross_gram(f_s, f_t, grid)
    A = M.mT @ M
    n = A.shape[-1]
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    c = A.diagonal(0, -2, -1).sum(-1)[..., None, None].clamp_min(1e-30)
    Y, Z = A / c, eye.expand_as(A)
    for _ in range(iters):
        T = 1.5 * eye - 0.5 * Z @ Y
        Y, Z = Y @ T, T @ Z
    nuc = (Y.diagonal(0, -2, -1).sum(-1)) * c[..., 0, 0].sqrt()
    return mean_term + (traces - 2 * nuc) / den


# name -> (kind: the covariance paths it applies to, label, function(f_s, f_t, grid) -> [N, P])
BASELINES = {
    "published": ("diag", "published diag formula (plain PyTorch)", published_diag),
    "eigh": ("full", "plain PyTorch (CxC covariances, eigh)", eigh_full),
    "pot": ("full", "POT (bures_wasserstein_distance)", pot_full),
    "svdvals": ("low-rank", "plain PyTorch (low-rank, svdvals)", svdvals_lowrank),
    "eigvalsh": ("low-rank", "plain PyTorch (low-rank, eigvalsh)", eigvalsh_lowrank),
    "ns_matmul": ("low-rank", "plain PyTorch (low-rank, Newton-Schulz matmuls)", ns_matmul_lowrank),
}


def _per_sample(fn, grid):
    """fn(f_s, f_t, grid) -> [N, P] shaped like our op's output ([N] at grid 1)."""
    return lambda f_s, f_t: (lambda w: w[:, 0] if grid == 1 else w)(fn(f_s, f_t, grid))


def make_cases(sizes, args):
    """One Case per size, covariance and grid: inputs (f_s, f_t), f_s differentiated."""
    for N, C, H, W in sizes:
        f_s, f_t = features(N, C, H, W, args.torch_dtype, args.device)
        for cov in args.covariances:
            for grid in args.grids:
                if grid > min(H, W):
                    continue
                low_rank = cov == "full" and max(cell_sizes(H, W, grid)) < C
                path = "diag" if cov == "diag" else ("low-rank" if low_rank else "CxC")
                methods = [ob.Method(bk, functools.partial(wk.gaussian_wasserstein, covariance=cov, grid=grid,
                                                             eps=EPS, backend=bk)) for bk in args.backends]
                skipped = []
                for name in args.baselines:
                    kind, label, fn = BASELINES[name]
                    if kind != path and not (kind == "full" and cov == "full"):
                        continue
                    if kind == "full" and N * grid * grid * C ** 3 > args.dense_max_work:
                        skipped.append((label, f"skipped: N cells C^3 > --dense-max-work {args.dense_max_work:.0e}"))
                    elif name == "pot" and importlib.util.find_spec("ot") is None:
                        skipped.append((label, "skipped: POT is not installed"))
                    else:
                        note = "eps I added (ours: none on this path)" if kind == "full" and low_rank else ""
                        methods.append(ob.Method(label, _per_sample(fn, grid), note))
                if path == "diag":
                    reference = _per_sample(published_diag, grid)
                elif path == "CxC":
                    reference = _per_sample(lambda a, b, g: ref.gaussian_wasserstein_reference(a, b, "full", g, EPS),
                                            grid)
                else:
                    reference = _per_sample(svdvals_lowrank, grid)
                yield ob.Case(shape=f"N={N} C={C} H={H} W={W} cov={cov} grid={grid}", inputs=(f_s, f_t),
                              grad_inputs=(0,), reference=reference, methods=methods, skipped=skipped,
                              note=f"our path: {path}")


def main(argv=None):
    ap = ob.build_parser(__doc__, "256x512x7x7,256x64x56x56", "4x32x4x4,3x8x6x6",
                         "comma-separated NxCxHxW feature-map shapes", tuple(BASELINES))
    ap.add_argument("--covariances", default="diag,full", help="comma-separated diag, full; default: %(default)s")
    ap.add_argument("--grids", default="1,4",
                    help="comma-separated cells per side; default: %(default)s (--smoke: 1,2)")
    ap.add_argument("--dense-max-work", type=float, default=None,
                    help="skip the C x C baselines (eigh, pot) where N * cells * C^3 exceeds this; default: 5e9 on "
                         "CPU, no limit on CUDA")
    args = ap.parse_args(argv)
    if args.smoke and args.grids == "1,4":
        args.grids = "1,2"
    args = ob.resolve(args, "gaussian_wasserstein", has_cuda_cpp=False, baselines=tuple(BASELINES))
    if args.dense_max_work is None:
        args.dense_max_work = float("inf") if args.device == "cuda" else 5e9
    args.covariances = ob.parse_list(args.covariances, "covariances", ("diag", "full"))
    args.grids = [int(g) for g in ob.parse_list(args.grids, "grids")]
    sizes = ob.parse_sizes(args.sizes, 4, "256x512x7x7,256x64x56x56")
    return ob.run(make_cases(sizes, args), args, meta={"eps": EPS})


if __name__ == "__main__":
    main()
