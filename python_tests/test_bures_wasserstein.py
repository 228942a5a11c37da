"""wkd::bures_wasserstein (+ backward) and wkd::nuclear_norm: POT (torch backend, float64; POT returns the unsquared
distance), float64 references, gradcheck, opcheck, torch.compile, the Triton kernels, bad input."""
import pytest
import torch

import wkd_kernels as wk
from wkd_kernels import reference as ref

from conftest import import_pot, triton_device


METHODS = ("newton_schulz", "eigh")


def _gauss(B, n, dtype=torch.float64, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    r = rank or 2 * n + 3
    mus, covs = [], []
    for _ in range(2):
        X = torch.randn(B, n, r, generator=g, dtype=torch.float64)
        S = X @ X.mT / r + (0.05 * torch.eye(n, dtype=torch.float64) if rank is None else 0)
        mus.append(torch.randn(B, n, generator=g, dtype=torch.float64))
        covs.append(((S + S.mT) / 2))
    return [t.to(dtype) for t in (mus[0], covs[0], mus[1], covs[1])]


# ---------------------------------------------------------------------------------------------------------------
# bures_wasserstein
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_matches_pot_full_rank(method):
    mu1, S1, mu2, S2 = _gauss(5, 7)
    w2 = wk.bures_wasserstein(mu1, S1, mu2, S2, method=method, num_iters=40)
    pot = import_pot().gaussian.bures_wasserstein_distance(mu1, mu2, S1, S2, paired=True)  # unsquared, torch backend
    assert isinstance(pot, torch.Tensor) and pot.dtype == torch.float64
    torch.testing.assert_close(w2, pot.square(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(w2, ref.bures_wasserstein_reference(mu1, S1, mu2, S2), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_float32_accuracy_and_batch_shape(method):
    mu1, S1, mu2, S2 = _gauss(6, 16, torch.float32, seed=1)
    shape = (2, 3)
    w2 = wk.bures_wasserstein(mu1.view(*shape, 16), S1.view(*shape, 16, 16), mu2.view(*shape, 16),
                              S2.view(*shape, 16, 16), method=method)
    assert w2.shape == shape and w2.dtype == torch.float32
    expected = ref.bures_wasserstein_reference(mu1, S1, mu2, S2).view(shape)
    assert float(((w2.double() - expected).abs() / expected).max()) <= 1e-5


def test_rank_deficient_covariances():
    # covariances of rank 3 in dimension 8: the float64 eigendecomposition (clamped) is the reference
    mu1, S1, mu2, S2 = _gauss(4, 8, seed=2, rank=3)
    expected = ref.bures_wasserstein_reference(mu1, S1, mu2, S2)
    # float32 input is rank-deficient only up to rounding: its zero eigenvalues are ~1e-7 |S|, whose square roots
    # (~3e-4 |S|^1/2 each) the exact method keeps; Newton-Schulz leaves them partly unconverged (measured 1e-5)
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-3)):
        for method in METHODS:
            args = [t.to(dtype) for t in (mu1, S1, mu2, S2)]
            w2 = wk.bures_wasserstein(*args, method=method, num_iters=30)
            assert float(((w2.double() - expected).abs() / expected).max()) <= tol, (dtype, method)
    # identical singular Gaussians: distance 0, finite gradients
    S = S1.clone().requires_grad_()
    w2 = wk.bures_wasserstein(mu1, S, mu1, S1, num_iters=30)
    assert float(w2.detach().abs().max()) < 1e-6
    (g,) = torch.autograd.grad(w2.sum(), S)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck(method):
    args = [t.requires_grad_() for t in _gauss(2, 4, seed=3)]
    torch.autograd.gradcheck(lambda a, b, c, d: wk.bures_wasserstein(a, b, c, d, method=method, num_iters=40), args)


@pytest.mark.parametrize("method", METHODS)
def test_backward_matches_reference(method):
    args = [t.requires_grad_() for t in _gauss(3, 6, seed=4)]
    g = torch.autograd.grad(wk.bures_wasserstein(*args, method=method, num_iters=40).sum(), args)
    gr = torch.autograd.grad(ref.bures_wasserstein_reference(*args).sum(), args)
    for a, b in zip(g, gr):
        b = (b + b.mT) / 2 if b.dim() == 3 else b
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


def test_opcheck():
    for method in METHODS:
        args = [t.requires_grad_() for t in _gauss(2, 5, seed=5)]
        torch.library.opcheck(torch.ops.wkd.bures_wasserstein.default, (*args, method, 25))
    mu1, S1, mu2, S2 = _gauss(2, 5, seed=6)
    _, R1, R2, Q = torch.ops.wkd.bures_wasserstein(mu1, S1, mu2, S2, "newton_schulz", 25)
    torch.library.opcheck(torch.ops.wkd.bures_wasserstein_backward.default,
                          (torch.ones(2, dtype=torch.float64), mu1, mu2, R1, R2, Q, "newton_schulz", 25))


def test_compile_fullgraph():
    args = [t.requires_grad_() for t in _gauss(3, 6, torch.float32, seed=7)]

    def f(a, b, c, d):
        return wk.bures_wasserstein(a, b, c, d).sum()

    eager = f(*args)
    ge = torch.autograd.grad(eager, args)
    comp = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    gc = torch.autograd.grad(comp, args)
    torch.testing.assert_close(comp, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


def test_bad_input_errors():
    mu1, S1, mu2, S2 = _gauss(2, 4)
    with pytest.raises(ValueError, match="`S2` must be"):
        wk.bures_wasserstein(mu1, S1, mu2, S2[:, :3, :3])
    with pytest.raises(ValueError, match="`mu2` must be"):
        wk.bures_wasserstein(mu1, S1, mu2[:, :3], S2)
    with pytest.raises(TypeError, match="`S2` has dtype"):
        wk.bures_wasserstein(mu1, S1, mu2, S2.float())
    with pytest.raises(ValueError, match="`S1` must be symmetric"):
        wk.bures_wasserstein(mu1, S1 + torch.triu(torch.ones(4, 4, dtype=torch.float64), 1), mu2, S2)
    bad = S2.clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="`S2` contains non-finite"):
        wk.bures_wasserstein(mu1, S1, mu2, bad)
    with pytest.raises(ValueError, match="square"):
        torch.ops.wkd.bures_wasserstein(mu1, S1[:, :, :3], mu2, S2, "eigh", 20)
    with pytest.raises(ValueError, match="`method`"):
        wk.bures_wasserstein(mu1, S1, mu2, S2, method="qr")


# ---------------------------------------------------------------------------------------------------------------
# nuclear_norm
# ---------------------------------------------------------------------------------------------------------------
def test_nuclear_norm_value_and_polar_gradient():
    g = torch.Generator().manual_seed(8)
    M = torch.randn(4, 6, 5, generator=g, dtype=torch.float64) + 2 * torch.eye(6, 5, dtype=torch.float64)
    M.requires_grad_()
    v = wk.nuclear_norm(M, num_iters=40)
    torch.testing.assert_close(v, ref.nuclear_norm_reference(M), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v, torch.linalg.matrix_norm(M, ord="nuc"), rtol=1e-12, atol=1e-12)
    (gm,) = torch.autograd.grad(v.sum(), M)
    U, _, Vh = torch.linalg.svd(M.detach(), full_matrices=False)
    torch.testing.assert_close(gm, U @ Vh, rtol=1e-10, atol=1e-10)
    torch.autograd.gradcheck(lambda A: wk.nuclear_norm(A, num_iters=40), (M,))


def test_nuclear_norm_rank_deficient_and_float32():
    g = torch.Generator().manual_seed(9)
    A = torch.randn(3, 7, 3, generator=g, dtype=torch.float64)
    M = (A @ torch.randn(3, 3, 7, generator=g, dtype=torch.float64)).requires_grad_()  # rank 3 of 7
    v = wk.nuclear_norm(M, num_iters=40)
    torch.testing.assert_close(v, ref.nuclear_norm_reference(M), rtol=1e-10, atol=1e-10)
    (gm,) = torch.autograd.grad(v.sum(), M)
    assert float(torch.linalg.matrix_norm(gm, ord=2).max()) <= 1 + 1e-6  # a subgradient: spectral norm <= 1
    v32 = wk.nuclear_norm(M.detach().float())
    assert float(((v32.double() - v.detach()) / v.detach()).abs().max()) <= 1e-5


def test_nuclear_norm_opcheck_and_errors():
    M = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.wkd.nuclear_norm.default, (M, 20))
    with pytest.raises(ValueError, match="`num_iters`"):
        torch.ops.wkd.nuclear_norm(M.detach(), 0)
    with pytest.raises(ValueError, match="3-D"):
        torch.ops.wkd.nuclear_norm(M.detach()[0], 20)
    bad = M.detach().clone()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="`M` contains non-finite"):
        wk.nuclear_norm(bad)


# ---------------------------------------------------------------------------------------------------------------
# Triton (CUDA, or CPU tensors under TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_triton_nuclear_norm(dtype, tol):
    dev = triton_device()
    from wkd_kernels.triton import nuclear_norm as tri

    g = torch.Generator().manual_seed(10)
    M = (torch.randn(3, 9, 5, generator=g, dtype=torch.float64) + torch.eye(9, 5, dtype=torch.float64)).to(dtype)
    v, Q = tri.nuclear_norm_forward(M.to(dev), 40)
    vr = ref.nuclear_norm_reference(M)
    assert float(((v.cpu().double() - vr) / vr).abs().max()) <= tol
    U, _, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    torch.testing.assert_close(Q.cpu().double(), U @ Vh, rtol=tol * 100, atol=tol * 100)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_triton_bures_newton_schulz(dtype, tol):
    dev = triton_device()
    from wkd_kernels.triton import bures_wasserstein as tri

    mu1, S1, mu2, S2 = (t.to(dev) for t in _gauss(3, 6, dtype, seed=11))
    w2, R1, R2, Q = tri.bures_wasserstein_forward(mu1, S1, mu2, S2, "newton_schulz", 40)
    cpu = torch.ops.wkd.bures_wasserstein(*(t.cpu() for t in (mu1, S1, mu2, S2)), "newton_schulz", 40)
    expected = ref.bures_wasserstein_reference(*(t.cpu() for t in (mu1, S1, mu2, S2)))
    assert float(((w2.cpu().double() - expected) / expected).abs().max()) <= tol
    for a, b in zip((R1, R2, Q), cpu[1:]):
        torch.testing.assert_close(a.cpu(), b, rtol=tol * 10, atol=tol * 10)
    grad = torch.ones(3, dtype=dtype, device=dev)
    gt = tri.bures_wasserstein_backward(grad, mu1, mu2, R1, R2, Q, "newton_schulz", 40)
    gc = torch.ops.wkd.bures_wasserstein_backward(grad.cpu(), mu1.cpu(), mu2.cpu(), *cpu[1:], "newton_schulz", 40)
    for a, b in zip(gt, gc):
        torch.testing.assert_close(a.cpu(), b, rtol=tol * 10, atol=tol * 10)


def test_triton_bures_eigh():
    dev = triton_device()
    from wkd_kernels.triton import bures_wasserstein as tri

    mu1, S1, mu2, S2 = (t.to(dev) for t in _gauss(1, 5, seed=12))
    w2, R1, R2, Q = tri.bures_wasserstein_forward(mu1, S1, mu2, S2, "eigh", 1)
    expected = ref.bures_wasserstein_reference(*(t.cpu() for t in (mu1, S1, mu2, S2)))
    torch.testing.assert_close(w2.cpu(), expected, rtol=1e-10, atol=1e-10)
    gt = tri.bures_wasserstein_backward(torch.ones(1, dtype=torch.float64, device=dev), mu1, mu2, R1, R2, Q, "eigh", 1)
    args = [t.cpu().requires_grad_() for t in (mu1, S1, mu2, S2)]
    gr = torch.autograd.grad(ref.bures_wasserstein_reference(*args).sum(), args)
    for a, b in zip(gt, gr):
        b = (b + b.mT) / 2 if b.dim() == 3 else b
        torch.testing.assert_close(a.cpu(), b, rtol=1e-8, atol=1e-8)


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_cuda_op_matches_cpu(method):
    args = _gauss(32, 64, torch.float32, seed=13)
    ac = [t.cuda().requires_grad_() for t in args]
    w = wk.bures_wasserstein(*ac, method=method)
    gc = torch.autograd.grad(w.sum(), ac)
    ar = [t.clone().requires_grad_() for t in args]
    wr = wk.bures_wasserstein(*ar, method=method)
    gr = torch.autograd.grad(wr.sum(), ar)
    torch.testing.assert_close(w.cpu(), wr, rtol=1e-4, atol=1e-3)
    for a, b in zip(gc, gr):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-3, atol=1e-3)
