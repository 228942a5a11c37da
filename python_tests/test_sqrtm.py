"""wkd::sqrtm / sqrtm_backward: scipy.linalg.sqrtm, float64 eigh reference, rank-deficient accuracy (the documented
bounds), gradcheck, opcheck, torch.compile, the Triton kernels (Newton-Schulz, Jacobi eigh, Lyapunov) and bad input.

Accuracy on rank-deficient input (what these tests pin down, documented in wkd_kernels.sqrtm, wkd_kernels/ops/sqrtm.py):
  newton_schulz, float32: relative error of the root <= 1e-3 (measured 2e-5 .. 2e-4), never diverges whatever
      num_iters (safeguards stop a matrix before rounding in its null space is amplified);
  newton_schulz, float64: <= 1e-6 once converged (100 steps; measured ~1e-8; 20 steps leave eigenvalues below
      ~1e-8 tr S partly unconverged: <= 1e-3); on float32-rounded (slightly indefinite) input <= 1e-3;
  eigh: <= 1e-5 (float32, measured ~1e-6) and <= 1e-7 (float64): the error of eigenvalues near 0 is ~n eps |S| each,
      ~sqrt(n eps |S|) in the root.
"""
import numpy as np
import pytest
import scipy.linalg
import torch

import wkd_kernels as wk
from wkd_kernels import reference as ref
from wkd_kernels.ops import common as G
from wkd_kernels.ops.checks import check_psd_values

from conftest import GAUSSIAN_BACKENDS, assert_close, available_backends, backend_or_reason, rel_error

METHODS = ("newton_schulz", "eigh")
F32, F64 = torch.float32, torch.float64
# {dtype: (rtol, atol)} of the root against scipy / the float64 reference (relative to max |root|), per backend family
TOL = {F64: (1e-10, 0.0), F32: (2e-5, 0.0)}
# Odd sizes: 1 x 1, below / across the Triton register tile, a prime
ODD_SIZES = [1, 3, 7, 17]


def _spd(B, n, dtype=torch.float64, seed=0, cond=None):
    g = torch.Generator().manual_seed(seed)
    if cond is None:
        X = torch.randn(B, n, 2 * n + 3, generator=g, dtype=torch.float64)
        S = X @ X.mT / X.shape[-1] + 0.1 * torch.eye(n, dtype=torch.float64)
    else:
        Q = torch.linalg.qr(torch.randn(B, n, n, generator=g, dtype=torch.float64))[0]
        S = (Q * torch.logspace(0, -np.log10(cond), n, dtype=torch.float64)) @ Q.mT
    return ((S + S.mT) / 2).to(dtype)


def _rank_deficient(B, n, r, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(B, n, r, generator=g, dtype=torch.float64)
    return (X @ X.mT / r).to(dtype)


def _rel(a, b):
    """Worst per-matrix Frobenius relative error (conftest.rel_error, mode "fro")."""
    return rel_error(a, b, "fro")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_matches_scipy_sqrtm(gaussian_backend, method, dtype):
    rtol, atol = TOL[dtype]
    n = 6 if gaussian_backend.interpreted else 9  # the interpreted Jacobi kernel is slow
    S = _spd(3, n, dtype)
    Y = wk.sqrtm(gaussian_backend.to(S), method=method, num_iters=30, backend=gaussian_backend.name)
    assert Y.device.type == gaussian_backend.device and Y.dtype == dtype
    for i in range(3):
        expected = scipy.linalg.sqrtm(S[i].double().numpy())
        np.testing.assert_allclose(Y[i].cpu().double().numpy(), np.real(expected), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("method", METHODS)
def test_batch_shapes_and_reference(gaussian_backend, method):
    S = _spd(6, 5).reshape(2, 3, 5, 5)
    Y = wk.sqrtm(gaussian_backend.to(S), method=method, num_iters=30, backend=gaussian_backend.name).cpu()
    assert Y.shape == S.shape
    torch.testing.assert_close(Y, ref.sqrtm_reference(S), rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(Y @ Y, S, rtol=1e-10, atol=1e-10)
    # 1 x 1 and half input (computed and returned in float32)
    s = gaussian_backend.to(torch.tensor([[[4.0]]], dtype=torch.float16))
    assert wk.sqrtm(s, method=method, backend=gaussian_backend.name).dtype == torch.float32
    torch.testing.assert_close(wk.sqrtm(s, method=method, backend=gaussian_backend.name).cpu(),
                               torch.tensor([[[2.0]]]))


# the interpreted Jacobi kernel is slow: n <= 7 there (all sizes on a GPU); larger cases are not generated
@pytest.mark.parametrize("gaussian_backend,method,n", [
    pytest.param(be, method, n, id=f"{be}-{method}-{n}") for be in available_backends(GAUSSIAN_BACKENDS)
    for method in METHODS for n in ODD_SIZES
    if not (backend_or_reason(be).interpreted and method == "eigh" and n > 7)], indirect=["gaussian_backend"])
def test_odd_sizes_match_reference(gaussian_backend, method, n):
    """Odd matrix sizes (1 x 1, a prime, across the register tile), value and gradient, on every backend."""
    S = _spd(2, n, seed=n).requires_grad_()
    Sd = gaussian_backend.to(S.detach()).requires_grad_()
    G = torch.randn(2, n, n, dtype=F64, generator=torch.Generator().manual_seed(n))
    Y = wk.sqrtm(Sd, method=method, num_iters=40, backend=gaussian_backend.name)
    (g,) = torch.autograd.grad((Y * gaussian_backend.to(G)).sum(), Sd)
    R = ref.sqrtm_reference(S)
    (gr,) = torch.autograd.grad((R * G).sum(), S)
    assert_close(Y, R, 1e-10, what=f"root ({gaussian_backend}, {method}, n={n})")
    assert_close(g, (gr + gr.mT) / 2, 1e-7, what=f"gradient ({gaussian_backend}, {method}, n={n})")


def test_newton_schulz_convergence_with_iterations():
    S = _spd(4, 16, cond=1e4)
    errs = [_rel(wk.sqrtm(S, num_iters=k), ref.sqrtm_reference(S)) for k in (5, 10, 20, 30)]
    assert errs[0] > errs[1] > errs[2] and errs[3] < 1e-12, errs


@pytest.mark.parametrize("n,r", [(32, 10), (49, 48), (16, 15)])
def test_rank_deficient_accuracy(n, r):
    S64 = _rank_deficient(4, n, r)
    R = ref.sqrtm_reference(S64)
    S32 = S64.float()
    R32 = ref.sqrtm_reference(S32)
    for iters in (20, 100):  # the safeguards keep many iterations from diverging
        Y = wk.sqrtm(S32, num_iters=iters)
        assert torch.isfinite(Y).all()
        assert _rel(Y, R32) <= 1e-3
        # float64: 20 steps leave tiny nonzero eigenvalues unconverged (error <= sqrt(l) each); 100 converge them
        assert _rel(wk.sqrtm(S64, num_iters=iters), R) <= (1e-3 if iters == 20 else 1e-6)
        # float32-rounded data in float64: eigenvalues ~ -1e-7 |S| (indefinite at rounding level)
        assert _rel(wk.sqrtm(S32.double(), num_iters=iters), R32) <= 1e-3
    assert _rel(wk.sqrtm(S32, method="eigh"), R32) <= 1e-5
    assert _rel(wk.sqrtm(S64, method="eigh"), R) <= 1e-7


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck(method):
    S = _spd(2, 4).requires_grad_()
    torch.autograd.gradcheck(lambda A: wk.sqrtm(A, method=method, num_iters=40), (S,))


@pytest.mark.parametrize("method", METHODS)
def test_backward_matches_eigh_reference(method):
    S = _spd(3, 7, cond=1e3).requires_grad_()
    G = torch.randn(3, 7, 7, dtype=torch.float64)
    (g,) = torch.autograd.grad((wk.sqrtm(S, method=method, num_iters=40) * G).sum(), S)
    (gr,) = torch.autograd.grad((ref.sqrtm_reference(S) * G).sum(), S)
    torch.testing.assert_close(g, (gr + gr.mT) / 2, rtol=1e-8, atol=1e-8)
    # the backward op directly: Y X + X Y = sym(G)
    Y = ref.sqrtm_reference(S.detach())
    X = torch.ops.wkd.sqrtm_backward(G, Y, method, 40)
    torch.testing.assert_close(Y @ X + X @ Y, (G + G.mT) / 2, rtol=1e-9, atol=1e-9)


def test_backward_finite_on_singular_input():
    S = _rank_deficient(2, 12, 5).float().requires_grad_()
    for method in METHODS:
        (g,) = torch.autograd.grad(wk.sqrtm(S, method=method, num_iters=50).sum(), S)
        assert torch.isfinite(g).all(), method


def test_opcheck():
    """wkd::sqrtm on CPU; the Triton op in test_triton_ops_opcheck."""
    for method in METHODS:
        for S in (_spd(3, 5).requires_grad_(), _spd(2, 6, torch.float32).requires_grad_()):
            torch.library.opcheck(torch.ops.wkd.sqrtm.default, (S, method, 25))
        S = _spd(2, 5)
        torch.library.opcheck(torch.ops.wkd.sqrtm_backward.default, (torch.randn(2, 5, 5, dtype=torch.float64),
                                                                     ref.sqrtm_reference(S), method, 25))


def test_compile_fullgraph():
    S = _spd(2, 6, torch.float32).requires_grad_()

    def f(A):
        return wk.sqrtm(A, num_iters=25).square().sum() + wk.sqrtm(A, method="eigh").sum()

    eager = f(S)
    (ge,) = torch.autograd.grad(eager, S)
    comp = torch.compile(f, fullgraph=True, backend="aot_eager")(S)
    (gc,) = torch.autograd.grad(comp, S)
    torch.testing.assert_close(comp, eager)
    torch.testing.assert_close(gc, ge)


def test_bad_input_errors():
    S = _spd(2, 4)
    with pytest.raises(ValueError, match="square"):
        wk.sqrtm(torch.zeros(2, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="`S` must be symmetric"):
        wk.sqrtm(S + torch.triu(torch.ones(4, 4, dtype=torch.float64), 1))
    bad = S.clone()
    bad[0, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="`S` contains non-finite"):
        wk.sqrtm(bad)
    with pytest.raises(ValueError, match="`method`"):
        wk.sqrtm(S, method="svd")
    with pytest.raises(ValueError, match="`num_iters`"):
        wk.sqrtm(S, num_iters=0)
    with pytest.raises(ValueError, match=r"\[\.\.\., n, n\]"):
        wk.sqrtm(torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32 or float64"):
        wk.sqrtm(S.long())
    with pytest.raises(ValueError, match="3-D"):  # the op itself takes [B, n, n]
        torch.ops.wkd.sqrtm(S[0], "newton_schulz", 20)
    with pytest.raises(ValueError, match="3-D"):  # same check in the fake kernel (torch.compile, CUDA path)
        torch.ops.wkd.sqrtm(S[0].to("meta"), "newton_schulz", 20)
    with pytest.raises(ValueError, match="`grad_Y` must have the shape"):
        torch.ops.wkd.sqrtm_backward(S[:, :3, :3], S, "eigh", 20)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1; the Jacobi kernel is slow there: tiny matrices)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
def test_triton_newton_schulz_and_lyapunov(dtype, tol, dev):
    from wkd_kernels.triton import sqrtm as tri

    for n in (5, 20):
        S = _spd(3, n, dtype, seed=n).to(dev)
        Y, _ = tri.sqrtm_forward(S, "newton_schulz", 30, "ieee")
        R = ref.sqrtm_reference(S.cpu())
        assert _rel(Y.cpu(), R) <= tol
        G = torch.randn(3, n, n, dtype=dtype).to(dev)
        X = torch.ops.wkd.sqrtm_triton_backward(G, Y, "newton_schulz", 30, "ieee").cpu().double()
        Gs = (G + G.mT).cpu().double() / 2
        assert _rel(R @ X + X @ R, Gs) <= tol * 10
    # singular input: finite, within the float32 bound, whatever the iteration count
    S = _rank_deficient(2, 24, 7, dtype).to(dev)
    Y, _ = tri.sqrtm_forward(S, "newton_schulz", 60, "ieee")
    assert torch.isfinite(Y).all() and _rel(Y.cpu(), ref.sqrtm_reference(S.cpu())) <= 1e-3
    assert torch.isfinite(torch.ops.wkd.sqrtm_triton_backward(torch.ones_like(S), Y, "newton_schulz", 60, "ieee")).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 1e-5)])
def test_triton_jacobi_eigh(dtype, tol, dev):
    from wkd_kernels.triton import sqrtm as tri

    S = _spd(2, 6, dtype, seed=3).to(dev)
    S[1] = _rank_deficient(1, 6, 3, dtype)[0].to(dev)  # one singular matrix
    Y, Zi = tri.sqrtm_forward(S, "eigh", 1, "ieee", want_inverse=True)
    R = ref.sqrtm_reference(S.cpu())
    assert _rel(Y[:1].cpu(), R[:1]) <= tol * 10
    # singular: eigenvalues near 0 carry ~n eps |S| of rounding, ~sqrt(n eps |S|) in the root
    assert _rel(Y[1:].cpu(), R[1:]) <= 10 * (6 * torch.finfo(dtype).eps) ** 0.5
    Zi, tol_s = Zi.cpu().double(), 10 * (6 * torch.finfo(dtype).eps) ** 0.5
    torch.testing.assert_close(Zi[0], torch.linalg.inv(R[0]), rtol=tol * 100, atol=tol * 100)
    # pseudo-inverse of the singular root: R Z R = R, Z R Z = Z, bounded (noise eigenvalues dropped)
    assert _rel(R[1] @ Zi[1] @ R[1], R[1]) <= tol_s and _rel(Zi[1] @ R[1] @ Zi[1], Zi[1]) <= tol_s
    assert float(Zi[1].norm()) < 1e3
    G = torch.randn(2, 6, 6, dtype=dtype).to(dev)
    X = torch.ops.wkd.sqrtm_triton_backward(G, Y, "eigh", 1, "ieee").cpu().double()
    Gs = (G + G.mT).cpu().double() / 2
    assert _rel(R[0] @ X[0] + X[0] @ R[0], Gs[0]) <= tol * 10


def test_triton_large_matrix_fallback(dev):
    from wkd_kernels.triton import sqrtm as tri

    S = _spd(1, tri.MAX_N + 3, seed=5).to(dev)  # beyond one register tile: batched torch products
    Y, _ = tri.sqrtm_forward(S, "newton_schulz", 30, "ieee")
    assert _rel(Y.cpu(), ref.sqrtm_reference(S.cpu())) <= 1e-10
    X = torch.ops.wkd.sqrtm_triton_backward(torch.eye(S.shape[-1], dtype=S.dtype, device=dev)[None], Y, "newton_schulz",
                                             30, "ieee")
    torch.testing.assert_close(X.cpu(), torch.linalg.inv(Y.cpu()) / 2, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_triton_ops_opcheck(method, dev):
    """torch.ops.wkd.sqrtm_triton / sqrtm_triton_backward: schema, fake kernel, autograd registration (opcheck; CPU
    tensors under the interpreter, tiny sizes)."""
    samples = [_spd(2, 3), _spd(1, 4, torch.float32)] if method == "newton_schulz" else [_spd(1, 3)]  # Jacobi: slow
    for S in samples:
        torch.library.opcheck(torch.ops.wkd.sqrtm_triton.default, (S.to(dev).requires_grad_(), method, 20, "ieee"))
    S = _spd(1 if method == "eigh" else 2, 3)
    torch.library.opcheck(torch.ops.wkd.sqrtm_triton_backward.default,
                          (torch.randn(S.shape, dtype=F64).to(dev), ref.sqrtm_reference(S).to(dev), method, 20, "ieee"))


def test_triton_precision_argument(dev):
    """`precision` reaches the Triton kernels per call: tf32x3 stays within float32 accuracy, float64 ignores it;
    a bad string names the argument; the CPU kernel accepts and ignores "tf32x3"."""
    S = _spd(2, 6, torch.float32, seed=4)
    ieee = wk.sqrtm(S.to(dev), num_iters=30, backend="triton", precision="ieee").cpu()
    x3 = wk.sqrtm(S.to(dev), num_iters=30, backend="triton", precision="tf32x3").cpu()
    assert_close(x3, ieee, 1e-5, what="tf32x3 vs ieee")
    S64 = S.double().to(dev)
    assert torch.equal(torch.ops.wkd.sqrtm_triton(S64, "newton_schulz", 30, "tf32x3"),
                       torch.ops.wkd.sqrtm_triton(S64, "newton_schulz", 30, "ieee"))
    assert torch.equal(wk.sqrtm(S, num_iters=30, backend="cpu", precision="tf32x3"), wk.sqrtm(S, num_iters=30))
    with pytest.raises(ValueError, match="`precision` must be one of"):
        wk.sqrtm(S, precision="tf32")  # the Gaussian ops have no plain tf32
    with pytest.raises(ValueError, match="`precision` must be one of"):
        torch.ops.wkd.sqrtm_triton(S.to(dev), "newton_schulz", 30, "fp16")


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_cuda_op_matches_cpu(method):
    S = _spd(64, 49, torch.float32, seed=7)
    Sc = S.cuda().requires_grad_()
    Y = torch.ops.wkd.sqrtm(Sc, method, 20)
    (g,) = torch.autograd.grad(Y.square().sum(), Sc)
    Sr = S.clone().requires_grad_()
    Yr = torch.ops.wkd.sqrtm(Sr, method, 20)
    (gr,) = torch.autograd.grad(Yr.square().sum(), Sr)
    assert _rel(Y.cpu(), Yr) <= 1e-4
    assert _rel(g.cpu(), gr) <= 1e-3


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30], ids=lambda s: f"{s:g}")
def test_eigh_float32_at_extreme_magnitudes(gaussian_backend, scale):
    """The Jacobi sweeps square the entries: in float32 |S|_F^2 over/underflows for entries beyond ~1e+-19 (before
    the kernel scaled S, the sweeps stopped at once and returned the diagonal); every backend must give the root of
    any S whose root is representable, as at scale 1."""
    S = _spd(2, 4, seed=7)
    Ss = (S * scale).float()
    Y = wk.sqrtm(gaussian_backend.to(Ss), "eigh", backend=gaussian_backend.name)
    want = ref.sqrtm_reference(S) * scale ** 0.5
    assert_close(Y, want, *TOL[F32], what=f"eigh root at {scale:g} ({gaussian_backend})", mode="fro")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_eigh_non_finite_input_is_nan_or_an_error(gaussian_backend, bad):
    """A NaN or inf entry must come out as NaN in that matrix's root (the Jacobi loop test is False on NaN: it used to
    return finite numbers), or be a ValueError naming `S` where values are checked (always on CPU)."""
    S = _spd(3, 4, seed=8).float()
    S[1, 2, 3] = S[1, 3, 2] = bad
    Sd = gaussian_backend.to(S)
    with pytest.raises(ValueError, match=r"wkd\.sqrtm.*`S`"):
        wk.sqrtm(Sd, "eigh", backend=gaussian_backend.name, check_values=True)
    if gaussian_backend.name == "cpu":
        return
    Y = wk.sqrtm(Sd, "eigh", backend=gaussian_backend.name, check_values=False).cpu()
    assert torch.isnan(Y[1]).all()
    assert_close(Y[[0, 2]], ref.sqrtm_reference(S[[0, 2]].double()), *TOL[F32], what="the finite matrices",
                 mode="fro")


# ------------------- clearly indefinite input: an error (CPU, or with value checks) or NaN, never a large finite number

@pytest.mark.parametrize("method", ["newton_schulz", "eigh"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_indefinite_input_raises(method, dtype):
    for d in ([1.0, -1.0], [2.0, -1.0], [-1.0, -2.0]):
        S = torch.diag(torch.tensor(d, dtype=dtype)).unsqueeze(0)  # sqrtm(diag(1, -1)) was +-9.2e18
        with pytest.raises(ValueError, match=r"`S` must be positive semi-definite.*matrix 0"):
            wk.sqrtm(S, method)
        z = torch.zeros(1, 2, dtype=dtype)
        eye = torch.eye(2, dtype=dtype).unsqueeze(0)
        with pytest.raises(ValueError, match=r"`S1` must be positive semi-definite"):
            wk.bures_wasserstein(z, S, z, eye, method)  # was -2.0, a negative squared distance
        with pytest.raises(ValueError, match=r"`S2` must be positive semi-definite"):
            wk.bures_wasserstein(z, eye, z, S, method)


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_rounding_level_negative_eigenvalues_still_accepted(dtype):
    g = torch.Generator().manual_seed(0)
    n, r = 24, 6
    X = torch.randn(4, n, r, generator=g, dtype=F64)
    S = X @ X.mT
    L, V = torch.linalg.eigh(S)
    L[:, : n - r] = -10 * n * torch.finfo(dtype).eps * L[:, -1:]  # rounding-level negative eigenvalues
    S = ((V * L.unsqueeze(-2)) @ V.mT).to(dtype)
    want = ((V * L.clamp_min(0).sqrt().unsqueeze(-2)) @ V.mT)
    for method in ("newton_schulz", "eigh"):
        Y = wk.sqrtm(S, method)
        assert torch.isfinite(Y).all()
        assert rel_error(Y, want) < (1e-3 if dtype == F32 else 1e-6)
    w2 = wk.bures_wasserstein(torch.zeros(4, n, dtype=dtype), S, torch.zeros(4, n, dtype=dtype), S)
    assert w2.abs().max() < 1e-3 * S.diagonal(0, -2, -1).sum(-1).max()


def test_cuda_paths_check_or_give_nan():
    """The CUDA wrappers' helpers, on CPU tensors: check_values=True runs check_psd_values; without it a negative (or
    zero, S != 0) trace gives NaN instead of the root divided by a clamped trace."""
    S = torch.stack([torch.diag(torch.tensor([1.0, -1.0])), torch.diag(torch.tensor([-1.0, -2.0])),
                     torch.eye(2), torch.zeros(2, 2)])
    with pytest.raises(ValueError, match=r"`S` must be positive semi-definite, but matrix 0"):
        check_psd_values(S, "S", "wkd.sqrtm")
    check_psd_values(S[2:], "S", "wkd.sqrtm")
    Y = G.nan_unless_psd_trace(S, torch.ones(4, 2, 2))
    assert torch.isnan(Y[:2]).all() and torch.equal(Y[2:], torch.ones(2, 2, 2))


# the interpreter computes the diverging iterates in NumPy
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_triton_newton_schulz_indefinite_is_nan_or_bounded(dev):
    S = torch.stack([torch.diag(torch.tensor([1.0, -1.0])), torch.diag(torch.tensor([2.0, -1.0]))]).to(dev)
    Y = torch.ops.wkd.sqrtm_triton(S, "newton_schulz", 20, "ieee")
    Y = G.nan_unless_psd_trace(S, Y).cpu()  # what the public CUDA path returns without value checks
    assert torch.isnan(Y[0]).all()
    assert (Y[1].abs() < 10).all()  # never a large finite number


# -------------------------- Newton-Schulz: the backward at S = 0 is finite (0, as eigh); iterations to float64 accuracy

@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_newton_schulz_backward_at_zero_is_zero(dtype):
    for n in (3, 70):  # 70: above the Triton tile limit (torch fallback on GPU)
        grads = {}
        for method in ("newton_schulz", "eigh"):
            S = torch.zeros(2, n, n, dtype=dtype, requires_grad=True)
            wk.sqrtm(S, method).sum().backward()
            grads[method] = S.grad
        assert torch.isfinite(grads["newton_schulz"]).all()  # was all NaN
        assert torch.equal(grads["newton_schulz"], grads["eigh"])


@pytest.mark.parametrize("n", [3, 70])
def test_triton_lyapunov_at_zero_is_zero(n, dev):
    from wkd_kernels.triton import sqrtm as sq

    Y = torch.zeros(2, n, n, device=dev)
    Gr = torch.randn(2, n, n, generator=torch.Generator().manual_seed(0)).to(dev)
    X = sq.lyapunov(Y, Gr, "newton_schulz", 20, "ieee")
    assert torch.equal(X.cpu(), torch.zeros(2, n, n))


def test_sqrtm_newton_schulz_float64_accuracy():
    g = torch.Generator().manual_seed(0)
    n = 8
    Q, _ = torch.linalg.qr(torch.randn(3, n, n, generator=g, dtype=F64))
    L = torch.logspace(0, -10, n, dtype=F64)  # an eigenvalue 1e-10 tr S: not converged after 20 steps
    S = (Q * L) @ Q.mT
    want = (Q * L.sqrt()) @ Q.mT
    eigh = rel_error(wk.sqrtm(S, "eigh"), want)
    assert rel_error(wk.sqrtm(S), want) < max(1e-11, 10 * eigh)  # cond(S) = 1e10: ~eps cond^1/2
    assert rel_error(wk.sqrtm(S, num_iters=20), want) > 1e-7  # the old default stops short
    S32 = S.float()
    assert rel_error(wk.sqrtm(S32), want) < 1e-3  # numerically rank-deficient in float32: ~sqrt(eps)
