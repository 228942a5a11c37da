"""Compile, for real GPU targets and without a GPU, every Triton kernel variant that the package's launchers produce.

    python python_tests/triton_compile_matrix.py [--arch 80,90] [--only sinkhorn|sparse_sinkhorn|gaussian] [--jobs N]

How the variants are found: the launchers themselves run (``wkd_kernels.triton.sinkhorn.sinkhorn_forward`` and
``sinkhorn_backward``, ``wkd_kernels.triton.sparse_sinkhorn.sparse_sinkhorn_forward`` and ``sparse_sinkhorn_backward``,
``feature_stats_forward/backward``, ``sqrtm_forward``, ``lyapunov``, ``nuclear_norm_forward``,
``bures_wasserstein_forward/backward``) on small CPU tensors over a grid of settings (dtype, every fp32 precision mode,
shared and per-row cost, both domains, with and without history, eps = 0 and > 0, every matrix block size the
Gaussian launchers can pick); ``JITFunction.run`` is replaced by a recorder, so every launch is captured with its
real arguments instead of running. Each distinct variant -- kernel, argument types (pointer dtypes, integer / float
scalars) and constexpr values, num_warps / num_stages -- is then compiled with ``triton.compile`` to the machine code
of each requested target (``GPUTarget("cuda", 80 | 90, 32)``: Triton's frontend, its LLVM and the bundled ptxas).
Integer-value specialisations that a real launch adds on top (arguments equal to 1, divisibility by 16) are not
reproduced: they only add attributes to the same code.

Works with Triton 3.2 and later (the ASTSource API changed in 3.3; both forms are handled). Do not set
TRITON_INTERPRET (the launchers would run the interpreter instead of recording). Prints one line per failing variant,
then ``compiled: <n> variants x <targets> targets (float32 <a>, float64 <b>, ...)`` and exits 1 if any failed.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import inspect
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("triton_compile_matrix: unset TRITON_INTERPRET (the launchers must record launches, not interpret them)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

_TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                    torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


# ------------------------------------------------------------------------------------------------ recording
class Variant(collections.namedtuple("Variant", "kernel name signature constexprs options dtype")):
    """One compilable kernel variant. signature: ((param, type), ...) over the non-constexpr parameters;
    constexprs: ((param, value), ...); options: ((name, value), ...); dtype: the floating data type it computes in."""

    def key(self):
        return (self.name, self.signature, tuple((k, repr(v)) for k, v in self.constexprs), self.options)


def _scalar_type(value) -> str:
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unsupported scalar argument {value!r} ({type(value).__name__})")


def _describe(fn: JITFunction, args, kwargs) -> Variant:
    kwargs = dict(kwargs)
    options = tuple(sorted((k, kwargs.pop(k)) for k in list(kwargs) if k in _LAUNCH_OPTIONS))
    kwargs.pop("debug", None)
    bound = inspect.signature(fn.fn).bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs, dtypes = [], [], []
    for p in fn.params:
        value = bound.arguments[p.name]
        if p.is_constexpr:
            constexprs.append((p.name, value))
        elif isinstance(value, torch.Tensor):
            signature.append((p.name, "*" + _TORCH_TO_TRITON[value.dtype]))
            if value.dtype.is_floating_point:
                dtypes.append(value.dtype)
        else:
            signature.append((p.name, _scalar_type(value)))
    # the data type a variant computes in: float64 if any operand is float64, else float32 (half inputs included)
    dtype = "float64" if torch.float64 in dtypes else ("float32" if dtypes else "none")
    return Variant(fn, fn.__name__, tuple(signature), tuple(constexprs), options, dtype)


class Recorder:
    """Replaces JITFunction.run while active: each launch is recorded (deduplicated), nothing runs. calls: every
    launch as (JITFunction, args, kwargs), in order, with its real argument values."""

    def __init__(self):
        self.variants: dict = {}
        self.launches = 0
        self.calls: list = []

    def __enter__(self):
        self._orig = JITFunction.run
        recorder = self

        def run(fn, *args, grid=None, warmup=False, **kwargs):
            recorder.launches += 1
            recorder.calls.append((fn, args, kwargs))
            v = _describe(fn, args, kwargs)
            recorder.variants.setdefault(v.key(), v)
            return None

        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._orig
        return False


# ------------------------------------------------------------------------------------------------ drivers
def drive_sinkhorn():
    """Every launch configuration of the Sinkhorn launchers (forward and backward)."""
    from wkd_kernels.triton import sinkhorn as sk

    B, n, m, T = 3, 5, 7, 2  # T = 2: first, middle and final half-iterations all occur
    saved = sk.ONCHIP_MAX_C
    sk.ONCHIP_MAX_C = 0  # the per-half-iteration kernels at every size (drive_sinkhorn_onchip drives the others)
    try:
        for dt in (torch.float32, torch.float64):
            precisions = sk.FP32_PRECISIONS if dt == torch.float32 else ("ieee",)
            for prec in precisions:
                for shared in (True, False):
                    for log_domain in (False, True):
                        for eps in (0.0, 1e-8):
                            a = torch.full((B, n), 1.0 / n, dtype=dt)
                            b = torch.full((B, m), 1.0 / m, dtype=dt)
                            cost = torch.rand((n, m) if shared else (B, n, m), dtype=dt)
                            sk.sinkhorn_forward(a, b, cost, 0.05, T, eps, log_domain, False, prec)
                            out = sk.sinkhorn_forward(a, b, cost, 0.05, T, eps, log_domain, True, prec)
                            g = torch.ones(B, dtype=dt)
                            sk.sinkhorn_backward(g, a, b, cost, *out[3:], 0.05, log_domain, prec)
    finally:
        sk.ONCHIP_MAX_C = saved


def drive_sinkhorn_onchip(sizes=(100,)):
    """Every launch configuration of the single-launch (on-chip) Sinkhorn launchers: both dtypes, every fp32
    precision (scaling domain), both domains, eps = 0 and > 0 (log domain), with and without history, the K buffer
    on and off, at the given n = m (the variants do not depend on the size); plus every scaling-domain
    configuration of ONCHIP_CONFIG_CANDIDATES (both dtypes, "ieee", forward with history and backward)."""
    from wkd_kernels.triton import sinkhorn as sk

    saved = dict(sk.ONCHIP_K_BUFFER)
    B, T = 3, 2
    try:
        for dt in (torch.float32, torch.float64):
            for n in sizes:
                a = torch.full((B, n), 1.0 / n, dtype=dt)
                cost = torch.rand(n, n, dtype=dt)
                g = torch.ones(B, dtype=dt)
                for log_domain in (False, True):
                    precisions = ("ieee", "tf32x3", "tf32") if dt == torch.float32 and not log_domain else ("ieee",)
                    for prec in precisions:
                        for eps in ((0.0, 1e-8) if log_domain else (0.0,)):
                            for kbuf in ((False, True) if not log_domain else (False,)):
                                sk.ONCHIP_K_BUFFER[dt] = kbuf
                                sk.sinkhorn_forward_onchip(a, a, cost, 0.05, T, eps, log_domain, False, prec)
                                out = sk.sinkhorn_forward_onchip(a, a, cost, 0.05, T, eps, log_domain, True, prec)
                                sk.sinkhorn_backward_onchip(g, a, a, cost, *out[3:], 0.05, log_domain, prec)
        # every scaling-domain configuration bench/tune_sinkhorn.py --sweep-onchip may time (tl.dot and broadcast
        # products), K on the fly, "ieee"
        saved_config = {dt: dict(cfg) for dt, cfg in sk.ONCHIP_CONFIG.items()}
        sk.ONCHIP_K_BUFFER.update({dt: False for dt in sk.ONCHIP_K_BUFFER})
        try:
            for config in sk.ONCHIP_CONFIG_CANDIDATES:
                for dt in (torch.float32, torch.float64):
                    sk.ONCHIP_CONFIG[dt]["scaling"] = config
                    a = torch.full((B, sizes[0]), 1.0 / sizes[0], dtype=dt)
                    cost = torch.rand(sizes[0], sizes[0], dtype=dt)
                    out = sk.sinkhorn_forward_onchip(a, a, cost, 0.05, T, 0.0, False, True, "ieee")
                    sk.sinkhorn_backward_onchip(torch.ones(B, dtype=dt), a, a, cost, *out[3:], 0.05, False, "ieee")
        finally:
            for dt, cfg in saved_config.items():
                sk.ONCHIP_CONFIG[dt].clear()
                sk.ONCHIP_CONFIG[dt].update(cfg)
    finally:
        sk.ONCHIP_K_BUFFER.clear()
        sk.ONCHIP_K_BUFFER.update(saved)


def drive_gaussian():
    """Every block size / dtype / precision the Gaussian launchers pick (matrix sizes 1..64 map to blocks 16, 32, 64;
    feature maps chosen so that every BLOCK_C, BLOCK_M, BLOCK_Q value occurs), plus the WKD-F shapes."""
    from wkd_kernels.triton import feature_stats as fs, nuclear_norm as nn_, sqrtm as sq

    for dt in (torch.float32, torch.float64):
        for prec in (("ieee", "tf32x3") if dt == torch.float32 else ("ieee",)):
            for n in (3, 20, 40, 64):
                S = torch.eye(n, dtype=dt).expand(2, n, n).contiguous()
                for method in ("newton_schulz", "eigh"):
                    Y, _ = sq.sqrtm_forward(S, method, 5, prec)
                    sq.sqrtm_forward(S, method, 5, prec, want_inverse=(method == "eigh"))
                    sq.lyapunov(Y, S, method, 5, prec)
                    # the Bures composition (wkd_kernels/ops/bures_wasserstein.py) through its registered op
                    mu = torch.zeros(2, n, dtype=dt)
                    w2, R1, R2, Q = torch.ops.wkd.bures_wasserstein_triton(mu, S, mu, S, method, 5, prec)
                    torch.ops.wkd.bures_wasserstein_triton_backward(torch.ones(2, dtype=dt), mu, mu, R1, R2, Q,
                                                                    method, 5, prec)
            for p, q in ((3, 5), (20, 40), (64, 64), (49, 49), (25, 25)):
                nn_.nuclear_norm_forward(torch.rand(2, p, q, dtype=dt), 5, prec)
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        # (C, H, W, grid): BLOCK_C 2..16, BLOCK_M 16..256, BLOCK_Q 16..128, full blocks 16 and 32, and the
        # WKD-F shapes (ImageNet C=512 7x7, CIFAR C=256 8x8, grid 1/2/4)
        for C, H, W, grid in ((1, 2, 2, 1), (3, 5, 5, 1), (6, 6, 6, 1), (16, 8, 8, 1), (40, 16, 16, 1),
                              (20, 23, 23, 1), (512, 7, 7, 1), (512, 7, 7, 4), (256, 8, 8, 2), (64, 28, 28, 4)):
            x = torch.rand(2, C, H, W, dtype=dt)
            for full in (False, True):
                mean, var = fs.feature_stats_forward(x, grid, full, True)
                fs.feature_stats_backward(torch.ones_like(mean), torch.ones_like(var), x, mean, grid, full, True)


# ------------------------------------------------------------------------------------------------ load widths
def compile_as_launched(fn: JITFunction, args, kwargs, arch: int) -> str:
    """The PTX of one recorded launch compiled for sm_<arch> with the specialisations a real launch adds (unlike the
    matrix above): pointer arguments 16-byte aligned (torch allocations are; asserted), integer arguments equal to 1
    as constexprs, integers divisible by 16 with the tt.divisibility = 16 attribute -- what lets Triton prove
    alignment and emit vector loads. Triton >= 3.3 (ASTSource with constexprs and attrs)."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in _LAUNCH_OPTIONS}
    kwargs.pop("debug", None)
    bound = inspect.signature(fn.fn).bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        value = bound.arguments[p.name]
        if p.is_constexpr or (isinstance(value, int) and not isinstance(value, bool) and value == 1):
            signature[p.name] = "constexpr"
            constexprs[(i,)] = value
        elif isinstance(value, torch.Tensor):
            assert value.data_ptr() % 16 == 0, (fn.__name__, p.name)
            signature[p.name] = "*" + _TORCH_TO_TRITON[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[p.name] = _scalar_type(value)
            if isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options).asm["ptx"]


def async_copy_widths(ptx: str) -> collections.Counter:
    """Bytes per cp.async (global -> shared copies: the k-loop operand loads of the tl.dot kernels) -> count."""
    import re

    pattern = r"cp\.async\.c[ag]\.shared\.global[^\[]*\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)"
    return collections.Counter(int(w, 0) for w in re.findall(pattern, ptx))


def check_dot_kernel_load_widths(arch: int = 90, sizes=((1000, 999), (1024, 1024))) -> list:
    """Padded leading dimensions: the Sinkhorn tl.dot kernels at n, m = 1000, 999 (not multiples of
    16, as ImageNet's C and C - 1) must copy their k-loop operands with the same cp.async widths as at n = m = 1024,
    where every row is 16-byte aligned -- i.e. the padding of K, K∘C and the scaling work buffers turns the 4-byte
    copies into 16-byte ones. Compared per kernel variant, every dtype and fp32 precision, forward and backward,
    except the backward's first S-side step (it also reads u_T = a / r_T from the unpadded inputs, once per call).
    Returns the mismatches (empty when the property holds); prints one line per variant."""
    from wkd_kernels.triton import sinkhorn as sk

    B, T = 64, 3
    widths: dict = {}
    saved = sk.ONCHIP_MAX_C
    sk.ONCHIP_MAX_C = 0
    try:
        for n, m in sizes:
            for dt in (torch.float32, torch.float64):
                for prec in (sk.FP32_PRECISIONS if dt == torch.float32 else ("ieee",)):
                    a = torch.full((B, n), 1.0 / n, dtype=dt)
                    b = torch.full((B, m), 1.0 / m, dtype=dt)
                    cost = torch.rand(n, m, dtype=dt)
                    hist = (torch.empty(T, B, n, dtype=dt), torch.empty(T, B, m, dtype=dt), torch.empty(B, n, dtype=dt))
                    with Recorder() as rec:
                        sk.sinkhorn_forward(a, b, cost, 0.05, T, 0.0, False, True, prec)
                        sk.sinkhorn_backward(torch.ones(B, dtype=dt), a, b, cost, *hist, 0.05, False, prec)
                    for fn, args, kw in rec.calls:
                        if fn.__name__ not in ("sinkhorn_fwd_dot_kernel", "sinkhorn_bwd_dot_kernel") or kw.get("FIRST"):
                            continue
                        flags = tuple(sorted((k, v) for k, v in kw.items() if k in ("FINAL", "SIDE_S", "STORE_OUT")))
                        role = (fn.__name__, str(dt).replace("torch.", ""), prec, flags)
                        if (n, m, role) not in widths:
                            widths[(n, m, role)] = async_copy_widths(compile_as_launched(fn, args, kw, arch))
    finally:
        sk.ONCHIP_MAX_C = saved
    (n0, m0), (n1, m1) = sizes
    problems = []
    for (n, m, role), w in sorted(widths.items(), key=repr):
        if (n, m) != (n0, m0):
            continue
        # STORE_OUT (padded sizes only) changes no load; compare with the aligned variant without it
        aligned_role = role[:3] + (tuple((k, False if k == "STORE_OUT" else v) for k, v in role[3]),)
        ref = widths.get((n1, m1, aligned_role))
        line = f"{role[0]} {role[1]} {role[2]} {dict(role[3])}: cp.async bytes at {n}x{m} {dict(sorted(w.items()))}"
        line += f", at {n1}x{m1} {dict(sorted(ref.items())) if ref else None}"
        print(line)
        if ref is None or w != ref or not w:
            problems.append(line)
    return problems


# ------------------------------------------------------------------------------------------------ compiling
def _ast_source(v: Variant):
    params = inspect.signature(triton.compiler.ASTSource.__init__).parameters
    sig = dict(v.signature)
    if "constexprs" in params:  # Triton >= 3.3: constexprs are part of the signature
        full = {p.name: (sig[p.name] if p.name in sig else "constexpr") for p in v.kernel.params}
        return triton.compiler.ASTSource(fn=v.kernel, signature=full, constexprs=dict(v.constexprs))
    return triton.compiler.ASTSource(fn=v.kernel, signature=sig, constants=dict(v.constexprs))  # Triton 3.2


def compile_variant(v: Variant, arch: int):
    """Compile one variant for sm_<arch>; returns None or the error text."""
    try:
        triton.compile(_ast_source(v), target=GPUTarget("cuda", arch, 32), options=dict(v.options))
        return None
    except Exception as exc:  # noqa: BLE001  (any failure is a finding)
        lines = f"{type(exc).__name__}: {exc}".strip().splitlines()[-6:]
        cause = exc.__cause__ or exc.__context__
        while cause is not None:  # Triton's CompilationError shows the source; the reason is in the cause
            lines.append(f"caused by {type(cause).__name__}: {str(cause).strip().splitlines()[-1:] or ''}")
            cause = cause.__cause__ or cause.__context__
        return "\n".join(lines)


def _compile_job(args):
    index, arch = args
    v = _VARIANTS[index]
    return index, arch, compile_variant(v, arch)


def drive_sparse_sinkhorn():
    """Every launch configuration of the sparse (CSR) Sinkhorn launchers: float32 and float64, int32 and int64
    indices (of both CSR orientations), with and without history, eps = 0 and > 0, the backward with and without
    the gauge correction."""
    from wkd_kernels.aten.sparse_sinkhorn import SparseCost
    from wkd_kernels.triton import sparse_sinkhorn as ss

    C, B, T = 5, 3, 2
    dense = torch.rand(C, C, dtype=torch.float64)
    for dt in (torch.float32, torch.float64):
        K = SparseCost(dense.to(dt).to_sparse_csr(), 0.5)
        for index in (torch.int32, torch.int64):
            arrays = [t if t.is_floating_point() else t.to(index) for t in K.arrays]
            a = torch.full((C, B), 1.0 / C, dtype=dt)
            for eps in (0.0, 1e-8):
                ss.sparse_sinkhorn_forward(a, a, *arrays, 0.5, T, eps, False)
                out = ss.sparse_sinkhorn_forward(a, a, *arrays, 0.5, T, eps, True)
                g = torch.ones(B, dtype=dt)
                ss.sparse_sinkhorn_backward(g, a, a, *arrays, *out[3:], 0.5, eps)
                ss.sparse_sinkhorn_backward(g, a, a, *arrays, *out[3:], 0.5, None)


_VARIANTS: list = []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="80,90", help="comma-separated sm versions to compile for (default: 80,90)")
    ap.add_argument("--only", choices=("sinkhorn", "sparse_sinkhorn", "gaussian"), default=None,
                    help="one kernel family (default: all)")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                    help="parallel compile processes (default: min(4, CPUs))")
    ap.add_argument("--check-load-widths", action="store_true",
                    help="instead: check that the padded Sinkhorn tl.dot kernels copy their operands with 16-byte "
                         "loads at C = 1000 (check_dot_kernel_load_widths, sm_90)")
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",") if a.strip()]
    if args.check_load_widths:
        print(f"triton {triton.__version__}")
        problems = check_dot_kernel_load_widths(90)
        print(f"load widths: {len(problems)} mismatches")
        return 1 if problems else 0

    t0 = time.time()
    rec = Recorder()
    with rec:
        if args.only in (None, "sinkhorn"):
            drive_sinkhorn()
            drive_sinkhorn_onchip()
        if args.only in (None, "sparse_sinkhorn"):
            drive_sparse_sinkhorn()
        if args.only in (None, "gaussian"):
            drive_gaussian()
    _VARIANTS[:] = sorted(rec.variants.values(), key=lambda v: (v.name, repr(v.key())))
    print(f"triton {triton.__version__} ({os.path.dirname(triton.__file__)}), torch {torch.__version__}")
    print(f"recorded {rec.launches} launches -> {len(_VARIANTS)} distinct variants; compiling for "
          f"{', '.join(f'sm_{a}' for a in archs)} with {args.jobs} processes", flush=True)

    jobs = [(i, a) for i in range(len(_VARIANTS)) for a in archs]
    failures = []
    if args.jobs > 1:
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            results = list(pool.map(_compile_job, jobs, chunksize=2))
    else:
        results = [_compile_job(j) for j in jobs]
    for index, arch, err in results:
        if err is not None:
            failures.append((index, arch, err))

    by_dtype = collections.Counter(v.dtype for v in _VARIANTS)
    by_kernel = collections.Counter(v.name for v in _VARIANTS)
    for index, arch, err in failures:
        v = _VARIANTS[index]
        consts = ", ".join(f"{k}={getattr(val, 'name', val)}" for k, val in v.constexprs)
        print(f"FAILED sm_{arch} {v.name} [{v.dtype}] ({consts}; {dict(v.options)}):\n    "
              + err.replace("\n", "\n    "))
    print("variants per kernel: " + ", ".join(f"{k} {c}" for k, c in sorted(by_kernel.items())))
    ok = len(jobs) - len(failures)
    print(f"compiled: {ok} of {len(jobs)} ({len(_VARIANTS)} variants x {len(archs)} targets; variants by dtype: "
          + ", ".join(f"{k} {c}" for k, c in sorted(by_dtype.items()))
          + f") with triton {triton.__version__} in {time.time() - t0:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
