"""wkd_kernels.interrelations.cka_distance (all pairs in batched products) against the per-pair loop.

The published tool computes d_ij = 1 - CKA(X_i, X_j) pair by pair in a Python loop, C^2 calls. Two per-pair
loops are timed, both computing every (i, j) entry, as the published tool does:
  * "per-pair (DxD)": the published formula ||X~_j^T X~_i||_F^2 / (||X~_i^T X~_i||_F ||X~_j^T X~_j||_F)
    (D x D products);
  * "per-pair (HKH nxn)" (rbf kernel): the common reference code, H K H centring of n x n kernel matrices;
  * "per-pair (nxn)": the cheapest per-pair form, <K~_i, K~_j> / (||K~_i|| ||K~_j||) on n x n centred Grams
    recomputed per pair (linear only).
Where the full loop would take too long (C^2 > --full-max, e.g. C=1000: 10^6 calls), the loop runs on `--pairs`
random pairs and its time is extrapolated linearly to C^2 (marked "extrapolated from N pairs"); the error column
compares the loop with ours on the pairs it computed. Features are random class-structured [C, n, D] tensors (the
timing depends on shapes only). Ours runs in float64 (the default) and float32; the loops in float32 (their usual
dtype) with the difference measured against ours in float64.

Rows (bench/README.md schema, op "cka_distance", mode "fwd", written to --out as they are measured): one per method;
max_rel_err is max |d - d_ours64| / max |d_ours64| over the off-diagonal entries computed (ours in float64 is the
reference, its own row leaves the column empty); a loop timed on a subset of pairs has one time, extrapolated.

Usage: python bench/bench_interrelations.py [--device cpu|cuda] [--sizes 100x50x256,1000x50x1000]
       [--full-max 10000] [--pairs 2000] [--kernels linear,rbf] [--threads N] [--out DIR]
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import REPO, ROW_FIELDS, RowWriter, bench_row, device_name, markdown_table, time_fn  # noqa: E402

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


def main(argv=None):
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
    ap.add_argument("--out", default=str(REPO / "bench_results"),
                    help="folder for bench_interrelations.csv/.json/.md (default: bench_results/ in the checkout)")
    args = ap.parse_args(argv)
    dev = args.device
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dev_name = device_name(dev)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "bench_interrelations")
    writer = RowWriter(f"{stem}.csv", f"{stem}.json", f"{stem}.md",
                       meta={"device": dev_name, "torch": torch.__version__, "argv": sys.argv[1:]})
    print(f"# cka_distance vs the per-pair loop on {dev_name} (torch {torch.__version__}); times: median ms")
    for size in args.sizes.split(","):
        C, n, D = (int(v) for v in size.split("x"))
        x = class_features(C, n, D, dev)
        for kernel in args.kernels.split(","):
            ref64 = cka_distance(x, kernel)  # float64 compute
            t64 = time_fn(functools.partial(cka_distance, x, kernel), dev, warmup=1, reps=args.reps, keep_times=True)
            t32 = time_fn(functools.partial(cka_distance, x, kernel, compute_dtype=torch.float32), dev, warmup=1,
                          reps=args.reps, keep_times=True)
            scale = ref64.abs().max().item()
            d32 = (cka_distance(x, kernel, compute_dtype=torch.float32).double() - ref64.double()).abs().max().item()
            shape = f"C={C} n={n} D={D} kernel={kernel}"
            for label, t, err, note in (("wkd_kernels (compute float64)", t64, None, "the reference of the rows"),
                                        ("wkd_kernels (compute float32)", t32, d32 / scale, "")):
                writer.add(bench_row("cka_distance", label, "fwd", shape, x.dtype, dev_name,
                                     times_ms=t["times_ms"], max_rel_err=err, note=note))
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
                writer.add(bench_row("cka_distance", f"per-pair loop ({form}) fp32", "fwd", shape, "float32",
                                     dev_name, times_ms=[t_loop], max_rel_err=diff / scale,
                                     note=f"{note}; x{t_loop / t64['median_ms']:.3g} the time of ours (float64)"))
    print(markdown_table(writer.rows, ROW_FIELDS))
    print(f"# rows written to {stem}.csv, .json, .md")
    return writer.rows


if __name__ == "__main__":
    main()
