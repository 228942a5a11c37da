"""The `torch` backend (ATen ops only, wkd_kernels/aten/) against the C++ CPU kernel and plain PyTorch, on WKD-L's
Sinkhorn: one shared C x C cost (the released CKA distance when found, else a seeded stand-in), B rows, float32,
reg 0.05, 10 iterations, eps 1e-8 (WKD-L's settings; docs/design.md section 3).

Timing: medians over --reps of forward and of forward + backward (exact gradient w.r.t. a), the methods measured
round-robin in one process (bench/_common.time_interleaved). Memory (torch backend): the peak of the bytes malloc
holds in use during its exact backward, above what was held at its start (glibc mallinfo2, sampled after every ATen
op: the largest set of live tensors), next to the history the forward saved (hist_r + hist_s + y: T B (n + m) + B n
numbers). The C++ kernel is one opaque op (its internal peak cannot be sampled this way): not measured.

Rows (bench/README.md schema, op "sinkhorn", written to --out as they are measured): fwd and fwd+bwd of every
method; for the torch backend also a "bwd" row: the time of its backward alone and its peak_mem_mb (the malloc
peak above; the note gives the history's size). max_rel_err: the value against
wkd_kernels.reference.sinkhorn_reference in float64 on the first --check rows. bench/bench_sinkhorn.py times the
three modes of every backend; this script adds the torch backend's backward memory.

    python bench/bench_torch_backend.py                     # B=256, C=1000 and 100
    python bench/bench_torch_backend.py --sizes 256x1000 --reps 21 --out /tmp/b
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import platform
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (REPO, ROW_FIELDS, RowWriter, bench_row, markdown_table, time_fn,  # noqa: E402
                     time_interleaved, wkd_cost)
from compare_pot import plain_pytorch, wkd_marginals  # noqa: E402

import wkd_kernels as wk  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from wkd_kernels.aten import sinkhorn as at_sk  # noqa: E402
from wkd_kernels.reference import sinkhorn_reference  # noqa: E402


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


class _MallocPeak(TorchDispatchMode):
    """Peak of the bytes glibc's malloc holds in use (mallinfo2: uordblks + hblkhd), sampled after every ATen op
    run under it, relative to the start: the largest set of live tensors at op granularity."""

    def __init__(self):
        super().__init__()
        self._mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
        self._mallinfo2.restype = _MallInfo2
        self.start = self.peak = self._in_use()

    def _in_use(self) -> int:
        m = self._mallinfo2()
        return m.uordblks + m.hblkhd

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self._in_use())
        return out


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def torch_backward_peak_bytes(a, b, cost, reg, T, eps) -> tuple[int, int]:
    """(peak extra bytes during the torch backend's exact backward, bytes of the saved history): the forward op
    saves the history, then its backward (wkd_kernels.aten.sinkhorn.sinkhorn_backward, what the op's autograd
    runs) under :class:`_MallocPeak`."""
    out = torch.ops.wkd.sinkhorn_torch(a, b, cost, reg, T, eps, False, True)
    hist = sum(t.numel() for t in out[3:]) * a.element_size()
    g = torch.ones(a.shape[0], dtype=a.dtype)
    gc.collect()
    with _MallocPeak() as mode:
        grads = at_sk.sinkhorn_backward(g, a, b, cost, *out[3:], reg, False, eps)
    del grads
    return mode.peak - mode.start, hist


def torch_backward(a, b, cost, reg, T, eps):
    """A callable running the torch backend's exact backward alone (the forward's history computed once, before)."""
    out = torch.ops.wkd.sinkhorn_torch(a, b, cost, reg, T, eps, False, True)
    g = torch.ones(a.shape[0], dtype=a.dtype)
    return lambda: at_sk.sinkhorn_backward(g, a, b, cost, *out[3:], reg, False, eps)


def timed_calls(a, b, cost, reg, T, eps):
    """The forward and forward+backward calls timed per method: our backends built here, then plain PyTorch."""
    def fwd(bk):
        return lambda: wk.sinkhorn(a, b, cost, reg, T, eps=eps, backend=bk).value

    def fwdbwd(bk):
        def run():
            x = a.detach().requires_grad_()
            wk.sinkhorn(x, b, cost, reg, T, eps=eps, backend=bk).value.sum().backward()
            return x.grad
        return run

    def plain_fwd():
        return plain_pytorch(a, b, cost, reg, T, eps)

    def plain_fwdbwd():
        x = a.detach().requires_grad_()
        plain_pytorch(x, b, cost, reg, T, eps).sum().backward()
        return x.grad

    backends = (["cpu"] if wk.HAS_C_EXT else []) + ["torch"]
    f = {f"wkd_kernels ({bk})": fwd(bk) for bk in backends}
    f["plain PyTorch (matmul + autograd)"] = plain_fwd
    fb = {f"wkd_kernels ({bk})": fwdbwd(bk) for bk in backends}
    fb["plain PyTorch (matmul + autograd)"] = plain_fwdbwd
    return f, fb


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256x1000,256x100", help="comma-separated BxC list; default: %(default)s")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--reg", type=float, default=0.05)
    ap.add_argument("--eps", type=float, default=1e-8)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--check", type=int, default=4, help="rows compared with the float64 reference (default: 4)")
    ap.add_argument("--out", default=str(REPO / "bench_results"),
                    help="folder for bench_torch_backend.csv/.json/.md (default: bench_results/ in the checkout)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev_name = f"{cpu_model()}, {torch.get_num_threads()} threads"
    print(f"# {dev_name}, torch {torch.__version__}, float32, "
          f"reg {args.reg}, {args.iters} iterations, eps {args.eps}; backends {wk.build_info()['backends']}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    stem = Path(args.out) / "bench_torch_backend"
    writer = RowWriter(f"{stem}.csv", f"{stem}.json", f"{stem}.md",
                       meta={"device": dev_name, "torch": torch.__version__, "build": wk.build_info(),
                             "argv": sys.argv[1:], "reg": args.reg, "iters": args.iters, "eps": args.eps,
                             "reps": args.reps, "warmup": args.warmup})
    for size in args.sizes.split(","):
        B, C = (int(v) for v in size.lower().split("x"))
        cost, src = wkd_cost(C, dtype=torch.float32)
        a, b, _ = wkd_marginals(B, C, torch.float32, "cpu")
        reg, T, eps = args.reg, args.iters, args.eps

        f, fb = timed_calls(a, b, cost, reg, T, eps)
        t_f = time_interleaved(f, "cpu", args.warmup, args.reps, keep_times=True)
        t_fb = time_interleaved(fb, "cpu", args.warmup, args.reps, keep_times=True)
        k = min(args.check, B)
        ref = sinkhorn_reference(a[:k], b[:k], cost, reg, T, eps)[0]
        shape = f"B={B} C={C} reg={reg:g} iters={T} eps={eps:g}"
        ref_f, ref_fb = t_f["wkd_kernels (cpu)"]["median_ms"], t_fb["wkd_kernels (cpu)"]["median_ms"]
        print(f"\nB={B} C={C} (cost: {src})")
        print(f"{'method':36s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'/ cpu fwd':>10s} {'/ cpu fwd+bwd':>14s} "
              f"{'bwd peak MB':>12s} {'history MB':>11s} {'peak/history':>13s}")
        for name in f:
            bk = name[len("wkd_kernels ("):-1] if name.startswith("wkd_kernels") else None
            mem = ""
            backend = bk or name
            err = ((f[name]()[:k].double() - ref).abs().max() / ref.abs().max()).item()
            for mode, t in (("fwd", t_f[name]), ("fwd+bwd", t_fb[name])):
                writer.add(bench_row("sinkhorn", backend, mode, shape, "float32", dev_name, times_ms=t["times_ms"],
                                     max_rel_err=err, note=f"cost: {src}"))
            if bk == "torch":
                peak, hist = torch_backward_peak_bytes(a, b, cost, reg, T, eps)
                mem = f"{peak / 2**20:12.2f} {hist / 2**20:11.2f} {peak / hist:13.2f}"
                t_b = time_fn(torch_backward(a, b, cost, reg, T, eps), "cpu", args.warmup, args.reps,
                              keep_times=True)
                writer.add(bench_row("sinkhorn", backend, "bwd", shape, "float32", dev_name, times_ms=t_b["times_ms"],
                                     peak_mem_mb=peak / 2**20, max_rel_err=None,
                                     note=f"cost: {src}; peak_mem_mb: glibc malloc in use above the start, sampled "
                                          f"after every ATen op; history saved by the forward "
                                          f"{hist / 2**20:.2f} MB"))
            tf, tfb = t_f[name]["median_ms"], t_fb[name]["median_ms"]
            print(f"{name:36s} {tf:9.2f} {tfb:11.2f} {tf / ref_f:10.2f} {tfb / ref_fb:14.2f} {mem}")
    print()
    print(markdown_table(writer.rows, ROW_FIELDS))
    print(f"# rows written to {stem}.csv, .json, .md")
    return writer.rows


if __name__ == "__main__":
    main()
