"""Sinkhorn (torch.ops.wkd.sinkhorn / sinkhorn_backward, torch.ops.wkd.sinkhorn_triton / _backward, wk.sinkhorn),
organised by property over the backends of conftest.py that can run here (cases are generated for those only):
"cpu" (C++ CPU kernels), "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1: small shapes only, the
interpreter is slow), "cuda" (the CUDA C++ kernels of csrc/cuda/sinkhorn.cu: a GPU and a build with them).
The grids over several parameters are pairwise (python_tests/pairwise.py: every pair of values in some case) plus
named edge cases; every forward + backward comparison goes through one harness, check_sinkhorn, with one tolerance
table, TOL.

Sections:
  1. properties on every backend: outputs and gradients vs the float64 reference (autograd through it) and the CPU
     op, odd shapes, history layout, log domain, non-contiguous inputs, POT, class removal, half inputs, opcheck,
     torch.compile, bad input, backend / precision arguments;
  2. CPU and public API only: POT in float32, real cost matrices, gradcheck, the envelope gradient, raw-op checks;
  3. Triton internals: small tiles (DOT_CONFIG / ROWS_CONFIG monkeypatched) so that tiny sizes span many tiles,
     the precision argument, the Triton ops' own checks, CUDA routing and graph capture;
  4. CUDA C++ internals (gpu): the big tile configuration, determinism, streams, CUDA graphs, no host sync, the
     real ImageNet cost at B=256;
  5. the CUDA C++ source under host emulation (opt-in, WKD_TEST_CUDA_EMULATION=1, a few minutes): csrc/cuda/
     sinkhorn.cu compiled as host C++ against csrc/cuda/cuda_emu.cuh, its two tile configurations vs the CPU op
     (the programs are in python_tests/cuda_emulation/).
"""
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import pytest
import torch

import wkd_kernels as wk
from conftest import (REPO, assert_close, assert_interruptible, available_backends, backend_or_reason,
                      capture_cuda_graph, import_pot, load_cost_matrix, rand_cost, rel_error, simplex, triton_device)
from pairwise import as_params, pairwise
from wkd_kernels.reference import sinkhorn_reference

F64, F32 = torch.float64, torch.float32
OUTPUTS = ("value", "u", "v", "hist_r", "hist_s", "y")
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"

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


# The file's one tolerance table: {(family, dtype): Tol}. A family is a set of cases with the same accuracy claim:
#   "op":      every backend's registered op over the shape grid (float32: its rounding; float64: 1e-10);
#   "tiles":   the Triton per-half-iteration kernels (16-wide tiles or the shipped ones, section 3): tighter;
#   "onchip":  the single-launch Triton kernels (section 6): tighter still in float64;
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
}
# Odd sizes, one-element rows, tile edges (16/32/64), unaligned rows (no 16-byte loads) and aligned ones. With a
# shared cost, n, m <= 256 take the single-launch kernels (Triton and CUDA C++); (64, 129, 257) takes the CUDA C++
# per-half-iteration kernels' 16 x 32 tiles on an H100/H200, SIZES_BIG (section 4) their 32 x 64 tiles.
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
        return "-".join(_id(c[k], k) for k in params)

    return list(params), as_params(cases, list(params), ident)


def _id(x, key=None):
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


def ref_grads(a, b, cost, reg, T, eps, g):
    """Exact gradient of sum(g * value) by autograd through the float64 reference (always the scaling-domain loop:
    its derivative at zero-mass entries is the one the kernels compute)."""
    a64 = a.detach().double().cpu().requires_grad_()
    b64 = b.detach().double().cpu().requires_grad_()
    value = sinkhorn_reference(a64, b64, cost.double().cpu(), reg, T, eps=eps)[0]
    return torch.autograd.grad((value * g.double().cpu()).sum(), (a64, b64))


def check_grads(got, want, rtol, what=""):
    """Gradients against one scale, the largest entry of `want` (some entries cancel to rounding noise)."""
    scale = max(w.abs().max().item() for w in want)
    for name, x, y in zip(("grad_a", "grad_b"), got, want):
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
    """The file's one forward + backward check, tolerances TOL[(family, dtype)]: the outputs' shapes, dtype and
    device; value and scalings vs the float64 reference (in the same domain); every output vs the CPU op; the
    backward op's gradients (from the forward's history) vs autograd through the float64 scaling-domain reference
    and vs the CPU backward op, on the same history and end to end (on the CPU op's history). `fwd(a, b, cost)` / `bwd(g, a, b, cost, out)` (device tensors):
    the launchers under test, default the backend's registered ops. Returns (outputs, gradients)."""
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

    value_ref, u_ref, v_ref = sinkhorn_reference(a, b, cost, reg, T, eps=eps, log_domain=log_domain)
    close(out[0], value_ref, tol.value_ref, "value vs reference")
    close(out[1], u_ref, tol.scalings_ref, "u vs reference", lf)
    close(out[2], v_ref, tol.scalings_ref, "v vs reference", lf)
    cpu = None
    if tol.value_cpu is not None:
        cpu = cpu_op(a, b, cost, reg, T, eps, log_domain)
        assert len(cpu) == len(OUTPUTS) and all(x.dtype == y.dtype for x, y in zip(out, cpu))
        close(out[0], cpu[0], tol.value_cpu, "value vs CPU op")
        for name, x, y in zip(OUTPUTS[1:], out[1:], cpu[1:]):
            close(x, y, tol.outputs_cpu, f"{name} vs CPU op", lf)
    if g is None:
        g = torch.randn(B, generator=torch.Generator().manual_seed(7), dtype=F64).to(dt)
    grads = bwd(backend.to(g), ad, bd, cd, out) if bwd else run_backward(backend, g, a, b, cost, out, reg, log_domain)
    assert grads[0].shape == a.shape and grads[1].shape == b.shape
    assert all(t.dtype == dt and t.device.type == backend.device for t in grads)
    want = ref_grads(a, b, cost, reg, T, eps, g)
    gfl = max(w.abs().max().item() for w in want)  # one scale: some entries cancel to rounding noise
    for name, x, y in zip(("grad_a", "grad_b"), grads, want):
        close(x, y, tol.grad_ref, f"{name} vs reference", gfl)
    if tol.grad_cpu is not None and cpu is not None:  # CPU backward on this forward's history and on the CPU op's
        for hist, what in ((out[3:], "this history"), (cpu[3:], "CPU history")):
            cpu_g = torch.ops.wkd.sinkhorn_backward(g, a, b, cost, *(t.cpu() for t in hist), reg, log_domain)
            for name, x, y in zip(("grad_a", "grad_b"), grads, cpu_g):
                close(x, y, tol.grad_cpu, f"{name} vs CPU op ({what})", gfl)
    return out, grads


# ==========================================================================================================
# 1. Properties on every backend
# ==========================================================================================================
# The shape grid, pairwise over backend x shape x dtype x shared cost x domain x eps (every pair of values in some
# case; the interpreted Triton backend on INTERPRETED_SHAPES only), plus named edges: the 1 x 1 problem in the log
# domain with eps (potentials ~0: the floor of 1), the largest shape per row in float32 on every backend.
FB_GRID = {"shape": SHAPES, "dtype": [F64, F32], "shared": [True, False], "log_domain": [False, True],
           "eps": [0.0, 1e-8]}
FB_EDGES = [dict(backend=be, shape=sh, dtype=dt, shared=shared, log_domain=lg, eps=eps)
            for be in available_backends()
            for sh, dt, shared, lg, eps in (((1, 1, 1), F64, True, True, 1e-8), ((1, 1, 1), F32, False, True, 1e-8),
                                             ((2, 13, 64), F32, False, False, 0.0),
                                             ((64, 129, 257), F32, False, True, 1e-8))]


@pytest.mark.parametrize(*backend_cases(FB_GRID, edges=FB_EDGES), indirect=["backend"])
def test_forward_backward_match_reference_and_cpu(backend, shape, dtype, shared, log_domain, eps):
    """Every output of the op (value, u, v, the whole history, y) vs the CPU op, value and scalings vs the float64
    reference, the backward op vs autograd through the reference and vs the CPU backward op; with and without zero
    masses (check_sinkhorn, TOL["op"])."""
    B, n, m = shape
    for zeros in (0, 2):
        a, b, cost = problem(B, n, m, dtype, shared, zeros)
        check_sinkhorn(backend, a, b, cost, 0.1, 5, eps, log_domain)


@pytest.mark.parametrize("T", [1, 2, 10])
def test_backward_number_of_iterations(backend, T):
    for shared, log_domain in ((True, False), (False, False), (True, True)):
        a, b, cost = problem(5, 20, 17, F64, shared, zeros=1)
        out = run_op(backend, a, b, cost, 0.1, T, 1e-8, log_domain)
        g = torch.ones(5, dtype=F64)
        got = run_backward(backend, g, a, b, cost, out, 0.1, log_domain)
        check_grads(got, ref_grads(a, b, cost, 0.1, T, 1e-8, g), TOL[("op", F64)].grad_ref, f"{backend} T={T}")


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
@pytest.mark.parametrize("log_domain", [False, True], ids=["scaling", "log"])
def test_history_layout_and_no_history(backend, shared, log_domain):
    """hist_r [T, B, n] = r_1..r_T, hist_s [T, B, m] = s_1..s_T, y [B, n] = (K∘C) v_T, value = sum_i u_i y_i
    (csrc/ops.cpp); the log domain stores their logs; without history [0, B, n], [0, B, m], [0, n] and the same
    value, u, v."""
    B, n, m, T = 3, 6, 5, 4
    a, b, cost = problem(B, n, m, F64, shared)
    value, u, v, hr, hs, y = (t.cpu() for t in run_op(backend, a, b, cost, 0.3, T, 0.0, log_domain, True))
    assert hr.shape == (T, B, n) and hs.shape == (T, B, m) and y.shape == (B, n)
    if log_domain:
        u, v, hr, hs, y = u.exp(), v.exp(), hr.exp(), hs.exp(), y.exp()
    K = torch.exp(-cost / 0.3).expand(B, n, m)
    assert torch.allclose(u, a / hr[T - 1]) and torch.allclose(v, b / hs[T - 1])
    assert torch.allclose(y, torch.einsum("bij,bj->bi", K * cost.expand(B, n, m), v))
    assert torch.allclose(value, (u * y).sum(1))
    light = run_op(backend, a, b, cost, 0.3, T, 0.0, log_domain, False)
    assert light[3].shape == (0, B, n) and light[4].shape == (0, B, m) and light[5].shape == (0, n)
    full = run_op(backend, a, b, cost, 0.3, T, 0.0, log_domain, True)
    for name, x, y_ in zip(("value", "u", "v"), light[:3], full[:3]):
        if backend.name == "cuda":  # the CUDA C++ kernels: the same code path, bitwise
            assert torch.equal(x, y_), name
        assert_close(x, y_, 1e-14, what=f"{backend} {name} without history")
    cpu = cpu_op(a, b, cost, 0.3, T, 0.0, log_domain, False)
    for name, x, y_ in zip(OUTPUTS, light, cpu):
        assert_close(x, y_, TOL[("op", F64)].value_cpu, what=f"{backend} {name} (no history) vs CPU op")


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
def test_log_domain_small_reg(backend, shared):
    """reg=1e-3, cost in [0, 1]: K underflows in float32, the log domain does not (vs the CPU op and reference)."""
    a, b, cost = problem(4, 30, 20, F32, shared, zeros=2)
    out = run_op(backend, a, b, cost, 1e-3, 10, 0.0, True)
    assert torch.isfinite(out[0]).all()
    cpu = cpu_op(a, b, cost, 1e-3, 10, 0.0, True)
    assert_close(out[0], cpu[0], 1e-4, what=f"{backend} value vs CPU op")
    ref = sinkhorn_reference(a, b, cost, 1e-3, 10, log_domain=True)[0]
    assert_close(out[0], ref, 1e-3, what=f"{backend} value vs reference")  # float32 logs of size 1/reg: ~1e-4


def test_log_domain_matches_scaling_domain(backend):
    """Same mathematics: the two domains agree in float64 where K does not underflow."""
    a, b, cost = problem(2, 19, 26, F64, True, 2, seed=5)
    s = run_op(backend, a, b, cost, 0.2, 4, 0.0, False)
    lg = run_op(backend, a, b, cost, 0.2, 4, 0.0, True)
    assert_close(lg[0], s[0], 1e-12, what="value", mode="row")
    for name, x, y in zip(OUTPUTS[1:], lg[1:], s[1:]):
        assert_close(x.exp(), y, 1e-12, what=name, mode="row")


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
def test_non_contiguous_inputs(backend, shared):
    B, n, m, T = 2, 18, 21, 2
    a, b, cost = backend.to(*problem(B, n, m, F32, shared, 1, seed=13))
    a_nc = a.t().contiguous().t()
    b_nc = b.new_empty(m, B).t().copy_(b)
    cost_nc = cost.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not a_nc.is_contiguous() and not b_nc.is_contiguous() and not cost_nc.is_contiguous()
    want = run_op(backend, a, b, cost, 0.1, T)
    got = run_op(backend, a_nc, b_nc, cost_nc, 0.1, T)
    for name, x, y in zip(OUTPUTS, got, want):
        assert_close(x, y, 1e-6, what=name, mode="row")
    g2 = backend.to(torch.linspace(0.5, 1.5, 2 * B, dtype=F32))
    ga, gb = run_backward(backend, g2[::2], a_nc, b_nc, cost_nc, got, 0.1)
    ga0, gb0 = run_backward(backend, g2[::2].contiguous(), a, b, cost, want, 0.1)
    assert_close(ga, ga0, 1e-6, what="grad_a", mode="row")
    assert_close(gb, gb0, 1e-6, what="grad_b", mode="row")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(*backend_cases({"shape": POT_SHAPES, "shared": [True, False], "log_domain": [False, True]}),
                         indirect=["backend"])
def test_value_matches_pot_float64(backend, shape, shared, log_domain):
    """Pairwise over backend x shape x shared cost x domain."""
    B, n, m = shape
    a, b = simplex(B, n), simplex(B, m, seed=3)
    cost = rand_cost(n, m) if shared else rand_cost(B, n, m)
    got = wk.sinkhorn(*backend.to(a, b, cost), 0.1, 7, log_domain=log_domain, backend=backend.name).value
    assert got.device.type == backend.device
    assert_close(got, pot_batch(a, b, cost, 0.1, 7, log_domain), TOL[("pot", F64)].value_ref, what=f"{backend} vs POT")


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
@pytest.mark.parametrize("log_domain", [False, True], ids=["scaling", "log"])
def test_value_matches_pot_float32(backend, shared, log_domain):
    B, n, m = 6, 50, 40
    a, b = simplex(B, n, F32, zeros=3), simplex(B, m, F32, seed=3)
    cost = rand_cost(n, m, dtype=F32) if shared else rand_cost(B, n, m, dtype=F32)
    got = wk.sinkhorn(*backend.to(a, b, cost), 0.05, 10, log_domain=log_domain, backend=backend.name).value
    assert got.dtype == F32
    assert_close(got, pot_batch(a, b, cost, 0.05, 10, log_domain), TOL[("pot", F32)].value_ref, what=f"{backend} vs POT")


@pytest.mark.parametrize(*backend_cases({"shared": [True, False], "log_domain": [False, True], "eps": [0.0, 1e-8],
                                          "zeros": [0, 2]}), indirect=["backend"])
def test_exact_gradient_matches_autograd_through_reference(backend, shared, log_domain, eps, zeros):
    """The public wk.sinkhorn's value and exact gradient (autograd through the registered op) on every backend,
    pairwise over backend x shared cost x domain x eps x zero masses."""
    B, n, m = 4, 12, 10
    a, b = simplex(B, n, zeros=zeros), simplex(B, m, zeros=zeros, seed=7)
    cost = rand_cost(n, m) if shared else rand_cost(B, n, m)
    w = torch.randn(B, dtype=F64, generator=torch.Generator().manual_seed(5))
    dcost, dw = backend.to(cost, w)
    got = grads(lambda a, b: wk.sinkhorn(a, b, dcost, 0.1, 8, eps=eps, log_domain=log_domain,
                                         backend=backend.name).value, *backend.to(a, b), dw)
    ref = grads(lambda a, b: sinkhorn_reference(a, b, cost, 0.1, 8, eps=eps)[0], a, b, w)
    for name, g, r in zip(("grad_a", "grad_b"), got, ref):
        assert_close(g, r, 1e-8, what=f"{backend} {name}")


@pytest.mark.parametrize("log_domain", [False, True], ids=["scaling", "log"])
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_zero_mass_gives_reduced_problem(backend, log_domain, eps):
    """Zero mass on class y in both marginals == deleting row and column y (WKD-L's target separation)."""
    B, C = 5, 15
    g = torch.Generator().manual_seed(0)
    cost = rand_cost(C, C)
    y = torch.randint(0, C, (B,), generator=g)
    keep = torch.ones(B, C, dtype=torch.bool).scatter_(1, y[:, None], False)
    p_red = simplex(B, C - 1, seed=1)
    q_red = simplex(B, C - 1, seed=2)
    a = torch.zeros(B, C, dtype=F64).masked_scatter_(keep, p_red)
    b = torch.zeros(B, C, dtype=F64).masked_scatter_(keep, q_red)
    ad = backend.to(a).requires_grad_()
    full = wk.sinkhorn(ad, *backend.to(b, cost), 0.1, 10, eps=eps, log_domain=log_domain,
                       backend=backend.name).value
    (ga,) = torch.autograd.grad(full.sum(), ad)
    full, ga = full.detach().cpu(), ga.cpu()
    for i in range(B):
        k = keep[i]
        pr = p_red[i:i + 1].clone().requires_grad_()
        red = wk.sinkhorn(pr, q_red[i:i + 1], cost[k][:, k].contiguous(), 0.1, 10, eps=eps,
                          log_domain=log_domain).value
        (gr,) = torch.autograd.grad(red.sum(), pr)
        assert abs(full[i].item() - red.item()) <= 1e-13 * abs(red.item())
        assert torch.allclose(ga[i][k], gr[0], rtol=1e-11, atol=1e-13)


def test_half_inputs_computed_in_float32(backend):
    a, b, cost = simplex(3, 16), simplex(3, 16, seed=2), rand_cost(16, 16)
    for dt in (torch.float16, torch.bfloat16):
        res = wk.sinkhorn(*backend.to(a.to(dt), b.to(dt), cost.to(dt)), 0.1, 5, backend=backend.name)
        assert res.value.dtype == F32
        ref = sinkhorn_reference(a.to(dt), b.to(dt), cost.to(dt), 0.1, 5)[0]
        assert_close(res.value, ref, 1e-5, what=f"{backend} {dt}")


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
@pytest.mark.parametrize("log_domain", [False, True], ids=["scaling", "log"])
def test_public_api_matches_cpu(backend, shared, log_domain):
    """wk.sinkhorn(..., backend=...) with autograd: value, log-scalings and gradients equal the CPU backend's."""
    if not wk.HAS_C_EXT:
        pytest.skip("compares with the C++ CPU kernel: installed without the compiled extension")
    B, n, m = (3, 9, 8) if backend.interpreted else (6, 50, 40)
    for dtype in (F64, F32):
        a, b, cost = problem(B, n, m, dtype, shared, zeros=2)
        ad, bd = (t.requires_grad_() for t in backend.to(a, b))
        res = wk.sinkhorn(ad, bd, backend.to(cost), 0.05, 10, eps=1e-8, log_domain=log_domain, backend=backend.name)
        w = torch.linspace(0.5, 1.5, B, dtype=dtype)
        ga, gb = torch.autograd.grad((res.value * backend.to(w)).sum(), (ad, bd))
        ac, bc = a.clone().requires_grad_(), b.clone().requires_grad_()
        want = wk.sinkhorn(ac, bc, cost, 0.05, 10, eps=1e-8, log_domain=log_domain, backend="cpu")
        wa, wb = torch.autograd.grad((want.value * w).sum(), (ac, bc))
        tol = TOL[("op", dtype)]
        assert_close(res.value, want.value, tol.value_cpu, what=f"{backend} value")
        assert_close(res.log_u, want.log_u, tol.scalings_ref, what=f"{backend} log_u")
        assert_close(res.log_v, want.log_v, tol.scalings_ref, what=f"{backend} log_v")
        check_grads((ga, gb), (wa, wb), tol.grad_cpu, f"{backend}")


def _op_samples(backend, sizes):
    out = []
    for B, n, m in sizes:
        a, b = simplex(B, n, zeros=1), simplex(B, m, seed=2)
        for cost in (rand_cost(n, m), rand_cost(B, n, m)):
            for log_domain in (False, True):
                if backend.interpreted and log_domain != (cost.dim() == 3):
                    continue  # the interpreter: shared-scaling and per_row-log only (slow)
                for keep in (True, False):
                    for dtype in ((F64,) if backend.interpreted else (F32, F64)):
                        ad, bd, cd = backend.to(a.to(dtype), b.to(dtype), cost.to(dtype))
                        out.append((ad.requires_grad_(), bd.requires_grad_(), cd, 0.1, 4,
                                    1e-8 if log_domain else 0.0, log_domain, keep))
    return out


def test_opcheck(backend):
    """Schema, fake kernel, autograd registration of the backend's op (torch.ops.wkd.sinkhorn on CPU and CUDA
    tensors, torch.ops.wkd.sinkhorn_triton on its device, CPU tensors under the interpreter) and its backward op."""
    sizes = ((3, 5, 4),) if backend.device == "cpu" else ((3, 5, 4), (4, 33, 20))
    triton = backend.name == "triton"
    if backend.name == "cuda":  # the CUDA C++ kernels are the CUDA kernels of wkd::sinkhorn / _backward themselves
        assert torch._C._dispatch_has_kernel_for_dispatch_key("wkd::sinkhorn", "CUDA")
        assert torch._C._dispatch_has_kernel_for_dispatch_key("wkd::sinkhorn_backward", "CUDA")
    fwd = torch.ops.wkd.sinkhorn_triton.default if triton else torch.ops.wkd.sinkhorn.default
    if backend.name == "torch":
        fwd = torch.ops.wkd.sinkhorn_torch.default
    for args in _op_samples(backend, sizes):
        torch.library.opcheck(fwd, args + (("ieee",) if triton else ()))
    for shared in (True, False):
        for log_domain in (False, True):
            if backend.interpreted and log_domain == shared:
                continue
            a, b, cost = problem(3, 9, 7, F64, shared, zeros=1)
            out = run_op(backend, a, b, cost, 0.1, 4, 1e-8 if log_domain else 0.0, log_domain)
            g = backend.to(torch.linspace(0.5, 1.5, 3, dtype=F64))
            bwd = torch.ops.wkd.sinkhorn_triton_backward.default if triton else torch.ops.wkd.sinkhorn_backward.default
            if backend.name == "torch":
                bwd = torch.ops.wkd.sinkhorn_torch_backward.default
            torch.library.opcheck(bwd, (g, *backend.to(a, b, cost), *out[3:], 0.1, log_domain)
                                  + (("ieee",) if triton else ()))


# inductor: GPU backends only (a C++ compile per test on the CPU machine)
@pytest.mark.parametrize("backend,compile_backend", [
    pytest.param(be, cb, id=f"{be}-{cb}") for be in available_backends() for cb in ("aot_eager", "inductor")
    if cb == "aot_eager" or backend_or_reason(be).device != "cpu"], indirect=["backend"])
def test_torch_compile_fullgraph_with_backward(backend, compile_backend):
    torch._dynamo.reset()
    B, n = (3, 6) if backend.device == "cpu" else (8, 40)
    a, b, cost = problem(B, n, n, F32 if backend.device == "cuda" else F64, True, zeros=1)
    b, cost = backend.to(b, cost)

    def loss(logits, b):
        return wk.sinkhorn(torch.softmax(logits, 1), b, cost, 0.05, 10, eps=1e-8, backend=backend.name).value.mean()

    x = backend.to(torch.randn(B, n, dtype=b.dtype, generator=torch.Generator().manual_seed(0))).requires_grad_()
    compiled = torch.compile(loss, fullgraph=True, backend=compile_backend)
    l1 = compiled(x, b)
    (g1,) = torch.autograd.grad(l1, x)
    l2 = loss(x, b)
    (g2,) = torch.autograd.grad(l2, x)
    assert torch.allclose(l1, l2, rtol=1e-5) and torch.allclose(g1, g2, rtol=1e-4, atol=1e-7)


def test_no_history_without_grad(backend):
    a, b, cost = backend.to(simplex(2, 5), simplex(2, 5, seed=2), rand_cost(5, 5))
    with torch.no_grad():
        res = wk.sinkhorn(a.requires_grad_(), b, cost, 0.1, 3, backend=backend.name)
    assert res.value.grad_fn is None


def test_outputs_other_than_value_are_not_differentiable(backend):
    a, b, cost = backend.to(simplex(2, 5), simplex(2, 5, seed=2), rand_cost(5, 5))
    res = wk.sinkhorn(a.requires_grad_(), b, cost, 0.1, 3, backend=backend.name)
    assert res.value.requires_grad and not res.log_u.requires_grad and not res.log_v.requires_grad


# ------------------------------------------------------------------------------------------ bad input (every backend)
def good():
    return simplex(2, 4), simplex(2, 3, seed=2), rand_cost(4, 3)


BAD = [
    ("`a` must be 2-D", lambda a, b, c: (a[0], b, c, 0.1, 3)),
    ("`b` must be 2-D", lambda a, b, c: (a, b[None], c, 0.1, 3)),
    ("`cost` must be [n, m] (shared", lambda a, b, c: (a, b, c[0], 0.1, 3)),
    ("batch mismatch", lambda a, b, c: (a, b[:1], c, 0.1, 3)),
    ("`cost` must be", lambda a, b, c: (a, b, c.T.contiguous(), 0.1, 3)),
    ("`cost` must be", lambda a, b, c: (a, b, c.expand(3, 4, 3).contiguous(), 0.1, 3)),
    ("`reg` must be", lambda a, b, c: (a, b, c, 0.0, 3)),
    ("`reg` must be", lambda a, b, c: (a, b, c, -1.0, 3)),
    ("`num_iters` must be", lambda a, b, c: (a, b, c, 0.1, 0)),
    ("`b` has dtype", lambda a, b, c: (a, b.float(), c, 0.1, 3)),
    ("`cost` has dtype", lambda a, b, c: (a, b, c.float(), 0.1, 3)),
    ("`a` must be", lambda a, b, c: (a.long(), b.long(), c.long(), 0.1, 3)),
    ("`cost` is on", lambda a, b, c: (a, b, c.to("meta"), 0.1, 3)),
]
BAD_VALUES = [
    ("`a` contains non-finite", lambda a, b, c: (a.index_put_((torch.tensor(0), torch.tensor(1)), torch.tensor(math.nan, dtype=F64)), b, c, 0.1, 3)),
    ("`b` contains non-finite", lambda a, b, c: (a, b.index_put_((torch.tensor(1), torch.tensor(0)), torch.tensor(math.inf, dtype=F64)), c, 0.1, 3)),
    ("`cost` contains non-finite", lambda a, b, c: (a, b, c.index_put_((torch.tensor(0), torch.tensor(0)), torch.tensor(math.inf, dtype=F64)), 0.1, 3)),
    ("`cost` must be non-negative", lambda a, b, c: (a, b, c - 0.5, 0.1, 3)),
    ("`a` must be non-negative", lambda a, b, c: (a - 0.3, b, c, 0.1, 3)),
    ("every row of `a`", lambda a, b, c: (a * 0, b, c, 0.1, 3)),
    ("`b` contains non-finite", lambda a, b, c: (a.float(), b.float().index_put_((torch.tensor(0), torch.tensor(2)), torch.tensor(-math.inf)), c.float(), 0.1, 3)),
    ("`cost` must be non-negative", lambda a, b, c: (a.float(), b.float(), c.float().index_put_((torch.tensor(2), torch.tensor(1)), torch.tensor(-1e-30)), 0.1, 3)),
]


@pytest.mark.parametrize("msg,make", BAD + BAD_VALUES)
def test_bad_input_python_wrapper(backend, msg, make):
    """Every backend rejects bad input before any kernel with the same message (value checks: always on CPU for
    the C++ kernels, on request -- check_values=True -- for the GPU kernels)."""
    args = make(*backend.to(*good()))
    with pytest.raises((ValueError, TypeError), match=re.escape(msg)):
        wk.sinkhorn(*args, backend=backend.name, check_values=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_check_has_no_false_alarm_on_huge_finite_costs(backend, dtype):
    """The one-pass value check flags a row whose sum overflows; the exact check then lets it through."""
    a, b, c = good()
    c = c.to(dtype)
    c[1] = torch.finfo(dtype).max / 2  # finite, non-negative, but the row sum is inf
    a, b, c = backend.to(a.to(dtype), b.to(dtype), c)
    out = wk.sinkhorn(a, b, c, 1e300 if dtype == torch.float64 else 1e38, 2, log_domain=True,
                      backend=backend.name, check_values=True)  # must not raise
    assert torch.isfinite(out.log_u).all() and torch.isfinite(out.log_v).all()


def test_bad_scalar_arguments(backend):
    a, b, c = backend.to(*good())
    with pytest.raises(ValueError, match="`eps` must be"):
        wk.sinkhorn(a, b, c, 0.1, 3, eps=-1.0, backend=backend.name)
    with pytest.raises(ValueError, match="`grad` must be"):
        wk.sinkhorn(a, b, c, 0.1, 3, grad="autodiff", backend=backend.name)
    with pytest.raises(ValueError, match="`num_iters` must be"):
        wk.sinkhorn(a, b, c, 0.1, 2.5, backend=backend.name)


def test_cost_gradient_is_refused(backend):
    a, b, c = backend.to(*good())
    with pytest.raises(NotImplementedError, match="`cost`"):
        wk.sinkhorn(a, b, c.requires_grad_(), 0.1, 3, backend=backend.name)


def test_backward_op_checks_history(backend):
    """The backward op of every backend checks the history it is given, with the same messages."""
    a, b, c = good()
    value, u, v, hr, hs, y = run_op(backend, a, b, c, 0.1, 3, 0.0, False, False)
    assert hr.shape == (0, 2, 4) and hs.shape == (0, 2, 3) and y.shape == (0, 4)
    one = torch.ones(2, dtype=F64)
    with pytest.raises(ValueError, match="`hist_r` must be"):
        run_backward(backend, one, a, b, c, (value, u, v, hr, hs, y), 0.1)
    out = run_op(backend, a, b, c, 0.1, 3, 0.0, False, True)
    hr, hs, y = out[3:]
    assert hr.shape == (3, 2, 4) and hs.shape == (3, 2, 3) and y.shape == (2, 4)
    with pytest.raises(ValueError, match="`grad_value` must be"):
        run_backward(backend, torch.ones(3, dtype=F64), a, b, c, out, 0.1)
    with pytest.raises(ValueError, match="`hist_s` must be"):
        run_backward(backend, one, a, b, c, (None,) * 3 + (hr, hs[:2], y), 0.1)
    with pytest.raises(ValueError, match="`y` must be"):
        run_backward(backend, one, a, b, c, (None,) * 3 + (hr, hs, y[:1]), 0.1)
    with pytest.raises(TypeError, match="dtype of `a`"):
        run_backward(backend, one, a, b, c, (None,) * 3 + (hr, hs, y.float()), 0.1)


# ------------------------------------------------------------------------------------------ backend / precision arguments
def test_backend_argument_errors():
    """backend= is checked and impossible combinations are clear errors (CPU tensors here)."""
    a, b, c = good()
    with pytest.raises(ValueError, match=r"backend='cuda'.*needs CUDA tensors"):
        wk.sinkhorn(a, b, c, 0.1, 3, backend="cuda")
    with pytest.raises(ValueError, match="`backend` must be one of"):
        wk.sinkhorn(a, b, c, 0.1, 3, backend="gpu")
    # "auto" on CPU tensors is the C++ CPU kernel, whatever the precision
    assert torch.equal(wk.sinkhorn(a, b, c, 0.1, 3, backend="auto").value, wk.sinkhorn(a, b, c, 0.1, 3).value)
    with wk.settings.override(backend="cuda"):  # the setting is the default of backend=
        with pytest.raises(ValueError, match=r"backend='cuda'"):
            wk.sinkhorn(a, b, c, 0.1, 3)
        assert torch.equal(wk.sinkhorn(a, b, c, 0.1, 3, backend="cpu").value, wk.sinkhorn(a, b, c, 0.1, 3,
                                                                                          backend="auto").value)


@pytest.mark.parametrize("precision", ["ieee", "tf32x3", "tf32"])
def test_cpu_accepts_and_ignores_precision(precision):
    """The C++ CPU kernel computes in IEEE: every valid precision is accepted and gives the same numbers."""
    a, b, c = good()
    a.requires_grad_()
    want = wk.sinkhorn(a, b, c, 0.1, 3, backend="cpu")
    got = wk.sinkhorn(a, b, c, 0.1, 3, backend="cpu", precision=precision)
    assert torch.equal(got.value, want.value) and torch.equal(got.log_u, want.log_u)
    assert torch.equal(torch.autograd.grad(got.value.sum(), a)[0], torch.autograd.grad(want.value.sum(), a)[0])
    with wk.settings.override(sinkhorn_precision=precision):
        assert torch.equal(wk.sinkhorn(a, b, c, 0.1, 3).value, want.value)


def test_bad_precision_names_the_argument():
    a, b, c = good()
    for bad in ("fp32", "TF32", "highest", ""):
        with pytest.raises(ValueError, match=r"wkd\.sinkhorn: `precision` must be one of"):
            wk.sinkhorn(a, b, c, 0.1, 3, precision=bad)


# ==========================================================================================================
# 2. CPU and the public API only
# ==========================================================================================================
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_log_domain_survives_small_reg():
    """reg=1e-3 with cost in [0, 1]: K underflows in float32 but the log domain matches POT's sinkhorn_log."""
    B, n = 3, 20
    a, b = simplex(B, n, F32), simplex(B, n, F32, seed=2)
    cost = rand_cost(n, n, dtype=F32)
    got = wk.sinkhorn(a, b, cost, 1e-3, 10, log_domain=True).value
    ref = pot_batch(a, b, cost, 1e-3, 10, log_domain=True)
    assert torch.isfinite(got).all()
    assert_close(got, ref, 1e-4)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("log_domain", [False, True])
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_outputs_match_reference(shared, log_domain, eps):
    B, n, m = 4, 9, 11
    a, b = simplex(B, n, zeros=2), simplex(B, m, zeros=1, seed=4)
    cost = rand_cost(n, m) if shared else rand_cost(B, n, m)
    res = wk.sinkhorn(a, b, cost, 0.2, 6, eps=eps, log_domain=log_domain)
    value, ru, rv = sinkhorn_reference(a, b, cost, 0.2, 6, eps=eps, log_domain=log_domain)
    ref_log_u = ru if log_domain else torch.log(ru)
    ref_log_v = rv if log_domain else torch.log(rv)
    assert rel_error(res.value, value) <= 1e-12
    fin = torch.isfinite(ref_log_u)
    assert torch.equal(fin, torch.isfinite(res.log_u))
    assert torch.allclose(res.log_u[fin], ref_log_u[fin], rtol=1e-11, atol=1e-11)
    fin = torch.isfinite(ref_log_v)
    assert torch.allclose(res.log_v[fin], ref_log_v[fin], rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("log_domain", [False, True])
def test_gradcheck(shared, log_domain):
    B, n, m = 2, 4, 3
    a, b = simplex(B, n).requires_grad_(), simplex(B, m, seed=2).requires_grad_()
    cost = rand_cost(n, m) if shared else rand_cost(B, n, m)
    assert torch.autograd.gradcheck(lambda a, b: wk.sinkhorn(a, b, cost, 0.2, 5, log_domain=log_domain).value,
                                    (a, b))


def test_float32_gradient_close_to_float64():
    B, n = 8, 100
    a, b = simplex(B, n, F32, zeros=1), simplex(B, n, F32, zeros=1, seed=2)
    cost = rand_cost(n, n, dtype=F32)
    w = torch.ones(B, dtype=F32)
    got = grads(lambda a, b: wk.sinkhorn(a, b, cost, 0.05, 10).value, a, b, w)
    ref = grads(lambda a, b: sinkhorn_reference(a, b, cost, 0.05, 10)[0], a.double(), b.double(), w.double())
    for g, r in zip(got, ref):
        assert_close(g, r, 1e-4)


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge:UserWarning")  # POT at 5 fixed iterations
@pytest.mark.parametrize("log_domain", [False, True])
def test_envelope_gradient_matches_pot(log_domain):
    n = 6
    a, b, M = simplex(1, n)[0], simplex(1, n, seed=2)[0], rand_cost(n, n)
    a1 = a.clone().requires_grad_()
    b1 = b.clone().requires_grad_()
    import_pot().solve(M, a1, b1, reg=0.1, max_iter=5, tol=0, grad="envelope").value.backward()
    a2 = a[None].clone().requires_grad_()
    b2 = b[None].clone().requires_grad_()
    wk.sinkhorn(a2, b2, M, 0.1, 5, grad="envelope", log_domain=log_domain).value.backward()
    assert torch.allclose(a2.grad[0], a1.grad, atol=1e-12)
    assert torch.allclose(b2.grad[0], b1.grad, atol=1e-12)


# ------------------------------------------------------------------------------------------ real data
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name,kappa", [("imagenet_resnet34_cka_distance.pth", 1.0),
                                        ("imagenet_resnet50_cka_distance.pth", 2.0),
                                        ("cifar100_resnet32x4_cka_distance.pth", 1.0),
                                        ("cifar100_wrn40_2_cka_distance.pth", 1.0)])
def test_real_cost_matrices(name, kappa):
    d = load_cost_matrix(name)
    cost = torch.relu(1 - torch.exp(-kappa * d)) + 1e-8
    C = cost.shape[0]
    B = 4
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, C, (B,), generator=g)
    logits_s, logits_t = torch.randn(B, C, generator=g), torch.randn(B, C, generator=g) * 3
    mask = torch.ones(B, C).scatter_(1, y[:, None], 0.0)
    a = torch.softmax(logits_s / 2, 1) * mask
    b = torch.softmax(logits_t / 2, 1) * mask
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    got = wk.sinkhorn(a, b, cost, 0.05, 10).value
    ref = pot_batch(a, b, cost, 0.05, 10)
    assert torch.isfinite(got).all()
    assert_close(got, ref, 1e-5)
    got64 = wk.sinkhorn(a.double(), b.double(), cost.double(), 0.05, 10).value
    assert_close(got64, ref, 1e-10)


# value checks: CPU op only (the GPU ops do not read values; see test_bad_input_python_wrapper)
@pytest.mark.parametrize("backend,msg,make", [
    pytest.param(be, msg, make, id=f"{be}-{msg}")
    for be in available_backends() for msg, make in (BAD if be != "cpu" else BAD + BAD_VALUES)
    if "`cost` is on" not in msg], indirect=["backend"])
def test_bad_input_raw_op(backend, msg, make):
    """Each backend's op checks on its own (direct torch.ops calls: the C++ CPU and CUDA kernels, the registered
    Triton op), with the same messages; the GPU ops read no values (those checks are the wrapper's, on request)."""
    args = make(*backend.to(*good()))
    op = torch.ops.wkd.sinkhorn_triton if backend.name == "triton" else torch.ops.wkd.sinkhorn
    if backend.name == "torch":
        op = torch.ops.wkd.sinkhorn_torch
    with pytest.raises((ValueError, TypeError, RuntimeError), match=re.escape(msg)):
        op(*args, 0.0, False, True)




# ==========================================================================================================
# 3. Triton internals (wkd_kernels/triton/sinkhorn/): small tiles, the precision argument, the Triton ops' checks
# ==========================================================================================================
@pytest.fixture
def dev():
    return triton_device()


@pytest.fixture
def small_blocks(monkeypatch):
    """The per-half-iteration kernels with 16-wide tiles, so that the small test sizes span several tiles in every
    dimension (with ragged edges)."""
    from wkd_kernels.triton import sinkhorn as sk

    monkeypatch.setattr(sk, "DOT_CONFIG", {key: (16, 16, 16, 4) for key in sk.DOT_CONFIG})
    monkeypatch.setattr(sk, "ROWS_CONFIG", {F32: (16, 16, 4), F64: (16, 16, 4)})
    monkeypatch.setattr(sk, "ONCHIP_MAX_C", 0)  # the per-half-iteration kernels (section 6 tests the single-launch ones)


def triton_backend():
    from conftest import make_backend

    return make_backend("triton")


def tproblem(B, n, m, dtype, shared, zeros_a=0, zeros_b=0, seed=0):
    """The Triton section's problems (the seeds its tolerances were set with)."""
    a = simplex(B, n, dtype, zeros_a, seed)
    b = simplex(B, m, dtype, zeros_b, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    cost = torch.rand(*((n, m) if shared else (B, n, m)), generator=g, dtype=F64).to(dtype)
    return a, b, cost


def run_triton(a, b, cost, reg, T, eps, log_domain, dev, keep_history=True, precision="ieee"):
    """torch.ops.wkd.sinkhorn_triton on `dev` (the op, not the launcher: its checks and registration included)."""
    a, b, cost = a.to(dev), b.to(dev), cost.to(dev)
    return torch.ops.wkd.sinkhorn_triton(a, b, cost, reg, T, eps, log_domain, keep_history, precision)


def close(got, want, tol, what="", floor=1e-300):
    """Same shape and dtype, same non-finite entries (-inf of the log domain), max |got - want| <= tol * max |want|
    per last-dim row (at least `floor`: 1 for logs, whose absolute error is a relative error of the exponential)."""
    assert_close(got, want, tol, 0.0, what, "row", floor=floor, check_dtype=True)


def check_triton(a, b, cost, reg, T, eps, log_domain, family="tiles"):
    """check_sinkhorn on the Triton backend's registered ops (the per-half-iteration kernels under small_blocks)."""
    return check_sinkhorn(triton_backend(), a, b, cost, reg, T, eps, log_domain, family,
                          g=torch.linspace(0.5, 1.5, a.shape[0], dtype=a.dtype))[0]


KINDS = [(True, False), (False, False), (True, True), (False, True)]  # (shared cost, log domain): 4 kernel families
KIND_IDS = ["shared-scaling", "per_row-scaling", "shared-log", "per_row-log"]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("shared,log_domain", KINDS, ids=KIND_IDS)
def test_multi_tile(dev, small_blocks, dtype, shared, log_domain):
    """16-wide tiles: 3 x 2 output tiles and 3 x 2 k-steps with ragged edges (the tl.dot kernels also 2 row tiles),
    zero masses in a and b; eps = 0 in float64, 1e-8 in float32."""
    B = 2 if log_domain or not shared else 17
    a, b, cost = tproblem(B, 35, 20, dtype, shared, zeros_a=3, zeros_b=2, seed=1)
    check_triton(a, b, cost, 0.1, 2, 0.0 if dtype == F64 else 1e-8, log_domain)


@pytest.mark.parametrize("shape", [(2, 70, 9, 2), (1, 1, 1, 2)], ids=["2x70x9", "1x1x1"])
@pytest.mark.parametrize("shared,log_domain", KINDS, ids=KIND_IDS)
def test_odd_shapes_default_blocks(dev, shape, shared, log_domain):
    """The shipped block sizes: n > BLOCK_N with m tiny, and the degenerate 1 x 1 problem (float64, eps = 1e-8)."""
    B, n, m, T = shape
    a, b, cost = tproblem(B, n, m, F64, shared, zeros_a=5 if n > 1 else 0, seed=2)
    check_triton(a, b, cost, 0.1, T, 1e-8, log_domain)


@pytest.mark.parametrize("shared,log_domain", KINDS, ids=KIND_IDS)
def test_wkdl_like_float32(dev, shared, log_domain):
    """WKD-L's setting in small: float32, reg 0.05, eps 1e-8, the target class removed (one zero per row of a),
    a square cost; the shipped block sizes."""
    B, n = 3, 29
    a, b, cost = tproblem(B, n, n, F32, shared, zeros_a=1, seed=7)
    check_triton(a, b, cost, 0.05, 4, 1e-8, log_domain)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
def test_triton_log_domain_small_reg_small_blocks(dev, small_blocks, dtype, shared):
    """reg=1e-2 with cost in [0, 1]: K = exp(-cost/reg) reaches e^-100 (below float32's normal range), the log
    domain still matches (the online max shift sees a large dynamic range across tiles). float32 vs float64:
    L = -cost/reg is rounded to float32 (|L| <= 100, abs error 4e-6), which moves the plan by a few 1e-6; the CPU op
    rounds identically and is matched to 1e-5."""
    a, b, cost = tproblem(2, 23, 18, dtype, shared, zeros_a=2, zeros_b=1, seed=3)
    out = check_triton(a, b, cost, 1e-2, 3, 1e-8, True, family="small_reg")
    assert torch.isfinite(out[0]).all()


def test_triton_log_domain_matches_scaling_domain_small_blocks(dev, small_blocks):
    """Same mathematics: the two domains agree in float64 where K does not underflow."""
    a, b, cost = tproblem(2, 19, 26, F64, True, 2, 2, seed=5)
    s = run_triton(a, b, cost, 0.2, 4, 0.0, False, dev)
    lg = run_triton(a, b, cost, 0.2, 4, 0.0, True, dev)
    close(lg[0], s[0], 1e-12, "value")
    close(lg[1].exp(), s[1], 1e-12, "u")
    close(lg[2].exp(), s[2], 1e-12, "v")
    close(lg[3].exp(), s[3], 1e-12, "hist_r")
    close(lg[4].exp(), s[4], 1e-12, "hist_s")
    close(lg[5].exp(), s[5], 1e-12, "y")


@pytest.mark.parametrize("shared,log_domain", [(True, False), (False, True)], ids=["shared-scaling", "per_row-log"])
def test_triton_keep_history_false_small_blocks(dev, small_blocks, shared, log_domain):
    B, n, m, T = 2, 20, 17, 3
    a, b, cost = tproblem(B, n, m, F64, shared, 1, 1, seed=11)
    full = run_triton(a, b, cost, 0.1, T, 1e-8, log_domain, dev, keep_history=True)
    light = run_triton(a, b, cost, 0.1, T, 1e-8, log_domain, dev, keep_history=False)
    assert light[3].shape == (0, B, n) and light[4].shape == (0, B, m) and light[5].shape == (0, n)
    assert full[3].shape == (T, B, n) and full[4].shape == (T, B, m) and full[5].shape == (B, n)
    for name, x, y in zip(("value", "u", "v"), light[:3], full[:3]):
        close(x, y, 1e-14, name)
    cpu = torch.ops.wkd.sinkhorn(a, b, cost, 0.1, T, 1e-8, log_domain, False)
    for name, x, y in zip(OUTPUTS, light, cpu):
        close(x, y, TOL[("tiles", F64)].outputs_cpu, name)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
def test_triton_non_contiguous_inputs_small_blocks(dev, small_blocks, shared):
    B, n, m, T = 2, 18, 21, 2
    a, b, cost = tproblem(B, n, m, F32, shared, 1, 1, seed=13)
    a_nc = a.t().contiguous().t()
    b_nc = b.new_empty(m, B).t().copy_(b)
    cost_nc = cost.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not a_nc.is_contiguous() and not b_nc.is_contiguous() and not cost_nc.is_contiguous()
    want = run_triton(a, b, cost, 0.1, T, 0.0, False, dev)
    got = run_triton(a_nc, b_nc, cost_nc, 0.1, T, 0.0, False, dev)
    for name, x, y in zip(OUTPUTS, got, want):
        close(x, y, 1e-6, name)
    g2 = torch.linspace(0.5, 1.5, 2 * B, dtype=F32).to(dev)
    ga, gb = torch.ops.wkd.sinkhorn_triton_backward(g2[::2], a_nc.to(dev), b_nc.to(dev), cost_nc.to(dev), *got[3:], 0.1, False)
    ga0, gb0 = torch.ops.wkd.sinkhorn_triton_backward(g2[::2].contiguous(), a.to(dev), b.to(dev), cost.to(dev), *want[3:], 0.1, False)
    close(ga, ga0, 1e-6, "grad_a")
    close(gb, gb0, 1e-6, "grad_b")


def test_fp32_dot_precision_argument(dev, small_blocks):
    """`precision` selects the float32 tl.dot input precision per call (no global state); float64 ignores it."""
    a, b, cost = tproblem(3, 20, 20, F32, True, 1, 0, seed=17)
    ieee = run_triton(a, b, cost, 0.1, 3, 0.0, False, dev)
    for p in ("tf32x3", "tf32"):
        out = run_triton(a, b, cost, 0.1, 3, 0.0, False, dev, precision=p)
        close(out[0], ieee[0], 1e-5 if p == "tf32x3" else 1e-2, f"value ({p})")
        op = torch.ops.wkd.sinkhorn_triton(a.to(dev), b.to(dev), cost.to(dev), 0.1, 3, 0.0, False, True, p)
        for name, x, y in zip(OUTPUTS, op, out):
            close(x, y, 0.0, f"{name} (op, {p})")
    a64, b64, c64 = a.double(), b.double(), cost.double()
    d_ieee = run_triton(a64, b64, c64, 0.1, 3, 0.0, False, dev)
    d_tf32 = run_triton(a64, b64, c64, 0.1, 3, 0.0, False, dev, precision="tf32")
    for name, x, y in zip(OUTPUTS, d_tf32, d_ieee):
        close(x, y, 0.0, f"{name} (float64 ignores precision)")


def test_bad_arguments(dev):
    """The Triton ops check their arguments before any kernel (ops.py; the launchers do not check), with the
    messages of the C++ ops."""
    a, b, cost = tproblem(2, 5, 4, F32, True, seed=1)
    a, b, cost = a.to(dev), b.to(dev), cost.to(dev)
    fwd, bwd = torch.ops.wkd.sinkhorn_triton, torch.ops.wkd.sinkhorn_triton_backward
    with pytest.raises(ValueError, match="wkd.sinkhorn_triton: `cost` must be"):
        fwd(a, b, cost.t(), 0.1, 3)
    with pytest.raises(TypeError, match="dtype"):
        fwd(a, b.double(), cost, 0.1, 3)
    with pytest.raises(ValueError, match="num_iters"):
        fwd(a, b, cost, 0.1, 0)
    with pytest.raises(ValueError, match="reg"):
        fwd(a, b, cost, 0.0, 3)
    with pytest.raises(ValueError, match="eps"):
        fwd(a, b, cost, 0.1, 3, eps=-1.0)
    with pytest.raises(ValueError, match="`precision` must be one of"):
        fwd(a, b, cost, 0.1, 3, precision="fp16")
    value, u, v, hr, hs, y = fwd(a, b, cost, 0.1, 3, keep_history=False)
    g = torch.ones_like(value)
    with pytest.raises(ValueError, match="keep_history"):
        bwd(g, a, b, cost, hr, hs, y, 0.1)
    value, u, v, hr, hs, y = fwd(a, b, cost, 0.1, 3)
    with pytest.raises(ValueError, match="wkd.sinkhorn_triton_backward: `hist_s` must be"):
        bwd(g, a, b, cost, hr, hs[:2], y, 0.1)
    with pytest.raises(ValueError, match="`y` must be"):
        bwd(g, a, b, cost, hr, hs, y[:1], 0.1)
    with pytest.raises(ValueError, match="grad_value"):
        bwd(g[:1], a, b, cost, hr, hs, y, 0.1)
    with pytest.raises(ValueError, match="`precision` must be one of"):
        bwd(g, a, b, cost, hr, hs, y, 0.1, False, "TF32")


@pytest.mark.parametrize("shared,log_domain", [(True, False), (False, True)], ids=["shared-scaling", "per_row-log"])
def test_triton_ops_opcheck_and_autograd(dev, small_blocks, shared, log_domain):
    """torch.ops.wkd.sinkhorn_triton and its backward op: schema, fake kernel, autograd registration (opcheck), and
    the gradient through autograd equal to the Triton backward launcher's."""
    a, b, cost = tproblem(3, 9, 7, F64, shared, 1, 1, seed=23)
    a, b, cost = a.to(dev), b.to(dev), cost.to(dev)
    eps = 1e-8 if log_domain else 0.0
    for keep in (True, False):
        torch.library.opcheck(torch.ops.wkd.sinkhorn_triton.default,
                              (a.clone().requires_grad_(), b.clone().requires_grad_(), cost, 0.1, 3, eps, log_domain,
                               keep, "ieee"))
    out = torch.ops.wkd.sinkhorn_triton(a, b, cost, 0.1, 3, eps, log_domain, True)
    gv = torch.linspace(0.5, 1.5, 3, dtype=F64).to(dev)
    torch.library.opcheck(torch.ops.wkd.sinkhorn_triton_backward.default,
                          (gv, a, b, cost, *out[3:], 0.1, log_domain, "ieee"))
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    value = torch.ops.wkd.sinkhorn_triton(a1, b1, cost, 0.1, 3, eps, log_domain, True)[0]
    ga, gb = torch.autograd.grad((value * gv).sum(), (a1, b1))
    ga0, gb0 = torch.ops.wkd.sinkhorn_triton_backward(gv, a, b, cost, *out[3:], 0.1, log_domain, "ieee", eps)
    close(ga, ga0, 0.0, "grad_a through autograd")
    close(gb, gb0, 0.0, "grad_b through autograd")


def test_split_scalar_keeps_float64():
    pytest.importorskip("triton")
    from wkd_kernels.triton import sinkhorn as sk

    for x in (0.1, 1e-8, 1e-2, 3.0, -18.420680743952367, 1e-300, 1e300, 0.0):
        hi, lo = sk._split(x)
        assert hi + lo == x
        assert hi == float(torch.tensor(hi, dtype=F32)) or lo == 0.0


@pytest.mark.gpu
def test_cuda_routing_opcheck_compile_and_graph_capture(monkeypatch):
    """On CUDA: torch.ops.wkd.sinkhorn_triton runs these kernels, passes opcheck, works under
    torch.compile(fullgraph=True) with autograd; wk.sinkhorn with the Triton backend selected routes to it; the
    forward + backward replay from a captured CUDA graph."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("compiled Triton kernels only (TRITON_INTERPRET=1 is set)")
    from wkd_kernels.triton import sinkhorn as sk

    a, b, cost = (t.cuda() for t in tproblem(4, 50, 45, F32, True, 1, 1, seed=19))
    args = (a, b, cost, 0.1, 5, 1e-8, False, True)
    want = sk.sinkhorn_forward(*args, "ieee")  # the launcher itself
    got = torch.ops.wkd.sinkhorn_triton(*args)
    for name, x, y in zip(OUTPUTS, got, want):
        close(x, y, 0.0, f"{name} (op)")
    res = wk.sinkhorn(a, b, cost, 0.1, 5, eps=1e-8, backend="triton")
    close(res.value, want[0], 0.0, "wk.sinkhorn with the Triton backend")
    with wk.settings.override(backend="triton"):
        close(wk.sinkhorn(a, b, cost, 0.1, 5, eps=1e-8).value, want[0], 0.0, "wk.sinkhorn, Triton by the setting")
    # "auto" with a precision other than ieee takes Triton on CUDA tensors
    tf32 = torch.ops.wkd.sinkhorn_triton(*args, "tf32")
    close(wk.sinkhorn(a, b, cost, 0.1, 5, eps=1e-8, backend="auto", precision="tf32").value, tf32[0], 0.0,
          "wk.sinkhorn auto + tf32")
    torch.library.opcheck(torch.ops.wkd.sinkhorn_triton.default, args)
    torch.library.opcheck(torch.ops.wkd.sinkhorn_triton.default, (a, b, cost, 0.05, 3, 0.0, True, True))
    gv = torch.linspace(0.5, 1.5, 4, device="cuda")
    torch.library.opcheck(torch.ops.wkd.sinkhorn_triton_backward.default, (gv, a, b, cost, *want[3:], 0.1, False))

    def loss(a, b):
        return (torch.ops.wkd.sinkhorn_triton(a, b, cost, 0.1, 5, 1e-8, False, True)[0] * gv).sum()

    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    ga, gb = torch.autograd.grad(torch.compile(loss, fullgraph=True)(a1, b1), (a1, b1))
    ga0, gb0 = torch.ops.wkd.sinkhorn_triton_backward(gv, a, b, cost, *want[3:], 0.1, False, "ieee", 1e-8)
    close(ga, ga0, 1e-6, "compiled grad_a")
    close(gb, gb0, 1e-6, "compiled grad_b")

    def step():
        out = sk.sinkhorn_forward(*args, "ieee")
        return out + torch.ops.wkd.sinkhorn_triton_backward(gv, a, b, cost, *out[3:], 0.1, False)

    graph, captured, eager = capture_cuda_graph(step)  # the warm-up compiles the kernels outside the capture
    graph.replay()
    torch.cuda.synchronize()
    for x, y in zip(captured, eager):
        close(x, y, 0.0, "graph replay")


# ==========================================================================================================
# 4. CUDA C++ internals (csrc/cuda/sinkhorn.cu; GPU only)
# ==========================================================================================================
SIZES_BIG = [(129, 1001, 999), (256, 1000, 1000)]


def need_native():
    from conftest import make_backend

    return make_backend("cuda")


def native(a, b, cost, reg, T, eps=0.0, log_domain=False, keep=True):
    """torch.ops.wkd.sinkhorn on CUDA tensors: the CUDA C++ kernels (need_native() checked they were built)."""
    assert a.is_cuda
    return torch.ops.wkd.sinkhorn(a, b, cost, reg, T, eps, log_domain, keep)


def native_backward(g, a, b, cost, out, reg, log_domain=False):
    assert a.is_cuda
    return torch.ops.wkd.sinkhorn_backward(g, a, b, cost, *out[3:], reg, log_domain)


def cproblem(B, n, m, dtype, shared, zeros=0, seed=0):
    return tuple(t.cuda() for t in problem(B, n, m, dtype, shared, zeros, seed))


@pytest.mark.gpu
@pytest.mark.parametrize("B,n,m", SIZES_BIG)
@pytest.mark.parametrize("dtype", [F64, F32])
def test_forward_big_tiles_match_cpu(B, n, m, dtype):
    """Sizes that take the 32 x 64 tiles, odd and even; float32 against the float64 CPU op (accuracy target)."""
    need_native()
    for zeros in (0, 1):
        a, b, cost = cproblem(B, n, m, dtype, True, zeros)
        out = native(a, b, cost, 0.05, 10, 1e-8)
        cpu = cpu_op(a, b, cost, 0.05, 10, 1e-8)
        for name, x, y in zip(OUTPUTS, out, cpu):
            assert_close(x, y, TOL[("op", dtype)].outputs_cpu, what=name)
        cpu64 = cpu_op(a.double(), b.double(), cost.double(), 0.05, 10, 1e-8)
        assert_close(out[0], cpu64[0], TOL[("op", dtype)].value_cpu, what="value vs float64")


@pytest.mark.gpu
def test_deterministic():
    """The per-row value is reduced in a fixed order (no float atomics): bitwise repeatable."""
    need_native()
    a, b, cost = cproblem(256, 1000, 1000, F32, True, zeros=1)
    first = native(a, b, cost, 0.05, 10, 1e-8)
    second = native(a, b, cost, 0.05, 10, 1e-8)
    for x, y in zip(first, second):
        assert torch.equal(x, y)
    g = torch.randn(256, device="cuda")
    ga1 = native_backward(g, a, b, cost, first, 0.05)
    ga2 = native_backward(g, a, b, cost, first, 0.05)
    assert torch.equal(ga1[0], ga2[0]) and torch.equal(ga1[1], ga2[1])


@pytest.mark.gpu
def test_noncontiguous_inputs_and_side_stream():
    need_native()
    a, b, cost = cproblem(8, 24, 20, F64, True, zeros=1)
    a_nc = a.t().contiguous().t()  # same values, column-major strides
    cost_nc = cost.t().contiguous().t()
    want = native(a, b, cost, 0.1, 5)
    got = native(a_nc, b, cost_nc, 0.1, 5)
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got_s = native(a, b, cost, 0.1, 5)
    torch.cuda.current_stream().wait_stream(s)
    for x, y in zip(got_s, want):
        assert torch.equal(x, y)


@pytest.mark.gpu
def test_bad_input_raises_same_messages():
    need_native()
    a, b, cost = cproblem(2, 4, 3, F64, True)
    with pytest.raises(ValueError, match="`cost` must be"):
        native(a, b, cost.t().contiguous(), 0.1, 3)
    with pytest.raises(ValueError, match="`reg` must be"):
        native(a, b, cost, 0.0, 3)
    with pytest.raises(TypeError, match="`cost` has dtype"):
        native(a, b, cost.float(), 0.1, 3)
    with pytest.raises(ValueError, match="`hist_r` must be"):
        out = native(a, b, cost, 0.1, 3, keep=False)
        native_backward(torch.ones(2, dtype=F64, device="cuda"), a, b, cost, out, 0.1)
    out = native(a, b, cost, 0.1, 3)
    with pytest.raises(ValueError, match="`y` must be"):
        torch.ops.wkd.sinkhorn_backward(torch.ones(2, dtype=F64, device="cuda"), a, b, cost, out[3], out[4],
                                        out[5][:1], 0.1, False)


@pytest.mark.gpu
@pytest.mark.parametrize("B,n,m", SIZES_BIG)
@pytest.mark.parametrize("dtype", [F64, F32])
def test_backward_big_tiles_match_cpu(B, n, m, dtype):
    need_native()
    a, b, cost = cproblem(B, n, m, dtype, True, zeros=1)
    out = native(a, b, cost, 0.05, 10, 1e-8)
    g = torch.randn(B, generator=torch.Generator().manual_seed(3), dtype=F64).to(dtype).cuda()
    got = native_backward(g, a, b, cost, out, 0.05)
    c64 = [t.double().cpu() for t in (a, b, cost)]
    o64 = cpu_op(*c64, 0.05, 10, 1e-8)
    want = torch.ops.wkd.sinkhorn_backward(g.double().cpu(), *c64, *o64[3:], 0.05, False)
    check_grads(got, want, TOL[("op", dtype)].grad_cpu)


@pytest.mark.gpu
def test_no_host_synchronisation():
    need_native()
    a, b, cost = cproblem(16, 100, 100, F32, True, zeros=1)
    a.requires_grad_()
    per_row = rand_cost(16, 100, 100, dtype=F32).cuda()
    cases = ((cost, False), (cost, True), (per_row, False))

    def run():
        for c, log_domain in cases:
            res = wk.sinkhorn(a, b, c, 0.05, 10, eps=1e-8, log_domain=log_domain, check_values=False,
                              backend="cuda")
            (ga,) = torch.autograd.grad(res.value.sum(), a)
        return ga

    run()  # warm-up: first-call allocations and initialisation happen outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ga = run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(ga).all()


@pytest.mark.gpu
@pytest.mark.parametrize("shared,log_domain", [(True, False), (False, False), (True, True)])
def test_cuda_graph_capture_forward_backward(shared, log_domain):
    """Forward + backward of the native ops captured in one CUDA graph, replayed on new inputs."""
    need_native()
    B, n, m, T, reg, eps = 32, 100, 90, 10, 0.05, 1e-8
    a, b, cost = cproblem(B, n, m, F32, shared, zeros=1)
    g = torch.ones(B, device="cuda")

    def step(a, b):
        out = native(a, b, cost, reg, T, eps, log_domain)
        ga, gb = native_backward(g, a, b, cost, out, reg, log_domain)
        return out[0], ga, gb

    sa, sb = a.clone(), b.clone()
    graph, outs, _ = capture_cuda_graph(lambda: step(sa, sb), warmup=2)
    a2, b2, _ = cproblem(B, n, m, F32, shared, zeros=2, seed=10)
    sa.copy_(a2)
    sb.copy_(b2)
    graph.replay()
    torch.cuda.synchronize()
    want = step(a2, b2)
    for x, y in zip(outs, want):
        assert torch.equal(x, y)


@pytest.mark.gpu
def test_cuda_graph_capture_through_autograd():
    """wkd_kernels.sinkhorn + torch.autograd.grad captured in a CUDA graph (the training-step pattern)."""
    need_native()
    B, n = 64, 200
    a, b, cost = cproblem(B, n, n, F32, True, zeros=1)
    logits = torch.randn(B, n, device="cuda", requires_grad=True)

    def step():
        value = wk.sinkhorn(torch.softmax(logits, 1), b, cost, 0.05, 10, eps=1e-8, backend="cuda").value.sum()
        return torch.autograd.grad(value, logits)[0]

    graph, grad, _ = capture_cuda_graph(step, warmup=3)
    with torch.no_grad():
        logits.copy_(torch.randn(B, n, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.allclose(grad, step(), rtol=1e-6, atol=1e-9)


# ------------------------------------------------------------------------------------------ real data, WKD-L size
@pytest.mark.gpu
@pytest.mark.parametrize("log_domain", [False, True])
def test_real_imagenet_cost_b256(log_domain):
    """WKD-L on ImageNet: B=256, C=1000, sharpened CKA cost, target class removed by zero mass, vs the CPU op."""
    need_native()
    d = load_cost_matrix("imagenet_resnet34_cka_distance.pth")
    cost = (torch.relu(1 - torch.exp(-d)) + 1e-8).float()
    B, C = 256, cost.shape[0]
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, C, (B,), generator=g)
    mask = torch.ones(B, C).scatter_(1, y[:, None], 0.0)
    a = torch.softmax(torch.randn(B, C, generator=g) / 2, 1) * mask
    b = torch.softmax(torch.randn(B, C, generator=g) * 3 / 2, 1) * mask
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    reg, T, eps = 0.05, 10, 1e-8
    out = native(a.cuda(), b.cuda(), cost.cuda(), reg, T, eps, log_domain)
    assert torch.isfinite(out[0]).all()
    cpu64 = cpu_op(a.double(), b.double(), cost.double(), reg, T, eps, log_domain)
    assert_close(out[0], cpu64[0], 1e-5)  # float32 against float64: the accuracy target
    if not log_domain:  # (the CPU log domain runs row by row: slow at this size, compared in float64 only)
        assert_close(out[0], cpu_op(a, b, cost, reg, T, eps, log_domain)[0], 1e-5)
    gv = torch.ones(B)
    got = native_backward(gv.cuda(), a.cuda(), b.cuda(), cost.cuda(), out, reg, log_domain)
    want = torch.ops.wkd.sinkhorn_backward(gv.double(), a.double(), b.double(), cost.double(), *cpu64[3:], reg,
                                           log_domain)
    check_grads(got, want, 1e-4)



# ==========================================================================================================
# 5. The CUDA C++ source under host emulation (no GPU; opt-in)
# ==========================================================================================================
def run_emulation_check(script, marker, tmp_path, sms):
    """Run python_tests/cuda_emulation/<script> in a subprocess (a fault in the emulator does not take pytest down)
    with WKD_EMU_SMS = sms emulated multiprocessors; it must exit 0 and print `marker`. The build goes to
    WKD_EMU_BUILD_DIR when set (reused between runs), else under tmp_path."""
    bdir = os.environ.get("WKD_EMU_BUILD_DIR", str(tmp_path / "build"))
    env = dict(os.environ, WKD_EMU_SMS=str(sms))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, str(EMULATION / script), bdir], env=env,
                          capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert marker in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("WKD_TEST_CUDA_EMULATION", "0") != "1",
                    reason="opt-in (WKD_TEST_CUDA_EMULATION=1): builds csrc/cuda/sinkhorn.cu as host C++, minutes")
@pytest.mark.parametrize("sms", [1, 1000], ids=["tiles32x64", "tiles16x32"])
def test_kernels_under_host_emulation(tmp_path, sms):
    """The CUDA kernel source, run on CPU tensors by the fiber emulator, against the CPU op and the reference.

    python_tests/cuda_emulation/check_emulated_kernels.py builds emu_sinkhorn_cuda.cpp (csrc/cuda/sinkhorn.cu with
    WKD_CUDA_EMULATE: the library wkd_cuda_emu, loadable next to wkd_kernels._C) and compares its ops with
    torch.ops.wkd.*. WKD_EMU_SMS sets the emulated multiprocessor count: 1 makes every product take the 32 x 64
    tiles, 1000 the 16 x 32 tiles. Runs in a subprocess (a fault in the emulator does not take pytest down). Set
    WKD_EMU_BUILD_DIR to reuse the build between runs.
    """
    run_emulation_check("check_emulated_kernels.py", "EMULATION OK", tmp_path, sms=sms)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("WKD_TEST_CUDA_EMULATION", "0") != "1",
                    reason="opt-in (WKD_TEST_CUDA_EMULATION=1): builds csrc/cuda/sinkhorn.cu as host C++, minutes")
def test_single_launch_kernels_under_host_emulation(tmp_path):
    """The CUDA C++ single-launch kernels (shared cost, C <= 256), emulated, against the CPU op and the float64
    reference.

    python_tests/cuda_emulation/check_small_c_kernels.py: C in {1, 3, 81, 91, 100, 256} and n != m, odd B, zero-mass
    entries, both domains, float32/float64, eps 0 and 1e-8, history on/off, forward and backward; 1 launch per
    direction (2 with the kernel matrix off chip), bitwise today's kernels in the scaling domain. (Every entry of the
    tile table of today's kernels: test_tuning_ops_under_host_emulation.) Set WKD_EMU_BUILD_DIR to reuse the build
    between runs.
    """
    run_emulation_check("check_small_c_kernels.py", "SMALL-C EMULATION OK", tmp_path, sms=8)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("WKD_TEST_CUDA_EMULATION", "0") != "1",
                    reason="opt-in (WKD_TEST_CUDA_EMULATION=1): builds csrc/cuda/sinkhorn.cu as host C++, minutes")
def test_tuning_ops_under_host_emulation(tmp_path):
    """The tuning ops (wkd_tuning::sinkhorn / sinkhorn_backward with explicit `tile` and `rows_per_block`; emulated:
    wkd_cuda_emu_tuning::*) against the product op's automatic choice and the CPU op.

    python_tests/cuda_emulation/check_tuning_ops.py: every tile table entry at n = m = 300 and (single-launch kernels
    off) 100 x 81, bitwise the automatic choice except the value (to rounding), the products' launch shapes those of
    the entry; rows_per_block in {1, 2, 3, 4, 8, 16} at 81 x 81 and 100 x 81, both domains, float32 / float64, every
    output bitwise, the launch the one small_plan reports; rows_per_block lowered by the shared-memory plan (M off
    chip, M on chip); the automatic rows per CTA at 132 SMs (one wave, the smallest such R); ValueError for
    out-of-range choices. WKD_EMU_SMS=8.
    Set WKD_EMU_BUILD_DIR to reuse the build between runs.
    """
    run_emulation_check("check_tuning_ops.py", "TUNING EMULATION OK", tmp_path, sms=8)


# ==========================================================================================================
# 6. Single-launch Triton kernels (n, m <= ONCHIP_MAX_C, shared cost; wkd_kernels/triton/sinkhorn/onchip_kernels.py)
#    against the float64 reference (autograd through it), the CPU op (value and history), launch counts. Their
#    sm_80 / sm_90 compilation: python_tests/triton_compile_matrix.py (drive_sinkhorn_onchip).
# ==========================================================================================================
try:  # the tests below take the `dev` fixture, which skips where Triton cannot run
    from wkd_kernels.triton import sinkhorn as sk  # noqa: E402
except ImportError:  # pragma: no cover
    sk = None



def oc_problem(B, n, m, dtype, zeros_a=0, zeros_b=0, seed=0):
    a = simplex(B, n, dtype, zeros_a, seed)
    b = simplex(B, m, dtype, zeros_b, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    cost = torch.rand(n, m, generator=g, dtype=F64).to(dtype)
    return a, b, cost


def oc_close(got, want, tol, what, floor=1e-300):
    """assert_close with a per-row scale max(max |want| of the row, floor) (logs: floor=1)."""
    assert_close(got, want, tol, 0.0, what, mode="row", floor=floor)


def oc_cpu_history(a, b, cost, reg, T, eps, log_domain):
    """(value, u, v, hist_r [T, B, n], hist_s [T, B, m], y [B, n]) of the CPU op, in the new layout whichever layout
    the op has (old: hist_r [T + 1, B, n] with y in the last slot)."""
    out = torch.ops.wkd.sinkhorn(a, b, cost, reg, T, eps, log_domain, True)
    if len(out) == 6:
        return tuple(out)
    value, u, v, hr, hs = out
    return value, u, v, hr[:T], hs, hr[T]


def oc_check(a, b, cost, reg, T, eps, log_domain, dev, precision="ieee", family="onchip"):
    """check_sinkhorn on the single-launch launchers themselves (sinkhorn_forward_onchip / _backward_onchip)."""
    def fwd(ad, bd, cd):
        return sk.sinkhorn_forward_onchip(ad, bd, cd, reg, T, eps, log_domain, True, precision)

    def bwd(g, ad, bd, cd, out):
        return sk.sinkhorn_backward_onchip(g, ad, bd, cd, *out[3:], reg, log_domain, precision)

    tb = triton_backend()
    assert tb.device == torch.device(dev).type
    return check_sinkhorn(tb, a, b, cost, reg, T, eps, log_domain, family, fwd, bwd,
                          g=torch.linspace(0.5, 1.5, a.shape[0], dtype=a.dtype))


def _oc_big_tiles(monkeypatch, dev):
    """Under the interpreter, 64-wide tiles for C >= 81 (the default 16 / 32-wide ones run ~10x more interpreted ops;
    they are exercised by the smaller sizes, the rectangular test and test_default_config_c100)."""
    if dev == "cpu":
        monkeypatch.setattr(sk, "ONCHIP_CONFIG", {dt: {"scaling": (16, 64, 64, 4), "log": (8, 64, 64, 4)}
                                                  for dt in (F32, F64)})


@pytest.fixture
def oc_big_tiles(monkeypatch, dev):
    _oc_big_tiles(monkeypatch, dev)


# ------------------------------------------------------------------------------------------------ forward + backward
# (C, B, T): odd B; few iterations at the large sizes (the interpreter runs them on the CPU)
OC_SIZES = [(1, 5, 3), (3, 7, 4), (81, 7, 3), (91, 5, 3), (100, 7, 3), (256, 5, 2)]


# pairwise over size x dtype x domain x eps: every size in both dtypes, both domains and both eps
OC_CASES = as_params(pairwise({"size": OC_SIZES, "dtype": [F64, F32], "log_domain": [False, True],
                               "eps": [0.0, 1e-8]}), ["size", "dtype", "log_domain", "eps"],
                     lambda c: "-".join([f"C{c['size'][0]}"] + [_id(c[k], k) for k in ("dtype", "log_domain", "eps")]))


@pytest.mark.parametrize("size,dtype,log_domain,eps", OC_CASES)
def test_onchip_forward_backward(dev, monkeypatch, size, dtype, log_domain, eps):
    C, B, T = size
    if C >= 81:
        _oc_big_tiles(monkeypatch, dev)
    # zero mass: one entry of a per row (WKD-L's target class) from C = 3 on, and one of b from C = 81 on
    a, b, cost = oc_problem(B, C, C, dtype, zeros_a=1 if C >= 3 else 0, zeros_b=1 if C >= 81 else 0, seed=C)
    oc_check(a, b, cost, 0.1, T, eps, log_domain, dev)


@pytest.mark.parametrize("log_domain", [False, True], ids=["scaling", "log"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_onchip_rectangular_multi_program(dev, dtype, log_domain):
    """n != m, m not a multiple of BLOCK_N, B spanning several programs with a ragged last one, several zeros."""
    a, b, cost = oc_problem(19, 45, 23, dtype, zeros_a=3, zeros_b=2, seed=5)
    oc_check(a, b, cost, 0.07, 4, 1e-8, log_domain, dev)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("config", sk.ONCHIP_CONFIG_CANDIDATES if sk is not None else [],
                         ids=lambda c: "x".join(map(str, c)))
def test_onchip_config_candidates(dev, monkeypatch, config, dtype):
    """Every scaling-domain configuration the GPU sweep may pick (tl.dot for BLOCK_B >= 16, broadcast products below)
    gives the reference results: rectangular, ragged tiles and a ragged last program, zero-mass entries."""
    monkeypatch.setitem(sk.ONCHIP_CONFIG, dtype, {**sk.ONCHIP_CONFIG[dtype], "scaling": config})
    a, b, cost = oc_problem(19, 45, 23, dtype, zeros_a=3, zeros_b=2, seed=6)
    oc_check(a, b, cost, 0.07, 3, 1e-8, False, dev)


@pytest.mark.parametrize("dtype,log_domain", [(F32, False), (F64, True)], ids=["f32-scaling", "f64-log"])
def test_onchip_default_config_c100(dev, dtype, log_domain):
    """The default ONCHIP_CONFIG tiles at C = 100 (ragged last tiles in both dimensions)."""
    a, b, cost = oc_problem(5, 100, 100, dtype, zeros_a=1, zeros_b=1, seed=11)
    oc_check(a, b, cost, 0.1, 2, 1e-8, log_domain, dev)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_onchip_log_domain_small_reg(dev, oc_big_tiles, dtype):
    """reg small enough that K underflows in float32: the log domain still matches the float64 log reference."""
    a, b, cost = oc_problem(5, 91, 91, dtype, zeros_a=1, seed=9)
    reg, T = 0.004, 3
    value, lu, lv, *_ = sk.sinkhorn_forward_onchip(a.to(dev), b.to(dev), cost.to(dev), reg, T, 0.0, True, True,
                                                   "ieee")
    value_ref, lu_ref, lv_ref = sinkhorn_reference(a, b, cost, reg, T, 0.0, True)
    tol = TOL[("onchip", dtype)]
    oc_close(value, value_ref, tol.value_ref * (10 if dtype == F32 else 1), "value vs log reference")
    # log u, log v: absolute errors; |log u| ~ C / reg here, so the float32 bound scales with it
    s = 1.0 if dtype == F64 else 300.0
    oc_close(lu, lu_ref, tol.value_ref * s, "log u vs log reference", floor=1.0)
    oc_close(lv, lv_ref, tol.value_ref * s, "log v vs log reference", floor=1.0)
    c = oc_cpu_history(a, b, cost, reg, T, 0.0, True)
    oc_close(value, c[0], tol.value_cpu * (10 if dtype == F32 else 1), "value vs CPU op")


@pytest.mark.parametrize("log_domain", [False, True], ids=["scaling", "log"])
def test_onchip_keep_history_false(dev, oc_big_tiles, log_domain):
    a, b, cost = oc_problem(7, 100, 100, F64, zeros_a=1, seed=3)
    on = sk.sinkhorn_forward_onchip(a.to(dev), b.to(dev), cost.to(dev), 0.1, 3, 1e-8, log_domain, True, "ieee")
    off = sk.sinkhorn_forward_onchip(a.to(dev), b.to(dev), cost.to(dev), 0.1, 3, 1e-8, log_domain, False, "ieee")
    assert [tuple(t.shape) for t in off[3:]] == [(0, 7, 100), (0, 7, 100), (0, 100)]
    for name, x, y in zip(("value", "u", "v"), off[:3], on[:3]):
        assert torch.equal(x, y), name  # same code path, same rounding


def test_onchip_k_buffer_matches_on_the_fly(dev, oc_big_tiles, monkeypatch):
    """ONCHIP_K_BUFFER (K built once by the element-wise kernel) gives the on-the-fly results."""
    a, b, cost = oc_problem(7, 81, 81, F64, zeros_a=1, seed=4)
    want = oc_check(a, b, cost, 0.1, 3, 0.0, False, dev)
    monkeypatch.setitem(sk.ONCHIP_K_BUFFER, F64, True)
    got = oc_check(a, b, cost, 0.1, 3, 0.0, False, dev)
    for x, y in zip(want[0] + want[1], got[0] + got[1]):
        oc_close(x, y, 1e-14, "K buffer vs on the fly")


@pytest.mark.parametrize("precision", ["tf32x3", "tf32"])
def test_onchip_fp32_precisions(dev, oc_big_tiles, precision):
    """The tensor-core precisions run (under the interpreter they compute like ieee); on a GPU tf32 has ~1e-3."""
    a, b, cost = oc_problem(5, 100, 100, F32, zeros_a=1, seed=6)
    family = "tf32_gpu" if precision == "tf32" and dev == "cuda" else "tensor_core_interp"
    oc_check(a, b, cost, 0.1, 3, 0.0, False, dev, precision=precision, family=family)


def test_onchip_empty_batch(dev):
    a, b, cost = oc_problem(1, 10, 10, F64)
    out = sk.sinkhorn_forward_onchip(a[:0].to(dev), b[:0].to(dev), cost.to(dev), 0.1, 3, 0.0, False, True, "ieee")
    assert [tuple(t.shape) for t in out] == [(0,), (0, 10), (0, 10), (3, 0, 10), (3, 0, 10), (0, 10)]
    ga, gb = sk.sinkhorn_backward_onchip(out[0], a[:0].to(dev), b[:0].to(dev), cost.to(dev), *out[3:], 0.1, False,
                                         "ieee")
    assert ga.shape == (0, 10) and gb.shape == (0, 10)


def test_onchip_fits():
    assert sk.onchip_fits(1, 1, F32) and sk.onchip_fits(100, 100, F64) and sk.onchip_fits(256, 256, F32)
    assert sk.onchip_fits(81, 91, F32)
    assert not sk.onchip_fits(257, 100, F32) and not sk.onchip_fits(100, 257, F32)
    assert not sk.onchip_fits(1000, 1000, F32) and not sk.onchip_fits(100, 100, torch.float16)
    for dt in (F32, F64):  # the configuration table's constraints
        for log_domain in (False, True):
            bb, bn, bk, warps = sk._onchip_config(dt, log_domain)
            assert all(x & (x - 1) == 0 for x in (bb, bn, bk, warps))
            if not log_domain:
                assert min(bb, bn, bk) >= 16  # tl.dot


# ------------------------------------------------------------------------------------------------ launch count
def _oc_count_launches(monkeypatch):
    """Count kernel launches: every Triton launch goes through JITFunction.run (compiled) or
    InterpretedFunction.run (TRITON_INTERPRET=1)."""
    from triton.runtime.jit import JITFunction

    counter = {"n": 0, "names": []}
    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:
        pass
    for cls in classes:
        orig = cls.run

        def run(self, *args, _orig=orig, **kwargs):
            counter["n"] += 1
            counter["names"].append(getattr(self, "__name__", "?"))
            return _orig(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", run)
    return counter


@pytest.mark.parametrize("log_domain,kbuf", [(False, False), (False, True), (True, False)],
                         ids=["scaling", "scaling-k_buffer", "log"])
@pytest.mark.parametrize("C", [3, 100, 256])
def test_onchip_launch_count(dev, oc_big_tiles, monkeypatch, C, log_domain, kbuf):
    a, b, cost = oc_problem(5, C, C, F32, zeros_a=1, seed=C)
    ad, bd, cd = a.to(dev), b.to(dev), cost.to(dev)
    monkeypatch.setitem(sk.ONCHIP_K_BUFFER, F32, kbuf)
    T = 4 if C < 256 else 2
    counter = _oc_count_launches(monkeypatch)
    out = sk.sinkhorn_forward_onchip(ad, bd, cd, 0.1, T, 0.0, log_domain, True, "ieee")
    n_fwd = counter["n"]
    sk.sinkhorn_backward_onchip(torch.ones(5, dtype=F32, device=dev), ad, bd, cd, *out[3:], 0.1, log_domain, "ieee")
    n_all = counter["n"]
    sys.stderr.write(f"\nlaunches C={C} {'log' if log_domain else 'scaling'} kbuf={kbuf}: forward {n_fwd}, "
                     f"forward + backward {n_all} ({', '.join(counter['names'])})\n")
    want = 4 if (kbuf and not log_domain) else 2
    assert n_all == want <= 4, counter["names"]
    assert n_fwd == want // 2


@pytest.mark.parametrize("shared_cost", [True, False], ids=["shared_cost_blas", "per_row_cost"])
@pytest.mark.parametrize("log_domain", [False, True], ids=["scaling", "log_domain"])
def test_long_cpu_call_stops_on_ctrl_c(shared_cost, log_domain):
    """Ctrl-C (SIGINT) during a minutes-long CPU Sinkhorn call raises KeyboardInterrupt within seconds (the kernel
    polls Python's signal handlers between iterations of the shared-cost path and between row blocks of the per-row
    paths: a block is at least one row per thread, so a single row of very many iterations is seen only after it;
    here a row takes well under a second), instead of after the call."""
    B, n = 5000, 64
    cost = f"torch.rand({n}, {n}, dtype=torch.float64)" if shared_cost else \
        f"torch.rand({B}, {n}, {n}, dtype=torch.float64)"
    setup = f"""
        a = torch.full(({B}, {n}), 1.0 / {n}, dtype=torch.float64)
        cost = {cost}
    """
    assert_interruptible(f"wk.sinkhorn(a, a, cost, 0.1, 8000, log_domain={log_domain})", setup)
