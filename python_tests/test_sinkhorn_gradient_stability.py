"""Accuracy of Sinkhorn's exact gradient in ill-conditioned problems (small reg, one-hot and near-one-hot
marginals, zero-mass entries), against an extended-precision ground truth (python_tests/sinkhorn_ground_truth.py).

The plain reverse sweep leaves a rounding residual in the gauge direction of the adjoint of v_t (sum_j b_j z_t,j,
exactly 0 for eps = 0) which the zero-mass entries of b amplify by up to exp(max cost / reg); every backend restores
the identity (docs/design.md section 3). These tests compare value, grad a and grad b entry by entry.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import simplex
from sinkhorn_ground_truth import sinkhorn_mp, sinkhorn_mp_finite_differences

import wkd_kernels as wk
from wkd_kernels.reference import sinkhorn_reference

F64 = torch.float64
# Per-entry tolerance of a float64 gradient: |got - want| <= RTOL (|want| + FLOOR scale_row), scale_row = the row's
# largest |entry| of both gradients: 1e-9 relative, and an absolute floor of 1e-13 of the row's scale (~500 ulps:
# every entry is a sum of terms of that scale, so an entry 1e8 times smaller is known to some ulps of the scale).
# The measured errors of the corrected backends are <= 1e-12 relative on the one-hot problems below; the
# uncorrected sweep's reach 1e3.
RTOL, FLOOR = 1e-9, 1e-4


def entry_errors(got, want, scale=None):
    """Per-entry |got - want| / (|want| + FLOOR scale), [B, k]; scale [B, 1] defaults to max_row |want|."""
    got, want = got.double().cpu(), want.double().cpu()
    scale = want.abs().amax(1, keepdim=True) if scale is None else scale
    return (got - want).abs() / (want.abs() + FLOOR * scale.clamp_min(1e-300))


def grad_errors(got, want):
    """entry_errors of (grad a, grad b) with the row scale over both gradients."""
    scale = torch.maximum(want[0].abs().amax(1, keepdim=True), want[1].abs().amax(1, keepdim=True))
    return entry_errors(got[0], want[0], scale).max().item(), entry_errors(got[1], want[1], scale).max().item()


def op_value_and_grads(a, b, cost, reg, T, eps, log_domain, g, backend="cpu", dev="cpu"):
    aa = a.to(dev).clone().requires_grad_()
    bb = b.to(dev).clone().requires_grad_()
    v = wk.sinkhorn(aa, bb, cost.to(dev), reg, T, eps=eps, log_domain=log_domain, backend=backend).value
    ga, gb = torch.autograd.grad((v * g.to(dev)).sum(), (aa, bb))
    return v.detach().cpu(), ga.cpu(), gb.cpu()


def reference_value_and_grads(a, b, cost, reg, T, eps, g):
    aa, bb = a.double().clone().requires_grad_(), b.double().clone().requires_grad_()
    v = sinkhorn_reference(aa, bb, cost.double(), reg, T, eps=eps)[0]
    ga, gb = torch.autograd.grad((v * g.double()).sum(), (aa, bb))
    return v.detach(), ga, gb


def one_hot_problem(shared, seed=0, B=20, n=17, m=11):
    """The defect's setting: one-hot b (the mass column cycling over the rows), reg 0.02, costs uniform in [0, 1]:
    per-row costs [B, n, m], or one shared cost [n, m]."""
    a = simplex(1, n, F64, 0, seed + 5).expand(B, n).contiguous()
    b = torch.zeros(B, m, dtype=F64)
    b[torch.arange(B), torch.arange(B) % m] = 1.0
    g = torch.Generator().manual_seed(seed + 3)
    cost = torch.rand(*((n, m) if shared else (B, n, m)), generator=g, dtype=F64)
    return a, b, cost


# ------------------------------------------------------------------------------------------------------------------
# The ground truth itself
# ------------------------------------------------------------------------------------------------------------------
def test_ground_truth_gradient_matches_converged_finite_differences():
    """The extended-precision sweep equals central differences of the extended-precision forward (step 1e-25, at
    40 more digits), zero-mass entries of a and b included, with a one-hot b at reg 0.02."""
    a = torch.tensor([[0.3, 0.0, 0.5, 0.2, 0.0]], dtype=F64)
    b = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=F64)
    cost = torch.rand(5, 4, generator=torch.Generator().manual_seed(11), dtype=F64)
    for eps in (0.0, 1e-3):
        _, ga, gb = sinkhorn_mp(a, b, cost, 0.02, 4, eps)
        fa, fb = sinkhorn_mp_finite_differences(a, b, cost, 0.02, 4, eps)
        assert entry_errors(ga, fa).max() < 1e-12 and entry_errors(gb, fb).max() < 1e-12, (eps, ga, fa, gb, fb)


# ------------------------------------------------------------------------------------------------------------------
# The defect's setting: one-hot b, reg 0.02, T = 6, eps = 0
# ------------------------------------------------------------------------------------------------------------------
CPU_BACKENDS = ["cpu", "torch"] if wk.HAS_C_EXT else ["torch"]  # the C++ kernels and the ATen backend


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shared", [False, True], ids=["per_row_cost", "shared_cost"])
@pytest.mark.parametrize("log_domain", [False, True], ids=["scaling", "log"])
def test_one_hot_b_zero_mass_gradient_matches_ground_truth(shared, log_domain, backend):
    a, b, cost = one_hot_problem(shared)
    g = torch.linspace(0.5, 1.5, a.shape[0], dtype=F64)
    want = sinkhorn_mp(a, b, cost, 0.02, 6, 0.0, g)
    got = op_value_and_grads(a, b, cost, 0.02, 6, 0.0, log_domain, g, backend=backend)
    assert entry_errors(got[0][:, None], want[0][:, None]).max() < RTOL
    assert entry_errors(got[1], want[1]).max() < RTOL, "grad a"
    err_b = entry_errors(got[2], want[2])
    assert err_b.max() < RTOL, f"grad b: {int((err_b > RTOL).sum())} entries off, worst {err_b.max():.2e}"


@pytest.mark.parametrize("shared", [False, True], ids=["per_row_cost", "shared_cost"])
def test_reference_autograd_zero_mass_gradient_matches_ground_truth(shared):
    """Autograd through the float64 reference (its gauge-correcting hooks) in the same setting."""
    a, b, cost = one_hot_problem(shared)
    g = torch.linspace(0.5, 1.5, a.shape[0], dtype=F64)
    want = sinkhorn_mp(a, b, cost, 0.02, 6, 0.0, g)
    got = reference_value_and_grads(a, b, cost, 0.02, 6, 0.0, g)
    for x, y in zip(got[1:], want[1:], strict=False):
        assert entry_errors(x, y).max() < RTOL


def test_uncorrected_backward_is_what_the_correction_fixes():
    """The raw op without `eps` (the plain sweep) misses the ground truth at zero-mass entries in this setting by
    orders of magnitude; with the forward's eps it matches. (Guards the premise of the tests above.)"""
    a, b, cost = one_hot_problem(False)
    g = torch.ones(a.shape[0], dtype=F64)
    want = sinkhorn_mp(a, b, cost, 0.02, 6, 0.0, g)
    out = torch.ops.wkd.sinkhorn(a, b, cost, 0.02, 6, 0.0, False, True)
    _, gb_plain = torch.ops.wkd.sinkhorn_backward(g, a, b, cost, *out[3:], 0.02, False)
    _, gb_fixed = torch.ops.wkd.sinkhorn_backward(g, a, b, cost, *out[3:], 0.02, False, 0.0)
    assert entry_errors(gb_plain, want[2]).max() > 1e-3
    assert entry_errors(gb_fixed, want[2]).max() < RTOL


@pytest.mark.parametrize("onchip", [True, False], ids=["single_launch", "per_half_iteration"])
@pytest.mark.parametrize("log_domain", [False, True], ids=["scaling", "log"])
def test_triton_one_hot_b_zero_mass_gradient_matches_ground_truth(onchip, log_domain, monkeypatch, dev):
    from wkd_kernels.triton import sinkhorn as tri

    monkeypatch.setattr(tri, "ONCHIP_MAX_C", 256 if onchip else 0)
    a, b, cost = one_hot_problem(True, B=11, n=9, m=11)
    g = torch.linspace(0.5, 1.5, a.shape[0], dtype=F64)
    want = sinkhorn_mp(a, b, cost, 0.02, 6, 0.0, g)
    got = op_value_and_grads(a, b, cost, 0.02, 6, 0.0, log_domain, g, backend="triton", dev=dev)
    for x, y in zip(got, want, strict=False):
        x, y = (x[:, None], y[:, None]) if x.dim() == 1 else (x, y)
        assert entry_errors(x, y).max() < RTOL


# ------------------------------------------------------------------------------------------------------------------
# Property: valid inputs of every kind, both domains, value and both gradients
# ------------------------------------------------------------------------------------------------------------------
def marginal(rng, B, k):
    """[B, k] rows: one-hot, near-one-hot (one mass 1 - delta, one delta), or random with zero-mass entries."""
    rows = []
    for _ in range(B):
        kind = rng.choice(["one_hot", "near_one_hot", "zeros", "full"])
        x = np.zeros(k)
        main = int(rng.integers(0, k))
        if kind == "one_hot" or k == 1:
            x[main] = 1.0
        elif kind == "near_one_hot":
            delta = float(rng.choice([1e-3, 1e-6, 1e-9]))
            x[main], x[(main + int(rng.integers(1, k))) % k] = 1.0 - delta, delta
        else:
            x = rng.random(k) + 0.05
            if kind == "zeros":
                x[rng.permutation(k)[: int(rng.integers(1, k))]] = 0.0
            x /= x.sum()
        rows.append(x)
    return torch.tensor(np.stack(rows), dtype=F64)


def sinkhorn_problem(seed):
    """One random valid problem: 1-3 rows, 1-9 bins a side, shared or per-row cost, any regulariser, iteration count
    and eps the ops accept, marginals with one-hot, near-one-hot and zero-mass rows."""
    rng = np.random.default_rng(seed)
    B, n, m = int(rng.integers(1, 4)), int(rng.integers(1, 10)), int(rng.integers(1, 10))
    shared = bool(rng.integers(0, 2))
    g = torch.Generator().manual_seed(int(rng.integers(0, 2**31)))
    cost = torch.rand(*((n, m) if shared else (B, n, m)), generator=g, dtype=F64)
    reg = float(rng.choice([0.02, 0.05, 0.2, 1.0]))
    T = int(rng.integers(1, 9))
    eps = float(rng.choice([0.0, 1e-30, 1e-8, 1e-3]))
    return marginal(rng, B, n), marginal(rng, B, m), cost, reg, T, eps


# Seeded cases (deterministic, the same on every machine); WKD_PROPERTY_CASES widens the sweep for a local soak run.
@pytest.mark.parametrize("seed", range(int(os.environ.get("WKD_PROPERTY_CASES", "40"))))
def test_value_and_gradients_match_ground_truth_property(seed):
    a, b, cost, reg, T, eps = sinkhorn_problem(seed)
    g = torch.linspace(0.5, 1.5, a.shape[0], dtype=F64)
    want = sinkhorn_mp(a, b, cost, reg, T, eps, g)
    for backend in CPU_BACKENDS:
        for log_domain in (False, True):
            got = op_value_and_grads(a, b, cost, reg, T, eps, log_domain, g, backend=backend)
            errs = (entry_errors(got[0][:, None], want[0][:, None]).max().item(),) + grad_errors(got[1:], want[1:])
            assert max(errs) < RTOL, f"{backend}, log_domain={log_domain}: value, grad a, grad b errors {errs}"
    ref = reference_value_and_grads(a, b, cost, reg, T, eps, g)
    assert max(grad_errors(ref[1:], want[1:])) < RTOL, "reference autograd"


@pytest.mark.slow
@pytest.mark.cuda_emulation  # opt-in: WKD_TEST_CUDA_EMULATION=1 (deselected otherwise; conftest.OPT_IN)
def test_cuda_gauge_correction_under_host_emulation(tmp_path):
    """The CUDA C++ backward's gauge correction (single-launch, per-half-iteration and per-row kernels, both
    domains), emulated on CPU, against the ground truth: python_tests/cuda_emulation/check_gauge_correction.py in a
    subprocess. Set WKD_EMU_BUILD_DIR to reuse the emulation build."""
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    bdir = os.environ.get("WKD_EMU_BUILD_DIR") or str(tmp_path / "emu_build")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(here.parent)] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, str(here / "cuda_emulation" / "check_gauge_correction.py"), bdir], env=env,
                          capture_output=True, text=True, timeout=3600, check=False)
    assert proc.returncode == 0 and "GAUGE EMULATION OK" in proc.stdout, proc.stdout[-5000:] + proc.stderr[-5000:]


@pytest.mark.parametrize("log_domain", [False, True], ids=["scaling", "log"])
def test_backward_op_with_eps_passes_opcheck_and_rejects_bad_eps(log_domain):
    a, b, cost = one_hot_problem(True, B=3, n=5, m=4)
    out = torch.ops.wkd.sinkhorn(a, b, cost, 0.1, 3, 1e-8, log_domain, True)
    g = torch.ones(3, dtype=F64)
    torch.library.opcheck(torch.ops.wkd.sinkhorn_backward.default, (g, a, b, cost, *out[3:], 0.1, log_domain, 1e-8))
    with pytest.raises(ValueError, match="eps"):
        torch.ops.wkd.sinkhorn_backward(g, a, b, cost, *out[3:], 0.1, log_domain, -1.0)
