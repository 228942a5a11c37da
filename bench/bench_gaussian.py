"""WKD-F Gaussian ops: wkd_kernels.gaussian_wasserstein against the published formulations (the paper's code and plain PyTorch), in the same run.

For every feature size [N, C, H, W], covariance (diag / full) and grid (1 / 4), student and teacher maps (float32 by
default) are compared with the squared 2-Wasserstein distance per sample (and cell); forward ("fwd") and forward +
backward w.r.t. the student features ("fwd+bwd") are timed (median after warm-up; CUDA events on GPU). Baselines:
  diag  published : the published WKD-F formula in plain PyTorch (slice every cell, mean/var, sqrt(var + eps)).
  full  eigh      : C x C covariances (plain PyTorch) and the Bures formula with torch.linalg.eigh square roots.
        pot       : POT's ot.gaussian.bures_wasserstein_distance (torch backend, paired) on the same covariances.
        svdvals   : the low-rank identity of docs/design.md 4 with torch.linalg.svdvals of the m x m cross-Gram.
        eigvalsh  : the same with torch.linalg.eigvalsh of M^T M.
        ns_matmul : the same with 20 coupled Newton-Schulz steps on M^T M as plain batched matmuls (autograd).
The low-rank baselines apply where every cell has m < C positions. A baseline whose first repetition on a
sub-batch predicts more than --baseline-budget seconds for the whole batch (or, on CUDA, would not fit in half the
free memory) is timed on a 2-sample sub-batch and extrapolated linearly in N (column "note"); C x C baselines above
--dense-max-work (N * cells * C^3) are skipped, and all baselines once --time-limit is reached (the GPU suite
allows 240 s). "x ours" is baseline time / our time. "rel err" is the largest
|W2 - W2_ref| / |W2_ref| over the first --check samples against the float64 reference (C x C eigendecomposition,
clamped eigenvalues, eps I added on the C x C path as ours does; the published formula in float64 for diag).

Usage: python bench/bench_gaussian.py [--device cpu|cuda] [--sizes 8x512x7x7,...] [--full-grid] [--dtype float32]
       [--reps 10] [--warmup 2] [--baseline-budget 20] [--baselines published,eigh,pot,svdvals,eigvalsh,ns_matmul]
       [--dense-max-work 5e9] [--time-limit 200] [--threads N] [--csv out.csv] [--json out.json]
Defaults: on CUDA the ResNet feature-map grid (256x512x7x7, 256x2048x7x7, 256x64x56x56, 256x256x14x14); on CPU small batches
(8 samples) of the same shapes plus the CPU target case 32x512x7x7 (full covariance vs eigh).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_name, print_table, save, time_fn  # noqa: E402

import wkd_kernels as wk  # noqa: E402
from wkd_kernels import reference as ref  # noqa: E402
from wkd_kernels.ops.checks import cell_sizes  # noqa: E402
from wkd_kernels.ops.gaussian_wasserstein import cell_gather_index  # noqa: E402

FULL_GRID = ["256x512x7x7", "256x2048x7x7", "256x64x56x56", "256x256x14x14"]
CPU_DEFAULT = ["8x512x7x7", "8x2048x7x7", "8x64x56x56", "8x256x14x14", "32x512x7x7"]
EPS = 1e-5


def features(N, C, H, W, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    f_t = torch.randn(N, C, H, W, generator=g).relu()
    f_s = (0.7 * f_t + 0.7 * torch.randn(N, C, H, W, generator=g)).relu()
    return f_s.to(device, dtype), f_t.to(device, dtype)


# ------------------------------------------------------------------------------------------------ baselines
def published_diag(f_s, f_t, grid):
    return ref.published_wkd_feature_diag(f_s, f_t, grid, eps=EPS)


def _eigh_sqrt(S):
    L, V = torch.linalg.eigh(S)
    return (V * L.clamp_min(0).sqrt().unsqueeze(-2)) @ V.mT


def _dense_stats(f, grid):
    mu, S = ref.feature_stats_reference(f, grid, True, True, dtype=f.dtype)
    return mu, S + EPS * torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)


def eigh_full(f_s, f_t, grid):
    mu_s, S_s = _dense_stats(f_s, grid)
    mu_t, S_t = _dense_stats(f_t, grid)
    R = _eigh_sqrt(S_s)
    cross = _eigh_sqrt(R @ S_t @ R).diagonal(0, -2, -1).sum(-1)
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


BASELINES = {
    "published": ("diag", published_diag),
    "eigh": ("full", eigh_full),
    "pot": ("full", pot_full),
    "svdvals": ("lowrank", svdvals_lowrank),
    "eigvalsh": ("lowrank", eigvalsh_lowrank),
    "ns_matmul": ("lowrank", ns_matmul_lowrank),
}


# ------------------------------------------------------------------------------------------------ timing
def timed(fn, f_s, f_t, device, warmup, reps, backward):
    x = f_s.detach().requires_grad_(backward)

    def run():
        out = fn(x, f_t)
        if backward:
            torch.autograd.grad(out.sum(), x)
        return out

    return time_fn(run, device, warmup=warmup, reps=reps)["median_ms"]


def timed_baseline(fn, f_s, f_t, device, args, backward, force_extrapolate=False):
    """Full batch when affordable, else a sub-batch extrapolated linearly in N. Returns (ms, note)."""
    N = f_s.shape[0]
    nb = min(N, 2)
    x = f_s[:nb].detach().requires_grad_(backward)
    t0 = time.perf_counter()
    out = fn(x, f_t[:nb])
    if backward:
        torch.autograd.grad(out.sum(), x)
    if device == "cuda":
        torch.cuda.synchronize()
    probe_s = time.perf_counter() - t0
    predicted = probe_s * N / nb * (args.warmup + args.reps)
    if predicted <= args.baseline_budget and not force_extrapolate:
        return timed(fn, f_s, f_t, device, args.warmup, args.reps, backward), ""
    reps = max(1, min(args.reps, int(args.baseline_budget / max(probe_s, 1e-9))))
    ms = timed(fn, f_s[:nb], f_t[:nb], device, 1 if probe_s < args.baseline_budget else 0, reps, backward)
    return ms * N / nb, f"extrapolated from {nb} samples"


def dense_bytes(N, P, C, dtype):
    """Rough peak memory of the C x C baselines (covariances, roots, eigenvectors, autograd buffers)."""
    return 12 * N * P * C * C * torch.finfo(dtype).bits // 8


def rel_err(w, f_s, f_t, cov, grid, n_check, eps):
    k = min(n_check, f_s.shape[0])
    with torch.no_grad():
        if cov == "diag":
            expected = ref.published_wkd_feature_diag(f_s[:k].cpu().double(), f_t[:k].cpu().double(), grid, eps=EPS)
        else:
            expected = ref.gaussian_wasserstein_reference(f_s[:k].cpu(), f_t[:k].cpu(), "full", grid, eps=eps)
    got = w[:k].detach().cpu().double().reshape(expected.shape)
    return float(((got - expected).abs() / expected.abs().clamp_min(1e-30)).max())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default=None, help="comma-separated NxCxHxW")
    p.add_argument("--full-grid", action="store_true", help="the ResNet feature-map N=256 grid (default on CUDA)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--grids", default="1,4")
    p.add_argument("--covariances", default="diag,full")
    p.add_argument("--baselines", default=",".join(BASELINES))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--baseline-budget", type=float, default=20.0, help="seconds per baseline before extrapolating")
    p.add_argument("--check", type=int, default=4, help="samples checked against the float64 reference")
    p.add_argument("--dense-max-work", type=float, default=None,
                   help="skip the C x C baselines (eigh, pot) when N * cells * C^3 exceeds this "
                        "(default: 5e9 on CPU, no limit on CUDA)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds after which remaining baselines are skipped (default: 200 on CUDA, 1800 on CPU)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--csv")
    p.add_argument("--json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    dtype = getattr(torch, args.dtype)
    if args.sizes:
        sizes = args.sizes.split(",")
    else:
        sizes = FULL_GRID if (device == "cuda" or args.full_grid) else CPU_DEFAULT
    grids = [int(g) for g in args.grids.split(",")]
    covs = args.covariances.split(",")
    wanted = [b for b in args.baselines.split(",") if b]
    dense_max_work = args.dense_max_work if args.dense_max_work is not None else (
        float("inf") if device == "cuda" else 5e9)
    time_limit = args.time_limit if args.time_limit is not None else (200.0 if device == "cuda" else 1800.0)
    t_start = time.perf_counter()

    meta = {"device": device_name(device), "dtype": args.dtype, "torch": torch.__version__, "build": wk.build_info(),
            "reps": args.reps, "warmup": args.warmup, "eps": EPS}
    print(f"# bench_gaussian: {meta['device']} ({device}), {args.dtype}, torch {torch.__version__}, "
          f"median of {args.reps} after {args.warmup} warm-up")
    rows = []
    for size in sizes:
        N, C, H, W = (int(v) for v in size.split("x"))
        f_s, f_t = features(N, C, H, W, dtype, device)
        for cov in covs:
            for grid in grids:
                if grid > min(H, W):
                    continue
                low_rank = max(cell_sizes(H, W, grid)) < C
                path = "diag" if cov == "diag" else ("low-rank" if low_rank else "CxC")

                def ours(a, b, cov=cov, grid=grid):
                    return wk.gaussian_wasserstein(a, b, cov, grid=grid, eps=EPS)

                fwd = timed(ours, f_s, f_t, device, args.warmup, args.reps, False)
                fb = timed(ours, f_s, f_t, device, args.warmup, args.reps, True)
                # the low-rank path is exact without regularisation (it ignores eps); the C x C path adds eps I
                err = rel_err(ours(f_s, f_t), f_s, f_t, cov, grid, args.check, EPS if path == "CxC" else 0.0)
                base = dict(size=size, cov=cov, grid=grid, path=path)
                rows.append(dict(base, impl="ours", fwd_ms=fwd, fwd_bwd_ms=fb, x_fwd=1.0, x_fwd_bwd=1.0,
                                 rel_err=err, note=""))
                for name in wanted:
                    kind, fn = BASELINES[name]
                    if (kind == "diag") != (cov == "diag") or (kind == "lowrank" and not low_rank):
                        continue
                    row = dict(base, impl=name)
                    if time.perf_counter() - t_start > time_limit:
                        rows.append(dict(row, note=f"skipped (--time-limit {time_limit:.0f} s reached)"))
                        continue
                    if kind == "full" and N * grid * grid * C ** 3 > dense_max_work:
                        rows.append(dict(row, note=f"skipped (N P C^3 > --dense-max-work {dense_max_work:.0e})"))
                        continue
                    big = kind == "full" and (device == "cuda" and dense_bytes(N, grid * grid, C, dtype)
                                              > 0.5 * torch.cuda.mem_get_info()[0])
                    try:
                        bf, note_f = timed_baseline(lambda a, b, fn=fn, grid=grid: fn(a, b, grid), f_s, f_t, device,
                                                    args, False, force_extrapolate=big)
                        bb, note_b = timed_baseline(lambda a, b, fn=fn, grid=grid: fn(a, b, grid), f_s, f_t, device,
                                                    args, True, force_extrapolate=big)
                        row.update(fwd_ms=bf, fwd_bwd_ms=bb, x_fwd=bf / fwd, x_fwd_bwd=bb / fb,
                                   note="; ".join(sorted({note_f, note_b} - {""})))
                    except Exception as exc:  # a baseline that cannot run here is reported, not fatal
                        row.update(note=f"failed: {type(exc).__name__}: {str(exc)[:60]}")
                        if device == "cuda":
                            torch.cuda.empty_cache()
                    rows.append(row)
                print(f"  done {size} {cov} grid={grid}", file=sys.stderr, flush=True)
    print()
    print_table(rows, ["size", "cov", "grid", "path", "impl", "fwd_ms", "fwd_bwd_ms", "x_fwd", "x_fwd_bwd", "rel_err",
                       "note"])
    print("\nx_fwd / x_fwd_bwd: baseline time / ours (higher = ours faster); rel_err: ours vs float64 reference.")
    save(rows, meta, args.csv, args.json)


if __name__ == "__main__":
    main()
