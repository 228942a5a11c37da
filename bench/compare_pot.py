"""The main job: wkd_kernels.sinkhorn against POT and plain PyTorch, for WKD-L's problem.

For each size (B rows, C classes), WKD-L's setting: one shared C x C cost (the released CKA distance of the paper
when --data-dir / $WKD_DATA_DIR / data/ holds it, sharpened c = relu(1 - exp(-d)) + 1e-8; otherwise a random
symmetric stand-in, announced loudly at the top), reg 0.05, a fixed number of iterations (10), student/teacher
softmax distributions with the target class given zero mass. Every method runs exactly `--iters` iterations (POT
with stopThr=0 / tol=0: its default threshold is never reached in float32 and silently runs 1000 iterations).

Columns: forward and forward+backward (exact gradient w.r.t. the student distribution) median times after warm-up
(ours and the plain PyTorch baselines timed round-robin, rep by rep, so that machine-speed drift hits all of them
alike); speed-up of ours over POT's fastest path; max relative error of the value vs a float64 reference on the
reduced (C-1)-class problems of the first --ref-rows rows, i.e. the published WKD-L semantics: POT's sinkhorn2 in
float64 when POT is installed, else wkd_kernels.reference.sinkhorn_reference in float64 (and the POT rows are
skipped). POT gets its best case: the per-row reduced cost matrices are gathered before the clock starts. To
stay within about 2 minutes and 2 GB on a 2-core CPU, the default run times POT on a subset of the rows and scales
the time to B (note "<rows> rows x<factor>"): --pot-rows rows for the loop over ot.sinkhorn2, --pot-batch-rows for
ot.batch.solve_batch (which materialises [rows, C-1, C-1] and its autodiff graph). `--full` is the configuration of
the full table of docs/benchmarks.md (21 reps, POT's loop and the reference on all B rows: several minutes, and
about 1 GB more memory for the [B, C-1, C-1] reduced costs at C=1000).

A line per method is printed as it finishes, then the table. --csv / --json / --out write the rows in the schema
of every benchmark here (bench/README.md; op "sinkhorn", one row per method and mode fwd / fwd+bwd, written as
they are measured). --plot FILE.png draws the times (needs matplotlib).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (DATA_HELP, RowWriter, bench_row, device_name, find_cost_file, need_matplotlib,  # noqa: E402
                     plot_times, print_table, stand_in_warning, time_fn, time_interleaved, wkd_cost)

import wkd_kernels as wk  # noqa: E402
from wkd_kernels.reference import sinkhorn_reference  # noqa: E402

# POT is imported where it is used (importing it takes seconds, and bench_sinkhorn.py imports this module)
HAVE_POT = importlib.util.find_spec("ot") is not None

# Defaults of the flags that --full changes: (default run, --full). An explicit flag wins over both.
PRESETS = {"reps": (10, 21), "pot_reps": (1, 1), "pot_rows": (16, 0), "pot_batch_rows": (8, 8), "ref_rows": (32, 0)}


def say(*parts):
    print(*parts, flush=True)


def wkd_logits(B, C, seed=0):
    """Seeded random student logits s [B, C], teacher logits t = 3 * randn [B, C] and targets y [B] (CPU, float32)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (B,), generator=g)
    s, t = torch.randn(B, C, generator=g), 3 * torch.randn(B, C, generator=g)
    return s, t, y


def wkd_marginals(B, C, dtype, device, seed=0):
    """Softmax distributions of random student/teacher logits (temperature 2) with the target's mass removed."""
    s, t, y = wkd_logits(B, C, seed)
    mask = torch.ones(B, C).scatter_(1, y[:, None], 0.0)
    p, q = torch.softmax(s / 2, 1) * mask, torch.softmax(t / 2, 1) * mask
    p, q = p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)
    return p.to(device, dtype), q.to(device, dtype), y


def plain_pytorch(a, b, cost, reg, iters, eps=0.0):
    """The same mathematics as plain PyTorch matrix products on the shared K (autograd through the loop)."""
    K = torch.exp(-cost / reg)
    supp = (a > 0).to(a.dtype)
    u = supp / supp.sum(1, keepdim=True)
    v = None
    for _ in range(iters):
        v = b / (u @ K + eps)
        u = a / (v @ K.T + eps)
    return ((u @ (K * cost)) * v).sum(1)


def keep_index(y, C):
    """[B, C-1] indices of the non-target classes of each row."""
    B = y.shape[0]
    keep = torch.ones(B, C, dtype=torch.bool).scatter_(1, y[:, None].cpu(), False)
    return keep.nonzero()[:, 1].view(B, C - 1)


def reduced_problems(a, b, cost, y, rows=None):
    """The published per-row (C-1)-class problems of the first `rows` rows: a, b [rows, C-1], Ms [rows, C-1, C-1]."""
    B, C = a.shape
    rows = B if rows is None else min(rows, B)
    idx = keep_index(y[:rows], C).to(a.device)
    Ms = cost[idx[:, :, None], idx[:, None, :]]
    return a[:rows].gather(1, idx), b[:rows].gather(1, idx), Ms


def pot_sinkhorn2_loop(ar, br, Ms, reg, iters):
    import ot

    return torch.stack([ot.sinkhorn2(ar[i], br[i], Ms[i], reg, numItermax=iters, stopThr=0)
                        for i in range(ar.shape[0])])


def pot_solve_batch(ar, br, Ms, reg, iters, grad):
    import ot

    return ot.batch.solve_batch(Ms, reg, ar, br, max_iter=iters, tol=0, method="sinkhorn", grad=grad).value_linear


def reference_values(a, b, cost, y, reg, iters, chunk=16):
    """Float64 values of the reduced problems of every row, computed a few rows at a time (memory stays at
    chunk x C x C doubles): POT's sinkhorn2 when POT is installed, else sinkhorn_reference."""
    a64, b64, c64 = a.double().cpu(), b.double().cpu(), cost.double().cpu()
    out = []
    for s in range(0, a.shape[0], chunk):
        ar, br, Ms = reduced_problems(a64[s:s + chunk], b64[s:s + chunk], c64, y[s:s + chunk])
        if HAVE_POT:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out.append(pot_sinkhorn2_loop(ar, br, Ms, reg, iters))
        else:
            out.append(sinkhorn_reference(ar, br, Ms, reg, iters)[0])
    return torch.cat(out)


def rel_err(x, ref):
    """Max relative error over the rows the reference covers (the first len(ref) rows of x, or all of x)."""
    n = min(x.shape[0], ref.shape[0])
    x, ref = x[:n].detach().double().cpu(), ref[:n]
    return ((x - ref).abs().max() / ref.abs().max()).item()


def fmt_row(r):
    t = lambda x: "-" if x is None else (f"{x:.0f} ms" if x >= 100 else f"{x:.3g} ms")  # noqa: E731
    extra = f", {r['note']}" if r.get("note") else ""
    return (f"  B={r['B']} C={r['C']} {r['method']}: fwd {t(r['fwd_ms'])}, fwd+bwd {t(r['fwd_bwd_ms'])}, "
            f"max rel err {r['max_rel_err']:.1e}{extra}")


def schema_rows(r, dev_name, fwd, fwdbwd, n_ref):
    """The rows of the one benchmark schema (bench/_common.ROW_FIELDS) for one method of the table: fwd (when
    timed) and fwd+bwd. ``fwd`` / ``fwdbwd``: time_fn-style dicts with "times_ms"."""
    backend = r["method"][len("wkd_kernels ("):-1] if r["method"].startswith("wkd_kernels (") else r["method"]
    shape = f"B={r['B']} C={r['C']} reg={r['reg']:g} iters={r['iters']}"
    note = "; ".join(p for p in (f"cost: {r['cost']}", f"error vs {r['reference']} on the first {n_ref} rows",
                                 r.get("note")) if p)
    out = []
    for mode, t, mem in (("fwd", fwd, None), ("fwd+bwd", fwdbwd, r.get("extra_mem_MB"))):
        if t is not None:
            out.append(bench_row("sinkhorn", backend, mode, shape, r["dtype"], dev_name, times_ms=t["times_ms"],
                                 peak_mem_mb=mem, max_rel_err=r["max_rel_err"], note=note))
    return out


def bench_size(B, C, args, device, dtype, writer=None):
    cost, src = wkd_cost(C, dtype=dtype, data_dir=args.data_dir)
    cost = cost.to(device)
    a, b, y = wkd_marginals(B, C, dtype, device)
    reg, T = args.reg, args.iters
    rows = []
    t0 = time.perf_counter()
    n_ref = B if args.ref_rows <= 0 else min(B, args.ref_rows)
    ref = reference_values(a[:n_ref], b[:n_ref], cost, y[:n_ref], reg, T)
    say(f"  B={B} C={C}: float64 reference ({'POT sinkhorn2' if HAVE_POT else 'sinkhorn_reference'}) on the "
        f"{n_ref} reduced problems of the first {n_ref} rows in {time.perf_counter() - t0:.1f} s")

    def row(method, fwd, fwdbwd, err, note="", mem=None):
        r = {"B": B, "C": C, "dtype": str(dtype).replace("torch.", ""), "method": method,
             "fwd_ms": fwd["median_ms"] if fwd else None, "fwd_bwd_ms": fwdbwd["median_ms"] if fwdbwd else None,
             "max_rel_err": err, "reference": "POT float64" if HAVE_POT else "sinkhorn_reference float64",
             "cost": src, "note": note, "reg": reg, "iters": T}
        if mem is not None:
            r["extra_mem_MB"] = mem
        rows.append(r)
        say(fmt_row(r))
        if writer is not None:
            for sr in schema_rows(r, writer.meta["device"], fwd, fwdbwd, n_ref):
                writer.add(sr)

    def ours_fns(bk, kernel=None):
        def fwd():
            return wk.sinkhorn(a, b, cost, reg, T, backend=bk, kernel=kernel).value

        def fwdbwd():
            x = a.detach().requires_grad_()
            wk.sinkhorn(x, b, cost, reg, T, backend=bk, kernel=kernel).value.sum().backward()
            return x.grad
        return fwd, fwdbwd

    def peak_extra_mb(fn):
        if device != "cuda":
            return None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    # The fast methods (ours per backend, plain PyTorch, its CUDA graph) are timed round-robin, so that every
    # one of them sees the same machine state (time_interleaved). Each entry: name -> (fwd, fwdbwd, error).
    fast = {}
    # the torch backend (ATen ops) on every device; the C++ CPU kernel when built; the fused GPU kernels on CUDA
    if device == "cpu":
        backends = (["cpu"] if wk.HAS_C_EXT else []) + ["torch"]
    else:
        backends = ["torch"] + [bk for bk in ("triton", "cuda") if bk == "triton" or wk.HAS_CUDA_EXT]
    for bk in backends:
        fwd, fwdbwd = ours_fns(bk)
        fast[f"wkd_kernels ({bk})"] = (fwd, fwdbwd, rel_err(fwd(), ref))
    if args.cached_kernel:  # K = exp(-cost / reg) and K∘cost computed once, as WKDLogitLoss keeps them
        kernel = wk.gibbs_kernel(cost, reg)
        for bk in [bk for bk in backends if bk in ("cpu", "torch")]:
            fwd, fwdbwd = ours_fns(bk, kernel)
            fast[f"wkd_kernels ({bk}, cached kernel)"] = (fwd, fwdbwd, rel_err(fwd(), ref))

    def plain_fwd():
        return plain_pytorch(a, b, cost, reg, T)

    def plain_fwdbwd():
        x = a.detach().requires_grad_()
        plain_pytorch(x, b, cost, reg, T).sum().backward()
        return x.grad

    fast["plain PyTorch (matmul + autograd)"] = (plain_fwd, plain_fwdbwd, rel_err(plain_fwd(), ref))

    if device == "cuda":  # the plain formulation captured in a CUDA graph (removes launch overhead)
        static_a = a.detach().clone().requires_grad_()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                static_a.grad = None
                plain_pytorch(static_a, b, cost, reg, T).sum().backward()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        static_a.grad = None
        with torch.cuda.graph(graph):
            out = plain_pytorch(static_a, b, cost, reg, T)
            out.sum().backward()
        fast["plain PyTorch, CUDA graph"] = (None, graph.replay, rel_err(out.detach(), ref))

    t_f = time_interleaved({k: f for k, (f, _, _) in fast.items() if f is not None}, device, args.warmup, args.reps,
                           keep_times=True)
    t_fb = time_interleaved({k: fb for k, (_, fb, _) in fast.items()}, device, args.warmup, args.reps,
                            keep_times=True)
    for name, (_, fwdbwd, err) in fast.items():
        row(name, t_f.get(name), t_fb[name], err, mem=peak_extra_mb(fwdbwd))

    if HAVE_POT and not args.skip_pot:
        n_loop = B if args.pot_rows <= 0 else min(B, args.pot_rows)
        n_batch = B if args.pot_batch_rows <= 0 else min(B, args.pot_batch_rows)
        ar, br, Ms = reduced_problems(a.cpu(), b.cpu(), cost.cpu(), y, max(n_loop, n_batch))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            la, lb, lM = ar[:n_loop], br[:n_loop], Ms[:n_loop]

            def pot_loop_fwdbwd():
                x = la.detach().requires_grad_()
                pot_sinkhorn2_loop(x, lb, lM, reg, T).sum().backward()

            scale = B / n_loop
            tf = time_fn(lambda: pot_sinkhorn2_loop(la, lb, lM, reg, T), "cpu", 1, args.pot_reps, keep_times=True)
            tfb = time_fn(pot_loop_fwdbwd, "cpu", 1, args.pot_reps, keep_times=True)
            scale_times(scale, tf, tfb)
            row("POT sinkhorn2, loop over rows (cpu)", tf, tfb,
                rel_err(pot_sinkhorn2_loop(la, lb, lM, reg, T), ref),
                note=f"{n_loop} rows x{scale:g}" if scale != 1 else "")
            del la, lb, lM

            scale = B / n_batch
            sa, sb, sM = ar[:n_batch].contiguous(), br[:n_batch].contiguous(), Ms[:n_batch].contiguous()
            del ar, br, Ms

            def sb_fwdbwd():
                x = sa.detach().requires_grad_()
                pot_solve_batch(x, sb, sM, reg, T, "autodiff").sum().backward()

            tf = time_fn(lambda: pot_solve_batch(sa, sb, sM, reg, T, "detach"), "cpu", 1, args.pot_reps,
                         keep_times=True)
            tfb = time_fn(sb_fwdbwd, "cpu", 1, args.pot_reps, keep_times=True)
            scale_times(scale, tf, tfb)
            err = rel_err(pot_solve_batch(sa, sb, sM, reg, T, "detach"), ref)
            row("POT solve_batch (cpu)", tf, tfb, err, note=f"{n_batch} rows x{scale:g}" if scale != 1 else "")
            del sa, sb, sM
        pot_rows = [r for r in rows if r["method"].startswith("POT")]
        best_f = min(r["fwd_ms"] for r in pot_rows)
        best_fb = min(r["fwd_bwd_ms"] for r in pot_rows)
        for r in rows:
            if not r["method"].startswith("POT"):
                r["speedup_fwd_vs_pot"] = best_f / r["fwd_ms"] if r["fwd_ms"] else None
                r["speedup_fwd_bwd_vs_pot"] = best_fb / r["fwd_bwd_ms"]
    return rows


def scale_times(scale, *timings):
    """Scale time_fn-style dicts (median and every time) from the timed rows to all B rows."""
    for t in timings:
        t["median_ms"] *= scale
        t["times_ms"] = [x * scale for x in t["times_ms"]]


def parse_sizes(text):
    try:
        return [tuple(int(x) for x in s.lower().split("x")) for s in text.split(",") if s]
    except ValueError:
        raise SystemExit(f"--sizes: expected a comma-separated list of BxC, e.g. 256x1000,256x100; "
                         f"got {text!r}") from None


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ap.add_argument("--device", default=dev, choices=["cpu", "cuda"],
                    help=f"where ours and plain PyTorch run (POT always runs on the CPU); default: {dev} here "
                         "(cuda when a GPU is visible)")
    ap.add_argument("--sizes", default="256x1000,256x100",
                    help="comma-separated BxC list (B rows, C classes); default: %(default)s")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="default: %(default)s")
    ap.add_argument("--iters", type=int, default=10, help="Sinkhorn iterations, all methods; default: %(default)s")
    ap.add_argument("--reg", type=float, default=0.05, help="entropic regularisation; default: %(default)s")
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed calls before the timed ones (ours, plain PyTorch; POT: 1); default: %(default)s")
    ap.add_argument("--reps", type=int, default=None,
                    help="timed calls per method, median reported; default: %d (--full: %d)" % PRESETS["reps"])
    ap.add_argument("--pot-reps", type=int, default=None,
                    help="timed calls of each POT method; default: %d (--full: %d)" % PRESETS["pot_reps"])
    ap.add_argument("--pot-rows", type=int, default=None,
                    help="rows timed for POT's loop over ot.sinkhorn2, time scaled to B (0: all B rows); "
                         "default: %d (--full: %d, i.e. all)" % PRESETS["pot_rows"])
    ap.add_argument("--pot-batch-rows", type=int, default=None,
                    help="rows timed for ot.batch.solve_batch, time scaled to B (0: all; it materialises "
                         "[rows, C-1, C-1] and its autodiff graph); "
                         "default: %d (--full: %d)" % PRESETS["pot_batch_rows"])
    ap.add_argument("--ref-rows", type=int, default=None,
                    help="rows whose reduced problem gets the float64 reference, i.e. where the error column is "
                         "measured (0: all B rows); default: %d (--full: %d, i.e. all)" % PRESETS["ref_rows"])
    ap.add_argument("--full", action="store_true",
                    help="the README table's configuration: --reps 21 --pot-reps 1 --pot-rows 0 --pot-batch-rows 8 "
                         "--ref-rows 0 "
                         "(several minutes on a 2-core CPU); default: off")
    ap.add_argument("--skip-pot", action="store_true",
                    help="no POT rows (the float64 reference is still computed); default: off, and POT rows are "
                         "skipped anyway when POT is not installed")
    ap.add_argument("--cached-kernel", action="store_true",
                    help="also time ours on K = exp(-cost / reg) and K∘cost computed once (wkd_kernels.gibbs_kernel, "
                         "as WKDLogitLoss keeps them; cpu and torch backends); default: off")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for the run (ours, plain PyTorch and POT); default: torch's")
    ap.add_argument("--data-dir", default=None, help=DATA_HELP)
    ap.add_argument("--csv", metavar="FILE", help="also write the rows (bench/README.md schema) as CSV; default: none")
    ap.add_argument("--json", metavar="FILE", help="also write the rows and run metadata as JSON; default: none")
    ap.add_argument("--out", metavar="DIR", help="also write compare_pot.csv, .json and .md (the rows) into DIR; "
                                                 "default: none")
    ap.add_argument("--plot", metavar="FILE.png",
                    help="draw time per method and size (needs matplotlib: pip install matplotlib); default: none")
    return ap


def resolve_args(args):
    for key, (default, full) in PRESETS.items():
        if getattr(args, key) is None:
            setattr(args, key, full if args.full else default)
    return args


def main(argv=None):
    args = resolve_args(build_parser().parse_args(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plot:
        need_matplotlib()  # fail now, not after the run
    dtype = getattr(torch, args.dtype)
    sizes = parse_sizes(args.sizes)
    t_start = time.perf_counter()
    missing = [C for C in dict.fromkeys(C for _, C in sizes) if find_cost_file(C, args.data_dir) is None]
    if missing:
        say(stand_in_warning(missing, args.data_dir))
    ref_name = "POT ot.sinkhorn2 in float64" if HAVE_POT else "wkd_kernels.reference.sinkhorn_reference in float64"
    if not HAVE_POT:
        say("# POT is not installed (pip install POT): the POT rows are skipped and the errors are measured "
            "against wkd_kernels.reference.sinkhorn_reference in float64 on the reduced problems")
    meta = {"device": device_name(args.device), "torch": torch.__version__, "build": wk.build_info(),
            "iters": args.iters, "reg": args.reg, "dtype": args.dtype, "reference": ref_name,
            "pot": importlib.import_module("ot").__version__ if HAVE_POT else None, "argv": sys.argv[1:]}
    pot_note = ("POT skipped" if args.skip_pot or not HAVE_POT else
                f"POT: {args.pot_reps} rep(s), loop on {args.pot_rows or 'all'} rows, "
                f"solve_batch on {args.pot_batch_rows or 'all'} rows, scaled to B")
    say(f"# compare_pot: device={meta['device']}, torch {torch.__version__}, dtype {args.dtype}, reg {args.reg}, "
        f"{args.iters} iterations, medians of {args.reps} after {args.warmup} warm-up; {pot_note}; "
        f"error reference: {ref_name}")
    writer = None
    if args.csv or args.json or args.out:
        paths = [args.csv, args.json, None]
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            paths = [p or os.path.join(args.out, f"compare_pot.{ext}")
                     for p, ext in zip(paths, ("csv", "json", "md"), strict=True)]
        writer = RowWriter(*paths, meta=meta)
    rows = []
    for B, C in sizes:
        rows += bench_size(B, C, args, args.device, dtype, writer)
    err_col = "max_rel_err_vs_pot64" if HAVE_POT else "max_rel_err_vs_ref64"
    for r in rows:
        r[err_col] = r["max_rel_err"]
    cols = ["B", "C", "method", "fwd_ms", "fwd_bwd_ms", "speedup_fwd_vs_pot", "speedup_fwd_bwd_vs_pot", err_col,
            "note"]
    if not any("speedup_fwd_bwd_vs_pot" in r for r in rows):
        cols = [c for c in cols if not c.startswith("speedup")]
    if args.device == "cuda":
        cols.insert(-1, "extra_mem_MB")
    say()
    print_table(rows, cols)
    say("# cost:", ", ".join(sorted({f"C={r['C']}: {r['cost']}" for r in rows})))
    if args.plot:
        plot_times(rows, args.plot, title=f"compare_pot: {meta['device']}, torch {torch.__version__}, {args.dtype}, "
                                          f"{args.iters} iterations")
        say(f"# plot written to {args.plot}")
    say(f"# done in {time.perf_counter() - t_start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
