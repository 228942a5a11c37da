"""wkd::bures_wasserstein (+ backward): POT (torch backend, float64; POT returns the unsquared
distance), float64 references, gradcheck, opcheck, torch.compile, the Triton kernels, bad input."""
import pytest
import torch

import wkd_kernels as wk
from wkd_kernels import reference as ref

from conftest import (GAUSSIAN_BACKENDS, assert_close, available_backends, backend_or_reason, import_pot,
                      backward_zero_bytes)


METHODS = ("newton_schulz", "eigh")
F32, F64 = torch.float32, torch.float64
# {dtype: (rtol, atol)} of W^2 against POT / the float64 reference (relative to the distance per sample)
TOL = {F64: (1e-9, 1e-9), F32: (1e-5, 0.0)}
ODD_SIZES = [1, 2, 5, 13]


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
def test_matches_pot_full_rank(gaussian_backend, method):
    mu1, S1, mu2, S2 = _gauss(3, 5) if gaussian_backend.interpreted and method == "eigh" else _gauss(5, 7)
    w2 = wk.bures_wasserstein(*gaussian_backend.to(mu1, S1, mu2, S2), method=method, num_iters=40,
                              backend=gaussian_backend.name).cpu()
    pot = import_pot().gaussian.bures_wasserstein_distance(mu1, mu2, S1, S2, paired=True)  # unsquared, torch backend
    assert isinstance(pot, torch.Tensor) and pot.dtype == torch.float64
    torch.testing.assert_close(w2, pot.square(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(w2, ref.bures_wasserstein_reference(mu1, S1, mu2, S2), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_float32_accuracy_and_batch_shape(gaussian_backend, method):
    n = (4 if method == "eigh" else 8) if gaussian_backend.interpreted else 16  # the interpreted Jacobi is slow
    mu1, S1, mu2, S2 = _gauss(6, n, torch.float32, seed=1)
    shape = (2, 3)
    w2 = wk.bures_wasserstein(*gaussian_backend.to(mu1.view(*shape, n), S1.view(*shape, n, n), mu2.view(*shape, n),
                                                   S2.view(*shape, n, n)), method=method, backend=gaussian_backend.name)
    assert w2.shape == shape and w2.dtype == torch.float32 and w2.device.type == gaussian_backend.device
    expected = ref.bures_wasserstein_reference(mu1, S1, mu2, S2).view(shape)
    assert_close(w2, expected, *TOL[F32], what=f"float32 W^2 ({gaussian_backend}, {method})", mode="entry")


# the interpreted Jacobi kernel is slow: n <= 5 there (all sizes on a GPU); larger cases are not generated
@pytest.mark.parametrize("gaussian_backend,method,n", [
    pytest.param(be, method, n, id=f"{be}-{method}-{n}") for be in available_backends(GAUSSIAN_BACKENDS)
    for method in METHODS for n in ODD_SIZES
    if not (backend_or_reason(be).interpreted and method == "eigh" and n > 5)], indirect=["gaussian_backend"])
def test_odd_sizes_value_and_gradient(gaussian_backend, method, n):
    """Odd dimensions (1, 2, a prime) on every backend: W^2 and all four gradients vs autograd through the
    float64 reference."""
    args = [t.requires_grad_() for t in _gauss(2, n, seed=20 + n)]
    dargs = [gaussian_backend.to(t.detach()).requires_grad_() for t in args]
    w2 = wk.bures_wasserstein(*dargs, method=method, num_iters=40, backend=gaussian_backend.name)
    g = torch.autograd.grad(w2.sum(), dargs)
    w2r = ref.bures_wasserstein_reference(*args)
    gr = torch.autograd.grad(w2r.sum(), args)
    assert_close(w2, w2r, *TOL[F64], what=f"W^2 ({gaussian_backend}, {method}, n={n})", mode="entry")
    for name, a, b in zip(("mu1", "S1", "mu2", "S2"), g, gr, strict=False):
        b = (b + b.mT) / 2 if b.dim() == 3 else b
        assert_close(a, b, 1e-7, 1e-7, what=f"grad {name} ({gaussian_backend}, {method}, n={n})")


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
    for a, b in zip(g, gr, strict=False):
        b = (b + b.mT) / 2 if b.dim() == 3 else b
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


def test_opcheck():
    """wkd::bures_wasserstein on CPU; the Triton op in test_triton_ops_opcheck."""
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
    for a, b in zip(gc, ge, strict=False):
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
# Triton (CUDA, or CPU tensors under TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_triton_bures_newton_schulz(dtype, tol, dev):
    mu1, S1, mu2, S2 = (t.to(dev) for t in _gauss(3, 6, dtype, seed=11))
    w2, R1, R2, Q = torch.ops.wkd.bures_wasserstein_triton(mu1, S1, mu2, S2, "newton_schulz", 40, "ieee")
    cpu = torch.ops.wkd.bures_wasserstein(*(t.cpu() for t in (mu1, S1, mu2, S2)), "newton_schulz", 40)
    expected = ref.bures_wasserstein_reference(*(t.cpu() for t in (mu1, S1, mu2, S2)))
    assert float(((w2.cpu().double() - expected) / expected).abs().max()) <= tol
    for a, b in zip((R1, R2, Q), cpu[1:], strict=False):
        torch.testing.assert_close(a.cpu(), b, rtol=tol * 10, atol=tol * 10)
    grad = torch.ones(3, dtype=dtype, device=dev)
    gt = torch.ops.wkd.bures_wasserstein_triton_backward(grad, mu1, mu2, R1, R2, Q, "newton_schulz", 40, "ieee")
    gc = torch.ops.wkd.bures_wasserstein_backward(grad.cpu(), mu1.cpu(), mu2.cpu(), *cpu[1:], "newton_schulz", 40)
    for a, b in zip(gt, gc, strict=False):
        torch.testing.assert_close(a.cpu(), b, rtol=tol * 10, atol=tol * 10)


def test_triton_bures_eigh(dev):
    mu1, S1, mu2, S2 = (t.to(dev) for t in _gauss(1, 5, seed=12))
    w2, R1, R2, Q = torch.ops.wkd.bures_wasserstein_triton(mu1, S1, mu2, S2, "eigh", 1, "ieee")
    expected = ref.bures_wasserstein_reference(*(t.cpu() for t in (mu1, S1, mu2, S2)))
    torch.testing.assert_close(w2.cpu(), expected, rtol=1e-10, atol=1e-10)
    gt = torch.ops.wkd.bures_wasserstein_triton_backward(torch.ones(1, dtype=torch.float64, device=dev), mu1, mu2, R1,
                                                         R2, Q, "eigh", 1, "ieee")
    args = [t.cpu().requires_grad_() for t in (mu1, S1, mu2, S2)]
    gr = torch.autograd.grad(ref.bures_wasserstein_reference(*args).sum(), args)
    for a, b in zip(gt, gr, strict=False):
        b = (b + b.mT) / 2 if b.dim() == 3 else b
        torch.testing.assert_close(a.cpu(), b, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("method", METHODS)
def test_triton_ops_opcheck(method, dev):
    """torch.ops.wkd.bures_wasserstein_triton and its backward op: schema, fake kernel, autograd registration
    (opcheck; CPU tensors under the interpreter, tiny sizes)."""
    B, n = (1, 2) if method == "eigh" else (2, 3)  # the interpreted Jacobi kernel is slow
    args = [t.to(dev).requires_grad_() for t in _gauss(B, n, seed=14)]
    torch.library.opcheck(torch.ops.wkd.bures_wasserstein_triton.default, (*args, method, 20, "ieee"))
    mu1, S1, mu2, S2 = (t.to(dev) for t in _gauss(B, n, seed=15))
    _, R1, R2, Q = torch.ops.wkd.bures_wasserstein_triton(mu1, S1, mu2, S2, method, 20, "ieee")
    torch.library.opcheck(torch.ops.wkd.bures_wasserstein_triton_backward.default,
                          (torch.ones(B, dtype=F64, device=dev), mu1, mu2, R1, R2, Q, method, 20, "ieee"))


def test_backend_and_precision_arguments():
    """backend="cuda" on CPU tensors is a clear error (and there is no CUDA C++ Bures kernel); a bad precision
    names the argument; the CPU kernel accepts and ignores precision="tf32x3"."""
    mu1, S1, mu2, S2 = _gauss(2, 4, seed=16)
    with pytest.raises(ValueError, match="backend='cuda'.*CPU tensors"):
        wk.bures_wasserstein(mu1, S1, mu2, S2, backend="cuda")
    with pytest.raises(ValueError, match="`backend` must be one of"):
        wk.bures_wasserstein(mu1, S1, mu2, S2, backend="gpu")
    with pytest.raises(ValueError, match="`precision` must be one of"):
        wk.bures_wasserstein(mu1, S1, mu2, S2, precision="bf16")
    cpu = "cpu" if wk.HAS_C_EXT else "torch"  # what "auto" runs on CPU tensors in this installation
    assert torch.equal(wk.bures_wasserstein(mu1, S1, mu2, S2, backend=cpu, precision="tf32x3"),
                       wk.bures_wasserstein(mu1, S1, mu2, S2))


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
    for a, b in zip(gc, gr, strict=False):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("scale", [1e10, 1e-12], ids=lambda s: f"{s:g}")
@pytest.mark.parametrize("method", METHODS)
def test_float32_at_extreme_covariance_magnitudes(gaussian_backend, method, scale):
    """Covariances ~1e10 make the mid matrix R1 S2 R1 of the eigh method ~1e20, whose squares overflowed the float32
    Jacobi kernel (18 % off before it scaled its input); every backend and method must give W^2 to float32 accuracy
    at any magnitude whose statistics are representable."""
    mu1, S1, mu2, S2 = _gauss(2, 4, seed=4)
    args = (mu1 * scale ** 0.5, S1 * scale, mu2 * scale ** 0.5, S2 * scale)
    w2 = wk.bures_wasserstein(*gaussian_backend.to(*(t.float() for t in args)), method=method,
                              backend=gaussian_backend.name)
    want = ref.bures_wasserstein_reference(*(t.float().double() for t in args))
    assert_close(w2, want, 1e-4, what=f"W^2 at {scale:g} ({gaussian_backend}, {method})", mode="entry")


def test_indefinite_covariance_with_positive_trace_is_an_error_with_value_checks(gaussian_backend):
    """An indefinite covariance whose trace is positive is outside the domain: with value checks (always on CPU, on
    request on GPUs) it is a ValueError naming it. Without them the GPU result is not checked and may be a negative
    squared distance (documented in the docstring of bures_wasserstein and in wkd_kernels.settings)."""
    mu1, S1, mu2, S2 = _gauss(2, 4, seed=6)
    S2 = S2.clone()
    S2[1] = torch.diag(torch.tensor([3.0, 2.0, 1.0, -1.5], dtype=torch.float64))  # trace 4.5 > 0
    with pytest.raises(ValueError, match=r"wkd\.bures_wasserstein.*`S2`"):
        wk.bures_wasserstein(*gaussian_backend.to(mu1, S1, mu2, S2), method="eigh", backend=gaussian_backend.name,
                             check_values=True)


# ------------------------------------------------------------------------------- the backward allocates no zero outputs

def test_backward_allocates_no_zero_outputs():
    B, n = 32, 8
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2, B, n, 2 * n, generator=g, dtype=F64)
    S1, S2 = (X[i] @ X[i].mT / (2 * n) + 0.1 * torch.eye(n, dtype=F64) for i in range(2))
    mu1, mu2 = torch.randn(B, n, generator=g, dtype=F64), torch.randn(B, n, generator=g, dtype=F64)
    S1.requires_grad_()
    mat = B * n * n * 8
    assert backward_zero_bytes(lambda s: wk.bures_wasserstein(mu1, s, mu2, S2), (S1,)) < mat  # was 3 [B, n, n]
