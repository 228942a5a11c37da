"""Sinkhorn's gradients: the backward op of every backend vs autograd through the float64 reference (number of
iterations, the public exact gradient pairwise over cost layout x domain x eps x zero masses), gradcheck, float32 vs
float64, the envelope gradient vs POT, which outputs are differentiable, and what the backward allocates (no zero
history materialised, peak RSS below the history's size).
"""
import os
import subprocess
import sys

import pytest
import torch

import wkd_kernels as wk
from conftest import REPO, assert_close, backward_zero_bytes, import_pot, rand_cost, rel_error, simplex
from sinkhorn_harness import F32, F64, TOL, backend_cases, check_grads, grads, problem, ref_grads, run_backward, run_op
from wkd_kernels.reference import sinkhorn_reference


# ----------------------------------------------------------------------------------- the exact gradient (every backend)
@pytest.mark.parametrize("T", [1, 2, 10])
def test_backward_number_of_iterations(backend, T):
    for shared, log_domain in ((True, False), (False, False), (True, True)):
        a, b, cost = problem(5, 20, 17, F64, shared, zeros=1)
        out = run_op(backend, a, b, cost, 0.1, T, 1e-8, log_domain)
        g = torch.ones(5, dtype=F64)
        got = run_backward(backend, g, a, b, cost, out, 0.1, log_domain)
        check_grads(got, ref_grads(a, b, cost, 0.1, T, 1e-8, g), TOL[("op", F64)].grad_ref, f"{backend} T={T}")


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
    for name, g, r in zip(("grad_a", "grad_b"), got, ref, strict=False):
        assert_close(g, r, 1e-8, what=f"{backend} {name}")


# ------------------------------------------------------------------------------------------------ the public API on CPU
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
    for g, r in zip(got, ref, strict=False):
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


# ----------------------------------------------------------------------------------------------- differentiable outputs
def test_no_history_without_grad(backend):
    a, b, cost = backend.to(simplex(2, 5), simplex(2, 5, seed=2), rand_cost(5, 5))
    with torch.no_grad():
        res = wk.sinkhorn(a.requires_grad_(), b, cost, 0.1, 3, backend=backend.name)
    assert res.value.grad_fn is None


def test_outputs_other_than_value_are_not_differentiable(backend):
    a, b, cost = backend.to(simplex(2, 5), simplex(2, 5, seed=2), rand_cost(5, 5))
    res = wk.sinkhorn(a.requires_grad_(), b, cost, 0.1, 3, backend=backend.name)
    assert res.value.requires_grad and not res.log_u.requires_grad and not res.log_v.requires_grad


# ----------------------------------------------------------------------------------------------- memory of the backward
def test_sinkhorn_backward_allocates_no_zero_history():
    B, n, T = 64, 50, 20
    a, b = simplex(B, n, F32, 2, 1).requires_grad_(), simplex(B, n, F32, 2, 2)
    cost = torch.rand(n, n, generator=torch.Generator().manual_seed(0))
    history = ((T + 1) * B * n + T * B * n) * 4
    nbytes = backward_zero_bytes(lambda x, y: wk.sinkhorn(x, y, cost, 0.1, T).value, (a, b))
    assert nbytes < history / 10, (nbytes, history)  # was > history (zeros for u, v, hist_r, hist_s)
    # the same gradient as the reference
    a64 = a.detach().double().requires_grad_()
    (ga,) = torch.autograd.grad(sinkhorn_reference(a64, b.double(), cost.double(), 0.1, T)[0].sum(), a64)
    assert rel_error(a.grad, ga) < 1e-4


_PEAK_SCRIPT = r'''
import sys, torch, wkd_kernels as wk
torch.set_num_threads(1)
B, n, T = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
g = torch.Generator().manual_seed(0)
a = torch.softmax(torch.randn(B, n, generator=g), 1).requires_grad_()
b = torch.softmax(torch.randn(B, n, generator=g), 1)
cost = torch.rand(n, n, generator=g)
loss = wk.sinkhorn(a, b, cost, 0.1, T).value.sum()
base = kib("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
loss.backward()
print((kib("VmHWM") - base) * 1024)
'''


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_backward_peak_rss_below_history():
    """Peak RSS of the backward in a fresh process (RSS, not the allocator's count, so a second copy of the history
    shows)."""
    B, n, T = 512, 400, 20
    history = ((T + 1) * B * n + T * B * n) * 4
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(B), str(n), str(T)], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = int(proc.stdout.split()[-1])
    assert peak < 0.6 * history, (peak, history)  # was ~1.2 history
