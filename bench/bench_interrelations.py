"""wkd_kernels.interrelations.cka_distance (all pairs in batched products) against the per-pair loop.

The published tool computes d_ij = 1 - CKA(X_i, X_j) pair by pair in a Python loop, C^2 calls. Two per-pair
loops are timed, both computing every (i, j) entry, as the published tool does:
  * "per-pair (DxD)": the published formula ||X~_j^T X~_i||_F^2 / (||X~_i^T X~_i||_F ||X~_j^T X~_j||_F)
    (D x D products);
  * "per-pair (HKH nxn)" (rbf kernel): the common reference code, H K H centring of n x n kernel matrices;
  * "per-pair (nxn)": the cheapest per-pair form, <K~_i, K~_j> / (||K~_i|| ||K~_j||) on n x n centred Grams
    recomputed per pair (linear only).
Where the full loop would take too long (C^2 > --full-max, e.g. C=1000: 10^6 calls), the loop runs on `--pairs`
random pairs and its time is extrapolated linearly to C^2 (marked "extrapolated from N pairs"); the max difference column compares ours with
the loop on the pairs it computed. Features are random class-structured [C, n, D] tensors (the timing depends on
shapes only). Ours runs in float64 (the default) and float32; the loops in float32 (their usual dtype) with the
difference measured against ours in float64.

Usage: python bench/bench_interrelations.py [--device cpu|cuda] [--sizes 100x50x256,1000x50x1000]
       [--full-max 10000] [--pairs 2000] [--kernels linear,rbf] [--threads N] [--csv out.csv] [--json out.json]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_name, print_table, save, time_fn  # noqa: E402

from wkd_kernels.interrelations import cka_distance  # noqa: E402


def class_features(C, n, D, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(C, 1, D, generator=g)
    x = torch.randn(C, n, D, generator=g) + 0.5 * base
    return x.to(device)


# ----------------------------------------------------------------------------- per-pair loops (the baseline)
def _linear_cka_dd(X, Y):
    X = X - X.mean(0)
    Y = Y - Y.mean(0)
    return torch.linalg.norm(Y.T @ X) ** 2 / (torch.linalg.norm(X.T @ X) * torch.linalg.norm(Y.T @ Y))


def _linear_cka_nn(X, Y):
    X = X - X.mean(0)
    Y = Y - Y.mean(0)
    Kx, Ky = X @ X.T, Y @ Y.T
    return (Kx * Ky).sum() / (torch.linalg.norm(Kx) * torch.linalg.norm(Ky))


def _centering(K):
    n = K.shape[0]
    H = torch.eye(n, dtype=K.dtype, device=K.device) - 1.0 / n
    return H @ K @ H


def _rbf(X):
    GX = X @ X.T
    KX = torch.diag(GX) - GX + (torch.diag(GX) - GX).T
    sigma2 = torch.quantile(KX[KX != 0], 0.5)
    return torch.exp(KX * (-0.5 / sigma2))


def _rbf_cka(X, Y):
    Kx, Ky = _centering(_rbf(X)), _centering(_rbf(Y))
    return (Kx * Ky).sum() / torch.sqrt((Kx * Kx).sum() * (Ky * Ky).sum())


PAIR_FNS = {("linear", "DxD"): _linear_cka_dd, ("linear", "nxn"): _linear_cka_nn, ("rbf", "HKH nxn"): _rbf_cka}


def per_pair_loop(x, fn, pairs):
    """Python loop over (i, j): one CKA call per pair, like the published tool. Returns {(i, j): d_ij}."""
    out = {}
    for i, j in pairs:
        out[(i, j)] = 1.0 - float(fn(x[i], x[j]))
    return out


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", default="100x50x256,1000x50x1000", help="CxnxD list")
    ap.add_argument("--kernels", default="linear,rbf")
    ap.add_argument("--full-max", type=int, default=10000,
                    help="the per-pair loop runs all C^2 pairs when C^2 <= this (C=100), else --pairs of them")
    ap.add_argument("--pairs", type=int, default=2000, help="pairs the loop runs on when C^2 > --full-max")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads for both methods (0: torch's default); on a shared, busy machine "
                         "1 avoids the OpenMP oversubscription that slows every small product down 10-30x")
    ap.add_argument("--csv")
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = args.device
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes.split(","):
        C, n, D = (int(v) for v in size.split("x"))
        x = class_features(C, n, D, dev)
        for kernel in args.kernels.split(","):
            ref64 = cka_distance(x, kernel)  # float64 compute
            t64 = time_fn(lambda: cka_distance(x, kernel), dev, warmup=1, reps=args.reps)["median_ms"]
            t32 = time_fn(lambda: cka_distance(x, kernel, compute_dtype=torch.float32), dev, warmup=1,
                          reps=args.reps)["median_ms"]
            d32 = (cka_distance(x, kernel, compute_dtype=torch.float32).double() - ref64.double()).abs().max().item()
            for (k, form), fn in PAIR_FNS.items():
                if k != kernel:
                    continue
                total = C * C
                if total <= args.full_max:
                    pairs = [(i, j) for i in range(C) for j in range(C)]
                    note = "measured (all pairs)"
                else:
                    g = torch.Generator().manual_seed(1)
                    flat = torch.randperm(total, generator=g)[:args.pairs].tolist()
                    pairs = [(p // C, p % C) for p in flat]
                    note = f"extrapolated from {len(pairs)} pairs"
                per_pair_loop(x, fn, pairs[:20])  # warm-up
                _sync(dev)
                t0 = time.perf_counter()
                got = per_pair_loop(x, fn, pairs)
                _sync(dev)
                t_loop = (time.perf_counter() - t0) * 1e3 * total / len(pairs)
                diff = max(abs(v - float(ref64[i, j])) for (i, j), v in got.items() if i != j)
                rows.append({
                    "C": C, "n": n, "D": D, "kernel": kernel, "baseline": f"per-pair ({form}) fp32",
                    "baseline_ms": t_loop, "baseline_note": note,
                    "ours_fp64_ms": t64, "ours_fp32_ms": t32,
                    "speedup_fp64": t_loop / t64, "speedup_fp32": t_loop / t32,
                    "max_abs_diff_loop_vs_ours": diff, "max_abs_diff_ours_fp32_vs_fp64": d32,
                })
    meta = {"device": device_name(dev), "torch": torch.__version__}
    print(f"# cka_distance vs the per-pair loop on {meta['device']} (torch {meta['torch']}); times: median ms")
    print_table(rows, ["C", "n", "D", "kernel", "baseline", "baseline_ms", "baseline_note", "ours_fp64_ms",
                       "ours_fp32_ms", "speedup_fp64", "speedup_fp32", "max_abs_diff_loop_vs_ours",
                       "max_abs_diff_ours_fp32_vs_fp64"])
    save(rows, meta, args.csv, args.json)


if __name__ == "__main__":
    main()
