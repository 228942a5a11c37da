"""gpu_quick: one short process that answers the first questions about the Sinkhorn kernels on a GPU.

Most important first, at B x C in {256x1000 (the released ImageNet cost), 129x1001x999 (random, non-square, odd),
256x100, 256x91, 2048x100, 4096x81 (CIFAR/COCO-like)}, for each Sinkhorn backend on CUDA ("cuda": the CUDA C++
kernels of torch.ops.wkd.sinkhorn; "triton-ieee", "triton-tf32x3", "triton-tf32": torch.ops.wkd.sinkhorn_triton with
that tl.dot input precision for float32):

1. correctness of the value and of both exact gradients (w.r.t. a and b, with a fixed non-uniform grad_value)
   against the float64 CPU op on the same float32 inputs, with the caching allocator's free memory filled with NaN
   before every call (so memory an op leaves unwritten shows up as NaN), and bitwise determinism (two runs; also
   the autograd path and the CUDA-graph replay must give the same bits as the direct op call);
2. forward+backward time of ours, eager and CUDA-graphed, next to plain PyTorch (the same loop as matrix products
   with autograd) in fp32 and TF32, eager and graphed, and the published per-sample gather formulation
   (wkd_kernels.reference.published_wkd_logit_loss, 256x1000 only); CUDA events, medians after warm-up;
3. the peak extra memory of one forward+backward;
4. calibration: a cuBLAS 256x1000x1000 fp32 (and TF32) product, an L2-resident read and an HBM read, the gap
   between graphed empty kernels and the eager launch cost of a Triton kernel, and the cost of one grid-wide
   exchange round among co-resident CTAs (partial sums through L2, release/acquire counter), i.e. what each of
   the ~40 half-iterations of a persistent multi-CTA Sinkhorn would pay.

Problem (WKD-L's): a, b are softmax distributions (temperature 2) of random logits with the target class given zero
mass, shared C x C cost = relu(1 - exp(-d)) + 1e-8 from the released CKA distance d (kappa 1; a random symmetric
stand-in, loudly announced, when the file is absent), reg 0.05, 10 iterations, eps 1e-8 (WKD-L's), float32.
"BxNxM" sizes use random a [B, N], b [B, M] with one zero-mass entry per row and a uniform [0, 1) cost [N, M].

Reading the table: one row per (size, method). status: ok / FAIL (a check failed: error above the threshold, a
non-finite output, non-deterministic bits) / ERROR (the row raised) / info (reported, not checked: TF32 accuracy,
baselines, calibration) / not built / n/a / skipped. err_*: max |x - ref| / max |ref| vs the float64 CPU op.
Thresholds: float32-exact backends (cpu, cuda, triton-ieee) 1e-4 on the value and 5e-4 on the gradients (the
float32 CPU op itself is at ~1e-6 / ~5e-5 on the ImageNet cost: the "cpu fp32 op" rows give that floor);
triton-tf32x3 1e-3 / 3e-3; triton-tf32 is inexact by design (10-bit mantissa): its errors are "info" when above
3e-2, never a failure (NaN and non-determinism still fail). det: value, grads, u, v bitwise equal over two poisoned
runs, the autograd path and the graph replay. eager_ms / graph_ms: median forward+backward. mem_MB: peak memory
of one eager forward+backward above what was allocated before it; on CUDA a failed poisoning self-test (fresh
buffers of the output shapes not all NaN) is said in the note. Calibration rows: eager_ms / graph_ms hold the
time of one operation (one product, one read kernel, one launch, one exchange round), the note the rate.
The exit code is 1 when a check of our kernels failed or one of their rows raised (on CPU also when the
calibration kernels give wrong sums under the interpreter); baseline and calibration errors on the GPU are
reported but do not change it.

Sweeps (off by default; the defaults they weigh are unmeasured: no GPU has run them yet):
  --sweep-tiles       the Triton per-half-iteration kernels at the first size, per float32 DOT_CONFIG tile;
  --sweep-cuda-tiles  the CUDA C++ kernels through torch.ops.wkd_tuning (per-call launch choices, one build): every
                      entry of the tile table (and auto) at the first size with n or m > 256, and the rows per CTA of
                      the single-launch kernels (auto, 1, 2, 4, 8, 16; the note gives the plan that ran, which may
                      lower R to fit shared memory) at the sizes with n, m <= 256; u, v and the gradients must be
                      bitwise the product op's (the value too, except for a forced tile: to rounding);
  --sweep-onchip      the single-launch Triton kernels with each float32 scaling-domain configuration of
                      sk.ONCHIP_CONFIG_CANDIDATES (tl.dot for BLOCK_B >= 16, broadcast products below) at
                      256x100, 256x91, 2048x100, 4096x81;
  --sweeps-only       only the sweeps: a tuning run as a device call of its own, e.g.
      python bench/gpu_quick.py --device cuda --sweeps-only --sweep-tiles --sweep-cuda-tiles --sweep-onchip \
          --budget-s 300 --out OUT
A sweep that cannot run here (no GPU, a build without the CUDA C++ kernels, no Triton) gives one "skipped" or "n/a"
row with the reason.

Budget: rows run in priority order (ours at 256x1000, baselines at 256x1000, 129x1001x999, the small sizes,
calibration, then the optional sweeps: Triton tiles, CUDA C++ tiles and rows per CTA, Triton on-chip); once
`--budget-s` seconds are spent (or too little is left for the next row: 8 s for a row that JIT-compiles new Triton
variants, 2 s otherwise) the remaining rows are skipped and listed once. Timing reps are cut so that one measurement takes at most ~3 s.

On CPU (`--device cpu --smoke`): tiny sizes, backends "cpu" (the C++ op) and, with TRITON_INTERPRET=1, the Triton
kernels through torch.ops.wkd.sinkhorn_triton on CPU tensors; CUDA graphs, CUDA events, poisoning and the
timed calibration are n/a, but the device-independent code runs (the read and exchange kernels run under the
interpreter with one program; without the interpreter the calibration kernels are compiled for sm_90 when possible);
smoke runs 3 Sinkhorn iterations instead of 10 (every kernel variant still runs) to stay within seconds.

Usage:
    python bench/gpu_quick.py                                  # on the GPU machine, ~1-2 min, writes bench_results/
    TRITON_INTERPRET=1 python bench/gpu_quick.py --device cpu --smoke --out /tmp/gq     # CI, seconds
"""
from __future__ import annotations

import time

_T0 = time.perf_counter()  # the budget counts from process start (imports included)

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import REPO, capture_cuda_graph, device_name, find_data_dir, print_table, time_fn, wkd_cost  # noqa: E402
from compare_pot import plain_pytorch, wkd_logits  # noqa: E402

import wkd_kernels as wk  # noqa: E402
from wkd_kernels.reference import published_wkd_logit_loss  # noqa: E402

try:
    import triton
    import triton.language as tl
    from wkd_kernels.triton import sinkhorn as sk
    TRITON_IMPORT_ERROR = None
except Exception as e:  # noqa: BLE001 - any import failure: Triton rows say why
    triton = tl = sk = None
    TRITON_IMPORT_ERROR = f"{type(e).__name__}: {e}"

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
REG, ITERS, EPS, TEMPERATURE, WKDL_WEIGHT = 0.05, 10, 1e-8, 2.0, 30.0
DTYPE = torch.float32
DEFAULT_SIZES = "256x1000,129x1001x999,256x100,256x91,2048x100,4096x81"
SMOKE_SIZES = "8x20,5x13x11"
# (value threshold, gradient threshold, failing?) per precision; see the module docstring.
THRESHOLDS = {"exact": (1e-4, 5e-4, True), "tf32x3": (1e-3, 3e-3, True), "tf32": (3e-2, 3e-2, False)}
STANDIN_MARK = "*"  # appended to a size label whose real cost matrix was absent
DEFAULT_TILES = ",".join("x".join(map(str, c)) for c in sk.DOT_CONFIG_CANDIDATES) if sk is not None else ""
COMPILE_NEED_S, ROW_NEED_S, MEASURE_CAP_S = 8.0, 2.0, 3.0
ROWS_PER_BLOCK_SWEEP = (1, 2, 4, 8, 16)  # --sweep-cuda-tiles: rows per CTA of the CUDA C++ single-launch kernels
ONCHIP_SWEEP_SIZES = "256x100,256x91,2048x100,4096x81"  # --sweep-onchip
COLUMNS = ["size", "method", "status", "err_val", "err_ga", "err_gb", "det", "eager_ms", "graph_ms", "mem_MB",
           "note"]


# ============================================================================================ problems
@dataclass
class Problem:
    label: str
    B: int
    n: int
    m: int
    kind: str  # "wkd" (shared C x C WKD-L cost) or "random"
    a: torch.Tensor
    b: torch.Tensor
    cost: torch.Tensor
    src: str
    s_logits: torch.Tensor = None
    t_logits: torch.Tensor = None
    y: torch.Tensor = None
    ref: dict = field(default_factory=dict)  # float64 CPU op results (computed on first use)

    def to(self, device):
        for k in ("a", "b", "cost", "s_logits", "t_logits", "y"):
            t = getattr(self, k)
            if t is not None:
                setattr(self, k, t.to(device))
        return self


def parse_size(spec: str):
    parts = [int(x) for x in spec.lower().strip().split("x")]
    if len(parts) == 2:
        return parts[0], parts[1], parts[1], "wkd"
    if len(parts) == 3:
        return parts[0], parts[1], parts[2], "random"
    raise ValueError(f"size {spec!r}: expected BxC or BxNxM")


def wkd_problem(B: int, C: int, seed: int = 0) -> Problem:
    """WKD-L's marginals: softmax(logits / 2) with the target class given zero mass, shared sharpened cost."""
    s, t, y = wkd_logits(B, C, seed)
    removed = F.one_hot(y, C).bool()
    a = torch.softmax((s / TEMPERATURE).masked_fill(removed, float("-inf")), 1)
    b = torch.softmax((t / TEMPERATURE).masked_fill(removed, float("-inf")), 1)
    cost, src = wkd_cost(C, dtype=DTYPE)
    return Problem(f"{B}x{C}", B, C, C, "wkd", a.to(DTYPE), b.to(DTYPE), cost, src, s, t, y)


def random_problem(B: int, n: int, m: int, seed: int = 0) -> Problem:
    """Random rows with one zero-mass entry each and a uniform [0, 1) cost (non-square)."""
    g = torch.Generator().manual_seed(seed)

    def rows(k):
        x = torch.randn(B, k, generator=g)
        x[torch.arange(B), torch.randint(0, k, (B,), generator=g)] = float("-inf")
        return torch.softmax(x, 1).to(DTYPE)

    a, b = rows(n), rows(m)
    cost = torch.rand(n, m, generator=g, dtype=torch.float64).to(DTYPE)
    return Problem(f"{B}x{n}x{m}", B, n, m, "random", a, b, cost, "random uniform")


def make_problem(spec: str) -> Problem:
    B, n, m, kind = parse_size(spec)
    return wkd_problem(B, n) if kind == "wkd" else random_problem(B, n, m)


def grad_weights(B: int, device) -> torch.Tensor:
    """The fixed non-uniform grad_value of every backward (so that rows do not enter with equal weights)."""
    return torch.linspace(0.5, 1.5, B, dtype=DTYPE, device=device)


def reference(pb: Problem) -> dict:
    """Float64 CPU op on the float32 inputs cast to float64: value, u, v, grad_a, grad_b (cached)."""
    if not pb.ref:
        a, b, c = (t.detach().cpu().double() for t in (pb.a, pb.b, pb.cost))
        out = torch.ops.wkd.sinkhorn(a, b, c, REG, ITERS, EPS, False, True)
        g = grad_weights(pb.B, "cpu").double()
        ga, gb = torch.ops.wkd.sinkhorn_backward(g, a, b, c, *out[3:], REG, False, EPS)
        pb.ref = {"value": out[0], "u": out[1], "v": out[2], "grad_a": ga, "grad_b": gb}
    return pb.ref


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|; inf when x has a non-finite entry (e.g. unwritten, NaN-poisoned memory)."""
    x = x.detach().double().cpu()
    if not bool(torch.isfinite(x).all()):
        return math.inf
    scale = ref.abs().max().item()
    return (x - ref).abs().max().item() / (scale if scale > 0 else 1.0)


# ============================================================================================ settings
@dataclass
class Backend:
    name: str  # "cuda", "cpu", "triton-ieee", ...
    precision: str  # "exact", "tf32x3", "tf32" (threshold class)
    wk_backend: str = None  # the `backend` argument of wk.sinkhorn ("cuda", "cpu", "triton")
    triton_precision: str = None  # Triton backends: the `precision` of torch.ops.wkd.sinkhorn_triton


def make_backend(name: str, device: str) -> Backend:
    if name in ("cuda", "cpu"):
        return Backend(name, "exact", wk_backend=name)
    if name.startswith("triton-"):
        p = name.split("-", 1)[1]
        if p not in ("ieee", "tf32x3", "tf32"):
            raise ValueError(f"unknown backend {name!r}")
        return Backend(name, "exact" if p == "ieee" else p, wk_backend="triton", triton_precision=p)
    raise ValueError(f"unknown backend {name!r}: choose from cuda, cpu, triton-ieee, triton-tf32x3, triton-tf32")


def backend_unavailable(bk: Backend, device: str):
    """None when the backend can run here, else (status, reason)."""
    if bk.name == "cuda":
        if device != "cuda":
            return "n/a", "CUDA C++ kernels need --device cuda"
        if not wk.HAS_CUDA_EXT:
            return "not built", f"no CUDA C++ kernels in this build ({wk.build_info()})"
    if bk.name == "cpu" and device != "cpu":
        return "n/a", "the C++ CPU op runs on --device cpu (the cpu fp32 op rows give its accuracy)"
    if bk.triton_precision:
        if sk is None:
            return "n/a", f"Triton unavailable: {TRITON_IMPORT_ERROR}"
        if device == "cpu" and not INTERPRET:
            return "n/a", "Triton on CPU needs TRITON_INTERPRET=1"
    return None


@contextlib.contextmanager
def matmul_precision(tf32: bool):
    """float32 matmuls in full fp32 ("highest") or TF32 ("high"), restored afterwards."""
    old = torch.get_float32_matmul_precision()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.set_float32_matmul_precision(old)


@contextlib.contextmanager
def onchip_config(cfg):
    """Temporarily replace ONCHIP_CONFIG[float32]["scaling"] (the Triton single-launch kernels' launch
    configuration, float32 scaling domain) by cfg = (BLOCK_B, BLOCK_N, BLOCK_K, num_warps)."""
    entry = sk.ONCHIP_CONFIG[torch.float32]
    old = entry["scaling"]
    entry["scaling"] = tuple(cfg)
    try:
        yield
    finally:
        entry["scaling"] = old


@contextlib.contextmanager
def tile_config(cfg):
    """Temporarily replace the float32 entries of DOT_CONFIG (the Triton tile table, per dtype and precision) by
    cfg = (BLOCK_B, BLOCK_N, BLOCK_K, warps)."""
    old = dict(sk.DOT_CONFIG)
    for key in old:
        if key[0] == torch.float32:
            sk.DOT_CONFIG[key] = tuple(cfg)
    try:
        yield
    finally:
        sk.DOT_CONFIG.clear()
        sk.DOT_CONFIG.update(old)


# ============================================================================================ poisoning
def op_shapes(pb: Problem):
    """Shapes of the buffers the forward and backward allocate (outputs and temporaries)."""
    B, n, m, T = pb.B, pb.n, pb.m, ITERS
    return [(B,), (B, n), (B, m), (T, B, n), (T, B, m), (n, m), (B, max(1, -(-n // 16))), (1,),
            (B, n), (B, m), (B, n), (B, m)]


def _free_cached_blocks():
    """Sizes (bytes) of the free blocks of the default pool of the current stream that an allocation can get."""
    stream = torch.cuda.current_stream().cuda_stream
    sizes = []
    for seg in torch.cuda.memory_snapshot():
        if seg.get("stream", stream) != stream:
            continue
        pool = seg.get("segment_pool_id", (0, 0))
        if tuple(pool) != (0, 0):
            continue
        small = seg.get("segment_type") == "small"
        for blk in seg.get("blocks", []):
            # Requests <= 1 MiB are served by the small pool, larger ones by the large pool: a free block the
            # other pool holds cannot be reached (asking for its size would only allocate a new segment).
            if blk.get("state") == "inactive" and (blk["size"] <= 2**20) == small:
                sizes.append(int(blk["size"]))
    return sorted(sizes, reverse=True)


def poison(pb: Problem, device: str) -> None:
    """Fill memory the next allocations will get with NaN (bytes 0xFF: NaN in float32 and float64).

    1. Allocate two NaN-filled copies of every buffer shape the op allocates and free them (so blocks of exactly
       those sizes are cached even on the first call of a size); 2. allocate every free block of the caching
       allocator's default pool (largest first, so that each request gets a block of exactly its size), fill all
       with 0xFF, free them. The cache is never emptied, so the op's torch.empty outputs come from NaN blocks.
       On CPU there is no caching allocator: step 1 runs, it poisons nothing reliably (the self-test says so)."""
    held = [torch.empty(s, dtype=DTYPE, device=device).fill_(float("nan")) for s in op_shapes(pb) for _ in range(2)]
    del held
    if device != "cuda":
        return
    try:
        held = [torch.empty(s, dtype=torch.uint8, device=device) for s in _free_cached_blocks()]
    except Exception:  # noqa: BLE001 - snapshot format differs: step 1 still poisoned the op's sizes
        return
    for t in held:
        t.fill_(255)
    del held


def poison_effective(pb: Problem, device: str) -> bool:
    """Self-test: after poison(), freshly allocated buffers of the op's output shapes are all NaN."""
    poison(pb, device)
    probes = [torch.empty(s, dtype=DTYPE, device=device) for s in op_shapes(pb)[:5]]
    return all(bool(torch.isnan(p).all()) for p in probes)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ============================================================================================ measurements
def measure(fn, device: str, reps: int, warmup: int) -> dict:
    """Median time of fn() (CUDA events on GPU), reps cut so that the measurement takes at most ~MEASURE_CAP_S."""
    if reps <= 1:
        return time_fn(fn, device, warmup=warmup, reps=1)
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = time.perf_counter() - t0
    reps = max(1, min(reps, int(MEASURE_CAP_S / max(one, 1e-6))))
    return time_fn(fn, device, warmup=max(0, warmup - 1), reps=reps)


def peak_extra_mb(fn, device: str):
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def graphed(step, device: str, reps: int, warmup: int):
    """Capture step() in a CUDA graph; returns (timing of graph.replay, captured outputs after one replay)."""
    graph, captured, _ = capture_cuda_graph(step, warmup=1)
    graph.replay()
    torch.cuda.synchronize()
    return measure(graph.replay, device, reps, warmup), captured, graph


def bits_equal(xs, ys) -> bool:
    return all(torch.equal(x, y) for x, y in zip(xs, ys))


# ============================================================================================ rows: ours
def op_call(bk: Backend, pb: Problem, g: torch.Tensor, device: str):
    """Forward (with history) then backward through the ops (torch.ops.wkd.sinkhorn / sinkhorn_backward, or
    sinkhorn_triton / sinkhorn_triton_backward with the backend's precision: on CUDA tensors, or on CPU tensors under
    the interpreter), the allocator poisoned before each call. Returns (value, u, v, grad_a, grad_b)."""
    poison(pb, device)
    if bk.triton_precision:
        out = torch.ops.wkd.sinkhorn_triton(pb.a, pb.b, pb.cost, REG, ITERS, EPS, False, True, bk.triton_precision)
        poison(pb, device)
        ga, gb = torch.ops.wkd.sinkhorn_triton_backward(g, pb.a, pb.b, pb.cost, *out[3:], REG, False,
                                                        bk.triton_precision, EPS)
    else:
        out = torch.ops.wkd.sinkhorn(pb.a, pb.b, pb.cost, REG, ITERS, EPS, False, True)
        poison(pb, device)
        ga, gb = torch.ops.wkd.sinkhorn_backward(g, pb.a, pb.b, pb.cost, *out[3:], REG, False, EPS)
    sync(device)
    return out[0], out[1], out[2], ga, gb


def ours_step(bk: Backend, pb: Problem, g: torch.Tensor):
    """One forward+backward as a training step does it: with autograd, through wk.sinkhorn with the row's backend
    and precision."""
    xa, xb = pb.a.detach().clone().requires_grad_(), pb.b.detach().clone().requires_grad_()

    def step():
        value = wk.sinkhorn(xa, xb, pb.cost, REG, ITERS, eps=EPS, backend=bk.wk_backend,
                            precision=bk.triton_precision).value
        ga, gb = torch.autograd.grad(value, (xa, xb), grad_outputs=g)
        return value, ga, gb
    return step


def judge(row: dict, precision: str, extra_failures) -> None:
    """Set row["status"] from the errors and the bitwise checks (see THRESHOLDS)."""
    tv, tg, failing = THRESHOLDS[precision]
    errs = [("value", row["err_val"], tv), ("grad_a", row["err_ga"], tg), ("grad_b", row["err_gb"], tg)]
    fails = [f"{k} non-finite" for k, e, _ in errs if e == math.inf]
    above = [f"{k} {e:.1e} > {t:.0e}" for k, e, t in errs if e != math.inf and not e <= t]
    fails += list(extra_failures)
    if failing:
        fails += above
    row["failures"] = fails
    if fails:
        row["status"] = "FAIL"
        row["note"] = "; ".join(fails + ([row["note"]] if row.get("note") else []))
    elif above:
        row["status"] = "info"
        row["note"] = "; ".join([f"{precision} inexact by design: " + ", ".join(above)] +
                                ([row["note"]] if row.get("note") else []))
    else:
        row["status"] = "ok"


def row_ours(pb: Problem, bk: Backend, args, device: str, timing: bool = True, method: str = None) -> dict:
    """Correctness (poisoned, two runs), eager and graphed timing, peak memory of one backend at one size."""
    row = new_row(pb, method or bk.name, backend=bk.name, precision=bk.triton_precision or bk.precision)
    na = backend_unavailable(bk, device)
    if na:
        row["status"], row["note"] = na
        return row
    ref = reference(pb)
    g = grad_weights(pb.B, device)
    first = op_call(bk, pb, g, device)
    second = op_call(bk, pb, g, device)
    for key, name, x in zip(("err_val", "err_u", "err_v", "err_ga", "err_gb"),
                            ("value", "u", "v", "grad_a", "grad_b"), first):
        row[key] = rel_err(x, ref[name])
    checks = {"two_runs_equal": bits_equal(first, second)}
    row["poison_effective"] = poison_effective(pb, device)
    timing_error = None
    if timing:
        try:  # the correctness results above survive a failing measurement or capture
            time_ours(row, checks, ours_step(bk, pb, g), first, args, device)
        except Exception as e:  # noqa: BLE001
            timing_error = f"timing/capture raised {one_line(e)}"
            with contextlib.suppress(Exception):
                sync(device)
    row["checks"] = checks
    row["det"] = "yes" if all(checks.values()) else "NO"
    extra = [f"{k} is False" for k, v in checks.items() if not v] + ([timing_error] if timing_error else [])
    if device == "cuda" and not row["poison_effective"]:
        row["note"] = "poisoning not effective (self-test)"
    elif device != "cuda":
        row["note"] = "cpu: no caching allocator to poison" + ("; Triton via interpreter" if bk.triton_precision else "")
    judge(row, bk.precision, extra)
    return row


def time_ours(row: dict, checks: dict, step, first, args, device: str) -> None:
    """Eager and graphed forward+backward time and peak memory; the autograd path and the graph replay must give
    the bits of the direct op call (first = its (value, u, v, grad_a, grad_b))."""
    eager_out = step()
    sync(device)
    checks["autograd_equals_op"] = bits_equal(eager_out, (first[0], first[3], first[4]))
    row["mem_MB"] = peak_extra_mb(step, device)
    row["eager"] = measure(step, device, args.reps, args.warmup)
    if device == "cuda":
        row["graph"], captured, _ = graphed(step, device, args.reps, args.warmup)
        checks["graph_equals_eager"] = bits_equal(captured, eager_out)


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def row_multi_launch(pb: Problem, bk: Backend, args, device: str) -> dict:
    """A Triton row with the single-launch kernels turned off (ONCHIP_MAX_C = 0): the per-half-iteration kernels at
    a size the dispatch would give to the single-launch ones."""
    saved = sk.ONCHIP_MAX_C
    sk.ONCHIP_MAX_C = 0
    try:
        return row_ours(pb, bk, args, device, method=f"{bk.name} per-half-iteration")
    finally:
        sk.ONCHIP_MAX_C = saved


def row_cpu_floor(pb: Problem, args, device: str) -> dict:
    """Accuracy of the float32 C++ CPU op vs float64: the floor any float32 backend can be compared with."""
    cpu = dataclasses.replace(pb).to("cpu")  # shallow copy: shares the cached reference
    row = row_ours(cpu, Backend("cpu", "exact", wk_backend="cpu"), args, "cpu", timing=False, method="cpu fp32 op (floor)")
    row["status"] = "info" if row["status"] == "ok" else row["status"]
    row["note"] = "float32 CPU op vs float64: accuracy floor (not timed)"
    return row


# ============================================================================================ rows: baselines
def row_plain(pb: Problem, args, device: str, tf32: bool, graph: bool) -> dict:
    """Plain PyTorch (bench/compare_pot.plain_pytorch: the same loop as products on K, autograd), fp32 or TF32."""
    name = f"plain PyTorch {'TF32' if tf32 else 'fp32'} {'graph' if graph else 'eager'}"
    row = new_row(pb, name, backend="plain", precision="tf32" if tf32 else "fp32")
    if device != "cuda" and (tf32 or graph):
        row["status"], row["note"] = "n/a", "CUDA only"
        return row
    ref = reference(pb)
    g = grad_weights(pb.B, device)
    xa, xb = pb.a.detach().clone().requires_grad_(), pb.b.detach().clone().requires_grad_()

    def step():
        value = plain_pytorch(xa, xb, pb.cost, REG, ITERS, EPS)
        ga, gb = torch.autograd.grad(value, (xa, xb), grad_outputs=g)
        return value, ga, gb

    with matmul_precision(tf32):
        out = step()
        sync(device)
        if graph:
            row["graph"], out, _ = graphed(step, device, args.reps, args.warmup)
        else:
            row["mem_MB"] = peak_extra_mb(step, device)
            row["eager"] = measure(step, device, args.reps, args.warmup)
    row["err_val"], row["err_ga"], row["err_gb"] = (rel_err(x, ref[k]) for x, k in
                                                     zip(out, ("value", "grad_a", "grad_b")))
    row["status"] = "info"
    return row


def row_published(pb: Problem, args, device: str) -> dict:
    """The published WKD-L (per-sample gathered (C-1) x (C-1) cost, bmm loop, autograd), eager only (its boolean
    mask indexing synchronises: not capturable). err_*: its loss and d loss / d student logits vs ours
    (wk.wkd_logit_loss on the same logits)."""
    row = new_row(pb, "published WKD-L (gather) eager", backend="published", precision="fp32")
    s = pb.s_logits.detach().clone().requires_grad_()

    def loss_and_grad(fn):
        loss = fn(s, pb.t_logits, pb.y, pb.cost, TEMPERATURE, WKDL_WEIGHT, REG, ITERS)
        return loss, torch.autograd.grad(loss, s)[0]

    def step():
        return loss_and_grad(published_wkd_logit_loss)

    with matmul_precision(False):
        pub = step()
        ours = loss_and_grad(wk.wkd_logit_loss)
        row["err_val"] = rel_err(pub[0], ours[0].detach().double().cpu())
        row["err_ga"] = rel_err(pub[1], ours[1].detach().double().cpu())
        row["mem_MB"] = peak_extra_mb(step, device)
        row["eager"] = measure(step, device, args.reps, args.warmup)
    row["status"] = "info"
    row["note"] = "err = loss and d/ds vs wk.wkd_logit_loss (not vs float64); not capturable"
    del pub, ours
    if device == "cuda":
        torch.cuda.empty_cache()  # its GB-sized blocks would only make the next poisoning slower
    return row


# ============================================================================================ calibration
_CAL = {}


def calibration_kernels():
    """The Triton kernels of the calibration rows (defined on first use: needs triton)."""
    if _CAL:
        return _CAL

    @triton.jit
    def read_kernel(x_ptr, out_ptr, n_per_prog, repeat, BLOCK: tl.constexpr):
        """Each program sums its slice `repeat` times through L2 (.cg: not L1), writes one float."""
        pid = tl.program_id(0).to(tl.int64)
        base = x_ptr + pid * n_per_prog
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for _r in range(repeat):
            for k in range(0, n_per_prog, BLOCK):
                acc += tl.load(base + k + tl.arange(0, BLOCK), cache_modifier=".cg")
        tl.store(out_ptr + pid, tl.sum(acc, axis=0))

    @triton.jit
    def empty_kernel(x_ptr):
        pid = tl.program_id(0)
        tl.store(x_ptr + pid, 0.0, mask=pid < 0)

    @triton.jit
    def exchange_kernel(slot_ptr, ctr_ptr, stat_ptr, rounds, spin_cap, P,
                        G: tl.constexpr, GC: tl.constexpr, W: tl.constexpr):
        """`rounds` grid-wide exchanges among P co-resident programs (one CTA each). Per round r: write W floats
        (pid + 1 + r + k) to this program's slot of buffer r % 2, CTA barrier, atomic +1 on the counter with
        release semantics, spin (acquire RMW polls, at most spin_cap) until the counter reaches (r + 1) P, CTA
        barrier, read the slots of the G programs of its group (GC at a time, L2 only) and check their sum.
        Double buffering suffices: nobody writes buffer r % 2 again before everybody has arrived in round r + 1,
        i.e. finished reading round r. After one timeout a program stops waiting (bounded run time, errors flagged).
        Writes per program: (sum mismatches, timeouts, polls)."""
        pid = tl.program_id(0)
        offs = tl.arange(0, W)
        gi = tl.arange(0, GC)
        grp0 = (pid // G) * G
        errors = tl.full([], 0, tl.int32)
        timeouts = tl.full([], 0, tl.int32)
        polls = tl.full([], 0, tl.int32)
        cap = spin_cap
        for r in range(rounds):
            buf = r % 2
            tl.store(slot_ptr + (buf * P + pid) * W + offs, (pid + 1 + r + offs).to(tl.float32))
            tl.debug_barrier()
            tl.atomic_add(ctr_ptr, 1, sem="release", scope="gpu")
            target = (r + 1) * P
            cnt = tl.atomic_add(ctr_ptr, 0, sem="acquire", scope="gpu")
            it = tl.full([], 0, tl.int32)
            while (cnt < target) & (it < cap):
                cnt = tl.atomic_add(ctr_ptr, 0, sem="acquire", scope="gpu")
                it += 1
            polls += it
            late = cnt < target
            timeouts += late.to(tl.int32)
            cap = tl.where(late, 0, cap)
            tl.debug_barrier()
            acc = tl.zeros([W], dtype=tl.float32)
            for j0 in range(0, G, GC):
                src = buf * P + grp0 + j0 + gi
                blk = tl.load(slot_ptr + src[:, None] * W + offs[None, :], cache_modifier=".cg")
                acc += tl.sum(blk, axis=0)
            expect = (G * (grp0 + 1 + r + offs) + (G * (G - 1)) // 2).to(tl.float32)
            errors += tl.sum((acc != expect).to(tl.int32), axis=0)
        tl.store(stat_ptr + pid * 3 + 0, errors)
        tl.store(stat_ptr + pid * 3 + 1, timeouts)
        tl.store(stat_ptr + pid * 3 + 2, polls)

    _CAL.update(read=read_kernel, empty=empty_kernel, exchange=exchange_kernel)
    return _CAL


# exchange variants: (label, group size G or None for all P programs, G chunk, floats per slot W)
EXCHANGE_VARIANTS = [("scalar partials, all programs", None, None, 1),
                     ("8 KB tile per program, groups of 16", 16, 2, 2048)]


def exchange_run(P: int, rounds: int, G: int, GC: int, W: int, device: str, spin_cap: int = 1 << 20):
    k = calibration_kernels()["exchange"]
    slot = torch.zeros(2 * P * W, dtype=torch.float32, device=device)
    ctr = torch.zeros(1, dtype=torch.int32, device=device)
    stat = torch.zeros(P, 3, dtype=torch.int32, device=device)
    k[(P,)](slot, ctr, stat, rounds, spin_cap, P, G=G, GC=GC, W=W, num_warps=4)
    sync(device)
    return stat.cpu()


def calib_rows_exchange(args, device: str):
    rows = []
    if device != "cuda":
        row = new_row(None, "exchange round (release/acquire)", backend="calibration")
        if INTERPRET and sk is not None:  # one program: the code runs, nothing to wait for (no deadlock)
            stat = exchange_run(1, 3, 1, 1, 4, device)
            ok = int(stat[:, 0].sum()) == 0 and int(stat[:, 1].sum()) == 0
            row["status"], row["note"] = ("info" if ok else "FAIL"), \
                f"interpreter, 1 program: sums {'correct' if ok else 'WRONG'}; timing n/a on CPU"
            row["failures"] = [] if ok else ["exchange sums wrong under the interpreter"]
        else:
            row["status"], row["note"] = "n/a", compile_exchange_sm90()
        return [row]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    P = 1 << (min(128, sms).bit_length() - 1)  # a power of two (tl.arange) <= min(128, SMs): one CTA per SM
    for label, G, GC, W in EXCHANGE_VARIANTS:
        G = G or P
        G = G if P % G == 0 else P
        GC = GC or G
        row = new_row(None, f"exchange: {label}", backend="calibration")
        try:
            r1, r2 = 8, 8 + args.exchange_rounds
            for R in (r1, r2):  # compile (each specialisation of `rounds`) and warm up outside the timing
                exchange_run(P, R, G, GC, W, device)
            times = {R: _time_exchange(P, R, G, GC, W) for R in (r1, r2)}
            us = (times[r2] - times[r1]) * 1e3 / (r2 - r1)
            row["eager"] = {"median_ms": us / 1e3, "reps": 5}
            row["status"] = "info"
            halves = 4 * ITERS - 1  # product kernels of one forward+backward: 2T forward, 2T - 1 backward
            row["note"] = (f"{us:.2f} us per round, {P} CTAs, G={G}, {W * 4} B per slot; x{halves} (fwd+bwd "
                           f"half-iterations) = {halves * us:.0f} us")
            row["us_per_round"] = us
        except Exception as e:  # noqa: BLE001
            msg = one_line(e)
            row["status"] = "timeout" if "timeout" in msg else "error"
            row["note"] = msg
        rows.append(row)
    return rows


def _time_exchange(P: int, R: int, G: int, GC: int, W: int, reps: int = 5) -> float:
    """Median ms of one launch of R exchange rounds (CUDA events); raises on a timeout or wrong sums."""
    k = calibration_kernels()["exchange"]
    ts = []
    for _ in range(reps):
        slot = torch.zeros(2 * P * W, dtype=torch.float32, device="cuda")
        ctr = torch.zeros(1, dtype=torch.int32, device="cuda")
        stat = torch.zeros(P, 3, dtype=torch.int32, device="cuda")
        ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        ev0.record()
        k[(P,)](slot, ctr, stat, R, 1 << 20, P, G=G, GC=GC, W=W, num_warps=4)
        ev1.record()
        torch.cuda.synchronize()
        ts.append(ev0.elapsed_time(ev1))
        bad, late = int(stat[:, 0].sum()), int(stat[:, 1].sum())
        if bad or late:
            raise RuntimeError(f"{'timeout' if late else 'wrong sums'}: {late} timeouts, {bad} mismatches among "
                               f"{P} programs")
    return statistics.median(ts)


def compile_exchange_sm90() -> str:
    """CPU without the interpreter: compile the calibration kernels for sm_90 (no GPU needed), as a check that they
    build with this Triton (the exchange kernel cannot run on CPU: its programs must be co-resident)."""
    if triton is None:
        return f"n/a on CPU (Triton unavailable: {TRITON_IMPORT_ERROR})"
    try:
        from triton.backends.compiler import GPUTarget
        ks = calibration_kernels()
        sig = {"slot_ptr": "*fp32", "ctr_ptr": "*i32", "stat_ptr": "*i32", "rounds": "i32", "spin_cap": "i32",
               "P": "i32", "G": "constexpr", "GC": "constexpr", "W": "constexpr"}
        jobs = [(ks["exchange"], sig, {"G": G or 128, "GC": GC or 128, "W": W}) for _, G, GC, W in EXCHANGE_VARIANTS]
        jobs += [(ks["read"], {"x_ptr": "*fp32", "out_ptr": "*fp32", "n_per_prog": "i32", "repeat": "i32",
                               "BLOCK": "constexpr"}, {"BLOCK": 1024}),
                 (ks["empty"], {"x_ptr": "*fp32"}, {})]
        for fn, sg, consts in jobs:
            src = triton.compiler.ASTSource(fn=fn, signature=sg, constexprs=consts)
            triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        return f"timing n/a on CPU; exchange, read and empty kernels compiled for sm_90 (triton {triton.__version__})"
    except Exception as e:  # noqa: BLE001
        why = one_line(e)[:160]
        return f"timing n/a on CPU; sm_90 compile not possible here ({why})"


def calib_rows_basic(args, device: str):
    """cuBLAS product, L2 and HBM reads, graphed empty-kernel gap, eager Triton launch."""
    if device != "cuda":
        row = new_row(None, "read kernel (L2 / HBM)", backend="calibration")
        if INTERPRET and sk is not None:
            x = torch.ones(4 * 64, dtype=torch.float32)
            out = torch.empty(4, dtype=torch.float32)
            calibration_kernels()["read"][(4,)](x, out, 64, 3, BLOCK=16)
            ok = bool(torch.all(out == 3 * 64))
            row["status"], row["note"] = ("info" if ok else "FAIL"), \
                f"interpreter: sums {'correct' if ok else 'WRONG'}; timing n/a on CPU"
            row["failures"] = [] if ok else ["read kernel sums wrong under the interpreter"]
        else:
            row["status"], row["note"] = "n/a", "CUDA only (cuBLAS, L2/HBM reads, graph gaps)"
        return [row]
    rows = []
    for fn in (calib_cublas, calib_reads, calib_launch_gaps):
        try:
            rows += fn(args)
        except Exception as e:  # noqa: BLE001
            row = new_row(None, fn.__name__, backend="calibration")
            row["status"], row["note"] = "error", one_line(e)
            rows.append(row)
    return rows


def _events_ms(fn, n_inner: int, reps: int = 5) -> float:
    """Median over reps of (time of n_inner back-to-back calls) / n_inner, CUDA events."""
    ts = []
    for _ in range(reps):
        ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        ev0.record()
        for _ in range(n_inner):
            fn()
        ev1.record()
        torch.cuda.synchronize()
        ts.append(ev0.elapsed_time(ev1) / n_inner)
    return statistics.median(ts)


def calib_cublas(args):
    rows = []
    A = torch.randn(256, 1000, device="cuda")
    Bm = torch.randn(1000, 1000, device="cuda")
    flop = 2 * 256 * 1000 * 1000
    for tf32 in (False, True):
        with matmul_precision(tf32):
            torch.mm(A, Bm)
            ms = _events_ms(lambda: torch.mm(A, Bm), 50)
        row = new_row(None, f"cuBLAS 256x1000x1000 {'TF32' if tf32 else 'fp32'}", backend="calibration")
        row["eager"] = {"median_ms": ms, "reps": 5}
        row["status"], row["note"] = "info", f"{flop / ms / 1e9:.1f} TFLOP/s (mean of 50 back-to-back)"
        rows.append(row)
    return rows


def calib_reads(args):
    rows = []
    k = calibration_kernels()["read"]
    progs = 4 * torch.cuda.get_device_properties(0).multi_processor_count
    BLOCK = 1024
    for label, mb, repeat in (("L2-resident read 16 MB", 16, 64), ("HBM read 1 GB", 1024, 1)):
        per = max(BLOCK, (mb * 2**20 // 4 // progs) // BLOCK * BLOCK)
        x = torch.ones(progs * per, dtype=torch.float32, device="cuda")
        out = torch.empty(progs, dtype=torch.float32, device="cuda")

        def run():
            k[(progs,)](x, out, per, repeat, BLOCK=BLOCK)
        run()
        torch.cuda.synchronize()
        ok = bool(torch.all(out == float(repeat * per)))
        ms = _events_ms(run, 5)
        gbs = x.numel() * 4 * repeat / (ms * 1e-3) / 1e9
        row = new_row(None, label, backend="calibration")
        row["eager"] = {"median_ms": ms, "reps": 5}
        row["status"] = "info" if ok else "error"
        row["note"] = f"{gbs:.0f} GB/s ({x.numel() * 4 / 2**20:.0f} MB x {repeat}, .cg loads)" + \
            ("" if ok else "; WRONG sums")
        rows.append(row)
        del x
    return rows


def calib_launch_gaps(args):
    k = calibration_kernels()["empty"]
    x = torch.zeros(1, device="cuda")
    N = 200

    def launches():
        for _ in range(N):
            k[(1,)](x)
    launches()
    torch.cuda.synchronize()
    eager_ms = _events_ms(launches, 1) / N
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        launches()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        launches()
    graph.replay()
    torch.cuda.synchronize()
    graph_ms = _events_ms(graph.replay, 1) / N
    row_g = new_row(None, "graphed empty Triton kernel gap", backend="calibration")
    row_g["graph"] = {"median_ms": graph_ms, "reps": 5}
    row_g["status"], row_g["note"] = "info", f"{graph_ms * 1e3:.2f} us per kernel ({N} in one graph)"
    row_e = new_row(None, "eager empty Triton kernel launch", backend="calibration")
    row_e["eager"] = {"median_ms": eager_ms, "reps": 5}
    row_e["status"], row_e["note"] = "info", f"{eager_ms * 1e3:.2f} us per launch (host-bound, {N} back-to-back)"
    return [row_g, row_e]


# ============================================================================================ tile sweep
def parse_tiles(spec: str):
    cfgs = []
    for s in spec.split(","):
        if s.strip():
            cfg = tuple(int(x) for x in s.lower().split("x"))
            if len(cfg) != 4:
                raise ValueError(f"tile config {s!r}: expected BLOCK_BxBLOCK_NxBLOCK_Kxnum_warps")
            cfgs.append(cfg)
    return cfgs


def row_tile(pb: Problem, cfg, args, device: str) -> dict:
    bk = make_backend(f"triton-{args.sweep_precision}", device)
    with tile_config(cfg):
        row = row_ours(pb, bk, args, device, method=f"tiles {'x'.join(map(str, cfg))} {bk.name}")
    row["tile_config"] = list(cfg)
    return row


# ============================================================================================ CUDA C++ launch sweep
def cuda_tuning_ops():
    """torch.ops.wkd_tuning (csrc/cuda/sinkhorn.cu, section "tuning ops": wkd::sinkhorn / sinkhorn_backward with the
    tile table entry and the rows per CTA as per-call arguments), or None in a build without the CUDA C++ kernels."""
    try:
        ops = torch.ops.wkd_tuning
        ops.num_tiles  # resolving an op of an unregistered library raises
        return ops
    except (AttributeError, RuntimeError):
        return None


def cuda_sweep_unavailable(device: str):
    """None when the CUDA C++ launch sweep can run, else the reason."""
    if device != "cuda":
        return "the CUDA C++ kernels need --device cuda"
    if cuda_tuning_ops() is None:
        return f"no CUDA C++ kernels (torch.ops.wkd_tuning) in this build ({wk.build_info()})"
    return None


def tile_label(ops, tile: int) -> str:
    """'auto' or 'k: BMxBN, TMxTN/thread, threads, min CTAs/SM' from tile_table() (5 integers per entry)."""
    if tile < 0:
        return "auto"
    bm, bn, tm, tn, min_blocks = list(ops.tile_table())[5 * tile:5 * tile + 5]
    return f"{tile}: {bm}x{bn}, {tm}x{tn}/thread, {(bm // tm) * (bn // tn)} threads, >= {min_blocks} CTA/SM"


def small_plan_note(ops, pb: Problem, rows_per_block: int) -> str:
    """The single-launch kernels' plan that runs (small_plan: R after the shared-memory limit), both directions."""
    parts = []
    for name, backward in (("fwd", False), ("bwd", True)):
        R, ctas, threads, on_chip, smem = ops.small_plan(pb.B, pb.n, pb.m, DTYPE, False, backward, rows_per_block)
        parts.append(f"{name} R={R} {ctas} CTAs x {threads} thr, M {'on' if on_chip else 'off'} chip, "
                     f"{smem / 1024:.1f} KiB")
    return "; ".join(parts)


def row_cuda_choice(pb: Problem, args, device: str, tile: int = -1, rows_per_block: int = -1) -> dict:
    """Forward (with history) + backward through torch.ops.wkd_tuning with an explicit tile table entry (the
    per-half-iteration kernels, n or m > 256) or rows per CTA (the single-launch kernels, n, m <= 256): errors vs
    the float64 CPU op, bits vs the product op (torch.ops.wkd.*, the automatic choice: u, v and the gradients
    bitwise, the value too for rows_per_block, to rounding for a tile), eager and graphed medians (CUDA events)."""
    small = max(pb.n, pb.m) <= 256
    what = f"rows_per_block {rows_per_block if rows_per_block > 0 else 'auto'}" if small else "tile"
    row = new_row(pb, f"cuda {what}" if small else "cuda tile", backend="cuda", precision="exact", tile=tile,
                  rows_per_block=rows_per_block)
    why = cuda_sweep_unavailable(device)
    if why:
        row["status"], row["note"] = "n/a", why
        return row
    ops = cuda_tuning_ops()
    if not small:
        row["method"] = f"cuda tile {tile_label(ops, tile)}"
    ref = reference(pb)
    g = grad_weights(pb.B, device)

    def step():
        out = ops.sinkhorn(pb.a, pb.b, pb.cost, REG, ITERS, EPS, False, True, tile=tile,
                           rows_per_block=rows_per_block)
        ga, gb = ops.sinkhorn_backward(g, pb.a, pb.b, pb.cost, *out[3:], REG, False, EPS, tile=tile,
                                       rows_per_block=rows_per_block)
        return out[0], out[1], out[2], ga, gb

    poison(pb, device)
    first = step()
    sync(device)
    for key, name, x in zip(("err_val", "err_u", "err_v", "err_ga", "err_gb"),
                            ("value", "u", "v", "grad_a", "grad_b"), first):
        row[key] = rel_err(x, ref[name])
    product = op_call(make_backend("cuda", device), pb, g, device)
    checks = {"u_v_grads_equal_product_op": bits_equal(first[1:], product[1:])}
    if small or tile < 0:
        checks["value_equals_product_op"] = bits_equal(first[:1], product[:1])
    else:  # the value's partial sums follow the tile width: equal to rounding (float32 sums of up to ~1000 terms in
        # another order: 1e-5 relative, a tenth of the value's threshold vs float64)
        checks["value_close_to_product_op"] = rel_err(first[0], product[0].detach().double().cpu()) <= 1e-5
    timing_error = None
    try:
        row["mem_MB"] = peak_extra_mb(step, device)
        row["eager"] = measure(step, device, args.reps, args.warmup)
        row["graph"], captured, _ = graphed(step, device, args.reps, args.warmup)
        checks["graph_equals_eager"] = bits_equal(captured, first)
    except Exception as e:  # noqa: BLE001 - the correctness results above survive a failing measurement
        timing_error = f"timing/capture raised {one_line(e)}"
        with contextlib.suppress(Exception):
            sync(device)
    row["checks"] = checks
    row["det"] = "yes" if all(checks.values()) else "NO"
    row["note"] = small_plan_note(ops, pb, rows_per_block) if small else "per-half-iteration kernels"
    failures = [f"{k} is False" for k, v in checks.items() if not v] + ([timing_error] if timing_error else [])
    judge(row, "exact", failures)
    return row


def cuda_sweep_tasks(problems, args, device):
    """--sweep-cuda-tiles: every tile table entry (and auto) at the first size with n or m > 256, rows per CTA
    (auto and ROWS_PER_BLOCK_SWEEP) at every size with n, m <= 256; or one row saying why not."""
    why = cuda_sweep_unavailable(device)
    if why:
        return [Task("cuda sweep", "cuda tile / rows_per_block sweep",
                     lambda: {**new_row(None, "cuda tile / rows_per_block sweep", backend="cuda"), "size": "sweep",
                              "status": "skipped", "note": why})]
    tasks = []
    large = [pb for pb in problems if max(pb.n, pb.m) > 256][:1]
    for pb in large:
        for tile in [-1] + list(range(int(cuda_tuning_ops().num_tiles()))):
            tasks.append(Task(pb.label, f"cuda tile {tile}", lambda pb=pb, tile=tile: row_cuda_choice(
                pb, args, device, tile=tile), ours=True))
    for pb in (pb for pb in problems if max(pb.n, pb.m) <= 256):
        for rpb in (-1,) + ROWS_PER_BLOCK_SWEEP:
            tasks.append(Task(pb.label, f"cuda rows_per_block {rpb}", lambda pb=pb, rpb=rpb: row_cuda_choice(
                pb, args, device, rows_per_block=rpb), ours=True))
    return tasks


# ============================================================================================ Triton on-chip sweep
def onchip_candidates():
    """The float32 scaling-domain configurations of the single-launch Triton kernels to time:
    sk.ONCHIP_CONFIG_CANDIDATES, (BLOCK_B, BLOCK_N, BLOCK_K, num_warps) each."""
    return tuple(tuple(c) for c in sk.ONCHIP_CONFIG_CANDIDATES)


def row_onchip(pb: Problem, cfg, args, device: str) -> dict:
    bk = make_backend(f"triton-{args.sweep_precision}", device)
    with onchip_config(cfg):
        row = row_ours(pb, bk, args, device, method=f"onchip {'x'.join(map(str, cfg))} {bk.name}")
    row["onchip_config"] = list(cfg)
    return row


def onchip_sweep_tasks(problems, args, device):
    """--sweep-onchip: each candidate at ONCHIP_SWEEP_SIZES (smoke: the first smoke size the single-launch kernels
    take), or one row saying why not."""
    if sk is None:
        return [Task("onchip sweep", "triton onchip sweep",
                     lambda: {**new_row(None, "triton onchip sweep", backend="triton"), "size": "sweep",
                              "status": "skipped", "note": f"Triton unavailable: {TRITON_IMPORT_ERROR}"})]
    if args.smoke:
        sizes = [pb for pb in problems if pb.cost.dim() == 2 and max(pb.n, pb.m) <= sk.ONCHIP_MAX_C][:1]
    else:  # the problems of --sizes where they are the same (their float64 references are cached there)
        known = {(pb.B, pb.n, pb.m, pb.kind): pb for pb in problems}
        sizes = [known.get(parse_size(s)) or make_problem(s).to(device) for s in ONCHIP_SWEEP_SIZES.split(",")]
    tasks = []
    for cfg in onchip_candidates():
        for pb in sizes:
            tasks.append(Task(pb.label, f"onchip {'x'.join(map(str, cfg))} triton-{args.sweep_precision}",
                              lambda pb=pb, cfg=cfg: row_onchip(pb, cfg, args, device), COMPILE_NEED_S, ours=True))
    return tasks


# ============================================================================================ rows, budget, output
def new_row(pb, method: str, **kw) -> dict:
    row = {"size": pb.label if pb is not None else "calib", "method": method, "status": None, "note": ""}
    if pb is not None:
        row.update(B=pb.B, n=pb.n, m=pb.m, cost=pb.src)
    row.update(kw)
    return row


def table_view(row: dict) -> dict:
    v = {k: row.get(k) for k in COLUMNS}
    v["eager_ms"] = row["eager"]["median_ms"] if row.get("eager") else None
    v["graph_ms"] = row["graph"]["median_ms"] if row.get("graph") else None
    return v


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = _T0, seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, need_s: float) -> bool:
        return self.elapsed() + need_s <= self.seconds


@dataclass
class Task:
    size: str
    label: str
    fn: object  # () -> dict or list of dicts
    need_s: float = ROW_NEED_S
    ours: bool = False  # an error in this row counts as a failure


def build_tasks(problems, backends, args, device):
    """All rows in priority order (see the module docstring)."""
    tasks, compiled = [], set()

    def add_ours(pb, bk):
        key = (bk.triton_precision, pb.B % 16 == 0)  # new Triton specialisations get JIT-compiled
        need = COMPILE_NEED_S if bk.triton_precision and key not in compiled else ROW_NEED_S
        compiled.add(key)
        tasks.append(Task(pb.label, bk.name, lambda: row_ours(pb, bk, args, device), need, ours=True))
        if bk.triton_precision == "ieee" and sk is not None and pb.cost.dim() == 2 and max(pb.n, pb.m) <= sk.ONCHIP_MAX_C:
            # the same sizes through the per-half-iteration kernels: what the single-launch ones gain, same run
            tasks.append(Task(pb.label, f"{bk.name} per-half-iteration", lambda: row_multi_launch(pb, bk, args, device),
                              COMPILE_NEED_S, ours=True))

    def add_baselines(pb):
        for tf32 in (False, True):
            for graph in (False, True):
                name = f"plain PyTorch {'TF32' if tf32 else 'fp32'} {'graph' if graph else 'eager'}"
                tasks.append(Task(pb.label, name, lambda tf32=tf32, graph=graph: row_plain(pb, args, device, tf32,
                                                                                         graph)))
        if pb.kind == "wkd" and (pb is problems[0] if args.smoke else (pb.B, pb.n) == (256, 1000)):
            tasks.append(Task(pb.label, "published WKD-L (gather) eager", lambda: row_published(pb, args, device), 5.0))
        if device == "cuda":
            tasks.append(Task(pb.label, "cpu fp32 op (floor)", lambda: row_cpu_floor(pb, args, device)))

    if not args.sweeps_only:
        for pb in problems:
            for bk in backends:
                add_ours(pb, bk)
            add_baselines(pb)
        tasks.append(Task("calib", "cuBLAS, reads, launch gaps", lambda: calib_rows_basic(args, device), 5.0))
        tasks.append(Task("calib", "exchange", lambda: calib_rows_exchange(args, device), 5.0))
    if args.sweep_tiles:
        pb = problems[0]
        for cfg in parse_tiles(args.sweep_tiles):
            tasks.append(Task(pb.label, f"tiles {'x'.join(map(str, cfg))} triton-{args.sweep_precision}",
                              lambda cfg=cfg: row_tile(pb, cfg, args, device), COMPILE_NEED_S, ours=True))
    if args.sweep_cuda_tiles:
        tasks += cuda_sweep_tasks(problems, args, device)
    if args.sweep_onchip:
        tasks += onchip_sweep_tasks(problems, args, device)
    return tasks


def run_tasks(tasks, budget: Budget, device: str):
    rows, skipped = [], []
    for task in tasks:
        if skipped or not budget.allows(task.need_s):
            skipped.append(f"{task.size} {task.label}")
            continue
        t0 = time.perf_counter()
        try:
            out = task.fn()
            out = out if isinstance(out, list) else [out]
        except Exception as e:  # noqa: BLE001 - a failing row prints one line, the script goes on
            msg = one_line(e)
            row = {"size": task.size, "method": task.label, "status": "ERROR" if task.ours else "error",
                   "note": msg, "traceback": traceback.format_exc()[-2000:]}
            if task.ours:
                row["failures"] = [msg]
            out = [row]
            with contextlib.suppress(Exception):
                sync(device)
        for r in out:
            r["row_s"] = time.perf_counter() - t0
            rows.append(r)
            print(f"[{budget.elapsed():6.1f}s] " + " | ".join(f"{k}={_short(v)}" for k, v in table_view(r).items()
                                                              if v not in (None, "")), flush=True)
    if skipped:
        print(f"# budget {budget.seconds:g} s: at {budget.elapsed():.1f} s too little was left for the next row; "
              f"skipped the {len(skipped)} remaining rows: {', '.join(skipped)}", flush=True)
    return rows, skipped


def _short(v):
    if isinstance(v, float):
        return "inf" if v == math.inf else f"{v:.3g}"
    return str(v)


def meta_info(args, device, problems, backends, budget, skipped, data_dir):
    import wkd_kernels
    info = {"device": device_name(device), "device_kind": device, "torch": torch.__version__,
            "triton": getattr(triton, "__version__", None), "triton_interpret": INTERPRET,
            "python": platform.python_version(), "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "build": wkd_kernels.build_info(), "dtype": str(DTYPE).replace("torch.", ""), "reg": REG,
            "iters": ITERS, "eps": EPS, "temperature": TEMPERATURE, "reps": args.reps, "warmup": args.warmup,
            "sizes": [{"label": p.label, "B": p.B, "n": p.n, "m": p.m, "kind": p.kind, "cost": p.src}
                      for p in problems],
            "backends": [b.name for b in backends], "thresholds": THRESHOLDS, "budget_s": args.budget_s,
            "elapsed_s": budget.elapsed(), "skipped": skipped, "data_dir": str(data_dir) if data_dir else None,
            "smoke": args.smoke, "argv": sys.argv[1:]}
    if device == "cuda":
        with contextlib.suppress(Exception):  # after a sticky CUDA error the outputs must still be written
            p = torch.cuda.get_device_properties(0)
            info.update(sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                        total_mem_GB=p.total_memory / 2**30)
    return info


def write_outputs(rows, meta, out_dir: Path, table: str):
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "gpu_quick.json", "w") as f:
        json.dump(_finite({"meta": meta, "rows": rows}), f, indent=2, default=str)
    head = (f"# gpu_quick: {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date_utc']}\n\n"
            f"float32, reg {REG}, {ITERS} iterations, eps {EPS}; medians of up to {meta['reps']} reps; "
            f"errors vs the float64 CPU op; {meta['elapsed_s']:.0f} s"
            + (f"; skipped (budget): {', '.join(meta['skipped'])}" if meta["skipped"] else "") + "\n\n")
    with open(out_dir / "gpu_quick.md", "w") as f:
        f.write(head + "```\n" + table + "\n```\n")


def _finite(x):
    """Strict JSON: inf / nan floats (e.g. the error of a NaN output) become the strings "inf" / "nan"."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def plot(rows, path: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"# --plot {path}: matplotlib is not installed (pip install matplotlib); no plot written", flush=True)
        return
    timed = [r for r in rows if r.get("size") != "calib" and (r.get("eager") or r.get("graph"))]
    sizes = list(dict.fromkeys(r["size"] for r in timed))
    series = {}
    for r in timed:
        for kind in ("eager", "graph"):
            if r.get(kind):
                name = r["method"] if r["method"].endswith(("eager", "graph")) else f"{r['method']} [{kind}]"
                series.setdefault(name, {})[r["size"]] = r[kind]["median_ms"]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(sizes)), 5))
    width = 0.8 / max(1, len(series))
    for i, (name, vals) in enumerate(series.items()):
        xs = [j + i * width for j, s in enumerate(sizes) if s in vals]
        ax.bar(xs, [vals[s] for s in sizes if s in vals], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], sizes)
    ax.set_yscale("log")
    ax.set_ylabel("forward+backward, ms (median)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"# plot written to {path}", flush=True)


# ============================================================================================ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where to run (default: cuda when available, else cpu)")
    ap.add_argument("--smoke", action="store_true",
                    help=f"tiny sizes ({SMOKE_SIZES}), 1 rep, no warm-up: checks that the script runs (default: off)")
    ap.add_argument("--out", default=str(REPO / "bench_results"),
                    help="folder for gpu_quick.json and gpu_quick.md (default: bench_results/ in the repo)")
    ap.add_argument("--data-dir", default=None,
                    help="folder with the released cost matrices (default: WKD_DATA_DIR, else data/ in the repo: "
                         "bench/_common.find_data_dir)")
    ap.add_argument("--budget-s", type=float, default=170.0,
                    help="time budget in seconds: remaining rows are skipped once it is spent (default: 170)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement (default: 30; smoke 1)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up calls before timing (default: 3; smoke 0)")
    ap.add_argument("--sizes", default=None,
                    help=f"comma-separated BxC (WKD-L problem) or BxNxM (random) sizes (default: {DEFAULT_SIZES}; "
                         f"smoke: {SMOKE_SIZES})")
    ap.add_argument("--backends", default=None,
                    help="comma-separated subset of cuda, triton-ieee, triton-tf32x3, triton-tf32 (and cpu on "
                         "--device cpu) (default: all of them for the device)")
    ap.add_argument("--sweep-tiles", nargs="?", const=DEFAULT_TILES, default=None, metavar="CONFIGS",
                    help="also time the Triton kernels at the first size with these float32 DOT_CONFIG tiles, "
                         f"BLOCK_BxBLOCK_NxBLOCK_Kxnum_warps (flag alone: {DEFAULT_TILES}; default: off)")
    ap.add_argument("--sweep-precision", default="ieee", choices=["ieee", "tf32x3", "tf32"],
                    help="tl.dot precision of the Triton tile and on-chip sweeps (default: ieee)")
    ap.add_argument("--sweep-cuda-tiles", action="store_true",
                    help="also time the CUDA C++ kernels through torch.ops.wkd_tuning: every entry of the tile table "
                         "(and auto) at the first size with n or m > 256, and rows per CTA auto, "
                         f"{','.join(map(str, ROWS_PER_BLOCK_SWEEP))} at the sizes with n, m <= 256 (default: off)")
    ap.add_argument("--sweep-onchip", action="store_true",
                    help="also time the single-launch Triton kernels with each float32 scaling-domain configuration "
                         "of sk.ONCHIP_CONFIG_CANDIDATES at "
                         f"{ONCHIP_SWEEP_SIZES} (smoke: the first smoke size) (default: off)")
    ap.add_argument("--sweeps-only", action="store_true",
                    help="run only the sweeps asked for (--sweep-tiles, --sweep-cuda-tiles, --sweep-onchip), not the "
                         "correctness / timing / baseline / calibration rows: a tuning run as a device call of its "
                         "own (default: off)")
    ap.add_argument("--iters", type=int, default=None,
                    help="Sinkhorn iterations (default: 10, WKD-L's; smoke: 3, which runs every kernel variant)")
    ap.add_argument("--exchange-rounds", type=int, default=200,
                    help="extra rounds timed by the exchange microbenchmark (default: 200)")
    ap.add_argument("--plot", default=None, metavar="FILE.png",
                    help="also plot forward+backward time per method and size (needs matplotlib; default: off)")
    args = ap.parse_args(argv)
    if args.data_dir and not Path(args.data_dir).is_dir():
        ap.error(f"--data-dir {args.data_dir}: not a directory")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available (use --device cpu --smoke)")
    args.reps = args.reps if args.reps is not None else (1 if args.smoke else 30)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 3)
    args.sizes = args.sizes or (SMOKE_SIZES if args.smoke else DEFAULT_SIZES)
    args.iters = args.iters if args.iters is not None else (3 if args.smoke else 10)
    if args.iters < 2:
        ap.error("--iters must be >= 2 (the backward's first and middle steps are different kernels)")
    if args.sweeps_only and not (args.sweep_tiles or args.sweep_cuda_tiles or args.sweep_onchip):
        ap.error("--sweeps-only needs at least one of --sweep-tiles, --sweep-cuda-tiles, --sweep-onchip")
    if args.backends is None:
        args.backends = ("cpu," if args.device == "cpu" else "cuda,") + "triton-ieee,triton-tf32x3,triton-tf32"
    try:
        for spec in args.sizes.split(","):
            if spec.strip():
                parse_size(spec)
        for name in args.backends.split(","):
            if name.strip():
                make_backend(name.strip(), args.device)
        if args.sweep_tiles:
            parse_tiles(args.sweep_tiles)
    except ValueError as e:
        ap.error(str(e))
    return args


def announce_data(problems, data_dir):
    real = {1000: "imagenet_resnet34_cka_distance.pth", 100: "cifar100_resnet32x4_cka_distance.pth"}
    for p in problems:
        if p.kind == "wkd" and p.n in real and p.src != real[p.n]:
            print(f"#### WARNING: {real[p.n]} not found (data dir: {data_dir}); size {p.label} uses a RANDOM "
                  "STAND-IN cost: its accuracy rows do not speak for the real problem ####", flush=True)
            p.src = "RANDOM STAND-IN (" + p.src + ")"
            p.label += STANDIN_MARK


def main(argv=None) -> int:
    global ITERS
    args = parse_args(argv)
    ITERS = args.iters
    budget = Budget(args.budget_s)
    device = args.device
    if args.data_dir:
        os.environ["WKD_DATA_DIR"] = str(Path(args.data_dir).resolve())
    data_dir = find_data_dir()
    if device == "cuda" and INTERPRET:
        print("# WARNING: TRITON_INTERPRET=1 with --device cuda: the Triton rows run in the interpreter", flush=True)
    problems = [make_problem(s) for s in args.sizes.split(",") if s.strip()]
    announce_data(problems, data_dir)
    for p in problems:
        p.to(device)
    backends = [make_backend(b.strip(), device) for b in args.backends.split(",") if b.strip()]
    print(f"# gpu_quick: {device_name(device)}, torch {torch.__version__}, triton "
          f"{getattr(triton, '__version__', None)}{' (interpreter)' if INTERPRET else ''}, build {wk.build_info()}; "
          f"sizes {args.sizes}; backends {args.backends}; {ITERS} iterations; budget {args.budget_s:g} s", flush=True)
    torch.manual_seed(0)
    tasks = build_tasks(problems, backends, args, device)
    rows, skipped = run_tasks(tasks, budget, device)

    view = [table_view(r) for r in rows]
    print()
    table = print_table(view, COLUMNS) if view else "(no rows ran)"
    if not view:
        print(table)
    failed = [r for r in rows if r.get("failures")]
    if any(p.label.endswith(STANDIN_MARK) for p in problems):
        table += f"\n({STANDIN_MARK} after a size: the real cost matrix was not found, a RANDOM STAND-IN was used)"
        print(table.splitlines()[-1])
    if skipped:
        table += f"\n(skipped, budget {args.budget_s:g} s: {', '.join(skipped)})"
        print(table.splitlines()[-1])
    meta = meta_info(args, device, problems, backends, budget, skipped, data_dir)
    write_outputs(rows, meta, Path(args.out), table)
    if args.plot:
        try:
            plot(rows, args.plot)
        except Exception as e:  # noqa: BLE001
            print(f"# --plot failed: {type(e).__name__}: {e}", flush=True)
    print(f"# wrote {Path(args.out) / 'gpu_quick.json'} and gpu_quick.md; {budget.elapsed():.1f} s; "
          f"{len(failed)} failed row(s)" + (": " + ", ".join(f"{r['size']} {r['method']}" for r in failed)
                                             if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
