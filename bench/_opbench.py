"""The driver shared by the per-op benchmark scripts (bench/bench_<op>.py): command line, timing of the three modes
round-robin over the methods, peak memory, error against the op's float64 reference, rows of the one schema.

A script describes each size as a :class:`Case` (its inputs, which of them are differentiated, the float64
reference, and the methods: our op per backend plus the plain-PyTorch baselines) and hands the cases to
:func:`run`. Every row is written through :class:`_common.RowWriter` as soon as it is measured.

What a row measures (bench/README.md explains the columns):
  fwd      the forward alone, inputs that do not require grad (no autograd graph is recorded);
  bwd      the backward alone: each repetition runs the forward untimed, then times
           ``torch.autograd.grad(outputs, differentiated inputs, fixed seeded cotangents)``;
  fwd+bwd  both, timed together.
Times: CUDA events around the timed part after the warm-up (the device synchronised after each repetition); on
CPU time.perf_counter. The methods of a case are timed round-robin (repetition 1 of every method, then
repetition 2, ...), so that a machine whose speed drifts affects all of them alike.
peak_mem_mb (CUDA only): torch.cuda.max_memory_allocated during one extra call of the timed part, minus what was
allocated when it started. CPU rows leave it empty (no per-call allocator statistics there).
max_rel_err: max |x - x_ref| / max |x_ref| over the first ``check`` batch entries, where x is the value (fwd row)
or the gradient w.r.t. the differentiated inputs (bwd and fwd+bwd rows; the largest over those inputs and, for
several outputs, over the outputs), and x_ref the same from the op's float64 reference (wkd_kernels/reference.py)
with autograd.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from _common import MODES, REPO, ROW_FIELDS, RowWriter, bench_row, device_name, markdown_table

import wkd_kernels as wk


@dataclass
class Method:
    """One timed implementation: ``backend`` is the schema's backend column (our op's backend name, or the label of
    a baseline); ``forward(*inputs)`` returns a tensor or a tuple of tensors shaped like the reference's."""
    backend: str
    forward: Callable
    note: str = ""


@dataclass
class Case:
    """One size of one op: ``shape`` (the schema's shape column), ``inputs`` (tensors on the device, in the
    benchmark dtype), ``grad_inputs`` (indices of the inputs the backward differentiates), ``reference`` (the op's
    float64 reference, called on the first ``check`` entries of every input cast to float64), ``methods``, and
    ``skipped``: (backend, reason) pairs written as rows without times; ``note``: goes into every row's note (e.g.
    where the data came from)."""
    shape: str
    inputs: tuple
    grad_inputs: Sequence[int]
    reference: Callable
    methods: list
    skipped: list = field(default_factory=list)
    note: str = ""
    shared_inputs: Sequence[int] = ()

    def head(self, x, i, k):
        """Input i restricted to the first k batch entries (inputs in ``shared_inputs``, e.g. one cost matrix for
        the whole batch, are used whole)."""
        return x if i in self.shared_inputs else x[:k]

    def __post_init__(self):
        if set(self.grad_inputs) & set(self.shared_inputs):
            raise ValueError("Case: a shared input cannot be differentiated (its gradient sums over the batch, "
                             "which the reference on the first entries does not see)")


def parse_list(text: str, what: str, allowed=None) -> list:
    """Comma-separated list; every entry must be in ``allowed`` when given."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise SystemExit(f"--{what}: empty list")
    if allowed is not None:
        bad = [s for s in items if s not in allowed]
        if bad:
            raise SystemExit(f"--{what}: {bad} not among {list(allowed)}")
    return items


def parse_sizes(text: str, dims: int, example: str) -> list:
    """Comma-separated sizes of ``dims`` integers joined by x, e.g. ``example``."""
    out = []
    for s in text.split(","):
        if not s.strip():
            continue
        try:
            t = tuple(int(v) for v in s.lower().split("x"))
        except ValueError:
            t = ()
        if len(t) != dims or min(t) < 1:
            raise SystemExit(f"--sizes: expected a comma-separated list like {example}; got {s!r}")
        out.append(t)
    if not out:
        raise SystemExit("--sizes: empty list")
    return out


def default_backends(device: str, has_cuda_cpp: bool, triton_interpret: bool) -> list:
    """Every backend of this installation that runs on ``device``: on CPU the C++ kernels (when built) and torch
    (plus triton with ``triton_interpret``); on CUDA torch, triton (when installed) and the CUDA C++ kernels (when
    the op has them and they are built)."""
    if device == "cpu":
        return (["cpu"] if wk.HAS_C_EXT else []) + ["torch"] + (["triton"] if triton_interpret else [])
    return ["torch"] + (["triton"] if wk.HAS_TRITON else []) + (["cuda"] if has_cuda_cpp and wk.HAS_CUDA_EXT else [])


def build_parser(description: str, default_sizes: str, smoke_sizes: str, size_help: str,
                 baselines: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The options every per-op script shares (``baselines``: the names --baselines accepts, for its help); a script
    adds its own before parsing."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ap.add_argument("--device", default=dev, choices=["cpu", "cuda"], help="default: %(default)s here")
    ap.add_argument("--sizes", default=None,
                    help=f"{size_help}; default: {default_sizes} (--smoke: {smoke_sizes})")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="default: %(default)s")
    ap.add_argument("--backends", default=None,
                    help="comma-separated backends of our op (cpu, torch, triton, cuda); default: every one that "
                         "runs on the device in this installation (triton on CPU tensors only with "
                         "--triton-interpret)")
    ap.add_argument("--baselines", default=None,
                    help="comma-separated baselines among " + (", ".join(baselines) or "none")
                         + "; 'none' for none; default: all")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of %(default)s")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per method and mode; default: 10 "
                                                           "(--smoke: 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed repetitions first; default: 2 (--smoke: 1)")
    ap.add_argument("--check", type=int, default=4,
                    help="batch entries compared with the float64 reference; default: %(default)s")
    ap.add_argument("--out", default=str(REPO / "bench_results"),
                    help="folder for bench_<op>.csv/.json/.md (created); default: bench_results/ in the checkout")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes and few repetitions (a quick check that the "
                                                         "script runs; the numbers mean little)")
    ap.add_argument("--triton-interpret", action="store_true",
                    help="include the triton backend on CPU tensors (needs TRITON_INTERPRET=1 in the environment "
                         "before start; interpreted kernels: their times are not kernel times)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: torch's")
    ap.add_argument("--time-limit", type=float, default=float("inf"),
                    help="seconds from the start after which the remaining sizes are not measured (their rows say "
                         "'skipped'); rows already measured are on disk at every moment; default: none")
    ap.set_defaults(default_sizes=default_sizes, smoke_sizes=smoke_sizes)
    return ap


def resolve(args, op: str, has_cuda_cpp: bool, baselines: Sequence[str]):
    """Fill the defaults that depend on --smoke and the installation; validate the choices. Returns args."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    if args.triton_interpret and args.device == "cpu" and not wk.settings.TRITON_INTERPRET:
        raise SystemExit("--triton-interpret: set TRITON_INTERPRET=1 in the environment (it must be set before "
                         "triton is imported)")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.reps = args.reps if args.reps is not None else (3 if args.smoke else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    if args.reps < 1 or args.warmup < 0 or args.check < 1:
        raise SystemExit("--reps and --check must be >= 1, --warmup >= 0")
    if args.sizes is None:
        args.sizes = args.smoke_sizes if args.smoke else args.default_sizes
    args.modes = parse_list(args.modes, "modes", MODES)
    possible = default_backends(args.device, has_cuda_cpp, args.triton_interpret)
    if args.backends is None:
        args.backends = possible
    else:
        args.backends = parse_list(args.backends, "backends", ("cpu", "torch", "triton", "cuda"))
        if "triton" in args.backends and args.device == "cpu" and not args.triton_interpret:
            raise SystemExit("--backends triton on --device cpu needs --triton-interpret (and TRITON_INTERPRET=1)")
    if args.baselines is None:
        args.baselines = list(baselines)
    elif args.baselines.strip() == "none":
        args.baselines = []
    else:
        args.baselines = parse_list(args.baselines, "baselines", baselines)
    args.torch_dtype = getattr(torch, args.dtype)
    args.op = op
    args.t_start = time.perf_counter()
    return args


# ------------------------------------------------------------------------------------------------------- timing
def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


class _Timed:
    """The three modes of one method on one case: ``setup()`` (untimed) and ``timed(state)``."""

    def __init__(self, method: Method, inputs, grad_idx, cotangents):
        self.method, self.inputs, self.grad_idx, self.cotangents = method, inputs, list(grad_idx), cotangents
        self.leaves = [x.detach().clone().requires_grad_(i in self.grad_idx) for i, x in enumerate(inputs)]

    def _forward_on_leaves(self):
        return _as_tuple(self.method.forward(*self.leaves))

    def _grad(self, outs):
        pairs = [(o, g) for o, g in zip(outs, self.cotangents, strict=True) if o.requires_grad]
        return torch.autograd.grad([o for o, _ in pairs], [self.leaves[i] for i in self.grad_idx],
                                   [g for _, g in pairs])

    def parts(self, mode):
        """(setup, timed) callables of ``mode``."""
        if mode == "fwd":
            return (lambda: None), (lambda _: self.method.forward(*self.inputs))
        if mode == "fwd+bwd":
            return (lambda: None), (lambda _: self._grad(self._forward_on_leaves()))
        return self._forward_on_leaves, self._grad


def _time_once(setup, timed, device) -> float:
    state = setup()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        timed(state)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    timed(state)
    return (time.perf_counter() - t0) * 1e3


def _peak_mem_mb(setup, timed, device):
    if device != "cuda":
        return None
    state = setup()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    timed(state)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ------------------------------------------------------------------------------------------------------- errors
def _rel_err(x: Sequence, ref: Sequence, k: int) -> float:
    worst = 0.0
    for a, r in zip(x, ref, strict=True):
        a = a[:k].detach().double().cpu()
        r = r.detach().double().cpu()
        scale = r.abs().max().item()
        worst = max(worst, (a - r).abs().max().item() / (scale if scale > 0 else 1.0))
    return worst


def _reference(case: Case, cotangents, k: int):
    """(values, gradients) of the float64 reference on the first k entries."""
    leaves = [case.head(x, i, k).detach().double().cpu().requires_grad_(i in case.grad_inputs)
              for i, x in enumerate(case.inputs)]
    outs = _as_tuple(case.reference(*leaves))
    gs = [g[:k].double().cpu() for g in cotangents]
    grads = torch.autograd.grad(list(outs), [leaves[i] for i in case.grad_inputs], gs)
    return [o.detach() for o in outs], list(grads)


# ------------------------------------------------------------------------------------------------------- driver
def run(cases, args, meta: Optional[dict] = None) -> list:
    """Measure every method of every case (an iterable: a generator builds one size's inputs at a time) in every
    requested mode; write the rows to ``args.out``. Returns them."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_{args.op}"
    dev_name = device_name(args.device)
    meta = dict(meta or {})
    meta.update(op=args.op, device=dev_name, torch=torch.__version__, build=wk.build_info(), argv=sys.argv[1:],
                reps=args.reps, warmup=args.warmup, check=args.check, loadavg_at_start=_loadavg())
    writer = RowWriter(f"{stem}.csv", f"{stem}.json", f"{stem}.md", meta)
    print(f"# {args.op}: {dev_name}, torch {torch.__version__}, {args.dtype}, medians of {args.reps} after "
          f"{args.warmup} warm-up, methods round-robin; load average {meta['loadavg_at_start']}", flush=True)
    for case in cases:
        _run_case(case, args, dev_name, writer)
    writer.update_meta(loadavg_at_end=_loadavg())
    print()
    print(markdown_table(writer.rows, ROW_FIELDS))
    print(f"# rows written to {stem}.csv, .json, .md")
    return writer.rows


def _failure(exc) -> str:
    return f"failed: {type(exc).__name__}: {str(exc)[:120]}"


def _run_case(case: Case, args, dev_name: str, writer: RowWriter) -> None:
    dtype = args.dtype

    def no_times(backend, note):
        for mode in args.modes:
            writer.add(bench_row(args.op, backend, mode, case.shape, dtype, dev_name, note=note))

    for backend, reason in case.skipped:
        no_times(backend, _join(case.note, reason))
    if time.perf_counter() - args.t_start > args.time_limit:
        for m in case.methods:
            no_times(m.backend, _join(case.note, m.note, f"skipped: --time-limit {args.time_limit:g} s reached"))
        return
    k = min(args.check, case.inputs[0].shape[0])
    # fixed seeded cotangents for the backward, shaped like the outputs of the first method that runs
    first, failed = None, {}
    for m in case.methods:
        try:
            first = _as_tuple(m.forward(*case.inputs))
            break
        except Exception as exc:  # reported below, with the other methods' errors
            failed[m.backend] = _failure(exc)
    if first is None:
        for m in case.methods:
            no_times(m.backend, _join(case.note, m.note, failed[m.backend]))
        return
    g = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype) for o in first]
    del first
    need_grad = any(m != "fwd" for m in args.modes)
    ref_vals, ref_grads = _reference(case, cotangents, k) if need_grad else (
        [o.detach() for o in _as_tuple(case.reference(*(case.head(x, i, k).detach().double().cpu()
                                                        for i, x in enumerate(case.inputs))))],
        None)
    live = []
    for m in case.methods:
        if m.backend == "triton" and args.device == "cpu":
            m.note = _join(m.note, "interpreted (TRITON_INTERPRET=1): not kernel times")
        try:
            if m.backend in failed:
                raise RuntimeError(failed[m.backend])
            t = _Timed(m, case.inputs, case.grad_inputs, cotangents)
            err = {"fwd": _rel_err(_as_tuple(m.forward(*case.inputs)), ref_vals, k)}
            if need_grad:
                err["bwd"] = err["fwd+bwd"] = _rel_err(t._grad(t._forward_on_leaves()), ref_grads, k)
            live.append((m, t, err))
        except Exception as exc:  # a method that cannot run here is reported, not fatal
            no_times(m.backend, _join(case.note, m.note, failed.get(m.backend) or _failure(exc)))
            _release(args.device)
    for mode in args.modes:
        parts = [t.parts(mode) for _, t, _ in live]
        times = [[] for _ in live]
        errors = [None for _ in live]
        for rep in range(args.warmup + args.reps):
            for i, (setup, timed) in enumerate(parts):
                if errors[i] is not None:
                    continue
                try:
                    ms = _time_once(setup, timed, args.device)
                except Exception as exc:  # e.g. out of memory in one mode: that row says so, the run goes on
                    errors[i] = _failure(exc)
                    _release(args.device)
                    continue
                if rep >= args.warmup:
                    times[i].append(ms)
        for (m, _, err), (setup, timed), ts, error in zip(live, parts, times, errors, strict=True):
            if error is None:
                try:
                    peak = _peak_mem_mb(setup, timed, args.device)
                except Exception as exc:
                    error = _failure(exc)
                    _release(args.device)
            if error is not None:
                writer.add(bench_row(args.op, m.backend, mode, case.shape, dtype, dev_name,
                                     note=_join(case.note, m.note, error)))
                print(f"  {case.shape} {m.backend:>28s} {mode:>7s}: {error}", flush=True)
                continue
            row = bench_row(args.op, m.backend, mode, case.shape, dtype, dev_name, times_ms=ts, peak_mem_mb=peak,
                            max_rel_err=err[mode], note=_join(case.note, m.note))
            writer.add(row)
            print(f"  {case.shape} {m.backend:>28s} {mode:>7s}: median {row['median_ms']:.4g} ms "
                  f"(p20 {row['p20_ms']:.4g}, p80 {row['p80_ms']:.4g}), max rel err {err[mode]:.1e}"
                  + (f", peak {peak:.1f} MB" if peak is not None else ""), flush=True)


def _release(device):
    """After a failure (e.g. out of memory): free the cached blocks so that the next method starts clean."""
    if device == "cuda":
        torch.cuda.empty_cache()


def _join(*parts):
    return "; ".join(p for p in parts if p)


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
