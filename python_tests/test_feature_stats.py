"""wkd::feature_stats / feature_stats_backward: CPU C++ kernel, Triton kernels, autograd, compile, bad input."""
import pytest
import torch
import torch.nn.functional as F

import wkd_kernels as wk
from wkd_kernels import reference as ref
from wkd_kernels.ops.checks import cell_bounds

from conftest import assert_close, triton_device

F32, F64 = torch.float32, torch.float64
# {dtype: (rtol, atol)} of mean / variance against the float64 reference (relative to max |reference|)
TOL = {F64: (1e-11, 0.0), F32: (2e-5, 0.0)}
# Odd maps [N, C, H, W] and grids: 1 channel, 2 positions per cell, non-square, overlapping cells
ODD_SHAPES = [((1, 1, 2, 2), 1), ((2, 3, 7, 5), 3), ((1, 4, 3, 9), 2), ((2, 2, 5, 5), 4)]

torch.manual_seed(0)


def _x(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # non-zero mean and a spread of scales per channel, like post-ReLU activations
    x = torch.randn(shape, generator=g, dtype=torch.float64).relu() * (1 + torch.arange(shape[1]).view(1, -1, 1, 1))
    return (x + 3.0).to(dtype)


def test_cell_bounds_follow_adaptive_pooling():
    # 7 rows in 4 cells: floor(i*7/4) .. ceil((i+1)*7/4) -> overlapping cells
    assert cell_bounds(7, 4) == [(0, 2), (1, 4), (3, 6), (5, 7)]
    assert cell_bounds(7, 4) == ref.cell_bounds_reference(7, 4)
    assert cell_bounds(8, 2) == [(0, 4), (4, 8)]
    # the cell means are exactly adaptive average pooling (an independent implementation of the same bounds)
    x = _x((2, 3, 7, 5))
    for grid in (1, 2, 3, 4, 5):
        mean, _ = torch.ops.wkd.feature_stats(x, grid, False, True)
        pooled = F.adaptive_avg_pool2d(x, grid).flatten(2).transpose(1, 2)  # [N, P, C]
        torch.testing.assert_close(mean, pooled, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grid", [1, 2, 3, 4])
@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("unbiased", [True, False])
def test_cpu_matches_reference_float64(grid, full, unbiased):
    x = _x((3, 5, 7, 6))
    mean, var = torch.ops.wkd.feature_stats(x, grid, full, unbiased)
    mr, vr = ref.feature_stats_reference(x, grid, full, unbiased)
    assert mean.shape == (3, grid * grid, 5) and var.shape == ((3, grid * grid, 5, 5) if full else (3, grid * grid, 5))
    torch.testing.assert_close(mean, mr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, vr, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("shape,grid", ODD_SHAPES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("covariance", ["diag", "full"])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
def test_matches_reference_on_every_backend(gaussian_backend, shape, grid, covariance, dtype):
    """Mean, variance / covariance and the gradient w.r.t. x through the public API on every backend, odd shapes."""
    x = _x(shape, dtype, seed=sum(shape))
    full = covariance == "full"
    unbiased = (shape[2] // grid) * (shape[3] // grid) > 1
    xd = gaussian_backend.to(x).requires_grad_()
    m, v = wk.feature_stats(xd, grid, covariance, unbiased, backend=gaussian_backend.name)
    assert m.device.type == gaussian_backend.device and m.dtype == dtype
    xr = x.double().requires_grad_()
    mr, vr = ref.feature_stats_reference(xr, grid, full, unbiased)
    if grid == 1:
        mr, vr = mr.squeeze(1), vr.squeeze(1)
    rtol, atol = TOL[dtype]
    assert_close(m, mr, rtol, atol, f"mean ({gaussian_backend})")
    assert_close(v, vr, rtol, atol, f"var ({gaussian_backend})")
    gm = torch.randn(mr.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    gv = torch.randn(vr.shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    weighted = (m * gaussian_backend.to(gm.to(dtype))).sum() + (v * gaussian_backend.to(gv.to(dtype))).sum()
    (gx,) = torch.autograd.grad(weighted, xd)
    (gr,) = torch.autograd.grad((mr * gm).sum() + (vr * gv).sum(), xr)
    assert_close(gx, gr, 10 * rtol, atol, f"grad x ({gaussian_backend})")


def test_backend_argument_errors():
    x = _x((1, 2, 3, 3))
    with pytest.raises(ValueError, match="backend='cuda'.*CPU tensors"):
        wk.feature_stats(x, backend="cuda")
    with pytest.raises(ValueError, match="`backend` must be one of"):
        wk.feature_stats(x, backend="triton-cpu")


def test_public_shapes_and_torch_var():
    x = _x((2, 4, 6, 6), torch.float32)
    m, v = wk.feature_stats(x)  # grid 1: no cell dim; unbiased like torch.var
    assert m.shape == (2, 4) and v.shape == (2, 4)
    torch.testing.assert_close(v, x.var(dim=(-1, -2)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m, x.mean(dim=(-1, -2)), rtol=1e-6, atol=1e-6)
    m, c = wk.feature_stats(x, covariance="full", unbiased=False)
    assert c.shape == (2, 4, 4)
    torch.testing.assert_close(c, torch.stack([torch.cov(xi.flatten(1), correction=0) for xi in x]), rtol=1e-5,
                               atol=1e-5)
    m, v = wk.feature_stats(x, grid=3, covariance="diag")
    assert m.shape == (2, 9, 4) and v.shape == (2, 9, 4)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5), (torch.float16, 1e-5)])
def test_cpu_low_precision_accumulates_in_float32(dtype, tol):
    x = _x((2, 6, 9, 7), dtype)
    for full in (False, True):
        mean, var = torch.ops.wkd.feature_stats(x, 3, full, True)
        assert mean.dtype == torch.float32 and var.dtype == torch.float32
        mr, vr = ref.feature_stats_reference(x, 3, full, True)  # the same rounded inputs, in float64
        torch.testing.assert_close(mean.double(), mr, rtol=tol, atol=tol)
        torch.testing.assert_close(var.double(), vr, rtol=tol, atol=tol * 10)


def test_large_offset_is_not_cancelled():
    # E[x^2] - E[x]^2 in float32 would lose everything here; the kernels centre first
    x = (torch.randn(2, 3, 8, 8, dtype=torch.float64) * 1e-2 + 1e3).float()
    for full in (False, True):
        _, var = torch.ops.wkd.feature_stats(x, 2, full, True)
        _, vr = ref.feature_stats_reference(x, 2, full, True)
        torch.testing.assert_close(var.double(), vr, rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("grid,full", [(1, False), (3, False), (1, True), (3, True)])
def test_gradcheck_cpu(grid, full):
    x = _x((2, 3, 5, 4)).requires_grad_()
    torch.autograd.gradcheck(lambda t: torch.ops.wkd.feature_stats(t, grid, full, True), (x,))


def test_backward_matches_reference_autograd():
    x = _x((2, 4, 7, 6)).requires_grad_()
    for full in (False, True):
        gm = torch.randn(2, 9, 4, dtype=torch.float64)
        gv = torch.randn((2, 9, 4, 4) if full else (2, 9, 4), dtype=torch.float64)
        m, v = torch.ops.wkd.feature_stats(x, 3, full, False)
        g = torch.autograd.grad((m * gm).sum() + (v * gv).sum(), x)[0]
        mr, vr = ref.feature_stats_reference(x, 3, full, False)
        gr = torch.autograd.grad((mr * gm).sum() + (vr * gv).sum(), x)[0]
        torch.testing.assert_close(g, gr, rtol=1e-10, atol=1e-10)


def test_opcheck():
    for x in (_x((2, 3, 5, 4)).requires_grad_(), _x((2, 3, 6, 6), torch.float32).requires_grad_(),
              _x((1, 2, 4, 4), torch.bfloat16)):
        for args in ((1, False, True), (2, True, False), (3, False, False)):
            torch.library.opcheck(torch.ops.wkd.feature_stats.default, (x,) + args)
    x = _x((2, 3, 5, 4))
    gm, gv = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 4, 3, 3, dtype=torch.float64)
    mean, _ = torch.ops.wkd.feature_stats(x, 2, True, True)
    torch.library.opcheck(torch.ops.wkd.feature_stats_backward.default, (gm, gv, x, mean, 2, True, True))


def test_compile_fullgraph():
    x = _x((2, 4, 6, 5), torch.float32).requires_grad_()

    def loss(t):
        m, v = wk.feature_stats(t, grid=2, covariance="diag")
        m1, c = wk.feature_stats(t, covariance="full")
        return (m.square() + v).sum() + c.square().sum() + m1.sum()

    eager = loss(x)
    (g_eager,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(x)
    (g_comp,) = torch.autograd.grad(compiled, x)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(g_comp, g_eager)


def test_bad_input_errors():
    x = _x((2, 3, 5, 4))
    with pytest.raises(ValueError, match="`x` must be 4-D"):
        wk.feature_stats(x[0])
    with pytest.raises(ValueError, match="`grid` .* must not exceed"):
        wk.feature_stats(x, grid=5)
    with pytest.raises(ValueError, match="`grid` must be"):
        wk.feature_stats(x, grid=0)
    with pytest.raises(ValueError, match="at least 2 positions per cell"):
        wk.feature_stats(x[:, :, :4, :4], grid=4, unbiased=True)
    with pytest.raises(ValueError, match="`covariance`"):
        wk.feature_stats(x, covariance="diagonal")
    with pytest.raises(TypeError, match="`x` must be float16"):
        wk.feature_stats(x.long())
    bad = x.clone()
    bad[1, 2, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="`x` contains non-finite"):
        wk.feature_stats(bad)
    # the C++ op and the Python checks (fake kernel, CUDA path) give the same messages
    with pytest.raises(ValueError, match="must not exceed"):
        torch.ops.wkd.feature_stats(x, 6, False, True)
    with pytest.raises(ValueError, match="must not exceed"):
        torch.ops.wkd.feature_stats(x.to("meta"), 6, False, True)
    with pytest.raises(ValueError, match="`grad_var` must be"):
        torch.ops.wkd.feature_stats_backward(torch.zeros(2, 1, 3, dtype=torch.float64),
                                             torch.zeros(2, 1, 3, dtype=torch.float64), x,
                                             torch.zeros(2, 1, 3, dtype=torch.float64), 1, True, True)


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels (CUDA, or CPU tensors under TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_triton_forward_backward(dtype, tol, dev):
    """The Triton ops torch.ops.wkd.feature_stats_triton / _backward against the float64 reference."""
    x = _x((2, 5, 7, 6), dtype).to(dev)
    for grid, full, unbiased in ((1, False, True), (3, False, False), (1, True, True), (3, True, True)):
        mean, var = torch.ops.wkd.feature_stats_triton(x, grid, full, unbiased)
        mr, vr = ref.feature_stats_reference(x.cpu(), grid, full, unbiased)
        torch.testing.assert_close(mean.cpu().double(), mr, rtol=tol, atol=tol)
        torch.testing.assert_close(var.cpu().double(), vr, rtol=tol, atol=tol * 10)
        gm = torch.randn(mean.shape, dtype=torch.float64)
        gv = torch.randn(var.shape, dtype=torch.float64)
        gx = torch.ops.wkd.feature_stats_triton_backward(gm.to(dev, mean.dtype), gv.to(dev, var.dtype), x, mean, grid,
                                                         full, unbiased)
        xr = x.cpu().double().requires_grad_()
        mr, vr = ref.feature_stats_reference(xr, grid, full, unbiased)
        gr = torch.autograd.grad((mr * gm).sum() + (vr * gv).sum(), xr)[0]
        torch.testing.assert_close(gx.cpu().double(), gr, rtol=tol * 10, atol=tol * 10)


def test_triton_half_input_and_chunked_cells(dev):
    # 20 x 18 map on grid 1: one cell of 360 positions, streamed in chunks of 256 (Chan merge)
    x = _x((1, 3, 20, 18), torch.bfloat16).to(dev)
    mean, var = torch.ops.wkd.feature_stats_triton(x, 1, False, True)
    assert mean.dtype == torch.float32
    mr, vr = ref.feature_stats_reference(x.cpu(), 1, False, True)
    torch.testing.assert_close(mean.cpu().double(), mr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.cpu().double(), vr, rtol=1e-5, atol=1e-5)
    gx = torch.ops.wkd.feature_stats_triton_backward(torch.ones_like(mean), torch.ones_like(var), x, mean, 1, False,
                                                     True)
    assert gx.dtype == torch.bfloat16 and torch.isfinite(gx.float()).all()


@pytest.mark.parametrize("full", [False, True])
def test_triton_ops_opcheck(full, dev):
    """torch.ops.wkd.feature_stats_triton and its backward op: schema, fake kernel, autograd (opcheck; CPU tensors
    under the interpreter, tiny sizes)."""
    x = _x((2, 3, 4, 4)).to(dev).requires_grad_()
    torch.library.opcheck(torch.ops.wkd.feature_stats_triton.default, (x, 2, full, True))
    xd = x.detach()
    mean, var = torch.ops.wkd.feature_stats_triton(xd, 2, full, True)
    torch.library.opcheck(torch.ops.wkd.feature_stats_triton_backward.default,
                          (torch.randn_like(mean), torch.randn_like(var), xd, mean, 2, full, True))


@pytest.mark.gpu
def test_cuda_op_matches_cpu():
    x = _x((8, 64, 14, 14), torch.float32)
    for grid, full in ((1, False), (4, False), (1, True), (4, True)):
        xc = x.cuda().requires_grad_()
        m, v = torch.ops.wkd.feature_stats(xc, grid, full, True)
        (v.sum() + m.sum()).backward()
        xr = x.clone().requires_grad_()
        mr, vr = torch.ops.wkd.feature_stats(xr, grid, full, True)
        (vr.sum() + mr.sum()).backward()
        torch.testing.assert_close(m.cpu(), mr, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v.cpu(), vr, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(xc.grad.cpu(), xr.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("flag", ["no", "False", 0, 1, None, 1.0, torch.tensor([True])])
def test_boolean_flags_reject_non_bools(flag):
    """`unbiased` (feature_stats, gaussian_wasserstein) and `check_values` (every op and loss) are bools: a string such
    as "no" must not read as true, nor a number as a flag, on every backend (CPU kernels included, which never read
    `check_values`)."""
    x = _x((2, 3, 4, 4))
    with pytest.raises(TypeError, match=r"wkd\.feature_stats: `unbiased` must be True or False"):
        wk.feature_stats(x, unbiased=flag)
    with pytest.raises(TypeError, match=r"`unbiased` must be True or False"):
        wk.gaussian_wasserstein(x, x.flip(0), unbiased=flag)
    if flag is None:
        return  # check_values=None means "the setting"
    with pytest.raises(TypeError, match=r"`check_values` must be True or False"):
        wk.feature_stats(x, check_values=flag)
    with pytest.raises(TypeError, match=r"`check_values` must be True or False"):
        wk.sqrtm(torch.eye(3, dtype=torch.float64), check_values=flag)
    with pytest.raises(TypeError, match=r"wkd_feature_loss: `check_values` must be True or False"):
        wk.wkd_feature_loss(x, x.flip(0), check_values=flag)
    with pytest.raises(TypeError, match=r"kd_loss: `check_values` must be True or False"):
        wk.kd_loss(torch.randn(2, 5), torch.randn(2, 5), check_values=flag)
    cost = torch.rand(5, 5)
    with pytest.raises(TypeError, match=r"wkd_logit_loss: `check_values` must be True or False"):
        wk.wkd_logit_loss(torch.randn(2, 5), torch.randn(2, 5), torch.tensor([0, 1]), cost, 4.0, 1.0, check_values=flag)
    assert torch.equal(wk.feature_stats(x, unbiased=torch.tensor(False))[1], wk.feature_stats(x, unbiased=False)[1])
    if wk.settings.TRITON_INTERPRET:
        with pytest.raises(TypeError, match=r"wkd\.feature_stats: `unbiased` must be True or False"):
            wk.feature_stats(x.to(triton_device()), unbiased=flag, backend="triton")


@pytest.mark.parametrize("offset,spread", [(1e7, 1.0), (0.0, 1e18), (3e18, 1e18), (0.0, 1e-18)],
                         ids=["offset_1e7_std", "spread_1e18", "offset_and_spread_1e18", "spread_1e-18"])
@pytest.mark.parametrize("covariance", ["diag", "full"])
@pytest.mark.parametrize("grid", [1, 2])
def test_float32_statistics_at_large_offsets_and_magnitudes(gaussian_backend, grid, covariance, offset, spread):
    """float32 statistics must be centred before they are squared and summed: a mean 1e7 standard deviations away
    (the Triton diagonal kernel's chunk means rounded by ~1 std: 14 % off) and values ~1e18 (m_p times the covariance
    overflowed float32 in the full kernels although the covariance is representable) give the statistics of the
    float32 input to float32 accuracy."""
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(2, 5, 9, 7, generator=g, dtype=torch.float64) * spread + offset).float()
    m, v = wk.feature_stats(gaussian_backend.to(x), grid, covariance, backend=gaussian_backend.name)
    wm, wv = ref.feature_stats_reference(x.double(), grid, covariance == "full", True)
    if grid == 1:
        wm, wv = wm.squeeze(1), wv.squeeze(1)
    what = f"{covariance}, grid {grid}, offset {offset:g}, spread {spread:g} ({gaussian_backend})"
    assert torch.isfinite(v).all(), what
    assert_close(m, wm, *TOL[F32], what=f"mean ({what})")
    assert_close(v, wv, *TOL[F32], what=f"variance ({what})")
