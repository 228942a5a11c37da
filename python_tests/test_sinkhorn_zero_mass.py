"""Sinkhorn with zero masses and underflowing kernels: zero mass on a class equals deleting it (WKD-L's target
separation), the shared-cost path's first half-iteration does not cancel when a zero-mass row dominates its column
(CPU op, Triton kernels), K underflow is an error naming `reg` and log_domain=True (never a silent NaN), the losses
pick the log domain themselves, float32 overflow edges, empty batches.
"""
import pytest
import torch

import wkd_kernels as wk
from conftest import rand_cost, rel_error, simplex
from sinkhorn_harness import F32, F64
from wkd_kernels.ops import checks as ops
from wkd_kernels.reference import sinkhorn_reference


# ---------------------------------------------------------- zero mass on a class == the reduced problem (every backend)
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


# ---------------- the shared-cost scaling path's first half-iteration (column sum minus zero-mass rows) must not cancel
def dominated_column_problem(dtype, n=16):
    """A zero-mass row whose K entry (1) dominates its column (others exp(-50))."""
    cost = 1 - torch.eye(n, dtype=dtype)
    a = torch.full((1, n), 1 / (n - 1), dtype=dtype)
    a[0, 0] = 0
    return a, a.clone(), cost


def wkdl_dominated_batch(dtype, B=24, n=40, seed=0):
    """WKD-L-like rows (target class has zero mass), off-diagonal costs in [0.9, 1], reg 0.02: in every row the
    zero-mass class's K entry (1) dominates its column (~1e-20 elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    cost = 0.9 + 0.1 * torch.rand(n, n, generator=g, dtype=F64)
    cost.fill_diagonal_(0)
    a, b = simplex(B, n, F64, 0, seed + 1), simplex(B, n, F64, 0, seed + 2)
    y = torch.randint(0, n, (B,), generator=g)
    a[torch.arange(B), y] = 0
    b[torch.arange(B), y] = 0
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    return a.to(dtype), b.to(dtype), cost.to(dtype)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_shared_first_half_does_not_cancel(dtype):
    a, b, cost = dominated_column_problem(dtype)
    n = a.shape[1]
    shared = wk.sinkhorn(a, b, cost, 0.02, 10).value
    per_row = wk.sinkhorn(a, b, cost.expand(1, n, n), 0.02, 10).value
    log = wk.sinkhorn(a, b, cost, 0.02, 10, log_domain=True).value
    ref = sinkhorn_reference(a, b, cost, 0.02, 10)[0]
    assert torch.isfinite(shared).all(), shared  # was nan
    tol = 1e-12 if dtype == F64 else 1e-5
    assert rel_error(shared, per_row) < tol
    assert rel_error(shared, ref) < tol
    assert rel_error(log, ref) < tol


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_wkdl_batch_value_and_gradient_match_per_row_path(dtype):
    a, b, cost = wkdl_dominated_batch(dtype)
    B, n = a.shape
    tol = 1e-11 if dtype == F64 else 1e-4
    res = {}
    for kind, c in (("shared", cost), ("per_row", cost.expand(B, n, n).contiguous())):
        aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
        v = wk.sinkhorn(aa, bb, c, 0.02, 8).value
        v.sum().backward()
        res[kind] = (v.detach(), aa.grad, bb.grad)
    for x, y in zip(res["shared"], res["per_row"], strict=False):
        assert torch.isfinite(x).all()
        assert rel_error(x, y) < tol
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    ref = sinkhorn_reference(a64, b64, cost.double(), 0.02, 8)[0]
    ga, gb = torch.autograd.grad(ref.sum(), (a64, b64))
    assert rel_error(res["shared"][0], ref.detach()) < tol
    assert rel_error(res["shared"][1], ga) < 10 * tol
    assert rel_error(res["shared"][2], gb) < 10 * tol


@pytest.mark.parametrize("log_domain", [False, True], ids=["scaling", "log"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
def test_triton_kernels_do_not_share_the_defect(shared, log_domain, dev):
    for a, b, cost in (dominated_column_problem(F64), wkdl_dominated_batch(F64, B=6, n=20)):
        B, n = a.shape
        c = cost if shared else cost.expand(B, n, n).contiguous()
        out = torch.ops.wkd.sinkhorn_triton(a.to(dev), b.to(dev), c.to(dev), 0.02, 6, 0.0, log_domain, True, "ieee")
        want = sinkhorn_reference(a, b, cost, 0.02, 6)[0]
        assert torch.isfinite(out[0]).all()
        assert rel_error(out[0].cpu(), want) < 1e-10


# ---------------------------------------- K underflow is never silent on CPU; the losses pick the log domain themselves
def test_whole_row_underflow_raises_naming_reg_and_log_domain():
    a, b = simplex(2, 6, F64, 0, 1), simplex(2, 6, F64, 0, 2)
    cost = torch.rand(6, 6, generator=torch.Generator().manual_seed(0), dtype=F64)
    cost[2] = 100.0  # exp(-100 / 0.05) = 0 in float64
    for c in (cost, cost.expand(2, 6, 6)):
        with pytest.raises(ValueError, match=r"(?s)underflows.*`reg`.*log_domain=True"):
            wk.sinkhorn(a, b, c, 0.05, 10)
    v = wk.sinkhorn(a, b, cost, 0.05, 10, log_domain=True).value
    assert torch.isfinite(v).all()
    assert rel_error(v, sinkhorn_reference(a, b, cost, 0.05, 10, log_domain=True)[0]) < 1e-10


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
def test_float32_small_reg_raises_instead_of_nan(shared):
    """The float32 case reg 1e-3 with cost in [0, 1]: NaN before, now a clear error (or the right value)."""
    g = torch.Generator().manual_seed(0)
    a, b = simplex(4, 8, F32, 0, 1), simplex(4, 8, F32, 0, 2)
    cost = torch.rand(8, 8, generator=g)
    c = cost if shared else cost.expand(4, 8, 8).contiguous()
    try:
        v = wk.sinkhorn(a, b, c, 1e-3, 10).value
    except ValueError as e:
        assert "log_domain=True" in str(e) and "`reg`" in str(e)
    else:
        assert torch.isfinite(v).all()
    v = wk.sinkhorn(a, b, c, 1e-3, 10, log_domain=True).value
    assert rel_error(v, sinkhorn_reference(a, b, cost, 1e-3, 10, log_domain=True)[0]) < 1e-4


def test_partial_underflow_nan_is_reported():
    """Rows of K that vanish only on the support of b: the result would be NaN; the op says why instead."""
    cost = torch.zeros(4, 4, dtype=F64)
    cost[:2, 2:] = 1.0
    cost[2:, :2] = 1.0
    cost[:2, :2] = 60.0  # row 0, 1: K = exp(-1200) = 0 on columns 0, 1 (the support of b)
    a = torch.tensor([[0.25, 0.25, 0.25, 0.25]], dtype=F64)
    b = torch.tensor([[0.5, 0.5, 0.0, 0.0]], dtype=F64)
    with pytest.raises(ValueError, match=r"(?s)non-finite.*`reg`.*log_domain=True"):
        wk.sinkhorn(a, b, cost, 0.05, 5)
    assert torch.isfinite(wk.sinkhorn(a, b, cost, 0.05, 5, log_domain=True).value).all()


def test_cuda_value_check_catches_underflow():
    """On CUDA the kernels read no values; check_values=True runs this check (run here on CPU tensors)."""
    cost = torch.rand(5, 5, dtype=F64)
    cost[:, 3] = 100.0
    with pytest.raises(ValueError, match=r"underflows.*log_domain=True"):
        ops.check_sinkhorn_kernel_range(cost, 0.05, False)
    ops.check_sinkhorn_kernel_range(cost, 0.05, True)  # fine in the log domain
    ops.check_sinkhorn_kernel_range(cost, 1.0, False)
    with pytest.raises(ValueError, match="`reg`"):
        ops.check_sinkhorn_kernel_range(cost.float(), 1e-46, True)


def test_losses_choose_the_log_domain_when_K_would_underflow():
    from wkd_kernels.losses import WKDLogitLoss

    C = 10
    g = torch.Generator().manual_seed(0)
    cost = torch.rand(C, C, generator=g)
    cost.fill_diagonal_(0)
    s, t = torch.randn(8, C, generator=g), torch.randn(8, C, generator=g)
    y = torch.randint(0, C, (8,), generator=g)
    # reg 1e-3: max(cost) / reg ~ 1000 > 87.3: the log domain (float32)
    auto = WKDLogitLoss(cost, 2.0, 1.0, reg=1e-3)(s, t, y)
    forced = WKDLogitLoss(cost, 2.0, 1.0, reg=1e-3, log_domain=True)(s, t, y)
    assert torch.isfinite(auto) and torch.equal(auto, forced)
    assert WKDLogitLoss(cost, 2.0, 1.0, reg=1e-3).log_domain == "auto"
    # the published reg 0.05: the (faster) scaling domain
    assert ops.auto_log_domain(float(cost.max()) + 1e-8, 0.05, F32) is False
    assert torch.equal(WKDLogitLoss(cost, 2.0, 1.0)(s, t, y), WKDLogitLoss(cost, 2.0, 1.0, log_domain=False)(s, t, y))
    # float64 only switches beyond 708
    assert ops.auto_log_domain(1.0, 1e-2, F64) is False and ops.auto_log_domain(1.0, 1e-2, F32) is True
    assert ops.auto_log_domain(1.0, 1e-3, F64) is True
    a, b = simplex(3, C, F64, 1, 1), simplex(3, C, F64, 1, 2)
    v = wk.sinkhorn(a.float(), b.float(), cost, 1e-3, 5, log_domain="auto").value
    assert rel_error(v, wk.sinkhorn(a.float(), b.float(), cost, 1e-3, 5, log_domain=True).value) == 0


def test_float32_overflow_edges_raise():
    a, b = simplex(1, 3, F32, 0, 1), simplex(1, 3, F32, 0, 2)
    cost = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0], [2.0, 1.0, 0.0]])
    with pytest.raises(ValueError, match="`reg` = 1e-46 underflows to 0 in float32"):
        wk.sinkhorn(a, b, cost, 1e-46, 3, log_domain=True)
    huge = torch.full((3, 3), 3e38)
    for log_domain in (False, True):
        with pytest.raises(ValueError, match="`reg`"):
            wk.sinkhorn(a, b, huge, 1e-3, 3, log_domain=log_domain)  # was 0 or NaN


# -------------------------------------------------------------------------------------------------------- empty batches
@pytest.mark.parametrize("shared,log_domain", [(True, False), (False, False), (True, True), (False, True)])
def test_empty_batch(shared, log_domain):
    a, b = torch.empty(0, 5, dtype=F64, requires_grad=True), torch.empty(0, 4, dtype=F64)
    cost = torch.rand(5, 4, dtype=F64) if shared else torch.rand(0, 5, 4, dtype=F64)
    v = wk.sinkhorn(a, b, cost, 0.1, 3, log_domain=log_domain).value  # was an internal max() error
    assert v.shape == (0,)
    v.sum().backward()
    assert a.grad.shape == (0, 5)
