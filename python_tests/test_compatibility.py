"""The compact suite every supported torch / Python runs (docs/build.md, "Supported versions"): the package imports,
every op passes ``torch.library.opcheck``, every op and loss compiles with ``torch.compile(fullgraph=True)`` and
differentiates through the compiled graph, and gradients match autograd of the float64 references on small sizes.

It needs only torch and numpy (no POT, SciPy or Triton), runs in well under a minute, and is part of the main suite
as well. Cases run on every CPU backend this installation has (the C++ kernels when built, the ATen ``torch``
backend when the package provides it).
"""
from __future__ import annotations

import pytest
import torch

import wkd_kernels as wk
from wkd_kernels import reference, settings

CPU_BACKENDS = [b for b in ("cpu", "torch") if b in settings.BACKENDS and (b != "cpu" or wk.HAS_C_EXT)]


def _simplex(B, n, seed, zeros=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, n, generator=g, dtype=torch.float64) + 0.05
    if zeros:
        x[:, :zeros] = 0
    return x / x.sum(1, keepdim=True)


def _spd(B, n, seed, rank=None):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, n, rank or n + 2, generator=g, dtype=torch.float64)
    return X @ X.transpose(1, 2) / X.shape[-1] + (0 if rank else 0.1) * torch.eye(n, dtype=torch.float64)


def _feats(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def test_import_and_build_info():
    info = wk.build_info()
    assert info["torch"] == torch.__version__
    assert isinstance(info["has_c_ext"], bool)
    assert settings.current().backend in settings.BACKENDS


# ----------------------------------------------------------------------------------------------------------
# opcheck of every op registered by the C++ extension (schemas, fakes, autograd registration)
# ----------------------------------------------------------------------------------------------------------
def _opcheck_cases():
    a, b = _simplex(3, 6, 0, zeros=1), _simplex(3, 5, 1)
    cost = _feats((6, 5), 2).abs()
    S1, S2 = _spd(2, 4, 3), _spd(2, 4, 4)
    mu1, mu2 = _feats((2, 4), 5), _feats((2, 4), 6)
    x = _feats((2, 3, 4, 4), 7)
    M = _feats((2, 5, 3), 8)
    return {
        "sinkhorn": (torch.ops.wkd.sinkhorn.default, (a.requires_grad_(), b, cost, 0.5, 4, 0.0, False, True)),
        "sinkhorn_log_domain": (torch.ops.wkd.sinkhorn.default, (a, b, cost, 0.5, 4, 0.0, True, True)),
        "feature_stats": (torch.ops.wkd.feature_stats.default, (x.requires_grad_(), 2, False, True)),
        "feature_stats_full": (torch.ops.wkd.feature_stats.default, (x, 1, True, True)),
        "sqrtm": (torch.ops.wkd.sqrtm.default, (S1.clone().requires_grad_(), "newton_schulz", 30)),
        "sqrtm_eigh": (torch.ops.wkd.sqrtm.default, (S1.clone().requires_grad_(), "eigh", 30)),
        "nuclear_norm": (torch.ops.wkd.nuclear_norm.default, (M.requires_grad_(), 40)),
        "bures_wasserstein": (torch.ops.wkd.bures_wasserstein.default,
                              (mu1.requires_grad_(), S1.clone().requires_grad_(), mu2, S2, "newton_schulz", 30)),
    }


@pytest.mark.skipif(not wk.HAS_C_EXT, reason="the C++ extension is not built in this installation")
@pytest.mark.parametrize("name", sorted(_opcheck_cases()))
def test_opcheck_every_op(name):
    op, args = _opcheck_cases()[name]
    torch.library.opcheck(op, args)


# ----------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) with backward of every op and loss, and gradients against the references
# ----------------------------------------------------------------------------------------------------------
def _sinkhorn_value(backend):
    b, cost = _simplex(3, 6, 1, zeros=1), _feats((6, 6), 2).abs()
    return (lambda a: wk.sinkhorn(a, b, cost, 0.5, 5, backend=backend).value.sum()), _simplex(3, 6, 0, zeros=2), \
        (lambda a: reference.sinkhorn_reference(a, b, cost, 0.5, 5)[0].sum())


def _sqrtm_value(backend):
    return (lambda S: wk.sqrtm(S, backend=backend).square().sum()), _spd(2, 4, 3), \
        (lambda S: reference.sqrtm_reference(S).square().sum())


def _nuclear_value(backend):
    return (lambda M: wk.nuclear_norm(M, backend=backend).sum()), _feats((2, 5, 3), 8), \
        (lambda M: reference.nuclear_norm_reference(M).sum())


def _bures_value(backend):
    mu1, mu2, S2 = _feats((2, 4), 5), _feats((2, 4), 6), _spd(2, 4, 4)
    return (lambda S1: wk.bures_wasserstein(mu1, S1, mu2, S2, backend=backend).sum()), _spd(2, 4, 3), \
        (lambda S1: reference.bures_wasserstein_reference(mu1, S1, mu2, S2).sum())


def _feature_stats_value(backend):
    def value(x):
        mean, var = wk.feature_stats(x, grid=2, backend=backend)
        return mean.square().sum() + var.sum()

    def ref(x):
        mean, var = reference.feature_stats_reference(x, grid=2)
        return mean.square().sum() + var.sum()

    return value, _feats((2, 3, 4, 4), 7), ref


def _gaussian_value(backend):
    f_t = _feats((2, 6, 3, 3), 9)

    def value(f_s):
        return (wk.gaussian_wasserstein(f_s, f_t, "full", eps=0.0, backend=backend).sum()
                + wk.gaussian_wasserstein(f_s, f_t, "diag", eps=0.0, backend=backend).sum())

    def ref(f_s):
        return (reference.gaussian_wasserstein_reference(f_s, f_t, "full").sum()
                + reference.gaussian_wasserstein_reference(f_s, f_t, "diag").sum())

    return value, _feats((2, 6, 3, 3), 10), ref


CASES = {"sinkhorn": _sinkhorn_value, "sqrtm": _sqrtm_value, "nuclear_norm": _nuclear_value,
         "bures_wasserstein": _bures_value, "feature_stats": _feature_stats_value,
         "gaussian_wasserstein": _gaussian_value}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_compile_fullgraph_backward_matches_reference(name, backend):
    fn, x0, ref = CASES[name](backend)
    torch._dynamo.reset()
    x = x0.clone().requires_grad_()
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(x)
    (grad,) = torch.autograd.grad(got, x)
    xr = x0.clone().requires_grad_()
    want = ref(xr)
    (want_grad,) = torch.autograd.grad(want, xr)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_losses_compile_fullgraph_with_backward(backend):
    g = torch.Generator().manual_seed(0)
    C, B = 7, 4
    cost = torch.rand(C, C, generator=g, dtype=torch.float64)
    cost = (cost + cost.T) / 2
    cost.fill_diagonal_(0)
    s = torch.randn(B, C, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(B, C, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    f_s = torch.randn(B, 5, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(B, 5, 3, 3, generator=g, dtype=torch.float64)
    wkdl = wk.WKDLogitLoss(cost, temperature=2.0, weight=1.0, backend=backend)
    wkdf = wk.WKDFeatureLoss(5, 5, covariance="full", projector=None, backend=backend).double()

    def total(s, f_s):
        return wkdl(s, t, y) + wkdf(f_s, f_t).loss

    eager = total(s, f_s)
    ge = torch.autograd.grad(eager, (s, f_s))
    torch._dynamo.reset()
    comp = torch.compile(total, fullgraph=True, backend="aot_eager")(s, f_s)
    gc = torch.autograd.grad(comp, (s, f_s))
    torch.testing.assert_close(comp, eager)
    for a, b in zip(gc, ge, strict=False):
        torch.testing.assert_close(a, b)
