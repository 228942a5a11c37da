"""The Gibbs kernel cache of the scaling-domain Sinkhorn: wkd::sinkhorn_gibbs (C++ CPU kernel and torch backend) on
a precomputed K = exp(-cost / reg) and K∘cost, wk.gibbs_kernel, ``sinkhorn(..., kernel=)`` and WKDLogitLoss's cache
(csrc/ops.cpp, schema comment of wkd::sinkhorn_gibbs).

Properties: the same numbers as the per-call path (bit for bit on the same backend, and the float64 reference to the
tolerances of the "op" family of sinkhorn_harness.TOL), values and gradients; opcheck of the new ops; errors naming the
argument; the loss's cache built once and rebuilt on an in-place change of the cost, on .to(dtype) and on a new reg,
not in state_dict; the loss under torch.compile.
"""
from __future__ import annotations

import copy

import pytest
import torch

import wkd_kernels as wk
from conftest import assert_close, rand_cost, simplex
from sinkhorn_harness import TOL as HARNESS_TOL
from wkd_kernels.reference import sinkhorn_reference

F32, F64 = torch.float32, torch.float64
# Relative tolerances vs the float64 reference: the "op" family of the Sinkhorn tests' one table (value, gradients).
TOL = {dt: (HARNESS_TOL[("op", dt)].value_ref, HARNESS_TOL[("op", dt)].grad_ref) for dt in (F32, F64)}
BACKENDS = ["cpu", "torch"] if wk.HAS_C_EXT else ["torch"]


def problem(B, n, m, dtype, zeros=1, seed=0):
    return simplex(B, n, dtype, zeros=zeros, seed=seed), simplex(B, m, dtype, zeros=zeros, seed=seed + 1), \
        rand_cost(n, m, dtype=dtype, seed=seed + 2)


def value_and_grads(a, b, cost, reg, T, eps, backend, kernel=None):
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    res = wk.sinkhorn(x, y, cost, reg, T, eps=eps, backend=backend, kernel=kernel)
    ga, gb = torch.autograd.grad(res.value, (x, y), torch.linspace(0.5, 1.5, a.shape[0], dtype=a.dtype))
    return res, ga, gb


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("B,n,m,eps", [(5, 13, 11, 0.0), (4, 17, 17, 1e-8), (1, 1, 6, 0.0), (3, 40, 9, 1e-3)])
def test_cached_equals_uncached_and_reference(backend, dtype, B, n, m, eps):
    a, b, cost = problem(B, n, m, dtype, zeros=1 if n > 1 else 0)
    reg, T = 0.1, 6
    kernel = wk.gibbs_kernel(cost, reg)
    r0, ga0, gb0 = value_and_grads(a, b, cost, reg, T, eps, backend)
    r1, ga1, gb1 = value_and_grads(a, b, cost, reg, T, eps, backend, kernel)
    for got, want in ((r1.value, r0.value), (r1.log_u, r0.log_u), (r1.log_v, r0.log_v), (ga1, ga0), (gb1, gb0)):
        assert torch.equal(got, want)  # the same ATen K and the same kernel: bit for bit
    a64, b64 = a.double().requires_grad_(), b.double().requires_grad_()
    ref = sinkhorn_reference(a64, b64, cost.double(), reg, T, eps)[0]
    rga, rgb = torch.autograd.grad(ref, (a64, b64), torch.linspace(0.5, 1.5, B, dtype=F64))
    tv, tg = TOL[dtype]
    assert_close(r1.value, ref, tv, what="value")
    assert_close(ga1, rga, tg, what="grad a", scale=rga.abs().max())
    assert_close(gb1, rgb, tg, what="grad b", scale=rgb.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_not_used_where_it_does_not_apply(backend):
    """The log domain and the envelope gradient take the cost (same numbers as without the kernel)."""
    a, b, cost = problem(3, 8, 7, F64)
    kernel = wk.gibbs_kernel(cost, 0.1)
    for kw in ({"log_domain": True}, {"grad": "envelope"}):
        x = a.clone().requires_grad_()
        r0 = wk.sinkhorn(x, b, cost, 0.1, 4, backend=backend, **kw)
        r1 = wk.sinkhorn(x, b, cost, 0.1, 4, backend=backend, kernel=kernel, **kw)
        assert torch.equal(r0.value, r1.value)
        assert torch.equal(torch.autograd.grad(r0.value.sum(), x)[0], torch.autograd.grad(r1.value.sum(), x)[0])


def test_gibbs_kernel_is_the_per_call_kernel():
    cost = rand_cost(9, 7, dtype=F32)
    k = wk.gibbs_kernel(cost, 0.05)
    assert torch.equal(k.K, torch.exp(cost / -0.05)) and torch.equal(k.KC, k.K * cost) and k.reg == 0.05


# ------------------------------------------------------------------------------------------------------ opcheck
@pytest.mark.parametrize("op_name", ["sinkhorn_gibbs", "sinkhorn_gibbs_torch"])
def test_opcheck(op_name):
    fwd = getattr(torch.ops.wkd, op_name).default
    bwd = getattr(torch.ops.wkd, op_name + "_backward").default
    for dtype in (F32, F64):
        a, b, cost = problem(3, 5, 4, dtype)
        k = wk.gibbs_kernel(cost, 0.1)
        for keep, eps in ((True, 0.0), (True, 1e-8), (False, 0.0)):
            torch.library.opcheck(fwd, (a.clone().requires_grad_(keep), b.clone().requires_grad_(keep), k.K, k.KC, 4,
                                        eps, keep))
        out = fwd(a, b, k.K, k.KC, 4, 1e-8, True)
        g = torch.linspace(0.5, 1.5, 3, dtype=dtype)
        for eps in (None, 1e-8):
            torch.library.opcheck(bwd, (g, a, b, k.K, k.KC, *out[3:], eps))


def test_gibbs_backward_op_equals_sinkhorn_backward():
    a, b, cost = problem(4, 9, 8, F64)
    k = wk.gibbs_kernel(cost, 0.1)
    g = torch.linspace(0.5, 1.5, 4, dtype=F64)
    ops = [("sinkhorn", "sinkhorn_gibbs")] if wk.HAS_C_EXT else []
    for base, gibbs in ops + [("sinkhorn_torch", "sinkhorn_gibbs_torch")]:
        out0 = getattr(torch.ops.wkd, base)(a, b, cost, 0.1, 5, 1e-8, False, True)
        out1 = getattr(torch.ops.wkd, gibbs)(a, b, k.K, k.KC, 5, 1e-8, True)
        assert all(torch.equal(x, y) for x, y in zip(out0, out1, strict=True))
        bw0 = getattr(torch.ops.wkd, base + "_backward")(g, a, b, cost, *out0[3:], 0.1, False, 1e-8)
        bw1 = getattr(torch.ops.wkd, gibbs + "_backward")(g, a, b, k.K, k.KC, *out1[3:], 1e-8)
        assert all(torch.equal(x, y) for x, y in zip(bw0, bw1, strict=True))


# ------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("op_name", ["sinkhorn_gibbs", "sinkhorn_gibbs_torch"])
def test_op_errors_name_the_argument(op_name):
    op = getattr(torch.ops.wkd, op_name)
    a, b, cost = problem(3, 5, 4, F64)
    k = wk.gibbs_kernel(cost, 0.1)
    with pytest.raises(ValueError, match="`K` must be"):
        op(a, b, k.K[None], k.KC, 2)
    with pytest.raises(ValueError, match="`KC` must have the shape"):
        op(a, b, k.K, k.KC[:, :3], 2)
    with pytest.raises(TypeError, match="`KC` has dtype"):
        op(a, b, k.K, k.KC.float(), 2)
    with pytest.raises(ValueError, match="`cost` must be"):  # K checked as the shared cost
        op(a, b, k.K[:, :3], k.KC[:, :3], 2)
    with pytest.raises(ValueError, match="`num_iters`"):
        op(a, b, k.K, k.KC, 0)


@pytest.mark.skipif(not wk.HAS_C_EXT, reason="the C++ CPU kernel checks K's values")
def test_cpu_op_checks_k_values():
    a, b, cost = problem(3, 5, 4, F64)
    k = wk.gibbs_kernel(cost, 0.1)
    dead = k.K.clone()
    dead[2] = 0
    with pytest.raises(ValueError, match="`K` has a row or a column that is entirely 0"):
        torch.ops.wkd.sinkhorn_gibbs(a, b, dead, k.KC, 2)
    bad = k.K.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="`K` contains non-finite or negative values"):
        torch.ops.wkd.sinkhorn_gibbs(a, b, bad, k.KC, 2)
    with pytest.raises(ValueError, match="`a` must be non-negative"):
        torch.ops.wkd.sinkhorn_gibbs(-a, b, k.K, k.KC, 2)


def test_wrapper_and_builder_errors():
    a, b, cost = problem(3, 5, 4, F64)
    k = wk.gibbs_kernel(cost, 0.1)
    with pytest.raises(ValueError, match="`kernel` was computed with reg = 0.1"):
        wk.sinkhorn(a, b, cost, 0.2, 3, kernel=k)
    with pytest.raises(ValueError, match="`kernel` .* does not match `cost`"):
        wk.sinkhorn(a.float(), b.float(), cost.float(), 0.1, 3, kernel=k)
    with pytest.raises(TypeError, match="`kernel` must be a GibbsKernel"):
        wk.sinkhorn(a, b, cost, 0.1, 3, kernel=(k.K, k.KC))
    far = cost.clone()
    far[:, 0] = 800.0  # column 0 of K underflows to 0 in float64 with reg 1
    with pytest.raises(ValueError, match="K = exp\\(-cost / reg\\) underflows"):
        wk.gibbs_kernel(far, 1.0)
    with pytest.raises(ValueError, match="`cost` contains non-finite"):
        wk.gibbs_kernel(torch.full((3, 3), float("nan")), 1.0)
    with pytest.raises(ValueError, match="`reg` must be a finite number > 0"):
        wk.gibbs_kernel(cost, 0.0)
    with pytest.raises(ValueError, match="`cost` must be a shared"):
        wk.gibbs_kernel(cost[None], 0.1)


# ------------------------------------------------------------------------------------------- WKDLogitLoss cache
def logits(B=6, C=12, dtype=F32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, C, generator=g, dtype=dtype), 3 * torch.randn(B, C, generator=g, dtype=dtype),
            torch.randint(0, C, (B,), generator=g))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [F32, F64])
def test_loss_cached_equals_uncached(backend, dtype):
    s, t, y = logits(dtype=dtype)
    cost = rand_cost(12, 12, dtype=dtype)
    loss = wk.WKDLogitLoss(cost, 2.0, 30.0, backend=backend)
    x0, x1 = s.clone().requires_grad_(), s.clone().requires_grad_()
    l0 = wk.wkd_logit_loss(x0, t, y, cost, 2.0, 30.0, backend=backend)  # the functional form: no cache
    l1 = loss(x1, t, y)
    assert loss.gibbs_cache is not None
    l0.backward()
    l1.backward()
    assert torch.equal(l0, l1) and torch.equal(x0.grad, x1.grad)


def fresh_value(loss, s, t, y):
    """The loss computed with a kernel built now from its current buffer (a copy with an empty cache)."""
    ref = copy.deepcopy(loss)
    ref.gibbs_cache = None
    return ref(s, t, y)


def test_loss_cache_built_once_and_invalidated():
    s, t, y = logits()
    loss = wk.WKDLogitLoss(rand_cost(12, 12, dtype=F32), 2.0, 30.0, backend="torch")
    first = loss(s, t, y)
    kernel = loss.gibbs_cache[1]
    assert torch.equal(loss(s, t, y), first) and loss.gibbs_cache[1] is kernel  # reused
    assert list(loss.state_dict()) == []  # neither the cost (non-persistent) nor the cache
    with torch.no_grad():
        loss.cost.mul_(2.0)  # in place: a new version of the same storage
    changed = loss(s, t, y)
    assert loss.gibbs_cache[1] is not kernel
    assert torch.equal(changed, fresh_value(loss, s, t, y)) and not torch.equal(changed, first)
    kernel = loss.gibbs_cache[1]
    loss.reg = 0.1  # a new reg
    assert torch.equal(loss(s, t, y), fresh_value(loss, s, t, y))
    assert loss.gibbs_cache[1] is not kernel and loss.gibbs_cache[1].reg == 0.1
    loss.to(F64)  # a new buffer in a new dtype
    s64, t64 = s.double(), t.double()
    out64 = loss(s64, t64, y)
    assert loss.gibbs_cache[1].K.dtype == F64 and out64.dtype == F64
    assert torch.equal(out64, fresh_value(loss, s64, t64, y))
    a64 = torch.softmax((s64 / 2).scatter(1, y[:, None], float("-inf")), 1)
    b64 = torch.softmax((t64 / 2).scatter(1, y[:, None], float("-inf")), 1)
    wd = sinkhorn_reference(a64, b64, loss.cost, 0.1, 10, 1e-8)[0]
    lt = wk.losses.logit.target_term(torch.log_softmax(s64, 1), torch.softmax(t64, 1), y)
    assert_close(out64, lt + 30.0 * wd.mean(), TOL[F64][0])


def test_loss_cache_follows_the_compute_dtype():
    s, t, y = logits(dtype=F32)
    loss = wk.WKDLogitLoss(rand_cost(12, 12, dtype=F64), 2.0, 30.0, backend="torch")
    loss(s, t, y)
    assert loss.gibbs_cache[1].K.dtype == F32  # float64 cost, float32 logits: the kernel of the float32 cost
    loss(s.double(), t.double(), y)
    assert loss.gibbs_cache[1].K.dtype == F64


def test_loss_under_torch_compile_matches():
    s, t, y = logits()
    loss = wk.WKDLogitLoss(rand_cost(12, 12, dtype=F32), 2.0, 30.0, backend="torch")
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    x0, x1 = s.clone().requires_grad_(), s.clone().requires_grad_()
    l0, l1 = loss(x0, t, y), compiled(x1, t, y)
    l0.backward()
    l1.backward()
    assert_close(l1, l0, 1e-6)
    assert_close(x1.grad, x0.grad, 1e-5, scale=x0.grad.abs().max())


# ------------------------------------------------------------- the torch backend's value checks (one host read)
def _bad(kind):
    a, b, cost = problem(3, 6, 5, F64, zeros=0)
    reg, log_domain = 0.1, False
    if kind == "a nan":
        a[1, 2] = float("nan")
    elif kind == "b negative":
        b[0, 1] = -0.1
    elif kind == "a empty row":
        a[2] = 0
    elif kind == "b inf":
        b[1, 1] = float("inf")
    elif kind == "cost inf":
        cost[0, 0] = float("inf")
    elif kind == "cost negative":
        cost[1, 1] = -1e-3
    elif kind == "K dead column":
        cost[:, 3] = 80.0  # exp(-800) underflows in float64
    elif kind == "K dead row":
        cost[4] = 80.0
    elif kind == "L overflows":
        cost[2] = 1e10  # -1e10 / 1e-300 overflows to -inf in float64
        reg, log_domain = 1e-300, True
    return a, b, cost, reg, log_domain


BAD = {"a nan": "`a` contains non-finite", "b negative": "`b` must be non-negative",
       "a empty row": "every row of `a` needs positive mass", "b inf": "`b` contains non-finite",
       "cost inf": "`cost` contains non-finite", "cost negative": "`cost` must be non-negative",
       "K dead column": "K = exp\\(-cost / reg\\) underflows", "K dead row": "K = exp\\(-cost / reg\\) underflows",
       "L overflows": "-cost / reg overflows to -inf"}


@pytest.mark.parametrize("kind", list(BAD))
def test_torch_backend_value_checks_name_the_problem(kind):
    a, b, cost, reg, log_domain = _bad(kind)
    with pytest.raises(ValueError, match=BAD[kind]):
        wk.sinkhorn(a, b, cost, reg, 3, backend="torch", log_domain=log_domain)


def test_torch_backend_value_checks_pass_valid_extremes():
    """Huge finite costs whose K has a live entry in every row and column, a K entry just above underflow, one-hot
    marginals: no false alarm."""
    a, b, cost = problem(3, 6, 5, F64, zeros=0)
    cost = cost * 1e300
    cost.fill_diagonal_(0.0)
    cost[5] = 0.0
    cost[:, 4] = 0.0
    wk.sinkhorn(a, b, cost, 0.1, 2, backend="torch", log_domain=True)
    a1, _, edge = problem(3, 6, 5, F64, zeros=0)
    a1[:, 5] = 0  # a one-hot-like zero-mass row whose K row is subnormal
    a1 = a1 / a1.sum(1, keepdim=True)
    edge[5] = 74.4  # exp(-744) is a float64 subnormal > 0: the row is live
    r = wk.sinkhorn(a1, b, edge, 0.1, 2, backend="torch", check_values=True)
    assert torch.isfinite(r.value).all()
