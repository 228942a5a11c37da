"""The Sinkhorn tests' one harness and one tolerance table (the test_sinkhorn_*.py files, one property each, and
test_sinkhorn_gpu.py).

Backends are those of conftest.py that can run here (cases are generated for those only): "cpu" (C++ CPU kernels),
"torch" (ATen ops), "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1: small shapes only, the
interpreter is slow), "cuda" (the CUDA C++ kernels of csrc/cuda/sinkhorn.cu: a GPU and a build with them). The grids
over several parameters are pairwise (python_tests/pairwise.py: every pair of values in some case) plus named edge
cases; every forward + backward comparison goes through one harness, check_sinkhorn, with one tolerance table, TOL.

Files, by property: test_sinkhorn_values.py (outputs vs the float64 reference, the CPU op, POT, real cost
matrices), test_sinkhorn_gradients.py (backward op, exact / envelope gradient, gradcheck, memory of the backward),
test_sinkhorn_zero_mass.py (zero masses, underflow, empty batches), test_sinkhorn_log_domain.py,
test_sinkhorn_history.py (the history contract, no-history calls, strided inputs), test_sinkhorn_bad_input.py,
test_sinkhorn_compile_opcheck.py (opcheck, torch.compile, Ctrl-C), test_sinkhorn_triton_tiles.py and
test_sinkhorn_triton_onchip.py (Triton internals), test_sinkhorn_cuda.py (CUDA C++ internals on a GPU, and the
CUDA C++ source under host emulation), test_sinkhorn_random_cases.py (seeded random problems).
"""
import hashlib
from typing import NamedTuple, Optional

import torch

from conftest import assert_close, available_backends, backend_or_reason, import_pot, rand_cost, simplex
from pairwise import as_params, pairwise
from wkd_kernels.reference import sinkhorn_reference

F64, F32 = torch.float64, torch.float32
OUTPUTS = ("value", "u", "v", "hist_r", "hist_s", "y")


# ------------------------------------------------------------------------------------------ tolerances, shapes
class Tol(NamedTuple):
    """Relative tolerances of one family of cases (check_sinkhorn), per output row (scale: max |want| of the row; 1
    for logs, whose absolute error is a relative error of the exponential; the gradients: max |reference grad|).
    None: not compared."""
    value_ref: float                # value vs the float64 reference
    scalings_ref: Optional[float]   # u, v (their logs in the log domain) vs the reference
    value_cpu: Optional[float]      # value vs the CPU op in the same dtype
    outputs_cpu: Optional[float]    # u, v, hist_r, hist_s, y vs the CPU op in the same dtype
    grad_ref: Optional[float]       # gradients vs autograd through the float64 reference
    grad_cpu: Optional[float]       # gradients vs the CPU backward op, on the same history and on the CPU op's


# The Sinkhorn tests' one tolerance table: {(family, dtype): Tol}. A family is a set of cases with the same accuracy
# claim:
#   "op":      every backend's registered op over the shape grid (float32: its rounding; float64: 1e-10);
#   "tiles":   the Triton per-half-iteration kernels (16-wide tiles or the shipped ones,
#              test_sinkhorn_triton_tiles.py): tighter;
#   "onchip":  the single-launch Triton kernels (test_sinkhorn_triton_onchip.py): tighter still in float64;
#   "small_reg": float32 log domain with reg = 1e-2 (|L| = cost / reg <= 100 rounded to float32: ~1e-6 per entry);
#   "tf32_gpu": float32 tl.dot in tf32 on a GPU (10 mantissa bits); "tensor_core_interp": tf32 / tf32x3 under the
#   interpreter (computes like ieee, but the claim is the tf32x3 one);
#   "pot": the value vs POT (the `value_ref` field).
TOL = {
    ("op", F32): Tol(1e-5, 2e-5, 1e-5, 1e-5, 1e-4, 1e-4),
    ("op", F64): Tol(1e-10, 2e-10, 1e-10, 1e-10, 1e-9, 1e-9),
    ("tiles", F32): Tol(1e-5, 1e-4, 1e-5, 1e-5, 1e-4, 1e-5),
    ("tiles", F64): Tol(1e-10, 1e-9, 1e-10, 1e-10, 1e-10, 1e-10),
    ("small_reg", F32): Tol(1e-4, 1e-3, 1e-5, 1e-5, 1e-3, 1e-5),
    ("small_reg", F64): Tol(1e-10, 1e-9, 1e-10, 1e-10, 1e-10, 1e-10),
    ("onchip", F32): Tol(1e-5, 1e-4, 1e-5, 1e-4, 2e-5, None),
    ("onchip", F64): Tol(1e-12, 1e-11, 1e-12, 1e-11, 1e-11, None),
    ("tf32_gpu", F32): Tol(5e-2, 5e-1, None, None, 5e-2, None),
    ("tensor_core_interp", F32): Tol(1e-4, 1e-3, None, None, 1e-4, None),
    ("pot", F32): Tol(1e-5, None, None, None, None, None),
    ("pot", F64): Tol(1e-10, None, None, None, None, None),
    # test_sinkhorn_gpu.py: float32 on a GPU vs the float64 CPU op by max |x - ref| / max |ref| (tolerance.py's
    # assert_within; value in `value_ref`, gradients in `grad_ref`): IEEE-exact products, and tf32x3
    # (docs/precision.md)
    ("gpu_exact", F32): Tol(1e-4, None, None, None, 5e-4, None),
    ("gpu_tf32x3", F32): Tol(1e-3, None, None, None, 3e-3, None),
}
# Odd sizes, one-element rows, tile edges (16/32/64), unaligned rows (no 16-byte loads) and aligned ones. With a
# shared cost, n, m <= 256 take the single-launch kernels (Triton and CUDA C++); (64, 129, 257) takes the CUDA C++
# per-half-iteration kernels' 16 x 32 tiles on an H100/H200, SIZES_BIG (test_sinkhorn_cuda.py) their 32 x 64 tiles.
SHAPES = [(1, 1, 1), (3, 7, 5), (5, 33, 65), (4, 40, 36), (17, 70, 37), (2, 13, 64), (33, 64, 128), (64, 129, 257)]
# the interpreted Triton kernels take the small ones only (the rest run on a GPU): the others are not generated
INTERPRETED_SHAPES = {(1, 1, 1), (3, 7, 5), (2, 13, 64)}
POT_SHAPES = [(1, 1, 1), (4, 7, 7), (3, 13, 5), (5, 33, 64)]


def runs_here(backend_name, shape=None):
    """Whether a case of that backend (and shape) is generated: the interpreter takes INTERPRETED_SHAPES only."""
    b = backend_or_reason(backend_name)
    return not isinstance(b, str) and (shape is None or not b.interpreted or tuple(shape) in INTERPRETED_SHAPES)


def backend_cases(grid, valid=None, edges=()):
    """Pairwise cases (python_tests/pairwise.py) over {"backend": the available backends, **grid}, only those that
    run here (`runs_here` with the case's "shape", and `valid`), plus the named `edges` ({name: value} dicts, kept
    where they run here), as pytest.params for @pytest.mark.parametrize(names, ..., indirect=["backend"])."""
    params = {"backend": available_backends(), **grid}

    def ok(c):
        return runs_here(c["backend"], c.get("shape")) and (valid is None or valid(c))

    cases = pairwise(params, ok)
    cases += [e for e in edges if ok(e) and e not in cases]

    def ident(c):
        return "-".join(param_id(c[k], k) for k in params)

    return list(params), as_params(cases, list(params), ident)


def param_id(x, key=None):
    """A readable test id for a parameter value (`key`: the parameter's name)."""
    if key == "shared":
        return "shared" if x else "per_row"
    if key == "log_domain":
        return "log" if x else "scaling"
    if key in ("eps", "zeros"):
        return f"{key}{x:g}"
    if isinstance(x, tuple):
        return "x".join(map(str, x))
    if isinstance(x, torch.dtype):
        return {F32: "f32", F64: "f64"}.get(x, str(x))
    return str(x)


# ------------------------------------------------------------------------------------------ helpers
def problem(B, n, m, dtype, shared, zeros=0, seed=0, zeros_b=None):
    """Seeded masses a [B, n], b [B, m] (`zeros` zero entries per row, at most n - 1) and a [0, 1) cost, shared
    [n, m] or per row [B, n, m]."""
    zb = zeros if zeros_b is None else zeros_b
    a = simplex(B, n, dtype, zeros=min(zeros, n - 1), seed=seed + 1)
    b = simplex(B, m, dtype, zeros=min(zb, m - 1), seed=seed + 2)
    cost = rand_cost(n, m, dtype=dtype, seed=seed + 3) if shared else rand_cost(B, n, m, dtype=dtype, seed=seed + 3)
    return a, b, cost


def run_op(backend, a, b, cost, reg, T, eps=0.0, log_domain=False, keep=True, precision="ieee"):
    """The forward op of `backend` on its device: torch.ops.wkd.sinkhorn (CPU kernel on CPU tensors, CUDA C++ kernel
    on CUDA tensors) or torch.ops.wkd.sinkhorn_triton."""
    a, b, cost = backend.to(a, b, cost)
    if backend.name == "triton":
        return torch.ops.wkd.sinkhorn_triton(a, b, cost, reg, T, eps, log_domain, keep, precision)
    if backend.name == "torch":
        return torch.ops.wkd.sinkhorn_torch(a, b, cost, reg, T, eps, log_domain, keep)
    return torch.ops.wkd.sinkhorn(a, b, cost, reg, T, eps, log_domain, keep)


def run_backward(backend, g, a, b, cost, out, reg, log_domain=False, precision="ieee"):
    """The backward op of `backend` from a forward's outputs `out` (its hist_r, hist_s, y)."""
    g, a, b, cost = backend.to(g, a, b, cost)
    if backend.name == "triton":
        return torch.ops.wkd.sinkhorn_triton_backward(g, a, b, cost, *out[3:], reg, log_domain, precision)
    if backend.name == "torch":
        return torch.ops.wkd.sinkhorn_torch_backward(g, a, b, cost, *out[3:], reg, log_domain)
    return torch.ops.wkd.sinkhorn_backward(g, a, b, cost, *out[3:], reg, log_domain)


def cpu_op(a, b, cost, reg, T, eps=0.0, log_domain=False, keep=True):
    return torch.ops.wkd.sinkhorn(a.cpu(), b.cpu(), cost.cpu(), reg, T, eps, log_domain, keep)


# The float64 reference's results by problem, shared by the backends that check the same problem (the grids' edges
# and the per-backend tests run one problem on every backend): keys hash the inputs' bytes, values are never written
_REFERENCE_CACHE = {}


def _key(*items):
    parts = []
    for x in items:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            parts.append((str(t.dtype), tuple(t.shape), hashlib.sha1(t.view(torch.uint8).numpy()).hexdigest()
                          if t.numel() else ""))
        else:
            parts.append(x)
    return tuple(parts)


def reference(a, b, cost, reg, T, eps, log_domain):
    """sinkhorn_reference(a, b, cost, reg, T, eps=eps, log_domain=log_domain) (value, u, v), once per problem."""
    key = ("forward", _key(a, b, cost, reg, T, eps, log_domain))
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = sinkhorn_reference(a, b, cost, reg, T, eps=eps, log_domain=log_domain)
    return _REFERENCE_CACHE[key]


def ref_grads(a, b, cost, reg, T, eps, g):
    """Exact gradient of sum(g * value) by autograd through the float64 reference (always the scaling-domain loop:
    its derivative at zero-mass entries is the one the kernels compute), once per problem."""
    key = ("grads", _key(a, b, cost, reg, T, eps, g))
    if key not in _REFERENCE_CACHE:
        a64 = a.detach().double().cpu().requires_grad_()
        b64 = b.detach().double().cpu().requires_grad_()
        value = sinkhorn_reference(a64, b64, cost.double().cpu(), reg, T, eps=eps)[0]
        _REFERENCE_CACHE[key] = torch.autograd.grad((value * g.double().cpu()).sum(), (a64, b64))
    return _REFERENCE_CACHE[key]


def check_grads(got, want, rtol, what=""):
    """Gradients against one scale, the largest entry of `want` (some entries cancel to rounding noise)."""
    scale = max(w.abs().max().item() for w in want)
    for name, x, y in zip(("grad_a", "grad_b"), got, want, strict=False):
        assert_close(x, y, rtol, what=f"{what} {name}", scale=scale)


def pot_row(a, b, M, reg, k, log_domain):
    """POT on one row, restricted to the support (POT itself cannot take zero masses in `a`)."""
    sa, sb = a > 0, b > 0
    return import_pot().sinkhorn2(a[sa], b[sb], M[sa][:, sb], reg, numItermax=k, stopThr=0,
                                  method="sinkhorn_log" if log_domain else "sinkhorn")


def pot_batch(a, b, cost, reg, k, log_domain=False):
    a, b, cost = a.double().cpu(), b.double().cpu(), cost.double().cpu()
    out = []
    for i in range(a.shape[0]):
        M = cost if cost.dim() == 2 else cost[i]
        out.append(pot_row(a[i], b[i], M, reg, k, log_domain))
    return torch.stack(out)


def grads(fn, a, b, w):
    a = a.clone().requires_grad_()
    b = b.clone().requires_grad_()
    val = fn(a, b)
    return torch.autograd.grad((val * w).sum(), (a, b))


def check_sinkhorn(backend, a, b, cost, reg, T, eps, log_domain, family="op", fwd=None, bwd=None, g=None):
    """The one forward + backward check of the Sinkhorn tests, tolerances TOL[(family, dtype)]: the outputs' shapes,
    dtype and device; value and scalings vs the float64 reference (in the same domain); every output vs the CPU op;
    the backward op's gradients (from the forward's history) vs autograd through the float64 scaling-domain
    reference and vs the CPU backward op, on the same history and end to end (on the CPU op's history).
    `fwd(a, b, cost)` / `bwd(g, a, b, cost, out)` (device tensors): the launchers under test, default the backend's
    registered ops. Returns (outputs, gradients)."""
    dt, (B, n), m = a.dtype, a.shape, b.shape[1]
    tol = TOL[(family, dt)]
    ad, bd, cd = backend.to(a, b, cost)
    out = fwd(ad, bd, cd) if fwd else run_op(backend, a, b, cost, reg, T, eps, log_domain)
    assert [tuple(t.shape) for t in out] == [(B,), (B, n), (B, m), (T, B, n), (T, B, m), (B, n)]
    assert all(t.dtype == dt and t.device.type == backend.device for t in out)
    lf = 1.0 if log_domain else 1e-300  # the scalings' and history's floor: logs in the log domain

    def close(got, want, rtol, what, floor=1e-300):
        if rtol is not None:
            assert_close(got, want, rtol, 0.0, f"{backend} {family} {what}", "row", floor=floor)

    value_ref, u_ref, v_ref = reference(a, b, cost, reg, T, eps, log_domain)
    close(out[0], value_ref, tol.value_ref, "value vs reference")
    close(out[1], u_ref, tol.scalings_ref, "u vs reference", lf)
    close(out[2], v_ref, tol.scalings_ref, "v vs reference", lf)
    cpu = None
    if tol.value_cpu is not None:
        cpu = cpu_op(a, b, cost, reg, T, eps, log_domain)
        assert len(cpu) == len(OUTPUTS) and all(x.dtype == y.dtype for x, y in zip(out, cpu, strict=False))
        close(out[0], cpu[0], tol.value_cpu, "value vs CPU op")
        for name, x, y in zip(OUTPUTS[1:], out[1:], cpu[1:], strict=False):
            close(x, y, tol.outputs_cpu, f"{name} vs CPU op", lf)
    if g is None:
        g = torch.randn(B, generator=torch.Generator().manual_seed(7), dtype=F64).to(dt)
    grads = bwd(backend.to(g), ad, bd, cd, out) if bwd else run_backward(backend, g, a, b, cost, out, reg, log_domain)
    assert grads[0].shape == a.shape and grads[1].shape == b.shape
    assert all(t.dtype == dt and t.device.type == backend.device for t in grads)
    want = ref_grads(a, b, cost, reg, T, eps, g)
    gfl = max(w.abs().max().item() for w in want)  # one scale: some entries cancel to rounding noise
    for name, x, y in zip(("grad_a", "grad_b"), grads, want, strict=False):
        close(x, y, tol.grad_ref, f"{name} vs reference", gfl)
    if tol.grad_cpu is not None and cpu is not None:  # CPU backward on this forward's history and on the CPU op's
        for hist, what in ((out[3:], "this history"), (cpu[3:], "CPU history")):
            cpu_g = torch.ops.wkd.sinkhorn_backward(g, a, b, cost, *(t.cpu() for t in hist), reg, log_domain)
            for name, x, y in zip(("grad_a", "grad_b"), grads, cpu_g, strict=False):
                close(x, y, tol.grad_cpu, f"{name} vs CPU op ({what})", gfl)
    return out, grads




# ------------------------------------------------------------------------------------------ Triton helpers
def triton_backend():
    """The Triton backend here (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), or skip."""
    from conftest import make_backend

    return make_backend("triton")


def tproblem(B, n, m, dtype, shared, zeros_a=0, zeros_b=0, seed=0):
    """The Triton files' problems (the seeds their tolerances were set with)."""
    a = simplex(B, n, dtype, zeros_a, seed)
    b = simplex(B, m, dtype, zeros_b, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    cost = torch.rand(*((n, m) if shared else (B, n, m)), generator=g, dtype=F64).to(dtype)
    return a, b, cost


def close(got, want, tol, what="", floor=1e-300):
    """Same shape and dtype, same non-finite entries (-inf of the log domain), max |got - want| <= tol * max |want|
    per last-dim row (at least `floor`: 1 for logs, whose absolute error is a relative error of the exponential)."""
    assert_close(got, want, tol, 0.0, what, "row", floor=floor, check_dtype=True)


def good():
    """A small valid float64 problem (a [2, 4], b [2, 3], a shared [4, 3] cost) for the input-check tests."""
    return simplex(2, 4), simplex(2, 3, seed=2), rand_cost(4, 3)
