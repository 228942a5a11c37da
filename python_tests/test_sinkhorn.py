"""torch.ops.wkd.sinkhorn on CPU: against POT, the float64 reference, autograd, opcheck, compile, bad input."""
import math

import pytest
import torch

import wkd_kernels as wk
from conftest import import_pot, load_cost_matrix, rand_cost, simplex
from wkd_kernels.reference import sinkhorn_reference

F64, F32 = torch.float64, torch.float32


def rel(x, y):
    return ((x.double() - y.double()).abs().max() / y.double().abs().max().clamp_min(1e-300)).item()


def pot_row(a, b, M, reg, k, log_domain):
    """POT on one row, restricted to the support (POT itself cannot take zero masses in `a`)."""
    sa, sb = a > 0, b > 0
    return import_pot().sinkhorn2(a[sa], b[sb], M[sa][:, sb], reg, numItermax=k, stopThr=0,
                        method="sinkhorn_log" if log_domain else "sinkhorn")


def pot_batch(a, b, cost, reg, k, log_domain=False):
    a, b, cost = a.double(), b.double(), cost.double()
    out = []
    for i in range(a.shape[0]):
        M = cost if cost.dim() == 2 else cost[i]
        out.append(pot_row(a[i], b[i], M, reg, k, log_domain))
    return torch.stack(out)


SHAPES = [(1, 1, 1), (4, 7, 7), (3, 13, 5), (5, 33, 64)]


# ------------------------------------------------------------------------------------------ vs POT
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("B,n,m", SHAPES)
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("log_domain", [False, True])
def test_value_matches_pot_float64(B, n, m, shared, log_domain):
    a, b = simplex(B, n), simplex(B, m, seed=3)
    cost = rand_cost(n, m) if shared else rand_cost(B, n, m)
    got = wk.sinkhorn(a, b, cost, 0.1, 7, log_domain=log_domain).value
    assert rel(got, pot_batch(a, b, cost, 0.1, 7, log_domain)) <= 1e-10


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("log_domain", [False, True])
def test_value_matches_pot_float32(shared, log_domain):
    B, n, m = 6, 50, 40
    a, b = simplex(B, n, F32, zeros=3), simplex(B, m, F32, seed=3)
    cost = rand_cost(n, m, dtype=F32) if shared else rand_cost(B, n, m, dtype=F32)
    got = wk.sinkhorn(a, b, cost, 0.05, 10, log_domain=log_domain).value
    assert got.dtype == F32
    assert rel(got, pot_batch(a, b, cost, 0.05, 10, log_domain)) <= 1e-5


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_log_domain_survives_small_reg():
    """reg=1e-3 with cost in [0, 1]: K underflows in float32 but the log domain matches POT's sinkhorn_log."""
    B, n = 3, 20
    a, b = simplex(B, n, F32), simplex(B, n, F32, seed=2)
    cost = rand_cost(n, n, dtype=F32)
    got = wk.sinkhorn(a, b, cost, 1e-3, 10, log_domain=True).value
    ref = pot_batch(a, b, cost, 1e-3, 10, log_domain=True)
    assert torch.isfinite(got).all()
    assert rel(got, ref) <= 1e-4


# ------------------------------------------------------------------------------------------ vs reference
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
    assert rel(res.value, value) <= 1e-12
    fin = torch.isfinite(ref_log_u)
    assert torch.equal(fin, torch.isfinite(res.log_u))
    assert torch.allclose(res.log_u[fin], ref_log_u[fin], rtol=1e-11, atol=1e-11)
    fin = torch.isfinite(ref_log_v)
    assert torch.allclose(res.log_v[fin], ref_log_v[fin], rtol=1e-11, atol=1e-11)


def test_history_layout():
    """hist_r [T, B, n] = r_1..r_T, hist_s [T, B, m] = s_1..s_T, y [B, n] = (K∘C) v_T, value = sum_i u_i y_i
    (csrc/ops.cpp); the log domain stores their logs; without history [0, B, n], [0, B, m], [0, n]."""
    B, n, m, T = 2, 5, 4, 3
    a, b = simplex(B, n), simplex(B, m, seed=2)
    for cost in (rand_cost(n, m), rand_cost(B, n, m)):
        value, u, v, hr, hs, y = torch.ops.wkd.sinkhorn(a, b, cost, 0.3, T, 0.0, False, True)
        assert hr.shape == (T, B, n) and hs.shape == (T, B, m) and y.shape == (B, n)
        K = torch.exp(-cost / 0.3).expand(B, n, m)
        assert torch.allclose(u, a / hr[T - 1]) and torch.allclose(v, b / hs[T - 1])
        assert torch.allclose(y, torch.einsum("bij,bj->bi", K * cost.expand(B, n, m), v))
        assert torch.allclose(value, (u * y).sum(1))
        *_, hr0, hs0, y0 = torch.ops.wkd.sinkhorn(a, b, cost, 0.3, T, 0.0, False, False)
        assert hr0.shape == (0, B, n) and hs0.shape == (0, B, m) and y0.shape == (0, n)
        *_, lhr, lhs, ly = torch.ops.wkd.sinkhorn(a, b, cost, 0.3, T, 0.0, True, True)
        for x, want in ((lhr, hr), (lhs, hs), (ly, y)):
            assert torch.allclose(x.exp(), want)


# ------------------------------------------------------------------------------------------ gradients
def grads(fn, a, b, w):
    a = a.clone().requires_grad_()
    b = b.clone().requires_grad_()
    val = fn(a, b)
    return torch.autograd.grad((val * w).sum(), (a, b))


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("log_domain", [False, True])
@pytest.mark.parametrize("eps", [0.0, 1e-8])
@pytest.mark.parametrize("zeros", [0, 2])
def test_exact_gradient_matches_autograd_through_reference(shared, log_domain, eps, zeros):
    B, n, m = 4, 12, 10
    a, b = simplex(B, n, zeros=zeros), simplex(B, m, zeros=zeros, seed=7)
    cost = rand_cost(n, m) if shared else rand_cost(B, n, m)
    w = torch.randn(B, dtype=F64, generator=torch.Generator().manual_seed(5))
    got = grads(lambda a, b: wk.sinkhorn(a, b, cost, 0.1, 8, eps=eps, log_domain=log_domain).value, a, b, w)
    ref = grads(lambda a, b: sinkhorn_reference(a, b, cost, 0.1, 8, eps=eps)[0], a, b, w)
    for g, r in zip(got, ref):
        assert rel(g, r) <= 1e-8


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
        assert rel(g, r) <= 1e-4


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


def test_no_history_without_grad():
    a, b, cost = simplex(2, 5), simplex(2, 5, seed=2), rand_cost(5, 5)
    with torch.no_grad():
        res = wk.sinkhorn(a.requires_grad_(), b, cost, 0.1, 3)
    assert res.value.grad_fn is None


def test_outputs_other_than_value_are_not_differentiable():
    a, b, cost = simplex(2, 5).requires_grad_(), simplex(2, 5, seed=2), rand_cost(5, 5)
    res = wk.sinkhorn(a, b, cost, 0.1, 3)
    assert res.value.requires_grad and not res.log_u.requires_grad and not res.log_v.requires_grad


# ------------------------------------------------------------------------------------------ class removal
@pytest.mark.parametrize("log_domain", [False, True])
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_zero_mass_gives_reduced_problem(log_domain, eps):
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
    a.requires_grad_()
    full = wk.sinkhorn(a, b, cost, 0.1, 10, eps=eps, log_domain=log_domain).value
    (ga,) = torch.autograd.grad(full.sum(), a)
    for i in range(B):
        k = keep[i]
        pr = p_red[i:i + 1].clone().requires_grad_()
        red = wk.sinkhorn(pr, q_red[i:i + 1], cost[k][:, k].contiguous(), 0.1, 10, eps=eps,
                          log_domain=log_domain).value
        (gr,) = torch.autograd.grad(red.sum(), pr)
        assert abs(full[i].item() - red.item()) <= 1e-13 * abs(red.item())
        assert torch.allclose(ga[i][k], gr[0], rtol=1e-11, atol=1e-13)


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
    assert rel(got, ref) <= 1e-5
    got64 = wk.sinkhorn(a.double(), b.double(), cost.double(), 0.05, 10).value
    assert rel(got64, ref) <= 1e-10


# ------------------------------------------------------------------------------------------ opcheck, compile
def _samples():
    a, b = simplex(3, 5, zeros=1), simplex(3, 4, seed=2)
    out = []
    for cost in (rand_cost(5, 4), rand_cost(3, 5, 4)):
        for log_domain in (False, True):
            for keep in (True, False):
                for dtype in (F32, F64):
                    out.append((a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_(), cost.to(dtype), 0.1, 4,
                                1e-8 if log_domain else 0.0, log_domain, keep))
    return out


@pytest.mark.parametrize("args", _samples())
def test_opcheck(args):
    torch.library.opcheck(torch.ops.wkd.sinkhorn.default, args)


def test_opcheck_backward_op():
    a, b, cost = simplex(3, 5), simplex(3, 4, seed=2), rand_cost(5, 4)
    value, u, v, hr, hs, y = torch.ops.wkd.sinkhorn(a, b, cost, 0.1, 4, 0.0, False, True)
    torch.library.opcheck(torch.ops.wkd.sinkhorn_backward.default,
                          (torch.ones(3, dtype=F64), a, b, cost, hr, hs, y, 0.1, False))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    a, b, cost = simplex(3, 6), simplex(3, 6, seed=2), rand_cost(6, 6)

    def loss(a, b):
        return wk.sinkhorn(torch.softmax(a, 1), b, cost, 0.1, 5, eps=1e-8).value.mean()

    x = torch.randn(3, 6, dtype=F64, requires_grad=True)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    l1 = compiled(x, b)
    (g1,) = torch.autograd.grad(l1, x)
    l2 = loss(x, b)
    (g2,) = torch.autograd.grad(l2, x)
    assert torch.allclose(l1, l2) and torch.allclose(g1, g2)


def test_half_inputs_computed_in_float32():
    a, b, cost = simplex(2, 8), simplex(2, 8, seed=2), rand_cost(8, 8)
    for dt in (torch.float16, torch.bfloat16):
        res = wk.sinkhorn(a.to(dt), b.to(dt), cost.to(dt), 0.1, 5)
        assert res.value.dtype == F32
        ref = sinkhorn_reference(a.to(dt), b.to(dt), cost.to(dt), 0.1, 5)[0]
        assert rel(res.value, ref) <= 1e-5


# ------------------------------------------------------------------------------------------ bad input
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_value_check_has_no_false_alarm_on_huge_finite_costs(dtype):
    """The one-pass value check flags a row whose sum overflows; the exact check then lets it through."""
    a, b, c = good()
    c = c.to(dtype)
    c[1] = torch.finfo(dtype).max / 2  # finite, non-negative, but the row sum is inf
    a, b = a.to(dtype), b.to(dtype)
    out = wk.sinkhorn(a, b, c, 1e300 if dtype == torch.float64 else 1e38, 2, log_domain=True)  # must not raise
    assert torch.isfinite(out.log_u).all() and torch.isfinite(out.log_v).all()


@pytest.mark.parametrize("msg,make", BAD + BAD_VALUES)
def test_bad_input_python_wrapper(msg, make):
    with pytest.raises((ValueError, TypeError), match=__import__("re").escape(msg)):
        wk.sinkhorn(*make(*good()))


@pytest.mark.parametrize("msg,make", [x for x in BAD + BAD_VALUES if "`cost` is on" not in x[0]])
def test_bad_input_raw_op(msg, make):
    """The C++ op checks on its own (direct torch.ops calls), with the same messages."""
    args = make(*good())
    with pytest.raises((ValueError, TypeError, RuntimeError), match=__import__("re").escape(msg)):
        torch.ops.wkd.sinkhorn(*args, 0.0, False, True)


def test_bad_scalar_arguments():
    a, b, c = good()
    with pytest.raises(ValueError, match="`eps` must be"):
        wk.sinkhorn(a, b, c, 0.1, 3, eps=-1.0)
    with pytest.raises(ValueError, match="`grad` must be"):
        wk.sinkhorn(a, b, c, 0.1, 3, grad="autodiff")
    with pytest.raises(ValueError, match="`num_iters` must be"):
        wk.sinkhorn(a, b, c, 0.1, 2.5)


def test_cost_gradient_is_refused():
    a, b, c = good()
    with pytest.raises(NotImplementedError, match="`cost`"):
        wk.sinkhorn(a, b, c.requires_grad_(), 0.1, 3)


def test_backward_op_checks_history():
    a, b, c = good()
    value, u, v, hr, hs, y = torch.ops.wkd.sinkhorn(a, b, c, 0.1, 3, 0.0, False, False)
    assert hr.shape == (0, 2, 4) and hs.shape == (0, 2, 3) and y.shape == (0, 4)
    with pytest.raises(ValueError, match="`hist_r` must be"):
        torch.ops.wkd.sinkhorn_backward(torch.ones(2, dtype=F64), a, b, c, hr, hs, y, 0.1, False)
    _, u, v, hr, hs, y = torch.ops.wkd.sinkhorn(a, b, c, 0.1, 3, 0.0, False, True)
    assert hr.shape == (3, 2, 4) and hs.shape == (3, 2, 3) and y.shape == (2, 4)
    with pytest.raises(ValueError, match="`grad_value` must be"):
        torch.ops.wkd.sinkhorn_backward(torch.ones(3, dtype=F64), a, b, c, hr, hs, y, 0.1, False)
    with pytest.raises(ValueError, match="`hist_s` must be"):
        torch.ops.wkd.sinkhorn_backward(torch.ones(2, dtype=F64), a, b, c, hr, hs[:2], y, 0.1, False)
    with pytest.raises(ValueError, match="`y` must be"):
        torch.ops.wkd.sinkhorn_backward(torch.ones(2, dtype=F64), a, b, c, hr, hs, y[:1], 0.1, False)
    with pytest.raises(TypeError, match="dtype of `a`"):
        torch.ops.wkd.sinkhorn_backward(torch.ones(2, dtype=F64), a, b, c, hr, hs, y.float(), 0.1, False)

