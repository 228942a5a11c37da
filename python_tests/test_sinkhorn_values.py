"""Sinkhorn's outputs against independent values: every output of every backend's op vs the float64 reference and the
CPU op over a pairwise shape grid (sinkhorn_harness.check_sinkhorn, TOL["op"]), the public wk.sinkhorn vs the
reference and the CPU backend, POT (float64 and float32), half inputs, and the paper's released cost matrices.
"""
import os
import subprocess
import sys

import pytest
import torch

import wkd_kernels as wk
from conftest import assert_close, available_backends, load_cost_matrix, rand_cost, rel_error, simplex
from sinkhorn_harness import (F32, F64, POT_SHAPES, SHAPES, TOL, backend_cases, check_grads, check_sinkhorn, pot_batch,
                              problem)
from wkd_kernels.reference import sinkhorn_reference


# --------------------------------------------------------------- the registered ops over the shape grid (every backend)
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


# ------------------------------------------------------------------------------------------------------- the public API
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


def test_half_inputs_computed_in_float32(backend):
    a, b, cost = simplex(3, 16), simplex(3, 16, seed=2), rand_cost(16, 16)
    for dt in (torch.float16, torch.bfloat16):
        res = wk.sinkhorn(*backend.to(a.to(dt), b.to(dt), cost.to(dt)), 0.1, 5, backend=backend.name)
        assert res.value.dtype == F32
        ref = sinkhorn_reference(a.to(dt), b.to(dt), cost.to(dt), 0.1, 5)[0]
        assert_close(res.value, ref, 1e-5, what=f"{backend} {dt}")


# ------------------------------------------------------------------------------------------------------------------ POT
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
    assert_close(got, pot_batch(a, b, cost, 0.05, 10, log_domain), TOL[("pot", F32)].value_ref,
                 what=f"{backend} vs POT")


# ----------------------------------------------------------------------------------- the paper's released cost matrices
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


# ------------------------------------------------------------------------------------------ the CPU kernel's ISA builds
_ISA_CASES = """
import sys, torch, wkd_kernels as wk


def isa_cases():
    out = []
    for dt in (torch.float32, torch.float64):
        for eps in (0.0, 1e-8):
            for B, n, m in ((5, 37, 29), (3, 100, 100), (2, 8, 3)):
                g = torch.Generator().manual_seed(B * n + m)
                a = torch.softmax(torch.randn(B, n, generator=g, dtype=dt), 1)
                a[:, 0] = 0
                a = a / a.sum(1, keepdim=True)
                b = torch.softmax(torch.randn(B, m, generator=g, dtype=dt), 1)
                c = torch.rand(n, m, generator=g, dtype=dt)
                x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
                v = wk.sinkhorn(x, y, c, 0.05, 7, eps=eps, backend="cpu").value
                v.sum().backward()
                out += [v.detach(), x.grad, y.grad]
    return out
"""


@pytest.mark.skipif(not wk.HAS_C_EXT, reason="needs the compiled extension")
def test_cpu_kernel_isa_builds_give_the_same_digits(tmp_path):
    """The elementwise passes of the C++ BLAS path exist for the baseline ISA and for AVX2 (chosen by the CPU;
    csrc/cpu/sinkhorn_row_passes.h): values and both gradients, float32 and float64, with and without eps, are equal
    bit for bit in this process (AVX2 where the CPU has it) and in one with WKD_CPU_ISA=baseline."""
    scope = {}
    exec(_ISA_CASES, scope)  # noqa: S102 -- the same cases here and in the child process
    here = scope["isa_cases"]()
    path = tmp_path / "baseline.pt"
    env = dict(os.environ, WKD_CPU_ISA="baseline")
    r = subprocess.run([sys.executable, "-c", _ISA_CASES + "\ntorch.save(isa_cases(), sys.argv[1])\n", str(path)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    baseline = torch.load(path)
    assert len(here) == len(baseline) == 36
    for i, (x, y) in enumerate(zip(here, baseline, strict=True)):
        assert torch.equal(x, y), f"output {i} differs between this process's build and the baseline build"
