"""Sinkhorn over a shared sparse cost (wk.sparse_sinkhorn), the k-NN cost (wk.knn_kernel) and the vocabulary loss
(wk.VocabOTLoss): values and both gradients against a dense float64 Sinkhorn written here (the sparse kernel
densified, excluded couplings K = 0), POT, the dense op, gradcheck, chunking and padding invariance, bad input."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import wkd_kernels as wk
from wkd_kernels.reference import sinkhorn_reference

D = torch.float64
REPO = Path(__file__).resolve().parents[1]


def _problem(B=3, C=9, density=0.5, seed=0, dtype=D, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(C, C, generator=g, dtype=D) * scale
    cost = 0.5 * (cost + cost.t())
    cost.fill_diagonal_(0.0)
    mask = torch.rand(C, C, generator=g) < density
    mask = mask | mask.t() | torch.eye(C, dtype=torch.bool)
    a = torch.softmax(torch.randn(B, C, generator=g, dtype=D) * 2, 1)
    b = torch.softmax(torch.randn(B, C, generator=g, dtype=D) * 2, 1)
    a[0, 1] = 0.0  # a zero mass removes its entry
    b[1, 2] = 0.0
    a, b = a / a.sum(1, keepdim=True), b / b.sum(1, keepdim=True)
    return a.to(dtype), b.to(dtype), cost.to(dtype), mask


def _dense_reference(a, b, cost, mask, reg, num_iters, eps=0.0):
    """Plain dense Sinkhorn in float64 with autograd: K = exp(-cost/reg) on the mask, 0 elsewhere."""
    a, b, cost = a.double(), b.double(), cost.double()
    K = torch.exp(-cost / reg) * mask
    supp = a > 0
    u = torch.where(supp, 1.0 / supp.sum(1, keepdim=True), torch.zeros_like(a))
    for _ in range(num_iters):
        v = b / (u @ K + eps)
        u = a / (v @ K.t() + eps)
    return (u * (v @ (K * cost).t())).sum(1)


def _gauge_reference(a, b, cost, mask, reg, num_iters, eps=0.0):
    """The package's float64 reference (gauge-corrected autograd), excluded couplings as a cost of 1e4 (K = 0 in
    float64, K * cost = 0)."""
    return sinkhorn_reference(a, b, torch.where(mask, cost, torch.full_like(cost, 1e4)), reg, num_iters, eps)[0]


def _grads(fn, a, b, weights):
    a = a.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_()
    value = fn(a, b)
    ga, gb = torch.autograd.grad((value * weights).sum(), (a, b))
    return value.detach(), ga, gb


def _close(x, y, rtol, atol=0.0):
    torch.testing.assert_close(x.detach().cpu().double(), y.detach().cpu().double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("log_domain", [False, True])
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_value_and_exact_gradients_match_dense_reference(log_domain, eps):
    a, b, cost, mask = _problem()
    w = torch.tensor([0.3, -1.2, 0.7], dtype=D)
    csr = wk.csr_from_dense(cost, mask)
    ref = _grads(lambda x, y: _dense_reference(x, y, cost, mask, 0.25, 6, eps), a, b, w)
    if eps > 0:  # plain autograd leaves a rounding residual in the adjoint (docs/design.md section 3)
        ref = _grads(lambda x, y: _gauge_reference(x, y, cost, mask, 0.25, 6, eps), a, b, w)
    got = _grads(lambda x, y: wk.sparse_sinkhorn(x, y, csr, 0.25, 6, eps=eps, log_domain=log_domain).value, a, b, w)
    for r, g in zip(ref, got, strict=True):
        _close(g, r, rtol=1e-10, atol=1e-12)


def test_float32_small_reg_log_domain_matches_float64():
    # reg 1e-3 with costs up to 0.2: K spans exp(-200), below float32's range; the log domain keeps it exact
    a, b, cost, mask = _problem(scale=0.2, seed=3)
    w = torch.ones(3, dtype=D)
    csr32 = wk.csr_from_dense(cost.float(), mask)
    ref = _grads(lambda x, y: _dense_reference(x, y, cost, mask, 1e-3, 10), a, b, w)
    res = wk.sparse_sinkhorn(a.float(), b.float(), csr32, 1e-3, 10)
    assert res.log_domain  # "auto" chose it
    got = _grads(lambda x, y: wk.sparse_sinkhorn(x, y, csr32, 1e-3, 10).value, a.float(), b.float(), w.float())
    assert all(bool(torch.isfinite(t).all()) for t in got)
    _close(got[0], ref[0], rtol=1e-4)
    scale = ref[1].abs().max()
    _close(got[1], ref[1], rtol=0, atol=2e-3 * scale)


def test_scaling_domain_underflow_is_an_error_not_nan():
    a, b, cost, mask = _problem(scale=1.0, seed=4)
    # entries far from the diagonal underflow to 0 in float32; a column with only such entries cannot carry mass
    cost = cost.float() + 200.0 * (1 - torch.eye(9))
    csr = wk.csr_from_dense(cost, mask)
    with pytest.raises(ValueError, match="log_domain"):
        wk.sparse_sinkhorn(a.float().roll(1, 1), b.float(), csr, 1.0, 5, log_domain=False)


def test_full_pattern_equals_dense_op_both_gradients():
    a, b, cost, _ = _problem(C=7, seed=1)
    csr = wk.csr_from_dense(cost)
    w = torch.tensor([1.0, 2.0, -0.5], dtype=D)
    for grad in ("exact", "envelope"):
        ref = _grads(lambda x, y, grad=grad: wk.sinkhorn(x, y, cost, 0.05, 8, grad=grad, backend="torch").value,
                     a, b, w)
        got = _grads(lambda x, y, grad=grad: wk.sparse_sinkhorn(x, y, csr, 0.05, 8, grad=grad).value, a, b, w)
        for r, g in zip(ref, got, strict=True):
            _close(g, r, rtol=1e-10, atol=1e-13)


def test_matches_pot():
    ot = pytest.importorskip("ot")
    a, b, cost, _ = _problem(C=8, seed=2)
    res = wk.sparse_sinkhorn(a, b, wk.csr_from_dense(cost), 0.1, 20).value
    for i in range(a.shape[0]):
        ia, ib = a[i] > 0, b[i] > 0  # POT on the reduced problem
        want = ot.sinkhorn2(a[i][ia].numpy(), b[i][ib].numpy(), cost[ia][:, ib].numpy(), 0.1, numItermax=20,
                            stopThr=0.0)
        assert math.isclose(float(res[i]), float(want), rel_tol=1e-10)


@pytest.mark.parametrize("log_domain", [False, True])
def test_gradcheck_float64(log_domain):
    a, b, cost, mask = _problem(B=2, C=5, seed=5)
    csr = wk.csr_from_dense(cost, mask)
    # away from the boundary of the simplex (a finite difference must not make a mass negative)
    a = (a + 0.05) / (a + 0.05).sum(1, keepdim=True)
    b = (b + 0.05) / (b + 0.05).sum(1, keepdim=True)
    fn = lambda x, y: wk.sparse_sinkhorn(x, y, csr, 0.2, 4, eps=1e-3, log_domain=log_domain).value  # noqa: E731
    assert torch.autograd.gradcheck(fn, (a.requires_grad_(), b.clone().requires_grad_()), eps=1e-6, atol=1e-7)
    fn = lambda x, y: wk.sparse_sinkhorn(x, y, csr, 0.2, 4, log_domain=log_domain, divergence=True).value  # noqa
    assert torch.autograd.gradcheck(fn, (a, b.clone().requires_grad_()), eps=1e-6, atol=1e-7)


def test_divergence_definition_zero_at_equal_and_nonnegative():
    a, b, cost, mask = _problem(C=10, seed=6, density=0.6)
    csr = wk.csr_from_dense(cost, mask)
    w = torch.ones(3, dtype=D)

    def ref(x, y):
        return (_dense_reference(x, y, cost, mask, 0.1, 50) - 0.5 * _dense_reference(x, x, cost, mask, 0.1, 50)
                - 0.5 * _dense_reference(y, y, cost, mask, 0.1, 50))

    want = _grads(ref, a, b, w)
    got = _grads(lambda x, y: wk.sparse_sinkhorn(x, y, csr, 0.1, 50, divergence=True).value, a, b, w)
    for r, g in zip(want, got, strict=True):
        _close(g, r, rtol=1e-9, atol=1e-12)
    assert bool((got[0] > 0).all())
    same = wk.sparse_sinkhorn(a, a, csr, 0.1, 50, divergence=True).value
    assert float(same.abs().max()) <= 1e-12
    # converged (50 iterations), random pairs on a kNN cost: non-negative
    g = torch.Generator().manual_seed(7)
    knn = wk.knn_kernel(torch.randn(40, 6, generator=g, dtype=D), 5)
    p = torch.softmax(torch.randn(16, 40, generator=g, dtype=D) * 3, 1)
    q = torch.softmax(torch.randn(16, 40, generator=g, dtype=D) * 3, 1)
    assert bool((wk.sparse_sinkhorn(p, q, knn, 0.05, 50, divergence=True).value >= 0).all())


def _brute_knn(e, k, kind):
    if kind == "cosine":
        x = F.normalize(e, dim=1)
        d = (1 - x @ x.t()).clamp_min(0)
    else:
        d = torch.cdist(e, e) ** 2
    d.fill_diagonal_(-1)
    return d.clamp_min(0), torch.topk(d, k + 1, dim=1, largest=False).indices


@pytest.mark.parametrize("kind", ["cosine", "sqeuclidean"])
def test_knn_kernel_symmetric_and_contains_neighbours(kind):
    e = torch.randn(30, 4, dtype=D, generator=torch.Generator().manual_seed(8))
    K = wk.knn_kernel(e, 4, kind, block_rows=7)
    assert K.layout == torch.sparse_csr and K.shape == (30, 30)
    dense_mask = torch.zeros(30, 30, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(30), K.crow_indices()[1:] - K.crow_indices()[:-1])
    dense_mask[rows, K.col_indices()] = True
    values = torch.zeros(30, 30, dtype=D)
    values[rows, K.col_indices()] = K.values()
    d, nb = _brute_knn(e, 4, kind)
    want = torch.zeros(30, 30, dtype=torch.bool)
    want[torch.arange(30).repeat_interleave(5), nb.reshape(-1)] = True
    want |= want.t().clone()
    assert torch.equal(dense_mask, want)
    assert bool(dense_mask.diagonal().all()) and float(values.diagonal().abs().max()) == 0.0
    _close(values, torch.where(want, d, torch.zeros_like(d)).fill_diagonal_(0), rtol=1e-12, atol=1e-12)
    K2 = wk.knn_kernel(e, 4, kind, block_rows=30)
    assert torch.equal(K2.col_indices(), K.col_indices())


def test_sparse_cost_prepared_once_equals_per_call():
    a, b, cost, mask = _problem(seed=9)
    csr = wk.csr_from_dense(cost, mask)
    prepared = wk.sparse_cost(csr, 0.1)
    _close(wk.sparse_sinkhorn(a, b, prepared, 0.1, 5).value, wk.sparse_sinkhorn(a, b, csr, 0.1, 5).value, 0)
    with pytest.raises(ValueError, match="reg"):
        wk.sparse_sinkhorn(a, b, prepared, 0.2, 5)


def test_log_domain_chunking_invariant():
    a, b, cost, mask = _problem(B=5, seed=10)
    csr = wk.csr_from_dense(cost, mask)
    w = torch.arange(5, dtype=D)
    ref = _grads(lambda x, y: wk.sparse_sinkhorn(x, y, csr, 0.1, 5, log_domain=True).value, a, b, w)
    got = _grads(lambda x, y: wk.sparse_sinkhorn(x, y, csr, 0.1, 5, log_domain=True, chunk_elements=1).value,
                 a, b, w)
    for r, g in zip(ref, got, strict=True):
        _close(g, r, rtol=1e-13, atol=1e-15)


# ------------------------------------------------------------------------------------------------------------------
# The vocabulary loss
# ------------------------------------------------------------------------------------------------------------------
def _vocab_setup(V=24, seed=11, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(V, 8, generator=g)
    cost = wk.knn_kernel(emb, 4).to(dtype)
    s = torch.randn(2, 5, V, generator=g, dtype=dtype)
    t = torch.randn(2, 5, V, generator=g, dtype=dtype)
    labels = torch.randint(0, V, (2, 5), generator=g)
    labels[0, 3:] = -100
    return cost, s, t, labels


def _reference_loss(s, t, cost, labels, reg, iters, tau, divergence, grad):
    keep = (labels != -100).reshape(-1)
    V = s.shape[-1]
    p = torch.softmax(s.reshape(-1, V)[keep] / tau, 1)
    q = torch.softmax(t.reshape(-1, V)[keep] / tau, 1)
    return wk.sparse_sinkhorn(p, q, cost, reg, iters, grad=grad, divergence=divergence).value.mean()


@pytest.mark.parametrize("grad", ["envelope", "exact"])
def test_vocab_loss_chunking_and_padding(grad):
    cost, s, t, labels = _vocab_setup(dtype=D)
    want = None
    for chunk in (1, 3, 100):
        loss = wk.VocabOTLoss(cost, reg=0.05, num_iters=7, temperature=2.0, grad=grad, chunk_size=chunk)
        x = s.clone().requires_grad_()
        val = loss(x, t, labels)
        (gs,) = torch.autograd.grad(val * 1.5, x)
        if want is None:
            xr = s.clone().requires_grad_()
            ref = _reference_loss(xr, t, cost, labels, 0.05, 7, 2.0, True, grad)
            (gr,) = torch.autograd.grad(ref * 1.5, xr)
            want = (ref.detach(), gr)
        _close(val.detach(), want[0], rtol=1e-12)
        _close(gs, want[1], rtol=1e-10, atol=1e-14)
        assert float(gs[0, 3:].abs().max()) == 0.0  # padding tokens contribute nothing
    # padding tokens may hold anything, NaN included
    s2 = s.clone()
    s2[0, 3:] = float("nan")
    _close(wk.VocabOTLoss(cost, reg=0.05, num_iters=7, temperature=2.0, grad=grad)(s2, t, labels), want[0], 1e-12)
    mask = labels != -100
    _close(wk.VocabOTLoss(cost, reg=0.05, num_iters=7, temperature=2.0, grad=grad)(s2, t, mask=mask), want[0], 1e-12)


def test_vocab_loss_fused_lm_head_equals_logits():
    cost, _, t, labels = _vocab_setup(dtype=D)
    g = torch.Generator().manual_seed(12)
    h = torch.randn(2, 5, 6, generator=g, dtype=D, requires_grad=True)
    W = torch.randn(24, 6, generator=g, dtype=D, requires_grad=True)
    bias = torch.randn(24, generator=g, dtype=D, requires_grad=True)
    loss = wk.VocabOTLoss(cost, reg=0.05, num_iters=5, chunk_size=3, grad="exact")
    ref = loss(F.linear(h, W, bias), t, labels)
    want = torch.autograd.grad(ref, (h, W, bias))
    got_val = loss.forward_hidden(h, W, t, labels, lm_head_bias=bias)
    got = torch.autograd.grad(got_val, (h, W, bias))
    _close(got_val.detach(), ref.detach(), rtol=1e-12)
    for r, x in zip(want, got, strict=True):
        _close(x, r, rtol=1e-10, atol=1e-14)


def test_vocab_loss_defaults_small_reg_float32_and_embedding_cost():
    cost, s, t, labels = _vocab_setup()
    x = s.clone().requires_grad_()
    val = wk.VocabOTLoss(cost)(x, t, labels)  # reg 1e-3: the log domain
    val.backward()
    assert bool(torch.isfinite(val)) and bool(torch.isfinite(x.grad).all()) and float(val) > 0
    e = torch.randn(24, 8, generator=torch.Generator().manual_seed(15))
    dense = wk.VocabOTLoss(wk.embedding_cost(e, 0.1), reg=0.1)(s, t, labels)
    implicit = wk.VocabOTLoss(wk.embedding_cost(e, 0.1, max_kernel_bytes=0, tile_rows=5), reg=0.1)(s, t, labels)
    _close(implicit, dense, rtol=1e-5)


def test_vocab_loss_no_kept_token_is_zero_with_zero_gradient():
    cost, s, t, labels = _vocab_setup()
    x = s.clone().requires_grad_()
    val = wk.VocabOTLoss(cost)(x, t, torch.full_like(labels, -100))
    val.backward()
    assert float(val) == 0.0 and float(x.grad.abs().max()) == 0.0


# ------------------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument
# ------------------------------------------------------------------------------------------------------------------
def test_bad_input_errors():
    a, b, cost, mask = _problem(C=6, seed=13)
    csr = wk.csr_from_dense(cost, mask)
    with pytest.raises(TypeError, match="`cost` must be a sparse CSR"):
        wk.sparse_sinkhorn(a, b, cost, 0.1, 3)
    rect = torch.sparse_csr_tensor(torch.tensor([0, 1, 2]), torch.tensor([0, 1]), torch.tensor([0.0, 0.0], dtype=D),
                                   (2, 3))
    with pytest.raises(ValueError, match="`cost` must be square"):
        wk.sparse_sinkhorn(a[:, :2], b[:, :2], rect, 0.1, 3)
    neg = wk.csr_from_dense(cost - 0.5, mask)
    with pytest.raises(ValueError, match="`cost` must be non-negative"):
        wk.sparse_sinkhorn(a, b, neg, 0.1, 3)
    no_row = mask.clone()
    no_row[2] = False
    with pytest.raises(ValueError, match="empty row"):
        wk.sparse_sinkhorn(a, b, wk.csr_from_dense(cost, no_row), 0.1, 3)
    with pytest.raises(ValueError, match="`a` has 5 classes"):
        wk.sparse_sinkhorn(a[:, :5], b, csr, 0.1, 3)
    with pytest.raises(ValueError, match="`b` contains non-finite"):
        wk.sparse_sinkhorn(a, b.clone().fill_(float("nan")), csr, 0.1, 3)
    with pytest.raises(ValueError, match="`a` must be non-negative"):
        wk.sparse_sinkhorn(-a, b, csr, 0.1, 3)
    with pytest.raises(ValueError, match="`reg`"):
        wk.sparse_sinkhorn(a, b, csr, 0.0, 3)
    with pytest.raises(ValueError, match="`num_iters`"):
        wk.sparse_sinkhorn(a, b, csr, 0.1, 0)
    with pytest.raises(ValueError, match="`grad`"):
        wk.sparse_sinkhorn(a, b, csr, 0.1, 3, grad="autograd")
    with pytest.raises(ValueError, match="`k`"):
        wk.knn_kernel(torch.randn(5, 3), 5)
    with pytest.raises(ValueError, match="`cost` must be 'cosine'"):
        wk.knn_kernel(torch.randn(5, 3), 2, "l1")
    cost_v, s, t, labels = _vocab_setup()
    loss = wk.VocabOTLoss(cost_v)
    with pytest.raises(ValueError, match="`student_logits` has 23 classes"):
        loss(s[..., :23], t[..., :23], labels)
    bad = s.clone()
    bad[1, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="`student_logits` contains non-finite"):
        loss(bad, t, labels)
    with pytest.raises(ValueError, match="`labels` must have the leading shape"):
        loss(s, t, labels[:, :3])
    with pytest.raises(TypeError, match="`cost` must be a sparse CSR"):
        wk.VocabOTLoss(torch.rand(4, 4))


def test_no_history_without_gradient():
    a, b, cost, mask = _problem(seed=16)
    csr = wk.csr_from_dense(cost, mask)
    with torch.no_grad():
        r = wk.sparse_sinkhorn(a.requires_grad_(), b, csr, 0.1, 5)
    assert r.value.grad_fn is None
    _close(r.value, wk.sparse_sinkhorn(a.detach(), b, csr, 0.1, 5, grad="envelope").value, rtol=0)


@pytest.mark.parametrize("grad", ["exact", "envelope"])
def test_double_backward_is_a_clear_error(grad):
    """Differentiating the gradient of sparse_sinkhorn (create_graph=True) raises the op's clear error rather than a
    silently missing second-order term or an unrelated autograd error."""
    g = torch.Generator().manual_seed(3)
    C = 6
    d = torch.rand(C, C, generator=g, dtype=torch.float64)
    cost = wk.csr_from_dense((d + d.T) / 2)
    a = torch.softmax(torch.randn(2, C, generator=g, dtype=torch.float64), 1).requires_grad_()
    b = torch.softmax(torch.randn(2, C, generator=g, dtype=torch.float64), 1)
    (ga,) = torch.autograd.grad(wk.sparse_sinkhorn(a, b, cost, 0.1, 10, grad=grad).value.sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="wkd.sparse_sinkhorn: double backward"):
        torch.autograd.grad(ga.sum(), a)


# ------------------------------------------------------------------------------------------------------------------
# The registered ops (wkd::sparse_sinkhorn: C++ on CPU; wkd::sparse_sinkhorn_torch: ATen, every device type), both
# backends of wk.sparse_sinkhorn
# ------------------------------------------------------------------------------------------------------------------
SPARSE_BACKENDS = ["torch", "cpu"]


@pytest.fixture(params=SPARSE_BACKENDS)
def sparse_backend(request):
    if request.param == "cpu" and not wk.HAS_C_EXT:
        pytest.skip("no compiled extension")
    return request.param


def _ops(backend):
    if backend == "cpu":
        return torch.ops.wkd.sparse_sinkhorn.default, torch.ops.wkd.sparse_sinkhorn_backward.default
    return torch.ops.wkd.sparse_sinkhorn_torch.default, torch.ops.wkd.sparse_sinkhorn_torch_backward.default


def test_cpu_kernel_is_registered_and_the_auto_rule():
    if not wk.HAS_C_EXT:
        pytest.skip("no compiled extension")
    for name in ("wkd::sparse_sinkhorn", "wkd::sparse_sinkhorn_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
    for name in ("wkd::sparse_sinkhorn_torch", "wkd::sparse_sinkhorn_torch_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd"), name
    # "auto": ATen with both gradients (measured faster than the C++ kernel); bit-equal to the chosen backend
    a, b, cost, mask = _problem(B=20, seed=21)
    csr = wk.csr_from_dense(cost, mask)
    w = torch.rand(20, dtype=D)
    for grad, want in (("exact", "torch"), ("envelope", "torch")):
        got = _grads(lambda x, y, grad=grad: wk.sparse_sinkhorn(x, y, csr, 0.2, 5, log_domain=False,
                                                                grad=grad).value, a, b, w)
        ref = _grads(lambda x, y, grad=grad, want=want: wk.sparse_sinkhorn(x, y, csr, 0.2, 5, log_domain=False,
                                                                           grad=grad, backend=want).value, a, b, w)
        for x, r in zip(got, ref, strict=True):
            assert torch.equal(x, r), grad
    with torch.no_grad():  # no gradient: no history, the forward alone: ATen
        _close(wk.sparse_sinkhorn(a, b, csr, 0.2, 5, log_domain=False).value,
               wk.sparse_sinkhorn(a, b, csr, 0.2, 5, log_domain=False, backend="torch").value, rtol=0)


@pytest.mark.parametrize("log_domain", [False, True])
def test_exact_gradient_in_forward_row_chunks_equal_the_ops_autograd(sparse_backend, log_domain, monkeypatch):
    """The public function computes the exact gradient in the forward, a chunk of rows at a time, and scales it by
    the upstream gradient in the backward: with chunks of 1, 2 and 7 rows (and one chunk), values, log-scalings and
    both gradients under a non-uniform upstream gradient equal the registered op's own autograd (the whole history
    kept until the backward) to rounding; a gradient w.r.t. one input only; the divergence (3B rows) too."""
    from wkd_kernels.ops import sparse_sinkhorn as mod

    a, b, cost, mask = _problem(B=9, C=11, seed=23, density=0.4)
    w = torch.randn(9, generator=torch.Generator().manual_seed(2), dtype=D)
    csr = wk.csr_from_dense(cost, mask)
    K = wk.sparse_cost(csr, 0.25)
    op = _ops(sparse_backend)[0]

    def by_op(x, y):
        return op(x.t(), y.t(), *K.arrays, 0.25, 6, 1e-3, log_domain, True, None)

    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    value, lu, lv, *_ = by_op(x, y)
    want = (value.detach(), lu.t(), lv.t()) + torch.autograd.grad((value * w).sum(), (x, y))
    C = a.shape[1]
    for rows in (1, 2, 7, 9):
        monkeypatch.setattr(mod, "ROW_CHUNK_ELEMENTS", (2 * 6 + mod.SWEEP_VECTORS_PER_ROW) * C * rows)
        assert mod.rows_per_chunk(6, C) == rows
        x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
        r = wk.sparse_sinkhorn(x, y, K, 0.25, 6, eps=1e-3, log_domain=log_domain, backend=sparse_backend)
        assert r.value.grad_fn is not None and r.log_u.grad_fn is None
        got = (r.value.detach(), r.log_u, r.log_v) + torch.autograd.grad((r.value * w).sum(), (x, y))
        for name, g, ref in zip(("value", "log_u", "log_v", "grad_a", "grad_b"), got, want, strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-13, atol=1e-15, msg=f"{name}, {rows} rows per chunk")
        x = a.clone().requires_grad_()  # only a needs a gradient
        (ga,) = torch.autograd.grad((wk.sparse_sinkhorn(x, b, K, 0.25, 6, eps=1e-3, log_domain=log_domain,
                                                        backend=sparse_backend).value * w).sum(), x)
        torch.testing.assert_close(ga, want[3], rtol=1e-13, atol=1e-15)
    monkeypatch.setattr(mod, "ROW_CHUNK_ELEMENTS", (2 * 6 + mod.SWEEP_VECTORS_PER_ROW) * C * 4)
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    got = torch.autograd.grad((wk.sparse_sinkhorn(x, y, K, 0.25, 6, eps=1e-3, log_domain=log_domain,
                                                  backend=sparse_backend, divergence=True).value * w).sum(), (x, y))
    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
    xx, yy = torch.cat([x, x, y]), torch.cat([y, x, y])
    v3 = by_op(xx, yy)[0]
    div = v3[:9] - 0.5 * (v3[9:18] + v3[18:])
    want = torch.autograd.grad((div * w).sum(), (x, y))
    for g, ref in zip(got, want, strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("log_domain", [False, True])
@pytest.mark.parametrize("eps", [0.0, 1e-3])
@pytest.mark.parametrize("grad", ["exact", "envelope"])
def test_backends_match_float64_dense_reference(sparse_backend, log_domain, eps, grad):
    """Values and gradients of both backends against the float64 dense references (exact: the gauge-corrected
    reverse sweep; envelope: the centred potentials of the dense op), B = 37 rows: two full blocks of the C++
    kernel and a partial one, zero masses included."""
    a, b, cost, mask = _problem(B=37, C=11, seed=22, density=0.4)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(37, generator=g, dtype=D)
    csr = wk.csr_from_dense(cost, mask)
    got = _grads(lambda x, y: wk.sparse_sinkhorn(x, y, csr, 0.25, 6, eps=eps, grad=grad, log_domain=log_domain,
                                                 backend=sparse_backend).value, a, b, w)
    if grad == "exact":
        ref = _grads(lambda x, y: _gauge_reference(x, y, cost, mask, 0.25, 6, eps), a, b, w)
    else:
        dense = torch.where(mask, cost, torch.full_like(cost, 1e4))
        ref = _grads(lambda x, y: wk.sinkhorn(x, y, dense, 0.25, 6, eps=eps, grad="envelope",
                                              backend="torch").value, a, b, w)
    for r, x in zip(ref, got, strict=True):
        _close(x, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("grad", ["exact", "envelope"])
def test_float32_backends_against_float64(grad):
    """float32 on a k-NN cost, B = 50 (a partial block), non-contiguous masses, plain OT and divergence (3B rows):
    both backends' values within 1e-6 of the float64 result and of each other, gradients within 3e-5 of the largest
    entry (the float32 rounding of the reverse sweep, which sums in a different order in each backend: measured
    7e-6 (C++) and 1.2e-5 (ATen); the dense op's documented bound at reg >= 0.05 is 6e-5)."""
    if not wk.HAS_C_EXT:
        pytest.skip("no compiled extension")
    g = torch.Generator().manual_seed(23)
    V = 300
    knn = wk.knn_kernel(torch.randn(V, 16, generator=g), 6)
    knn64 = torch.sparse_csr_tensor(knn.crow_indices(), knn.col_indices(), knn.values().double(), knn.shape)
    p = torch.softmax(torch.randn(V, 50, generator=g) * 2, 0).t()  # a transposed view
    q = torch.softmax(torch.randn(50, V, generator=g) * 2, 1)
    w = torch.rand(50, generator=g)
    for div in (False, True):
        def run(be, K, x, y, div=div):
            return _grads(lambda s, t: wk.sparse_sinkhorn(s, t, K, 0.05, 10, grad=grad, divergence=div,
                                                          log_domain=False, backend=be).value, x, y, w.to(x.dtype))
        ref = run("torch", knn64, p.double(), q.double())
        got = {be: run(be, knn, p, q) for be in SPARSE_BACKENDS}
        _close(got["cpu"][0], got["torch"][0], rtol=1e-6)
        for res in got.values():
            _close(res[0], ref[0], rtol=1e-6)
            for x, r in zip(res[1:], ref[1:], strict=True):
                _close(x, r, rtol=0, atol=3e-5 * float(r.abs().max()))


def _op_args(dtype=D, B=5, C=9, seed=24, keep=True, log_domain=False, eps=0.0, T=3, int32=False):
    a, b, cost, mask = _problem(B=B, C=C, seed=seed, dtype=dtype)
    K = wk.sparse_cost(wk.csr_from_dense(cost, mask), 0.3)
    arrays = list(K.arrays)
    if int32:
        arrays = [t.to(torch.int32) if not t.is_floating_point() else t for t in arrays]
    return (a.t().contiguous(), b.t().contiguous(), *arrays, 0.3, T, eps, log_domain, keep)


def test_opcheck(sparse_backend):
    """Schema, fake kernel and autograd registration of both ops of the backend (opcheck), forward with and without
    history, both domains, int32 and int64 indices, and the backward op on the forward's history."""
    fwd, bwd = _ops(sparse_backend)
    for keep in (True, False):
        for log_domain in (False, True):
            for int32 in (False, True):
                args = _op_args(keep=keep, log_domain=log_domain, eps=1e-3 if log_domain else 0.0, int32=int32)
                torch.library.opcheck(fwd, args)
    for log_domain in (False, True):
        for eps in (None, 0.0, 1e-3):
            args = _op_args(log_domain=log_domain, eps=eps or 0.0)
            out = fwd(*args)
            g = torch.linspace(0.5, 1.5, args[0].shape[1], dtype=D)
            torch.library.opcheck(bwd, (g, *args[:8], *out[3:], 0.3, log_domain, eps))


@pytest.mark.parametrize("log_domain", [False, True])
def test_gradcheck_float64_both_backends(sparse_backend, log_domain):
    a, b, cost, mask = _problem(B=3, C=6, seed=25)
    csr = wk.sparse_cost(wk.csr_from_dense(cost, mask), 0.2)
    a = (a + 0.05) / (a + 0.05).sum(1, keepdim=True)
    b = (b + 0.05) / (b + 0.05).sum(1, keepdim=True)
    fn = lambda x, y: wk.sparse_sinkhorn(x, y, csr, 0.2, 4, eps=1e-3, log_domain=log_domain,  # noqa: E731
                                         backend=sparse_backend).value
    assert torch.autograd.gradcheck(fn, (a.requires_grad_(), b.requires_grad_()), eps=1e-6, atol=1e-7)


def test_torch_compile_fullgraph_with_backward(sparse_backend):
    """wk.sparse_sinkhorn under torch.compile(fullgraph=True) with a prepared cost (aot_eager): the op is one node,
    its fake kernel gives the shapes, its autograd the backward; equal to eager. (A raw CSR tensor, or
    log_domain="auto"/check_values on CPU, read values on the host and cannot be traced without a break.)"""
    torch._dynamo.reset()
    a, b, cost, mask = _problem(B=4, C=8, seed=26)
    K = wk.sparse_cost(wk.csr_from_dense(cost, mask), 0.2)

    def loss(logits, b):
        return wk.sparse_sinkhorn(torch.softmax(logits, 1), b, K, 0.2, 6, eps=1e-8, log_domain=False,
                                  check_values=False, backend=sparse_backend).value.mean()

    x = torch.randn(4, 8, dtype=D, generator=torch.Generator().manual_seed(0)).requires_grad_()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    l1 = compiled(x, b)
    (g1,) = torch.autograd.grad(l1, x)
    l2 = loss(x, b)
    (g2,) = torch.autograd.grad(l2, x)
    _close(l1, l2, rtol=1e-12)
    _close(g1, g2, rtol=1e-10, atol=1e-14)


def test_op_bad_input_names_the_argument(sparse_backend):
    fwd, bwd = _ops(sparse_backend)
    args = list(_op_args())
    err = (ValueError, TypeError, RuntimeError)

    def bad(i, value, match):
        a = list(args)
        a[i] = value
        with pytest.raises(err, match=match):
            fwd(*a)

    bad(0, args[0][:, :2], r"`b` must have the shape of `a`")
    bad(1, args[1].float(), r"`b` must have the dtype of `a`|`b` must have the shape of `a`")
    bad(2, args[2][:-1], r"`crow` must be an int32/int64 \[C \+ 1\]")
    bad(3, args[3].double(), r"`col` must be an int32/int64")
    bad(4, args[4][:-1], r"`cost` must be \[nnz\]")
    bad(7, args[7].float(), r"`cost_t` must have the dtype of `a`")
    bad(6, args[6][:-1], r"`col_t`|`cost_t` must be \[nnz\]")
    bad(8, 0.0, r"`reg` must be a positive finite number")
    bad(9, 0, r"`num_iters` must be >= 1")
    bad(10, -1.0, r"`eps` must be a finite number >= 0")
    out = fwd(*args)
    g = torch.ones(args[0].shape[1], dtype=D)
    with pytest.raises(err, match=r"`hist_r` must be the \[T, C, B\]"):
        bwd(g, *args[:8], out[3][:, :2], out[4], out[5], 0.3)
    with pytest.raises(err, match=r"`grad_value` must be a \[5\]"):
        bwd(g[:2], *args[:8], *out[3:], 0.3)
    with pytest.raises(err, match=r"`y` must be \[C, B\]"):
        bwd(g, *args[:8], out[3], out[4], out[5][:2], 0.3)
    with pytest.raises(ValueError, match=r"no CUDA C\+\+ kernel"):
        a, b, cost, mask = _problem()
        wk.sparse_sinkhorn(a, b, wk.csr_from_dense(cost, mask), 0.3, 2, backend="cuda")


# ------------------------------------------------------------------------------------------------------------------
# Peak memory of forward + backward (resident set of a fresh process), in [C, B] float32 buffers
# ------------------------------------------------------------------------------------------------------------------
_PEAK_SCRIPT = r'''
import gc, sys, torch, wkd_kernels as wk
torch.set_num_threads(1)
C, B, T = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
# a symmetric band cost: each class coupled to itself and its 8 nearest indices (mod C), cost 0.1 per step
offs = torch.tensor([0, 1, -1, 2, -2, 3, -3, 4, -4])
cols, order = ((torch.arange(C)[:, None] + offs) % C).sort(1)
vals = (offs.abs().float() * 0.1).expand(C, -1).gather(1, order)
csr = torch.sparse_csr_tensor(torch.arange(0, 9 * C + 1, 9), cols.reshape(-1), vals.reshape(-1), (C, C))
K = wk.sparse_cost(csr, 0.05)
g = torch.Generator().manual_seed(0)
p = torch.softmax(torch.randn(B, C, generator=g), 1).requires_grad_()
q = torch.softmax(torch.randn(B, C, generator=g), 1)
for case in sys.argv[4:]:
    grad, backend = case.split("/")
    def step():
        wk.sparse_sinkhorn(p, q, K, 0.05, T, grad=grad, log_domain=False, backend=backend).value.sum().backward()
        p.grad = None
    step()  # builds the prepared kernel's CSR matrices
    gc.collect()
    base = kib("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    step()
    print(case, (kib("VmHWM") - base) * 1024, flush=True)
'''


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_forward_backward_peak_memory():
    """Peak extra resident memory of one forward + backward w.r.t. p at C = 20,000, B = 512, 5 iterations, float32,
    in [C, B] buffers (41 MB), each case measured in turn in one fresh process. Envelope: the two scalings in the
    forward; one saved log-scaling, the gradient (kept by autograd without a copy) and a boolean mask in the
    backward: < 3 buffers (it was 6). Exact, both backends: the two log-scalings returned and the gradient, plus one
    chunk of rows (27 rows: its history and the sweep's vectors, 1.6 buffers): < 5.5 buffers, where the whole
    history alone is 10."""
    limits = {"envelope/torch": 3.0, "exact/torch": 5.5}
    if wk.HAS_C_EXT:
        limits["exact/cpu"] = 5.5
    C, B, T = 20000, 512, 5
    env = dict(os.environ, PYTHONPATH=str(REPO), MALLOC_MMAP_THRESHOLD_="65536")  # freed blocks leave the RSS
    proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(C), str(B), str(T), *limits],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks = {case: int(nbytes) / (C * B * 4) for case, nbytes in (line.split() for line in proc.stdout.splitlines())}
    assert peaks.keys() == limits.keys(), proc.stdout
    over = {case: f"{peaks[case]:.2f} >= {limit}" for case, limit in limits.items() if peaks[case] >= limit}
    assert not over, f"peak [C, B] buffers over the limit: {over} (all: {peaks})"
