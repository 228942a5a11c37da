"""wkd::nuclear_norm (value by the Newton-Schulz polar iteration, gradient = the polar factor): the float64
reference and torch.linalg (SVD), rank-deficient input, float32, gradcheck, opcheck (C++ and Triton ops), the Triton
kernels, the backend / precision arguments, bad input. (Used by bures_wasserstein and gaussian_wasserstein's low-rank
path; their tests are in test_bures_wasserstein.py and test_gaussian_wasserstein.py.)"""
import pytest
import torch

import wkd_kernels as wk
from wkd_kernels import reference as ref
from wkd_kernels.ops import common as G

from conftest import assert_close, assert_interruptible, backward_zero_bytes, rel_error

F32, F64 = torch.float32, torch.float64
# {dtype: (rtol, atol)} of the value against the reference (relative to the value per matrix)
TOL = {F64: (1e-12, 0.0), F32: (1e-5, 0.0)}
# Odd shapes [B, p, q]: 1 x 1, a column, a row, wide, tall, primes
ODD_SHAPES = [(1, 1, 1), (2, 5, 1), (2, 1, 4), (3, 3, 7), (2, 11, 5)]


def _mat(B, p, q, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, p, q, generator=g, dtype=F64) + 2 * torch.eye(p, q, dtype=F64)).to(dtype)


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_value_and_gradient_on_every_backend(gaussian_backend, shape, dtype):
    """Value vs the SVD, gradient vs the polar factor U V^T, on every backend and odd shapes."""
    M = _mat(*shape, dtype=dtype, seed=sum(shape))
    Md = gaussian_backend.to(M).requires_grad_()
    v = wk.nuclear_norm(Md, backend=gaussian_backend.name)
    assert v.shape == shape[:1] and v.dtype == dtype and v.device.type == gaussian_backend.device
    (gm,) = torch.autograd.grad(v.sum(), Md)
    want = torch.linalg.matrix_norm(M.double(), ord="nuc")
    assert_close(v, want, *TOL[dtype], what=f"value ({gaussian_backend})", mode="entry")
    U, _, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    assert_close(gm, U @ Vh, 1e3 * TOL[dtype][0], what=f"polar factor ({gaussian_backend})")


def test_batch_shape_and_half_input(gaussian_backend):
    M = _mat(6, 4, 3, seed=3).reshape(2, 3, 4, 3)
    v = wk.nuclear_norm(gaussian_backend.to(M), backend=gaussian_backend.name)
    assert v.shape == (2, 3)
    assert_close(v, torch.linalg.matrix_norm(M, ord="nuc"), 1e-12, mode="entry")
    h = wk.nuclear_norm(gaussian_backend.to(M.half()), backend=gaussian_backend.name)
    assert h.dtype == F32
    assert_close(h, torch.linalg.matrix_norm(M.half().double(), ord="nuc"), 1e-5, mode="entry")


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




@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_triton_nuclear_norm(dtype, tol, dev):
    """The Triton op (value and polar factor) against the reference and the SVD."""
    g = torch.Generator().manual_seed(10)
    M = (torch.randn(3, 9, 5, generator=g, dtype=torch.float64) + torch.eye(9, 5, dtype=torch.float64)).to(dtype)
    v, Q = torch.ops.wkd.nuclear_norm_triton(M.to(dev), 40, "ieee")
    vr = ref.nuclear_norm_reference(M)
    assert float(((v.cpu().double() - vr) / vr).abs().max()) <= tol
    U, _, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    torch.testing.assert_close(Q.cpu().double(), U @ Vh, rtol=tol * 100, atol=tol * 100)


def test_triton_op_opcheck_and_precision(dev):
    """torch.ops.wkd.nuclear_norm_triton: opcheck on tiny sizes (CPU tensors under the interpreter); precision
    "tf32x3" stays within float32 accuracy, float64 ignores it; bad precision names the argument."""
    for dtype in (F64, F32):
        M = _mat(2, 4, 3, dtype, seed=4).to(dev).requires_grad_()
        torch.library.opcheck(torch.ops.wkd.nuclear_norm_triton.default, (M, 20, "ieee"))
    M = _mat(2, 6, 5, F32, seed=5).to(dev)
    ieee = wk.nuclear_norm(M, backend="triton", precision="ieee")
    assert_close(wk.nuclear_norm(M, backend="triton", precision="tf32x3"), ieee, 1e-5, what="tf32x3 vs ieee")
    M64 = M.double()
    assert torch.equal(torch.ops.wkd.nuclear_norm_triton(M64, 30, "tf32x3")[0],
                       torch.ops.wkd.nuclear_norm_triton(M64, 30, "ieee")[0])
    with pytest.raises(ValueError, match="`precision` must be one of"):
        torch.ops.wkd.nuclear_norm_triton(M, 20, "tf32")


def test_backend_and_precision_arguments():
    M = _mat(2, 3, 3, seed=6)
    with pytest.raises(ValueError, match="backend='cuda'.*CPU tensors"):
        wk.nuclear_norm(M, backend="cuda")
    with pytest.raises(ValueError, match="`backend` must be one of"):
        wk.nuclear_norm(M, backend="CPU")
    with pytest.raises(ValueError, match="`precision` must be one of"):
        wk.nuclear_norm(M, precision="IEEE")
    cpu = "cpu" if wk.HAS_C_EXT else "torch"  # what "auto" runs on CPU tensors in this installation
    assert torch.equal(wk.nuclear_norm(M, backend=cpu, precision="tf32x3"), wk.nuclear_norm(M))


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e20, 1e30], ids=lambda s: f"{s:g}")
def test_float32_value_at_extreme_magnitudes(gaussian_backend, scale):
    """|M|_F^2 under/overflows float32 for |M| below ~1e-19 / above ~1e19 although the nuclear norm is representable:
    the start X0 = M / |M|_F must not see it (NaN, resp. 0, before the scaling); value and polar factor as at scale
    1."""
    M = _mat(3, 5, 4, seed=11)
    Ms = (M * scale).float()
    v = wk.nuclear_norm(gaussian_backend.to(Ms).requires_grad_(), backend=gaussian_backend.name)
    assert_close(v, torch.linalg.matrix_norm(Ms.double(), ord="nuc"), *TOL[F32], what=f"value at {scale:g}",
                 mode="entry")
    Md = gaussian_backend.to(Ms).requires_grad_()
    (gm,) = torch.autograd.grad(wk.nuclear_norm(Md, backend=gaussian_backend.name).sum(), Md)
    U, _, Vh = torch.linalg.svd(M, full_matrices=False)
    assert_close(gm, U @ Vh, 1e3 * TOL[F32][0], what=f"polar factor at {scale:g}")


def test_long_cpu_call_stops_on_ctrl_c():
    """Ctrl-C (SIGINT) during a long CPU polar Newton-Schulz call (a large float64 batch: at least 89 steps of
    batched products) raises KeyboardInterrupt within seconds: the loop polls Python's signal handlers between
    steps (the same loop structure as the sqrtm and Lyapunov iterations of csrc/cpu/sqrtm.cpp)."""
    setup = """
        M = torch.randn(1500, 64, 64, dtype=torch.float64)
    """
    assert_interruptible({"nuclear_norm": (setup, "wk.nuclear_norm(M, num_iters=100000)")})


# ----------------------------------------------- iterations to float64 accuracy; the backward allocates no zero outputs

def test_triton_nuclear_norm_and_sqrtm_converge(dev):
    M = torch.randn(4, 25, 25, generator=torch.Generator().manual_seed(1), dtype=F64)
    M[:, :, 0] *= 1e-7
    val, _ = torch.ops.wkd.nuclear_norm_triton(M.to(dev), G.default_num_iters(F64), "ieee")
    assert rel_error(val.cpu(), torch.linalg.svdvals(M).sum(-1)) < 1e-13
    g = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(2, 8, 8, generator=g, dtype=F64))
    L = torch.logspace(0, -10, 8, dtype=F64)
    Y = torch.ops.wkd.sqrtm_triton(((Q * L) @ Q.mT).to(dev), "newton_schulz", G.default_num_iters(F64), "ieee")
    assert rel_error(Y.cpu(), (Q * L.sqrt()) @ Q.mT) < 1e-11


def test_backward_allocates_no_zero_outputs():
    M = torch.randn(32, 8, 5, generator=torch.Generator().manual_seed(0), dtype=F64, requires_grad=True)
    assert backward_zero_bytes(lambda m: wk.nuclear_norm(m), (M,)) < 32 * 8 * 8 * 8 / 2  # was one [B, p, q]
