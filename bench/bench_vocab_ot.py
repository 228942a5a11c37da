"""Sinkhorn over a vocabulary-sized sparse k-NN cost: wk.sparse_sinkhorn against the WASD formulation in plain
PyTorch, and (ImageNet-21k size) against the dense-K path of wk.sinkhorn.

LLM part (--vocab): V classes, k-NN cost (wk.knn_kernel, cosine) of random [V, --dim] embeddings, N = --tokens
rows of softmax masses p, q (student / teacher), float32, --iters iterations, forward + backward w.r.t. p, with the
envelope and the exact gradient, the plain OT (--divergence adds the Sinkhorn divergence). The baseline is the WASD
formulation (github.com/aailab-kaist/WASD; the loop below follows the method as its paper describes it, not a
line-by-line copy of that repository's code: a sparse COO kernel exp(-C/reg) from the teacher's token embeddings,
dense [V, N] scalings updated by torch.sparse.mm, 10 iterations, envelope gradients through the dual potentials;
the exact gradient by autograd through the same loop). Both compute the transport cost sum u K∘C v; their values are
compared (max_rel_err of our row against the baseline). Ours is timed per --backends: "cpu" (the C++ kernel of
csrc/cpu/sparse_sinkhorn.cpp; what backend="auto" runs for the exact gradient) and "torch" (the ATen ops; "auto"
for the envelope gradient).
The log-domain and ImageNet-21k rows run the torch backend.

ImageNet-21k part (--imagenet): C = 21,843 classes, B = 256 rows, k-NN cost of random [C, 512] embeddings; ours
against wk.sinkhorn (C++ CPU kernel) on the same problem densified (excluded couplings at cost 1e4, K = 0); the
gather formulation of the published WKD-L (B x (C-1)^2 floats) by arithmetic in the note.

Timing: medians (p20 / p80) over --reps calls after --warmup calls and the memory call, the methods of one size
measured round-robin in one process (bench/_common.time_interleaved's rule). Memory (peak_mem_mb): the peak
resident set during one forward + backward above the resident set at its start (Linux: /proc/self/clear_refs
resets VmHWM, VmHWM read after the call), inputs and the prepared kernel excluded; the script re-executes itself
with MALLOC_MMAP_THRESHOLD_=65536 so that freed large blocks leave the resident set at once (glibc would otherwise
keep them and under-count).

    python bench/bench_vocab_ot.py --vocab 50257 --reps 2
    python bench/bench_vocab_ot.py --vocab none --imagenet --reps 1
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RowWriter, bench_row, device_name  # noqa: E402

import wkd_kernels as wk  # noqa: E402

warnings.filterwarnings("ignore", message=".*[Ss]parse.*")


# ------------------------------------------------------------------------------------------------------------------
# Memory: peak resident set of one call above its start
# ------------------------------------------------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_extra_mb(fn, times=None) -> float:
    """Peak extra resident MB of one call of fn; its wall time appended to ``times`` when given (--reps 0)."""
    gc.collect()
    start = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    out = fn()
    if times is not None:
        times.append((time.perf_counter() - t0) * 1e3)
    peak = _status_kb("VmHWM")
    del out
    gc.collect()
    return (peak - start) / 1024.0


# ------------------------------------------------------------------------------------------------------------------
# The WASD formulation in plain PyTorch: [V, N] scalings, COO kernel, torch.sparse.mm
# ------------------------------------------------------------------------------------------------------------------
class WasdStyle:
    """layout "coo": the WASD formulation as described (sparse COO kernel); "csr": the same loop with CSR matrices
    (torch.sparse.mm on CSR), separating the choice of format from the rest of our implementation."""

    def __init__(self, cost_csr: torch.Tensor, reg: float, layout: str = "coo"):
        coo = cost_csr.to_sparse_coo().coalesce()
        self.reg = reg
        self.K = torch.sparse_coo_tensor(coo.indices(), torch.exp(-coo.values() / reg), coo.shape).coalesce()
        self.KC = torch.sparse_coo_tensor(coo.indices(), torch.exp(-coo.values() / reg) * coo.values(),
                                          coo.shape).coalesce()
        self.Kt = self.K.t().coalesce()
        if layout == "csr":
            self.K, self.KC, self.Kt = (m.to_sparse_csr() for m in (self.K, self.KC, self.Kt))

    def ot(self, p, q, iters, exact):
        """transport cost [N] of p, q [N, V]."""
        P, Q = p.t(), q.t()
        V = P.shape[0]
        if exact:
            u = torch.full_like(P, 1.0 / V)
            for _ in range(iters):
                v = Q / torch.sparse.mm(self.Kt, u)
                u = P / torch.sparse.mm(self.K, v)
            return (u * torch.sparse.mm(self.KC, v)).sum(0)
        with torch.no_grad():
            u = torch.full_like(P, 1.0 / V)
            for _ in range(iters):
                v = Q / torch.sparse.mm(self.Kt, u)
                u = P / torch.sparse.mm(self.K, v)
            value = (u * torch.sparse.mm(self.KC, v)).sum(0)
            f, g = self.reg * torch.log(u), self.reg * torch.log(v)
        # envelope gradient: d value / dP = f, d value / dQ = g (up to a constant per column)
        return value + (f * (P - P.detach())).sum(0) + (g * (Q - Q.detach())).sum(0)

    def divergence(self, p, q, iters, exact):
        return self.ot(p, q, iters, exact) - 0.5 * self.ot(p, p, iters, exact) - 0.5 * self.ot(q, q, iters, exact)


def random_graph_cost(V, k, seed=0):
    """A symmetric random k-neighbour cost (each row: itself at cost 0 and k uniform random neighbours at cost
    uniform in [0.2, 0.8], both orientations stored): the sparsity of knn_kernel on random embeddings without its
    O(V^2 d) search (which takes minutes at V = 151,936 on a loaded 2-core machine)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.arange(V).repeat_interleave(k)
    c = torch.randint(0, V, (V * k,), generator=g)
    v = torch.rand(V * k, generator=g) * 0.6 + 0.2
    r, c, v = torch.cat([r, c, torch.arange(V)]), torch.cat([c, r, torch.arange(V)]), torch.cat([v, v, torch.zeros(V)])
    v = torch.where(r == c, torch.zeros_like(v), v)
    keys, inverse = torch.unique(r * V + c, return_inverse=True)
    vals = torch.zeros(keys.numel()).scatter_reduce_(0, inverse, v, "amax", include_self=False)
    crow = torch.zeros(V + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(keys // V, minlength=V), 0)
    return torch.sparse_csr_tensor(crow, keys % V, vals, (V, V))


def masses(N, V, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(N, V, generator=g) * 2.0, 1)


def fwd_bwd(fn, p):
    x = p.detach().clone().requires_grad_()
    value = fn(x)
    (g,) = torch.autograd.grad(value.sum(), x)
    return value.detach(), g


def bench_vocab(V, args, writer, dev):
    torch.manual_seed(0)
    if args.graph == "knn":
        emb = torch.randn(V, args.dim)
        t0 = time.perf_counter()
        cost = wk.knn_kernel(emb, args.k)
        t_knn = (time.perf_counter() - t0) * 1e3
        writer.add(bench_row("knn_kernel", "torch", "fwd", f"V={V} d={args.dim} k={args.k}", torch.float32, dev,
                             [t_knn], note="one build, not repeated"))
        print(writer.rows[-1], flush=True)
    else:
        cost = random_graph_cost(V, args.k)
    nnz = cost.values().numel()
    shape = f"V={V} N={args.tokens} k={args.k} nnz={nnz} T={args.iters} reg={args.reg} graph={args.graph}"
    p, q = masses(args.tokens, V, 1), masses(args.tokens, V, 2)
    K = wk.sparse_cost(cost, args.reg)
    bases = {name: WasdStyle(cost, args.reg, "coo" if name == "wasd" else "csr") for name in args.baselines}
    ours_backends = [be for be in args.backends if be != "cpu" or wk.HAS_C_EXT]
    problems = [("ot", False)] + ([("divergence", True)] if args.divergence else [])
    for what, div in problems:
        for grad in args.grads:
            exact = grad == "exact"
            fns = {}
            for be in ours_backends:
                ours = lambda x, div=div, be=be, grad=grad: wk.sparse_sinkhorn(  # noqa: E731
                    x, q, K, args.reg, args.iters, grad=grad, log_domain=False, divergence=div, backend=be).value
                fns[f"ours-{be}"] = lambda ours=ours: fwd_bwd(ours, p)
            for name, base in bases.items():
                theirs = (lambda x, exact=exact, base=base: base.divergence(x, q, args.iters, exact)) if div else \
                    (lambda x, exact=exact, base=base: base.ot(x, q, args.iters, exact))
                fns[name] = lambda theirs=theirs: fwd_bwd(theirs, p)
            ref = args.baselines[0]
            times = {n: [] for n in fns}
            outs = {}
            for n, fn in fns.items():  # --warmup calls
                for _ in range(args.warmup):
                    outs[n] = fn()
            # also a warm-up call of each; with --reps 0 the only call, and the timed one
            mem = {}
            for n, fn in fns.items():
                def keep(fn=fn, n=n, outs=outs):
                    outs[n] = fn()
                    return outs[n]
                mem[n] = peak_extra_mb(keep, None if args.reps else times[n])
            for _ in range(args.reps):
                for n, fn in fns.items():
                    t0 = time.perf_counter()
                    outs[n] = fn()
                    times[n].append((time.perf_counter() - t0) * 1e3)
            ref_v = outs[ref][0].double()
            err, gnote = {}, {}
            for n in fns:
                if not n.startswith("ours"):
                    continue
                err[n] = float(((outs[n][0].double() - ref_v).abs() / ref_v.abs()).max())
                g_ours, g_base = outs[n][1], outs[ref][1]
                bad = int((~torch.isfinite(g_base)).sum())
                if bad:
                    gnote[n] = (f"the baseline's gradient has {bad} non-finite entries (float32 autograd through the "
                                f"loop overflows), ours {int((~torch.isfinite(g_ours)).sum())}")
                else:  # gradients w.r.t. masses on the simplex: compared up to a constant per row
                    g_ours, g_base = g_ours - g_ours.mean(1, keepdim=True), g_base - g_base.mean(1, keepdim=True)
                    rel = float((g_ours - g_base).abs().max() / g_base.abs().max())
                    gnote[n] = f"max |grad diff| / max |grad| = {rel:.1e}"
            med = {n: statistics.median(t) for n, t in times.items()}  # the rows' median_ms
            labels = {"ours-cpu": "wk.sparse_sinkhorn, C++ CPU kernel (rows of all tokens, fused passes)",
                      "ours-torch": "wk.sparse_sinkhorn, torch backend (ATen CSR x dense, [V, N] layout)",
                      "wasd": "WASD formulation, plain PyTorch (COO, torch.sparse.mm)",
                      "csr": "the WASD loop in plain PyTorch with CSR matrices (torch.sparse.mm)"}
            for n in fns:
                note = f"{what}, grad={grad}; {labels[n]}"
                if n.startswith("ours"):
                    note += "".join(f"; {med[b] / med[n]:.2f}x faster than '{b}', "
                                    f"{mem[n] / max(mem[b], 1e-9):.2f}x its peak" for b in args.baselines)
                    if n == "ours-cpu" and "ours-torch" in med:
                        note += f"; {med['ours-torch'] / med[n]:.2f}x faster than the torch backend"
                    note += f"; vs '{ref}': {gnote[n]}"
                backend = n[len("ours-"):] if n.startswith("ours") else "plain-pytorch"
                writer.add(bench_row(f"vocab_ot_{what}", backend, "fwd+bwd", shape, torch.float32, dev, times[n],
                                     round(mem[n], 1), err.get(n), note))
                print(writer.rows[-1], flush=True)
    if args.log_domain_reg:
        r = args.log_domain_reg
        Kl = wk.sparse_cost(cost, r)
        fn = lambda: fwd_bwd(lambda x: wk.sparse_sinkhorn(x, q, Kl, r, args.iters, grad="envelope",  # noqa: E731
                                                          log_domain=True, backend="torch").value, p)
        mem = peak_extra_mb(fn)
        times = []
        for _ in range(max(1, args.reps // 2)):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        writer.add(bench_row("vocab_ot_ot", "torch", "fwd+bwd", shape.replace(f"reg={args.reg}", f"reg={r}"),
                             torch.float32, dev, times, round(mem, 1), None,
                             "log domain (sparse log-sum-exp), grad=envelope; no baseline (the scaling-domain "
                             "formulation underflows at this reg)"))
        print(writer.rows[-1], flush=True)


def bench_imagenet(args, writer, dev):
    C, B, d = 21843, 256, 512
    torch.manual_seed(0)
    cost = wk.knn_kernel(torch.randn(C, d), args.k)
    nnz = cost.values().numel()
    a, b = masses(B, C, 3), masses(B, C, 4)
    K = wk.sparse_cost(cost, args.reg)
    shape = f"C={C} B={B} k={args.k} nnz={nnz} T={args.iters} reg={args.reg}"
    gather_gib = B * (C - 1) ** 2 * 4 / 2 ** 30
    dense_gib = C * C * 4 / 2 ** 30
    results = {}
    for grad in args.grads:
        fn = lambda grad=grad: fwd_bwd(lambda x: wk.sparse_sinkhorn(  # noqa: E731
            x, b, K, args.reg, args.iters, grad=grad, log_domain=False, backend="torch").value, a)
        for _ in range(args.warmup):
            fn()
        mem = peak_extra_mb(fn)  # also a warm-up call
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            results[grad] = fn()
            times.append((time.perf_counter() - t0) * 1e3)
        writer.add(bench_row("vocab_ot_ot", "torch", "fwd+bwd", shape, torch.float32, dev, times, round(mem, 1), None,
                             f"ImageNet-21k size, grad={grad}, sparse k-NN kernel; the published gather formulation "
                             f"would hold B (C-1)^2 floats = {gather_gib:.0f} GiB"))
        print(writer.rows[-1], flush=True)
    if args.dense:
        dense = torch.full((C, C), 1e4)  # excluded couplings: K = exp(-1e4 / reg) = 0, K * cost = 0
        rows = torch.repeat_interleave(torch.arange(C), cost.crow_indices()[1:] - cost.crow_indices()[:-1])
        dense[rows, cost.col_indices()] = cost.values()
        grad, T = "envelope", args.dense_iters
        fns = {"dense": lambda: fwd_bwd(lambda x: wk.sinkhorn(x, b, dense, args.reg, T, grad=grad,  # noqa: E731
                                                              log_domain=False, backend="cpu").value, a),
               "sparse": lambda: fwd_bwd(lambda x: wk.sparse_sinkhorn(x, b, K, args.reg, T, grad=grad,  # noqa
                                                                      log_domain=False, backend="torch").value, a)}
        mem = {n: peak_extra_mb(fn) for n, fn in fns.items()}
        times, outs = {n: [] for n in fns}, {}
        for _ in range(max(1, args.dense_reps)):
            for n, fn in fns.items():
                t0 = time.perf_counter()
                outs[n] = fn()
                times[n].append((time.perf_counter() - t0) * 1e3)
        err = float(((outs["sparse"][0].double() - outs["dense"][0].double()).abs()
                     / outs["dense"][0].double().abs()).max())
        shape_t = shape.replace(f"T={args.iters}", f"T={T}")
        writer.add(bench_row("vocab_ot_ot", "cpu", "fwd+bwd", shape_t, torch.float32, dev, times["dense"],
                             round(mem["dense"], 1), None,
                             f"dense-K path: wk.sinkhorn (C++) on the densified cost ({dense_gib:.1f} GiB per C x C "
                             f"matrix, input excluded from the peak), grad={grad}"))
        print(writer.rows[-1], flush=True)
        writer.add(bench_row("vocab_ot_ot", "torch", "fwd+bwd", shape_t, torch.float32, dev, times["sparse"],
                             round(mem["sparse"], 1), err,
                             f"sparse op, same problem and run as the dense-K row above, grad={grad}; max_rel_err = "
                             "its value against the dense path's"))
        print(writer.rows[-1], flush=True)


def main(argv=None):
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:  # see the module docstring (memory)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", default="50257,151936", help="comma-separated V list, or 'none'")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--graph", default="knn", choices=["knn", "random"],
                    help="LLM part: knn_kernel of random embeddings, or random_graph_cost (same sparsity, no search)")
    ap.add_argument("--dim", type=int, default=32, help="embedding width of the random k-NN embeddings (LLM part)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--reg", type=float, default=0.05,
                    help="scaling-domain reg of the comparison (cosine costs of neighbours < 1: K in range)")
    ap.add_argument("--log-domain-reg", type=float, default=None,
                    help="also time ours in the log domain at this reg (e.g. WASD's 1e-3)")
    ap.add_argument("--grads", default="envelope,exact")
    ap.add_argument("--backends", default="cpu,torch",
                    help="comma list of wk.sparse_sinkhorn backends timed (LLM part): 'cpu' (C++, when built), 'torch'")
    ap.add_argument("--baselines", default="wasd", help="comma list of 'wasd' (COO) and 'csr'; the first is the "
                    "reference of max_rel_err")
    ap.add_argument("--divergence", action="store_true", help="also the Sinkhorn divergence (3 problems)")
    ap.add_argument("--imagenet", action="store_true")
    ap.add_argument("--dense", action="store_true", help="ImageNet-21k part: also the dense-K path")
    ap.add_argument("--dense-reps", type=int, default=1)
    ap.add_argument("--dense-iters", type=int, default=10, help="iterations of the dense-K comparison")
    ap.add_argument("--reps", type=int, default=2,
                    help="timed calls per method; 0: the memory call is the timed one (LLM part)")
    ap.add_argument("--warmup", type=int, default=0, help="calls before the memory call (itself a warm-up)")
    ap.add_argument("--out", default="bench_vocab_ot", help="output prefix (.csv, .json, .md)")
    args = ap.parse_args(argv)
    args.grads = args.grads.split(",")
    args.baselines = args.baselines.split(",")
    args.backends = args.backends.split(",")
    dev = device_name("cpu")
    writer = RowWriter(args.out + ".csv", args.out + ".json", args.out + ".md",
                       meta={"device": dev, "torch": torch.__version__, "argv": sys.argv[1:]})
    print(f"# {dev}, torch {torch.__version__}, float32", flush=True)
    if args.vocab != "none":
        for V in args.vocab.split(","):
            bench_vocab(int(V), args, writer, dev)
    if args.imagenet:
        bench_imagenet(args, writer, dev)


if __name__ == "__main__":
    main()
