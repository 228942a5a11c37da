"""gpu_quick: the first questions about the Sinkhorn kernels on a GPU, most important first, in one short process.

Sizes, in this order (B x C: WKD-L's problem on the shared C x C cost; B x N x M: random, non-square, odd):
256x1000 (the released ImageNet cost when present: bench/_common.find_cost_file), 256x100, 4096x81, 129x1001x999.
At each size, forward+backward (value and the exact gradients w.r.t. a and b, fixed non-uniform grad_value) of

* ``torch``        the device-generic backend (ATen ops only, wkd_kernels/aten/: torch.ops.wkd.sinkhorn_torch);
* ``cuda``         the CUDA C++ kernels (torch.ops.wkd.sinkhorn);
* ``triton-ieee``, ``triton-tf32x3``  the Triton kernels with that float32 tl.dot precision;
* ``plain fp32``, ``plain tf32``  plain PyTorch: the same loop as matrix products with autograd
  (bench/compare_pot.plain_pytorch), float32 matmuls in full fp32 or TF32;

each eager and CUDA-graphed (backend "<name> graph"). Right after the first size: the calibration, i.e. the L2 and
HBM read bandwidth (a Triton read kernel with .cg loads) and the cost of one grid-wide barrier round among co-resident
CTAs (partial sums through L2, release/acquire counter): what each of the ~40 half-iterations of a persistent
multi-CTA Sinkhorn would pay.

Every result is one row of the benchmark schema (bench/_common.ROW_FIELDS): op "sinkhorn" (or "calibration"),
mode "fwd+bwd", median / p20 / p80 ms over the timed calls (CUDA events), peak_mem_mb of one eager call above what
was allocated before it, max_rel_err = the largest of max |x - ref| / max |ref| over value, grad_a, grad_b against
the float64 CPU op on the same float32 inputs. The note starts with "ok", "ABOVE <threshold>" (an IEEE-exact
backend over 1e-4 on the value or 5e-4 on a gradient, triton-tf32x3 over 1e-3 / 3e-3), "info" (baselines,
calibration: reported, not judged) or "error: ..." (the row raised). OUT/gpu_quick.json, .md and .csv are rewritten
after every row (bench/_common.RowWriter), so a run killed mid-way keeps every finished row. The exit code is 1 when
a row of ours is above its threshold or raised.

The bitwise determinism, NaN-poisoned output buffers and graph-capture checks are tests
(python_tests/test_sinkhorn_gpu.py, marked gpu); the launch-configuration sweeps are bench/tune_sinkhorn.py.

Budget: rows run in the order above; once --budget-s seconds are spent (or too little is left for the next row:
8 s for one that JIT-compiles new Triton kernels, 2 s otherwise) the remaining rows are written as "skipped" rows.

On CPU (``--device cpu --smoke``): tiny sizes, 3 iterations, 1 rep; the backends "torch", "cpu" (the C++ op) and,
with TRITON_INTERPRET=1, the Triton kernels on CPU tensors; no graphs; the calibration kernels run once under the
interpreter (one program) as a check of their sums.

Usage:
    python bench/gpu_quick.py --out OUT                                       # on the GPU machine, ~2 min
    TRITON_INTERPRET=1 python bench/gpu_quick.py --device cpu --smoke --out /tmp/gq                 # seconds
"""
from __future__ import annotations

import time

_T0 = time.perf_counter()  # the budget counts from process start (imports included)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (COST_FILES, REPO, RowWriter, _atomic_write, bench_row, capture_cuda_graph, time_fn,  # noqa: E402
                     device_name, wkd_cost)
from compare_pot import plain_pytorch, wkd_logits  # noqa: E402

import wkd_kernels as wk  # noqa: E402

try:
    import triton
    import triton.language as tl
    TRITON_IMPORT_ERROR = None
except Exception as e:  # noqa: BLE001 - any import failure: the Triton rows say why
    triton = tl = None
    TRITON_IMPORT_ERROR = f"{type(e).__name__}: {e}"

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
REG, EPS, TEMPERATURE = 0.05, 1e-8, 2.0
DTYPE = torch.float32
DEFAULT_SIZES = "256x1000,256x100,4096x81,129x1001x999"
SMOKE_SIZES = "8x20,5x13x11"
DEFAULT_BACKENDS = "torch,cuda,triton-ieee,triton-tf32x3,plain-fp32,plain-tf32"
SMOKE_BACKENDS = "torch,cpu,triton-ieee,triton-tf32x3,plain-fp32"
# (value threshold, gradient threshold) of max |x - ref| / max |ref| vs the float64 CPU op, per precision class
THRESHOLDS = {"exact": (1e-4, 5e-4), "tf32x3": (1e-3, 3e-3)}
COMPILE_NEED_S, ROW_NEED_S, MEASURE_CAP_S = 8.0, 2.0, 3.0


# ============================================================================================ problems
@dataclass
class Problem:
    """One size: float32 marginals a [B, n], b [B, m] and cost [n, m]; ``shape`` the schema's shape string."""
    shape: str
    B: int
    n: int
    m: int
    a: torch.Tensor
    b: torch.Tensor
    cost: torch.Tensor
    src: str
    ref: dict = None  # float64 CPU op results, computed on first use


def parse_size(spec: str):
    """'BxC' -> (B, C, C, "wkd"); 'BxNxM' -> (B, N, M, "random")."""
    try:
        parts = [int(x) for x in spec.lower().strip().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 2:
        return parts[0], parts[1], parts[1], "wkd"
    if len(parts) == 3:
        return parts[0], parts[1], parts[2], "random"
    raise ValueError(f"--sizes: {spec!r} is not BxC or BxNxM")


def make_problem(spec: str, device: str) -> Problem:
    """WKD-L's marginals (softmax(logits / 2), target class given zero mass, the shared sharpened cost) for BxC;
    random rows with one zero-mass entry each and a uniform [0, 1) cost for BxNxM."""
    B, n, m, kind = parse_size(spec)
    if kind == "wkd":
        s, t, y = wkd_logits(B, n, 0)
        removed = F.one_hot(y, n).bool()
        a = torch.softmax((s / TEMPERATURE).masked_fill(removed, float("-inf")), 1)
        b = torch.softmax((t / TEMPERATURE).masked_fill(removed, float("-inf")), 1)
        cost, src = wkd_cost(n, dtype=DTYPE)
        shape = f"B={B} C={n}"
    else:
        g = torch.Generator().manual_seed(0)

        def rows(k):
            x = torch.randn(B, k, generator=g)
            x[torch.arange(B), torch.randint(0, k, (B,), generator=g)] = float("-inf")
            return torch.softmax(x, 1)
        a, b = rows(n), rows(m)
        cost, src = torch.rand(n, m, generator=g, dtype=torch.float64), "random uniform"
        shape = f"B={B} n={n} m={m}"
    return Problem(shape, B, n, m, a.to(device, DTYPE), b.to(device, DTYPE), cost.to(device, DTYPE), src)


def grad_weights(B: int, device) -> torch.Tensor:
    """The fixed non-uniform grad_value of every backward (rows do not enter with equal weights)."""
    return torch.linspace(0.5, 1.5, B, dtype=DTYPE, device=device)


def reference(pb: Problem, iters: int) -> dict:
    """Float64 CPU op on the float32 inputs: value, grad_a, grad_b (cached on the problem)."""
    if pb.ref is None:
        a, b, c = (t.detach().cpu().double() for t in (pb.a, pb.b, pb.cost))
        out = torch.ops.wkd.sinkhorn(a, b, c, REG, iters, EPS, False, True)
        g = grad_weights(pb.B, "cpu").double()
        ga, gb = torch.ops.wkd.sinkhorn_backward(g, a, b, c, *out[3:], REG, False, EPS)
        pb.ref = {"value": out[0], "grad_a": ga, "grad_b": gb}
    return pb.ref


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|; inf when x has a non-finite entry."""
    x = x.detach().double().cpu()
    if not bool(torch.isfinite(x).all()):
        return math.inf
    scale = ref.abs().max().item()
    return (x - ref).abs().max().item() / (scale if scale > 0 else 1.0)


# ============================================================================================ methods
@dataclass
class Method:
    """A backend of the table: ``kind`` "ours" (wk.sinkhorn with ``wk_backend`` / ``precision``) or "plain"."""
    name: str
    kind: str
    wk_backend: str = None
    precision: str = None  # Triton: tl.dot precision; plain: "fp32" / "tf32"

    @property
    def threshold_class(self):
        return "tf32x3" if self.precision == "tf32x3" else "exact"


def make_method(name: str) -> Method:
    if name in ("torch", "cuda", "cpu"):
        return Method(name, "ours", wk_backend=name)
    if name in ("triton-ieee", "triton-tf32x3"):
        return Method(name, "ours", wk_backend="triton", precision=name.split("-", 1)[1])
    if name in ("plain-fp32", "plain-tf32"):
        return Method(name, "plain", precision=name.split("-", 1)[1])
    raise ValueError(f"--backends: unknown backend {name!r}; choose from torch, cuda, cpu, triton-ieee, "
                     "triton-tf32x3, plain-fp32, plain-tf32")


def unavailable(method: Method, device: str):
    """None when the method can run here, else why not."""
    if method.name == "cuda" and device != "cuda":
        return "the CUDA C++ kernels need --device cuda"
    if method.name == "cuda" and not wk.HAS_CUDA_EXT:
        return f"this build has no CUDA C++ kernels ({wk.build_info()})"
    if method.name == "cpu" and device != "cpu":
        return "the C++ CPU op runs on --device cpu"
    if method.wk_backend == "triton":
        if triton is None:
            return f"Triton unavailable: {TRITON_IMPORT_ERROR}"
        if device == "cpu" and not INTERPRET:
            return "Triton on CPU needs TRITON_INTERPRET=1"
    if method.kind == "plain" and method.precision == "tf32" and device != "cuda":
        return "TF32 matmuls need a CUDA device"
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


def fwd_bwd_step(method: Method, pb: Problem, iters: int):
    """One forward+backward as a training step does it (autograd): returns step() -> (value, grad_a, grad_b)."""
    xa, xb = pb.a.detach().clone().requires_grad_(), pb.b.detach().clone().requires_grad_()
    g = grad_weights(pb.B, pb.a.device)

    def step():
        if method.kind == "plain":
            value = plain_pytorch(xa, xb, pb.cost, REG, iters, EPS)
        else:
            value = wk.sinkhorn(xa, xb, pb.cost, REG, iters, eps=EPS, backend=method.wk_backend,
                                precision=method.precision).value
        ga, gb = torch.autograd.grad(value, (xa, xb), grad_outputs=g)
        return value, ga, gb
    return step


# ============================================================================================ timing
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def call_times_ms(fn, device: str, reps: int, warmup: int) -> list:
    """Per-call times of fn() in ms (CUDA events on GPU) after ``warmup`` calls; reps cut so that the measurement
    takes at most ~MEASURE_CAP_S seconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    reps = max(1, min(reps, int(MEASURE_CAP_S / max(time.perf_counter() - t0, 1e-6))))
    return time_fn(fn, device, warmup=0, reps=reps, keep_times=True)["times_ms"]


def peak_extra_mb(fn, device: str):
    """Peak memory of one fn() call above what was allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    del out
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def finite_max(errs: dict):
    """The largest error, or None when one is non-finite (the note says which: strict JSON has no inf)."""
    worst = max(errs.values())
    return worst if math.isfinite(worst) else None


def judge(method: Method, errs: dict) -> str:
    """The note's verdict: "ok", "ABOVE ..." (ours over its threshold, or a non-finite output), "info" (plain)."""
    parts = ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
    if method.kind == "plain":
        return f"info: {parts}"
    tv, tg = THRESHOLDS[method.threshold_class]
    above = [f"{k} {v:.1e} > {tv if k == 'value' else tg:.0e}" for k, v in errs.items()
             if not v <= (tv if k == "value" else tg)]
    return f"ABOVE threshold: {', '.join(above)}" if above else f"ok: {parts}"


def rows_method(pb: Problem, method: Method, args, device: str, dev_name: str) -> list:
    """The eager row and (on CUDA) the graphed row of one method at one size."""
    shape_note = f"cost: {pb.src}"
    why = unavailable(method, device)
    if why:
        return [bench_row("sinkhorn", method.name, "fwd+bwd", pb.shape, DTYPE, dev_name, note=f"n/a: {why}")]
    ref = reference(pb, args.iters)
    step = fwd_bwd_step(method, pb, args.iters)
    rows = []
    with matmul_precision(method.precision == "tf32"):
        out = step()
        sync(device)
        errs = {k: rel_err(x, ref[k]) for k, x in zip(("value", "grad_a", "grad_b"), out, strict=True)}
        verdict = judge(method, errs)
        err = finite_max(errs)
        mem = peak_extra_mb(step, device)
        times = call_times_ms(step, device, args.reps, args.warmup)
        rows.append(bench_row("sinkhorn", method.name, "fwd+bwd", pb.shape, DTYPE, dev_name, times, mem, err,
                              f"{verdict}; eager; {shape_note}"))
        if device == "cuda":
            graph, captured, _ = capture_cuda_graph(step, warmup=1)
            graph.replay()
            torch.cuda.synchronize()
            gerrs = {k: rel_err(x, ref[k]) for k, x in zip(("value", "grad_a", "grad_b"), captured, strict=True)}
            gtimes = call_times_ms(graph.replay, device, args.reps, args.warmup)
            rows.append(bench_row("sinkhorn", f"{method.name} graph", "fwd+bwd", pb.shape, DTYPE, dev_name, gtimes,
                                  None, finite_max(gerrs), f"{judge(method, gerrs)}; CUDA graph replay; "
                                  f"{shape_note}"))
            del graph, captured
    return rows


# ============================================================================================ calibration
_CAL = {}


def calibration_kernels():
    """The Triton kernels of the calibration rows (defined on first use: needs triton)."""
    if _CAL:
        return _CAL

    @triton.jit
    def read_kernel(x_ptr, out_ptr, n_per_prog, repeat, BLOCK: tl.constexpr):
        """Each program sums its slice `repeat` times through L2 (.cg: not L1) and writes one float."""
        pid = tl.program_id(0).to(tl.int64)
        base = x_ptr + pid * n_per_prog
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for _r in range(repeat):
            for k in range(0, n_per_prog, BLOCK):
                acc += tl.load(base + k + tl.arange(0, BLOCK), cache_modifier=".cg")
        tl.store(out_ptr + pid, tl.sum(acc, axis=0))

    @triton.jit
    def barrier_kernel(slot_ptr, ctr_ptr, stat_ptr, rounds, spin_cap, P, W: tl.constexpr):
        """`rounds` grid-wide barrier rounds among P co-resident programs (one CTA each). Per round r: write W
        floats (pid + 1 + r + k) to this program's slot of buffer r % 2, CTA barrier, atomic +1 on the counter with
        release semantics, spin (acquire polls, at most spin_cap) until it reaches (r + 1) P, CTA barrier, read
        every program's slot (L2 only) and check the sum. Double buffering suffices: nobody writes buffer r % 2
        again before everybody arrived in round r + 1, i.e. finished reading round r. After one timeout a program
        stops waiting (bounded run time, flagged). Writes per program: (sum mismatches, timeouts)."""
        pid = tl.program_id(0)
        offs = tl.arange(0, W)
        errors = tl.full([], 0, tl.int32)
        timeouts = tl.full([], 0, tl.int32)
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
            late = cnt < target
            timeouts += late.to(tl.int32)
            cap = tl.where(late, 0, cap)
            tl.debug_barrier()
            acc = tl.zeros([W], dtype=tl.float32)
            for j in range(P):
                acc += tl.load(slot_ptr + (buf * P + j) * W + offs, cache_modifier=".cg")
            expect = (P * (1 + r + offs) + (P * (P - 1)) // 2).to(tl.float32)
            errors += tl.sum((acc != expect).to(tl.int32), axis=0)
        tl.store(stat_ptr + pid * 2 + 0, errors)
        tl.store(stat_ptr + pid * 2 + 1, timeouts)

    _CAL.update(read=read_kernel, barrier=barrier_kernel)
    return _CAL


def barrier_launch(P: int, rounds: int, device: str, W: int = 4, spin_cap: int = 1 << 20):
    """One launch of `rounds` barrier rounds among P programs; returns (ms by CUDA events or None, mismatches,
    timeouts)."""
    k = calibration_kernels()["barrier"]
    slot = torch.zeros(2 * P * W, dtype=torch.float32, device=device)
    ctr = torch.zeros(1, dtype=torch.int32, device=device)
    stat = torch.zeros(P, 2, dtype=torch.int32, device=device)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if device == "cuda" else None
    sync(device)
    if ev:
        ev[0].record()
    k[(P,)](slot, ctr, stat, rounds, spin_cap, P, W=W, num_warps=4)
    if ev:
        ev[1].record()
    sync(device)
    return (ev[0].elapsed_time(ev[1]) if ev else None), int(stat[:, 0].sum()), int(stat[:, 1].sum())


def calibration_rows(args, device: str, dev_name: str) -> list:
    """L2-resident and HBM read bandwidth, and one grid-wide barrier round. On CPU (interpreter): the kernels run
    once with tiny sizes and their sums are checked (no timing)."""
    if triton is None or (device == "cpu" and not INTERPRET):
        why = f"Triton unavailable: {TRITON_IMPORT_ERROR}" if triton is None else "CPU needs TRITON_INTERPRET=1"
        return [bench_row("calibration", "triton", "fwd", "L2 read, grid barrier", DTYPE, dev_name, note=f"n/a: {why}")]
    rows = []
    read = calibration_kernels()["read"]
    progs = 4 * torch.cuda.get_device_properties(0).multi_processor_count if device == "cuda" else 4
    block = 1024 if device == "cuda" else 16
    sizes = (("L2-resident read", 16, 64), ("HBM read", 1024, 1)) if device == "cuda" else (("L2-resident read", 0, 3),)
    for label, mb, repeat in sizes:
        per = max(block, (mb * 2**20 // 4 // progs) // block * block)
        x = torch.ones(progs * per, dtype=torch.float32, device=device)
        out = torch.empty(progs, dtype=torch.float32, device=device)

        def run(x=x, out=out, per=per, repeat=repeat):
            read[(progs,)](x, out, per, repeat, BLOCK=block)
        run()
        sync(device)
        ok = bool(torch.all(out == float(repeat * per)))
        shape = f"{x.numel() * 4 / 2**20:.3g} MB x {repeat} reads, {progs} programs"
        if device == "cuda":
            times = call_times_ms(run, device, 10, 1)
            gbs = x.numel() * 4 * repeat / (statistics.median(times) * 1e-3) / 1e9
            note = f"{'info' if ok else 'WRONG sums'}: {gbs:.0f} GB/s (.cg loads)"
        else:
            times, note = None, f"{'info' if ok else 'WRONG sums'}: interpreter run, timing n/a on CPU"
        rows.append(bench_row("calibration", "triton", "fwd", f"{label}: {shape}", DTYPE, dev_name, times, note=note))
        del x, out, run
    if device == "cuda":
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        P = min(128, sms)  # one CTA per SM: all co-resident
        r1, r2 = 8, 8 + args.barrier_rounds
        for R in (r1, r2):  # compile and warm up outside the timing
            barrier_launch(P, R, device)
        t = {R: [barrier_launch(P, R, device) for _ in range(5)] for R in (r1, r2)}
        bad = sum(x[1] + x[2] for R in t for x in t[R])
        per_round = [(b[0] - a[0]) / (r2 - r1) for a, b in zip(t[r1], t[r2], strict=True)]
        us = statistics.median(per_round) * 1e3
        halves = 4 * args.iters - 1
        note = (f"{'info' if not bad else f'WRONG: {bad} mismatches/timeouts'}: {us:.2f} us per round; x{halves} "
                f"(fwd+bwd half-iterations) = {halves * us:.0f} us")
        rows.append(bench_row("calibration", "triton", "fwd", f"grid barrier round: {P} CTAs, 16 B per slot", DTYPE,
                              dev_name, per_round, note=note))
    else:
        _, bad, late = barrier_launch(1, 3, device)
        rows.append(bench_row("calibration", "triton", "fwd", "grid barrier round: 1 program", DTYPE, dev_name,
                              note=f"{'info' if not bad + late else 'WRONG sums'}: interpreter run, timing n/a"))
    return rows


# ============================================================================================ tasks, budget
@dataclass
class Task:
    """One unit of work: fn() -> list of rows; ``placeholder``: the row written when the budget skips it."""
    placeholder: dict
    fn: object
    need_s: float = ROW_NEED_S
    ours: bool = False  # an error in this task counts as a failure


def build_tasks(problems, methods, args, device: str, dev_name: str) -> list:
    """Every task in priority order: all methods at the first size, the calibration, then the other sizes."""
    tasks, compiled = [], set()
    for i, pb in enumerate(problems):
        for method in methods:
            key = (method.precision, pb.B % 16 == 0, max(pb.n, pb.m) <= 256)
            need = COMPILE_NEED_S if method.wk_backend == "triton" and key not in compiled else ROW_NEED_S
            compiled.add(key)
            tasks.append(Task(bench_row("sinkhorn", method.name, "fwd+bwd", pb.shape, DTYPE, dev_name),
                              lambda pb=pb, method=method: rows_method(pb, method, args, device, dev_name), need,
                              ours=method.kind == "ours"))
        if i == 0 and not args.no_calibration:
            tasks.append(Task(bench_row("calibration", "triton", "fwd", "L2 read, grid barrier", DTYPE, dev_name),
                              lambda: calibration_rows(args, device, dev_name), COMPILE_NEED_S))
    return tasks


def run_tasks(tasks, writer: RowWriter, args, device: str) -> list:
    """Run the tasks within the budget; every row goes to the writer (and one line to stdout) as it is made.
    Returns the failures of ours (above threshold or raised)."""
    failures, skipping = [], False
    for task in tasks:
        elapsed = time.perf_counter() - _T0
        if skipping or elapsed + task.need_s > args.budget_s:
            skipping = True
            rows = [{**task.placeholder, "note": f"skipped: budget {args.budget_s:g} s spent ({elapsed:.0f} s)"}]
        else:
            try:
                rows = task.fn()
            except Exception as e:  # noqa: BLE001 - a failing row is one row, the run goes on
                text = str(e).strip().splitlines()
                rows = [{**task.placeholder, "note": f"error: {type(e).__name__}: {text[0][:300] if text else ''}"}]
                with contextlib.suppress(Exception):
                    sync(device)
        for row in rows:
            writer.add(row)
            note = row.get("note") or ""
            if task.ours and (note.startswith(("ABOVE", "error"))):
                failures.append(f"{row['backend']} {row['shape']}: {note}")
            ms = row.get("median_ms")
            print(f"[{time.perf_counter() - _T0:6.1f}s] {row['op']} | {row['backend']} | {row['shape']} | "
                  f"{'-' if ms is None else f'{ms:.4g} ms'} | err {row.get('max_rel_err')} | {note}", flush=True)
    return failures


def run_meta(args, device: str, dev_name: str, problems) -> dict:
    info = {"device": dev_name, "device_kind": device, "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": getattr(triton, "__version__", None), "triton_interpret": INTERPRET,
            "python": platform.python_version(), "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "build": wk.build_info(), "reg": REG, "iters": args.iters, "eps": EPS, "reps": args.reps,
            "warmup": args.warmup, "budget_s": args.budget_s, "thresholds": THRESHOLDS,
            "sizes": [{"shape": p.shape, "cost": p.src} for p in problems], "argv": sys.argv[1:]}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                    total_mem_GB=p.total_memory / 2**30)
    return info


# ============================================================================================ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where to run (default: cuda when available, else cpu)")
    ap.add_argument("--smoke", action="store_true",
                    help=f"tiny sizes ({SMOKE_SIZES}), 3 iterations, 1 rep, no warm-up (default: off)")
    ap.add_argument("--out", default=str(REPO / "bench_results"),
                    help="folder for gpu_quick.json, .md and .csv (default: bench_results/ in the checkout)")
    ap.add_argument("--data-dir", default=None, help="folder with the released cost matrices (default: "
                    "$WKD_DATA_DIR, else data/ in the checkout; without them a random stand-in, said in the note)")
    ap.add_argument("--budget-s", type=float, default=140.0,
                    help="seconds from process start after which the remaining rows are skipped (default: 140)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per measurement (default: 30; smoke: 1)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up calls before timing (default: 3; smoke: 0)")
    ap.add_argument("--iters", type=int, default=None, help="Sinkhorn iterations (default: 10, WKD-L's; smoke: 3)")
    ap.add_argument("--sizes", default=None, help=f"comma-separated BxC or BxNxM (default: {DEFAULT_SIZES}; "
                    f"smoke: {SMOKE_SIZES})")
    ap.add_argument("--backends", default=None, help=f"comma-separated (default on cuda: {DEFAULT_BACKENDS}; "
                    f"on cpu: {SMOKE_BACKENDS})")
    ap.add_argument("--barrier-rounds", type=int, default=200,
                    help="extra rounds timed by the grid-barrier calibration (default: 200)")
    ap.add_argument("--no-calibration", action="store_true", help="leave out the calibration rows (default: off)")
    args = ap.parse_args(argv)
    if args.data_dir and not Path(args.data_dir).is_dir():
        ap.error(f"--data-dir {args.data_dir}: not a directory")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda, but CUDA is not available (use --device cpu --smoke)")
    args.reps = args.reps if args.reps is not None else (1 if args.smoke else 30)
    args.warmup = args.warmup if args.warmup is not None else (0 if args.smoke else 3)
    args.iters = args.iters if args.iters is not None else (3 if args.smoke else 10)
    args.sizes = args.sizes or (SMOKE_SIZES if args.smoke else DEFAULT_SIZES)
    args.backends = args.backends or (DEFAULT_BACKENDS if args.device == "cuda" else SMOKE_BACKENDS)
    if args.iters < 2:
        ap.error("--iters must be >= 2 (the backward's first and middle steps are different kernels)")
    if args.reps < 1 or args.warmup < 0:
        ap.error("--reps must be >= 1 and --warmup >= 0")
    try:
        for spec in args.sizes.split(","):
            parse_size(spec)
        for name in args.backends.split(","):
            make_method(name.strip())
    except ValueError as e:
        ap.error(str(e))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device
    if args.data_dir:
        os.environ["WKD_DATA_DIR"] = str(Path(args.data_dir).resolve())
    dev_name = device_name(device)
    problems = [make_problem(s, device) for s in args.sizes.split(",")]
    for p in problems:
        if p.src.startswith("random symmetric") and p.n in COST_FILES:
            print(f"# WARNING: {p.shape}: {COST_FILES[p.n]} not found; a RANDOM STAND-IN cost is used (its timings "
                  "hold, its accuracy does not speak for the paper's problem)", flush=True)
    methods = [make_method(b.strip()) for b in args.backends.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = run_meta(args, device, dev_name, problems)
    writer = RowWriter(out / "gpu_quick.csv", out / "gpu_quick.json", out / "gpu_quick.md", meta)
    print(f"# gpu_quick: {dev_name}, torch {torch.__version__}, triton {meta['triton']}"
          f"{' (interpreter)' if INTERPRET else ''}, build {meta['build']}; sizes {args.sizes}; backends "
          f"{args.backends}; {args.iters} iterations; budget {args.budget_s:g} s", flush=True)
    torch.manual_seed(0)
    failures = run_tasks(build_tasks(problems, methods, args, device, dev_name), writer, args, device)
    writer.meta.update(elapsed_s=time.perf_counter() - _T0, failures=failures)
    _atomic_write(out / "gpu_quick.json", json.dumps({"meta": writer.meta, "rows": writer.rows}, indent=2,
                                                     default=str))
    print(f"# wrote {out}/gpu_quick.json, .md, .csv ({len(writer.rows)} rows) in {time.perf_counter() - _T0:.1f} s; "
          f"{len(failures)} failure(s)" + "".join(f"\n#   {f}" for f in failures), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
