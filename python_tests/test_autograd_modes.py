"""Autograd modes beyond first-order reverse mode, for every public op: forward-mode AD and the ``torch.func``
transforms are a clear error naming the op (never a silent zero tangent, never PyTorch's internal setup_context
message), and double backward is a clear error (never a gradient silently missing its second-order term)."""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import grad, hessian, jacfwd, jacrev, jvp

import wkd_kernels as wk


def _simplex(B, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, n, generator=g, dtype=torch.float64) + 0.05
    return x / x.sum(1, keepdim=True)


def _spd(B, n, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, n, n + 2, generator=g, dtype=torch.float64)
    return X @ X.transpose(1, 2) / (n + 2) + 0.1 * torch.eye(n, dtype=torch.float64)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


_B6, _COST = _simplex(2, 6, 1), _randn(6, 6, seed=2).abs()
_MU2, _S2 = _randn(2, 4, seed=3), _spd(2, 4, 4)
_FT = _randn(2, 5, 3, 3, seed=5)
_S1, _MU1 = _spd(2, 4, 9), _randn(2, 4, seed=11)

# name -> (scalar-valued function of one tensor, that tensor)
CASES = {
    "sinkhorn": (lambda a: wk.sinkhorn(a, _B6, _COST, 0.5, 5).value.sum(), _simplex(2, 6, 0)),
    "sinkhorn_b": (lambda b: wk.sinkhorn(_B6, b, _COST, 0.5, 5).value.sum(), _simplex(2, 6, 0)),
    "feature_stats": (lambda x: wk.feature_stats(x, covariance="full")[1].square().sum(), _randn(2, 3, 4, 4, seed=6)),
    "sqrtm": (lambda S: wk.sqrtm(S).square().sum(), _spd(2, 4, 7)),
    "nuclear_norm": (lambda M: wk.nuclear_norm(M).sum(), _randn(2, 5, 3, seed=8)),
    "bures_wasserstein_mean": (lambda mu: wk.bures_wasserstein(mu, _S1, _MU2, _S2).sum(),
                               _randn(2, 4, seed=10)),
    "bures_wasserstein_covariance": (lambda S: wk.bures_wasserstein(_MU1, S, _MU2, _S2).sum(),
                                     _spd(2, 4, 12)),
    "gaussian_wasserstein": (lambda f: wk.gaussian_wasserstein(f, _FT, "full").sum(), _randn(2, 5, 3, 3, seed=13)),
    "gaussian_wasserstein_low_rank": (lambda f: wk.gaussian_wasserstein(f[:, :, :2, :2].repeat(1, 2, 1, 1),
                                                                        _FT[:, :, :2, :2].repeat(1, 2, 1, 1),
                                                                        "full").sum(),
                                      _randn(2, 5, 3, 3, seed=14)),
}

_FORWARD_AD_ERROR = r"wkd\.\w+: .*forward-mode AD .*(is )?not supported"


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_mode_ad_is_a_clear_error(name):
    fn, x = CASES[name]
    with pytest.raises(RuntimeError, match=_FORWARD_AD_ERROR):
        jvp(fn, (x,), (torch.ones_like(x),))
    with pytest.raises(RuntimeError, match=_FORWARD_AD_ERROR):
        with fwAD.dual_level():
            fn(fwAD.make_dual(x, torch.ones_like(x)))


@pytest.mark.parametrize("name", ["sinkhorn", "nuclear_norm"])
def test_jacfwd_and_hessian_are_a_clear_error(name):
    fn, x = CASES[name]
    with pytest.raises(RuntimeError, match=_FORWARD_AD_ERROR):
        jacfwd(fn)(x)
    with pytest.raises(RuntimeError, match=_FORWARD_AD_ERROR):
        hessian(fn)(x)


# More paths for double backward (its error node sits in each op's backward): the envelope gradient, the per-row
# log-domain Sinkhorn, eigh's sqrtm, grid cells of feature_stats
DOUBLE_BACKWARD_CASES = {
    **CASES,
    "sinkhorn_envelope": (lambda a: wk.sinkhorn(a, _B6, _COST, 0.5, 5, grad="envelope").value.square().sum(),
                          _simplex(2, 6, 0)),
    "sinkhorn_per_row_log": (lambda a: wk.sinkhorn(a, _B6, _COST.expand(2, 6, 6), 0.1, 5,
                                                   log_domain=True).value.square().sum(), _simplex(2, 6, 0)),
    "sqrtm_eigh": (lambda S: wk.sqrtm(S, "eigh").square().sum(), _spd(2, 4, 7)),
    "feature_stats_grid": (lambda x: wk.feature_stats(x, 2, "full")[1].square().sum(), _randn(2, 3, 4, 4, seed=6)),
}


@pytest.mark.parametrize("name", sorted(DOUBLE_BACKWARD_CASES))
def test_double_backward_is_a_clear_error(name):
    """The gradient under create_graph=True equals the plain one and carries an error node: differentiating it
    raises an error naming the op (never a gradient silently missing its second-order term)."""
    fn, x0 = DOUBLE_BACKWARD_CASES[name]
    x = x0.clone().requires_grad_()
    (g,) = torch.autograd.grad(fn(x), x, create_graph=True)
    assert g.requires_grad, "the gradient under create_graph=True must carry the error node"
    x1 = x0.clone().requires_grad_()
    (g1,) = torch.autograd.grad(fn(x1), x1)
    assert torch.equal(g.detach(), g1), "create_graph=True changed the first-order gradient"
    with pytest.raises(RuntimeError, match=r"wkd\.\w+: double backward .* is not supported"):
        torch.autograd.grad(g.sum(), x)


@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_func_transforms_are_a_clear_error(name):
    fn, x0 = CASES[name]
    for transform in (grad, jacrev, torch.func.vmap):
        with pytest.raises(RuntimeError, match=r"wkd\.\w+: torch.func transforms .* are not supported"):
            transform(fn)(x0[None] if transform is torch.func.vmap else x0)


def test_reverse_mode_is_unchanged_outside_forward_ad():
    """The forward-mode guard only exists inside a forward-mode context: plain calls add no autograd node."""
    fn, x0 = CASES["nuclear_norm"]
    x = x0.clone().requires_grad_()
    out = wk.nuclear_norm(x)
    assert "NoForwardAD" not in type(out.grad_fn).__name__
    names, node = [], out.grad_fn
    while node is not None:
        names.append(type(node).__name__)
        node = node.next_functions[0][0] if node.next_functions else None
    assert not any("NoForwardAD" in n for n in names), names
