"""Sinkhorn's history contract (csrc/ops.cpp): hist_r [T, B, n] = r_1..r_T, hist_s [T, B, m], y [B, n] = (K∘C) v_T,
their logs in the log domain, empty history without keep_history and the same value, u, v; the backward op's checks
of the history it is given; strided (non-contiguous) inputs give the contiguous results.
"""
import pytest
import torch

from conftest import assert_close
from sinkhorn_harness import F32, F64, OUTPUTS, TOL, cpu_op, good, problem, run_backward, run_op


# -------------------------------------------------------------------------------------------------------- every backend
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
    for name, x, y_ in zip(("value", "u", "v"), light[:3], full[:3], strict=False):
        if backend.name == "cuda":  # the CUDA C++ kernels: the same code path, bitwise
            assert torch.equal(x, y_), name
        assert_close(x, y_, 1e-14, what=f"{backend} {name} without history")
    cpu = cpu_op(a, b, cost, 0.3, T, 0.0, log_domain, False)
    for name, x, y_ in zip(OUTPUTS, light, cpu, strict=False):
        assert_close(x, y_, TOL[("op", F64)].value_cpu, what=f"{backend} {name} (no history) vs CPU op")


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
    for name, x, y in zip(OUTPUTS, got, want, strict=False):
        assert_close(x, y, 1e-6, what=name, mode="row")
    g2 = backend.to(torch.linspace(0.5, 1.5, 2 * B, dtype=F32))
    ga, gb = run_backward(backend, g2[::2], a_nc, b_nc, cost_nc, got, 0.1)
    ga0, gb0 = run_backward(backend, g2[::2].contiguous(), a, b, cost, want, 0.1)
    assert_close(ga, ga0, 1e-6, what="grad_a", mode="row")
    assert_close(gb, gb0, 1e-6, what="grad_b", mode="row")
