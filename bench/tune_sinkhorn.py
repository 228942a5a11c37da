"""tune_sinkhorn: times the launch configurations of the Sinkhorn kernels, one schema row per configuration.

Sweeps (each off unless named; a tuning run is a command of its own on the GPU machine, after the build; the CUDA
C++ sweeps need a build with the benchmark-only ops: WKD_BUILD_TUNING_OPS=1, which bash bench/gpu_suite.sh
--tuning-ops sets for its build, so that the suite's one build serves the sweep too):

  --sweep-tiles       the Triton per-half-iteration kernels (n or m > 256) at the first --sizes entry with n or m >
                      256, with each float32 tile of sk.DOT_CONFIG_CANDIDATES (BLOCK_B x BLOCK_N x BLOCK_K x warps)
                      (smoke: at the first smoke size, with the single-launch kernels turned off);
  --sweep-onchip      the Triton single-launch kernels (n, m <= 256) with each float32 scaling-domain configuration of
                      sk.ONCHIP_CONFIG_CANDIDATES (tl.dot for BLOCK_B >= 16, broadcast products below) at every
                      --sizes entry with n, m <= 256;
  --sweep-cuda-tiles  the CUDA C++ per-half-iteration kernels: auto and every entry of the tile table, at the first
                      size with n or m > 256;
  --sweep-cuda-rows   the CUDA C++ single-launch kernels: rows per CTA auto, 1, 2, 4, 8, 16 at every size with n, m
                      <= 256 (256x100 among the defaults; the note gives the plan that ran, which may lower R to fit
                      shared memory);
  --sweep-precision   the Triton sweeps once per tl.dot precision of this comma-separated list (default: ieee).

Each row: op "sinkhorn", mode "fwd+bwd", backend naming the configuration, median / p20 / p80 of the CUDA-graphed
forward+backward (eager on CPU; the note adds the eager median on CUDA), max_rel_err of value, grad_a, grad_b vs the
float64 CPU op (bench/gpu_quick.reference), and the verdict first in the note: "ok", "ABOVE threshold" (the
thresholds of gpu_quick) or, for a CUDA C++ row, "NOT BITWISE" when u, v or the gradients differ from the automatic
choice's bits (the value too, except under a forced tile: its partial sums follow the tile width). The CUDA C++
configurations are passed per call to the benchmarking ops torch.ops.wkd_tuning.* (bench/cuda/sinkhorn_tuning_ops.cu,
in a build with WKD_BUILD_TUNING_OPS=1; one build serves the sweep); the one function cuda_tuning_op() reaches them.
OUT/tune_sinkhorn.json, .md and .csv are rewritten after every row.

Usage:
    bash bench/gpu_suite.sh --tuning-ops OUTDIR   # (or WKD_BUILD_TUNING_OPS=1 pip install --no-build-isolation -e .)
    python bench/tune_sinkhorn.py --sweep-tiles --sweep-onchip --sweep-cuda-tiles --sweep-cuda-rows --out OUT
    TRITON_INTERPRET=1 python bench/tune_sinkhorn.py --device cpu --smoke --sweep-tiles --sweep-onchip --out /tmp/t
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_quick as gq  # noqa: E402
from _common import REPO, RowWriter, bench_row, capture_cuda_graph, device_name  # noqa: E402

DEFAULT_SIZES = "256x1000,256x100,256x91,2048x100,4096x81"
SMOKE_SIZES = "8x20,5x13x11"
ROWS_PER_BLOCK = (-1, 1, 2, 4, 8, 16)  # -1: the automatic choice


def cuda_tuning_op(name: str):
    """torch.ops.wkd_tuning.<name> (bench/cuda/sinkhorn_tuning_ops.cu: wkd::sinkhorn / sinkhorn_backward
    with the tile table entry and the rows per CTA as per-call arguments, num_tiles, tile_table, small_plan), or
    None in a build without them (they are built only with WKD_BUILD_TUNING_OPS=1). Every use of those ops goes
    through here."""
    try:
        ops = torch.ops.wkd_tuning
        return getattr(ops, name) if ops.num_tiles is not None else None
    except (AttributeError, RuntimeError):
        return None


def cuda_unavailable(device: str):
    if device != "cuda":
        return "the CUDA C++ kernels need --device cuda"
    if cuda_tuning_op("sinkhorn") is None:
        return (f"no torch.ops.wkd_tuning in this build (built with WKD_BUILD_TUNING_OPS=1 only: "
                f"bash bench/gpu_suite.sh --tuning-ops; {gq.wk.build_info()})")
    return None


# ============================================================================================ measuring one config
def measure(step, device: str, args):
    """(times of the graphed step on CUDA, else eager; eager median ms on CUDA or None)."""
    eager = gq.call_times_ms(step, device, args.reps, args.warmup)
    if device != "cuda":
        return eager, None
    graph, _, _ = capture_cuda_graph(step, warmup=1)
    return gq.call_times_ms(graph.replay, device, args.reps, args.warmup), statistics.median(eager)


def triton_row(pb, precision: str, label: str, args, device: str, dev_name: str) -> dict:
    """One Triton configuration (already installed by the caller) through wk.sinkhorn + autograd."""
    method = gq.make_method(f"triton-{precision}") if precision != "tf32" else gq.Method("triton-tf32", "ours",
                                                                                          "triton", "tf32")
    backend = f"triton-{precision} {label}"
    why = gq.unavailable(method, device)
    if why:
        return bench_row("sinkhorn", backend, "fwd+bwd", pb.shape, gq.DTYPE, dev_name, note=f"n/a: {why}")
    ref = gq.reference(pb, args.iters)
    step = gq.fwd_bwd_step(method, pb, args.iters)
    errs = {k: gq.rel_err(x, ref[k]) for k, x in zip(("value", "grad_a", "grad_b"), step(), strict=True)}
    verdict = gq.judge(method, errs) if precision != "tf32" else \
        "info: tf32, inexact by design: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
    times, eager_ms = measure(step, device, args)
    return bench_row("sinkhorn", backend, "fwd+bwd", pb.shape, gq.DTYPE, dev_name, times, None, gq.finite_max(errs),
                     verdict + (f"; graphed; eager median {eager_ms:.4g} ms" if eager_ms else "; eager"))


@contextlib.contextmanager
def triton_tiles(cfg, per_half_iteration: bool = False):
    """The float32 entries of sk.DOT_CONFIG (the per-half-iteration tile table) replaced by cfg, restored after;
    ``per_half_iteration``: also ONCHIP_MAX_C = 0, so that a small size runs those kernels (the smoke run)."""
    from wkd_kernels.triton import sinkhorn as sk
    old, old_max = dict(sk.DOT_CONFIG), sk.ONCHIP_MAX_C
    for key in old:
        if key[0] == torch.float32:
            sk.DOT_CONFIG[key] = tuple(cfg)
    if per_half_iteration:
        sk.ONCHIP_MAX_C = 0
    try:
        yield
    finally:
        sk.DOT_CONFIG.clear()
        sk.DOT_CONFIG.update(old)
        sk.ONCHIP_MAX_C = old_max


@contextlib.contextmanager
def triton_onchip(cfg):
    """sk.ONCHIP_CONFIG[float32]["scaling"] (the single-launch kernels' launch configuration) replaced by cfg."""
    from wkd_kernels.triton import sinkhorn as sk
    entry = sk.ONCHIP_CONFIG[torch.float32]
    old = entry["scaling"]
    entry["scaling"] = tuple(cfg)
    try:
        yield
    finally:
        entry["scaling"] = old


def cuda_row(pb, args, device: str, dev_name: str, tile: int = -1, rows_per_block: int = -1) -> dict:
    """Forward (with history) + backward through torch.ops.wkd_tuning with a tile table entry (n or m > 256) or a
    rows-per-CTA count (n, m <= 256): errors vs float64, bits vs the automatic choice (torch.ops.wkd.*)."""
    small = max(pb.n, pb.m) <= 256
    backend = (f"cuda rows_per_block={'auto' if rows_per_block < 0 else rows_per_block}" if small
               else f"cuda tile={'auto' if tile < 0 else tile}")
    why = cuda_unavailable(device)
    if why:
        return bench_row("sinkhorn", backend, "fwd+bwd", pb.shape, gq.DTYPE, dev_name, note=f"n/a: {why}")
    fwd, bwd = cuda_tuning_op("sinkhorn"), cuda_tuning_op("sinkhorn_backward")
    g = gq.grad_weights(pb.B, device)
    it, reg, eps = args.iters, gq.REG, gq.EPS

    def step():
        out = fwd(pb.a, pb.b, pb.cost, reg, it, eps, False, True, tile=tile, rows_per_block=rows_per_block)
        ga, gb = bwd(g, pb.a, pb.b, pb.cost, *out[3:], reg, False, eps, tile=tile, rows_per_block=rows_per_block)
        return out[0], out[1], out[2], ga, gb

    def product():
        out = torch.ops.wkd.sinkhorn(pb.a, pb.b, pb.cost, reg, it, eps, False, True)
        ga, gb = torch.ops.wkd.sinkhorn_backward(g, pb.a, pb.b, pb.cost, *out[3:], reg, False, eps)
        return out[0], out[1], out[2], ga, gb

    ref = gq.reference(pb, it)
    got, auto = step(), product()
    errs = {k: gq.rel_err(x, ref[k])
            for k, x in zip(("value", "grad_a", "grad_b"), (got[0], got[3], got[4]), strict=True)}
    verdict = gq.judge(gq.make_method("cuda"), errs)
    same = all(torch.equal(x, y) for x, y in zip(got[1:], auto[1:], strict=True))
    if small or tile < 0:
        same = same and torch.equal(got[0], auto[0])
    else:  # float32 partial sums of up to ~1000 terms in another order: equal to 1e-5 relative
        same = same and gq.rel_err(got[0], auto[0].double().cpu()) <= 1e-5
    if not same:
        verdict = "NOT BITWISE the automatic choice's u, v, gradients" + ("" if small else " (value to 1e-5)") + \
            "; " + verdict
    times, eager_ms = measure(step, device, args)
    plan = small_plan_note(pb, rows_per_block) if small else tile_note(tile)
    return bench_row("sinkhorn", backend, "fwd+bwd", pb.shape, gq.DTYPE, dev_name, times, None, gq.finite_max(errs),
                     f"{verdict}; graphed; eager median {eager_ms:.4g} ms; {plan}")


def tile_note(tile: int) -> str:
    """'auto' or 'BMxBN, TMxTN/thread, threads, min CTAs/SM' of a tile table entry (5 integers each)."""
    if tile < 0:
        return "tile auto"
    bm, bn, tm, tn, min_blocks = list(cuda_tuning_op("tile_table")())[5 * tile:5 * tile + 5]
    return f"tile {bm}x{bn}, {tm}x{tn}/thread, {(bm // tm) * (bn // tn)} threads, >= {min_blocks} CTA/SM"


def small_plan_note(pb, rows_per_block: int) -> str:
    """The single-launch plan that runs (small_plan: R after the shared-memory limit), both directions."""
    parts = []
    for name, backward in (("fwd", False), ("bwd", True)):
        R, ctas, threads, on_chip, smem = cuda_tuning_op("small_plan")(pb.B, pb.n, pb.m, gq.DTYPE, False, backward,
                                                                        rows_per_block)
        parts.append(f"{name} R={R} {ctas} CTAs x {threads} thr, M {'on' if on_chip else 'off'} chip, "
                     f"{smem / 1024:.1f} KiB")
    return "; ".join(parts)


# ============================================================================================ the sweeps
def build_tasks(problems, args, device: str, dev_name: str) -> list:
    """Every configuration of the sweeps asked for, as gpu_quick Tasks (placeholder row + function)."""
    large = [pb for pb in problems if max(pb.n, pb.m) > 256][:1]
    small = [pb for pb in problems if max(pb.n, pb.m) <= 256]
    tasks = []

    def add(pb, backend, fn, need):
        tasks.append(gq.Task(bench_row("sinkhorn", backend, "fwd+bwd", pb.shape, gq.DTYPE, dev_name), fn, need,
                             ours=True))
    triton_ok = gq.triton is not None
    if triton_ok:
        from wkd_kernels.triton import sinkhorn as sk
    for precision in args.sweep_precision.split(","):
        if args.sweep_tiles and triton_ok:
            cands = sk.DOT_CONFIG_CANDIDATES[:2] if args.smoke else sk.DOT_CONFIG_CANDIDATES
            for pb in large or problems[:1] if args.smoke else large:
                for cfg in cands:
                    label = "tiles " + "x".join(map(str, cfg))

                    def fn(pb=pb, cfg=cfg, label=label, precision=precision):
                        with triton_tiles(cfg, per_half_iteration=max(pb.n, pb.m) <= 256):
                            return [triton_row(pb, precision, label, args, device, dev_name)]
                    add(pb, f"triton-{precision} {label}", fn, gq.COMPILE_NEED_S)
        if args.sweep_onchip and triton_ok:
            cands = sk.ONCHIP_CONFIG_CANDIDATES[:2] if args.smoke else sk.ONCHIP_CONFIG_CANDIDATES
            for cfg in cands:
                for pb in small:
                    label = "onchip " + "x".join(map(str, cfg))

                    def fn(pb=pb, cfg=cfg, label=label, precision=precision):
                        with triton_onchip(cfg):
                            return [triton_row(pb, precision, label, args, device, dev_name)]
                    add(pb, f"triton-{precision} {label}", fn, gq.COMPILE_NEED_S)
    if (args.sweep_tiles or args.sweep_onchip) and not triton_ok:
        pb = problems[0]
        add(pb, "triton sweeps", lambda: [bench_row("sinkhorn", "triton sweeps", "fwd+bwd", pb.shape, gq.DTYPE,
                                                    dev_name, note=f"n/a: Triton unavailable: "
                                                                   f"{gq.TRITON_IMPORT_ERROR}")], 0.0)
    why = cuda_unavailable(device)
    if (args.sweep_cuda_tiles or args.sweep_cuda_rows) and why:  # one row saying why, not one per configuration
        pb = problems[0]
        add(pb, "cuda sweeps", lambda: [bench_row("sinkhorn", "cuda sweeps", "fwd+bwd", pb.shape, gq.DTYPE,
                                                  dev_name, note=f"n/a: {why}")], 0.0)
        return tasks
    if args.sweep_cuda_tiles:
        for pb in large:
            for tile in [-1] + list(range(int(cuda_tuning_op("num_tiles")()))):
                add(pb, f"cuda tile={tile}", lambda pb=pb, tile=tile: [cuda_row(pb, args, device, dev_name,
                                                                                tile=tile)], gq.ROW_NEED_S)
    if args.sweep_cuda_rows:
        for pb in small:
            for rpb in ROWS_PER_BLOCK:
                add(pb, f"cuda rows_per_block={rpb}", lambda pb=pb, rpb=rpb: [cuda_row(
                    pb, args, device, dev_name, rows_per_block=rpb)], gq.ROW_NEED_S)
    return tasks


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where to run (default: cuda when available, else cpu)")
    ap.add_argument("--smoke", action="store_true", help=f"tiny sizes ({SMOKE_SIZES}), the first two candidates of "
                    "each Triton sweep, 3 iterations, 1 rep (default: off)")
    ap.add_argument("--out", default=str(REPO / "bench_results"),
                    help="folder for tune_sinkhorn.json, .md and .csv (default: bench_results/ in the checkout)")
    ap.add_argument("--sizes", default=None, help=f"comma-separated BxC or BxNxM (default: {DEFAULT_SIZES})")
    ap.add_argument("--sweep-tiles", action="store_true", help="Triton per-half-iteration tiles (default: off)")
    ap.add_argument("--sweep-onchip", action="store_true", help="Triton single-launch configurations (default: off)")
    ap.add_argument("--sweep-cuda-tiles", action="store_true", help="CUDA C++ tile table entries (default: off)")
    ap.add_argument("--sweep-cuda-rows", action="store_true",
                    help="CUDA C++ single-launch rows per CTA (default: off)")
    ap.add_argument("--sweep-precision", default="ieee",
                    help="comma-separated tl.dot precisions of the Triton sweeps: ieee, tf32x3, tf32 (default: ieee)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="seconds, then the rest is skipped (default: 300)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per measurement (default: 30; smoke: 1)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up calls (default: 3; smoke: 0)")
    ap.add_argument("--iters", type=int, default=None, help="Sinkhorn iterations (default: 10; smoke: 3)")
    args = ap.parse_args(argv)
    if not (args.sweep_tiles or args.sweep_onchip or args.sweep_cuda_tiles or args.sweep_cuda_rows):
        ap.error("name at least one sweep: --sweep-tiles, --sweep-onchip, --sweep-cuda-tiles, --sweep-cuda-rows")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but CUDA is not available (use --device cpu --smoke)")
    bad = [p for p in args.sweep_precision.split(",") if p not in ("ieee", "tf32x3", "tf32")]
    if bad:
        ap.error(f"--sweep-precision: unknown {bad}; choose from ieee, tf32x3, tf32")
    args.reps = args.reps if args.reps is not None else (1 if args.smoke else 30)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 3)
    args.iters = args.iters if args.iters is not None else (3 if args.smoke else 10)
    args.sizes = args.sizes or (SMOKE_SIZES if args.smoke else DEFAULT_SIZES)
    if args.iters < 2 or args.reps < 1 or args.warmup < 0:
        ap.error("--iters must be >= 2, --reps >= 1, --warmup >= 0")
    try:
        for spec in args.sizes.split(","):
            gq.parse_size(spec)
    except ValueError as e:
        ap.error(str(e))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dev_name = args.device, device_name(args.device)
    problems = [gq.make_problem(s, device) for s in args.sizes.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = gq.run_meta(args, device, dev_name, problems)
    writer = RowWriter(out / "tune_sinkhorn.csv", out / "tune_sinkhorn.json", out / "tune_sinkhorn.md", meta)
    print(f"# tune_sinkhorn: {dev_name}, torch {torch.__version__}, build {meta['build']}; sizes {args.sizes}",
          flush=True)
    failures = gq.run_tasks(build_tasks(problems, args, device, dev_name), writer, args, device)
    failures += [f"{r['backend']} {r['shape']}: {r['note']}" for r in writer.rows
                 if (r.get("note") or "").startswith("NOT BITWISE")]
    print(f"# wrote {out}/tune_sinkhorn.json, .md, .csv ({len(writer.rows)} rows) in "
          f"{time.perf_counter() - gq._T0:.1f} s; {len(failures)} failure(s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
