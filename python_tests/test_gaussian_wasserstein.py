"""wkd_kernels.gaussian_wasserstein (WKD-F): the low-rank path (nuclear norm of the m x m cross-Gram) against a float64
eigendecomposition with clamped eigenvalues, the C x C path, the diagonal path against the published formula, POT,
finite gradients at rank-deficient covariances, gradcheck, torch.compile, bad input."""
import numpy as np
import pytest
import torch

import wkd_kernels as wk
from wkd_kernels import reference as ref
from wkd_kernels.ops.checks import cell_sizes

from conftest import assert_close, capture_cuda_graph, import_pot, rel_error
from wkd_kernels import _build

F64 = torch.float64


def _feats(shape, dtype=torch.float64, seed=0, corr=0.6):
    g = torch.Generator().manual_seed(seed)
    f_t = torch.randn(shape, generator=g, dtype=torch.float64).relu()
    f_s = (corr * f_t + torch.randn(shape, generator=g, dtype=torch.float64)).relu() + 0.1
    return f_s.to(dtype), f_t.to(dtype)


def _rel(a, b):
    """Worst relative error per entry (conftest.rel_error, mode "entry")."""
    return rel_error(a, b, "entry")


@pytest.mark.parametrize("shape,grid", [((3, 12, 3, 3), 1), ((2, 30, 5, 5), 1), ((2, 16, 7, 6), 2),
                                        ((2, 24, 7, 7), 4), ((2, 12, 5, 7), 3)])
def test_low_rank_path_vs_float64_eigendecomposition(shape, grid):
    f_s, f_t = _feats(shape)
    assert max(cell_sizes(shape[2], shape[3], grid)) < shape[1]  # m < C: "auto" takes the low-rank path
    expected = ref.gaussian_wasserstein_reference(f_s, f_t, "full", grid, eps=0.0)  # C x C eigh, clamped
    w64 = wk.gaussian_wasserstein(f_s, f_t, "full", grid, eps=0.0, num_iters=40)
    assert w64.shape == ((shape[0],) if grid == 1 else (shape[0], grid * grid))
    # the reference itself carries ~sqrt(eps) per clamped near-zero eigenvalue (it takes C x C roots)
    assert _rel(w64.reshape(expected.shape), expected) <= 1e-6
    w32 = wk.gaussian_wasserstein(f_s.float(), f_t.float(), "full", grid, eps=0.0)
    assert w32.dtype == torch.float32 and _rel(w32.reshape(expected.shape), expected) <= 1e-4
    # the exact low-rank eigh variant (tr (M^T M)^1/2), float64
    we = wk.gaussian_wasserstein(f_s, f_t, "full", grid, eps=0.0, method="eigh")
    assert _rel(we.reshape(expected.shape), expected) <= 1e-6


def test_low_rank_equals_dense_path_when_both_apply():
    # m = 25 >= C = 6: covariances have full rank; both paths are exact at eps = 0
    f_s, f_t = _feats((3, 6, 5, 5), seed=1)
    lr = wk.gaussian_wasserstein(f_s, f_t, "full", eps=0.0, path="low_rank", num_iters=40)
    dense = wk.gaussian_wasserstein(f_s, f_t, "full", eps=0.0, path="dense", num_iters=40)
    auto = wk.gaussian_wasserstein(f_s, f_t, "full", eps=0.0, num_iters=40)
    torch.testing.assert_close(lr, dense, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(auto, dense, rtol=0, atol=0)  # auto took the C x C path (m >= C)
    expected = ref.gaussian_wasserstein_reference(f_s, f_t, "full", 1, eps=0.0)[:, 0]
    torch.testing.assert_close(dense, expected, rtol=1e-10, atol=1e-10)


def test_dense_path_with_eps_vs_reference_and_pot():
    f_s, f_t = _feats((2, 8, 6, 6), seed=2)
    eps = 1e-3
    w = wk.gaussian_wasserstein(f_s, f_t, "full", grid=2, eps=eps, path="dense", num_iters=40)
    expected = ref.gaussian_wasserstein_reference(f_s, f_t, "full", 2, eps=eps)
    torch.testing.assert_close(w, expected, rtol=1e-9, atol=1e-9)
    # POT on per-sample Gaussians (full rank: m = 36 > C = 8); POT returns the unsquared distance
    w1 = wk.gaussian_wasserstein(f_s, f_t, "full", grid=1, eps=0.0, num_iters=40)
    mu_s, S_s = wk.feature_stats(f_s, covariance="full")
    mu_t, S_t = wk.feature_stats(f_t, covariance="full")
    pot = import_pot().gaussian.bures_wasserstein_distance(mu_s, mu_t, S_s, S_t, paired=True)
    torch.testing.assert_close(w1, pot.square(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("grid", [1, 2, 4])
def test_diag_matches_published_formula(grid):
    f_s, f_t = _feats((3, 7, 9, 8), seed=3)
    w = wk.gaussian_wasserstein(f_s, f_t, "diag", grid=grid)  # eps=1e-5, unbiased: the published defaults
    expected = ref.published_wkd_feature_diag(f_s, f_t, grid, eps=1e-5)
    torch.testing.assert_close(w.reshape(expected.shape), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w.reshape(expected.shape),
                               ref.gaussian_wasserstein_reference(f_s, f_t, "diag", grid, eps=1e-5), rtol=1e-12,
                               atol=1e-12)
    # the published loss: sum over batch and cells / (N * grid^2)
    w32 = wk.gaussian_wasserstein(f_s.float(), f_t.float(), "diag", grid=grid)
    assert _rel(w32.reshape(expected.shape), expected) <= 1e-5


def test_gradients_finite_at_rank_deficient_covariances():
    f_s, f_t = _feats((2, 16, 4, 4), torch.float32, seed=4)
    f_s[:, 3] = 0.0          # a dead channel
    f_s[:, 5] = 2.0          # a constant channel
    f_t[1] = f_s[1]          # identical student and teacher (W2 = 0)
    for cov, path, grid in (("full", "low_rank", 1), ("full", "low_rank", 2), ("full", "dense", 1), ("diag", "auto", 1),
                            ("diag", "auto", 2)):
        x = f_s.clone().requires_grad_()
        w = wk.gaussian_wasserstein(x, f_t, cov, grid=grid, path=path)
        (g,) = torch.autograd.grad(w.sum(), x)
        assert torch.isfinite(w).all() and torch.isfinite(g).all(), (cov, path, grid)
        assert float(w.detach().reshape(2, -1)[1].abs().max()) < 1e-3, (cov, path, grid)


@pytest.mark.parametrize("cov,grid,path", [("full", 1, "low_rank"), ("full", 2, "low_rank"), ("full", 1, "dense"),
                                           ("diag", 1, "auto"), ("diag", 3, "auto")])
def test_gradcheck(cov, grid, path):
    f_s, f_t = _feats((2, 5, 4, 4) if path != "dense" else (2, 3, 4, 4), seed=5)
    x = f_s.requires_grad_()
    torch.autograd.gradcheck(lambda t: wk.gaussian_wasserstein(t, f_t, cov, grid=grid, path=path, num_iters=40,
                                                               eps=1e-3), (x,), fast_mode=True)


def test_low_rank_gradient_vs_reference():
    f_s, f_t = _feats((2, 12, 3, 3), seed=6)
    x = f_s.clone().requires_grad_()
    (g,) = torch.autograd.grad(wk.gaussian_wasserstein(x, f_t, "full", grid=1, eps=0.0, num_iters=40).sum(), x)
    xr = f_s.clone().requires_grad_()
    (gr,) = torch.autograd.grad(ref.gaussian_wasserstein_reference(xr, f_t, "full", 1, eps=1e-9).sum(), xr)
    torch.testing.assert_close(g, gr, rtol=1e-4, atol=1e-5)


def test_compile_fullgraph():
    f_s, f_t = _feats((2, 16, 4, 4), torch.float32, seed=7)
    x = f_s.requires_grad_()

    def loss(a, b):  # low-rank path with cells, diag, and the C x C path (4 channels, m = 16 positions)
        return (wk.gaussian_wasserstein(a, b, "full", grid=2).mean() + wk.gaussian_wasserstein(a, b, "diag").mean()
                + wk.gaussian_wasserstein(a[:, :4], b[:, :4], "full").mean())

    eager = loss(x, f_t)
    (ge,) = torch.autograd.grad(eager, x)
    comp = torch.compile(loss, fullgraph=True, backend="aot_eager")(x, f_t)
    (gc,) = torch.autograd.grad(comp, x)
    torch.testing.assert_close(comp, eager)
    torch.testing.assert_close(gc, ge)


def test_bad_input_errors():
    f_s, f_t = _feats((2, 4, 5, 5))
    with pytest.raises(ValueError, match="`f_t` must have the shape"):
        wk.gaussian_wasserstein(f_s, f_t[:, :3])
    with pytest.raises(TypeError, match="`f_t` has dtype"):
        wk.gaussian_wasserstein(f_s, f_t.float())
    with pytest.raises(ValueError, match="`grid` .* must not exceed"):
        wk.gaussian_wasserstein(f_s, f_t, grid=6)
    with pytest.raises(ValueError, match="`eps` must be"):
        wk.gaussian_wasserstein(f_s, f_t, eps=-1.0)
    with pytest.raises(ValueError, match="`covariance`"):
        wk.gaussian_wasserstein(f_s, f_t, "spherical")
    with pytest.raises(ValueError, match="`path`"):
        wk.gaussian_wasserstein(f_s, f_t, path="svd")
    with pytest.raises(ValueError, match="must be 4-D"):
        wk.gaussian_wasserstein(f_s[0], f_t[0])
    bad = f_s.clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        wk.gaussian_wasserstein(bad, f_t, "diag")


@pytest.mark.gpu
def test_cuda_matches_cpu_target_shape():
    """ResNet-18 layer-4 size: relative error of W^2 <= 1e-4 vs float64 (the WKD-F accuracy target), CUDA vs CPU
    gradients."""
    f_s, f_t = _feats((16, 512, 7, 7), torch.float32, seed=8)
    expected = ref.gaussian_wasserstein_reference(f_s, f_t, "full", 1, eps=0.0)[:, 0]
    x = f_s.cuda().requires_grad_()
    w = wk.gaussian_wasserstein(x, f_t.cuda(), "full")
    assert _rel(w.cpu(), expected) <= 1e-4
    (g,) = torch.autograd.grad(w.sum(), x)
    xr = f_s.clone().requires_grad_()
    (gr,) = torch.autograd.grad(wk.gaussian_wasserstein(xr, f_t, "full").sum(), xr)
    torch.testing.assert_close(g.cpu(), gr, rtol=1e-3, atol=1e-5)
    for grid in (1, 4):
        w = wk.gaussian_wasserstein(f_s.cuda(), f_t.cuda(), "diag", grid=grid)
        torch.testing.assert_close(w.cpu(), wk.gaussian_wasserstein(f_s, f_t, "diag", grid=grid), rtol=1e-5,
                                   atol=1e-4)


@pytest.mark.gpu
def test_cuda_graph_capture_forward_backward():
    """No host synchronisation or host-to-device copy inside the ops: forward + backward replay from a CUDA graph."""
    f_s, f_t = _feats((8, 64, 7, 7), torch.float32, seed=9)
    x = f_s.cuda().requires_grad_()
    t = f_t.cuda()

    def step():
        w = (wk.gaussian_wasserstein(x, t, "full", grid=2).sum() + wk.gaussian_wasserstein(x, t, "diag").sum()
             + wk.gaussian_wasserstein(x[:, :16], t[:, :16], "full", path="dense").sum())
        (g,) = torch.autograd.grad(w, x)
        return w.detach(), g

    graph, captured, eager = capture_cuda_graph(step)  # warm-up: compiles, fills the cell-index cache
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager, strict=False):
        torch.testing.assert_close(a, b)


def test_backend_and_precision_arguments(dev):
    """backend= / precision= reach the Gaussian ops: backend="cuda" on CPU tensors is an error, a bad precision names
    the argument, "tf32x3" is accepted and ignored by the CPU kernels; backend="triton" (CPU tensors under the
    interpreter, or CUDA) agrees with the CPU kernels on both paths."""
    if not _build.HAS_C_EXT:
        pytest.skip("compares with the C++ CPU kernels: installed without the compiled extension")
    g = torch.Generator().manual_seed(3)
    f_s, f_t = (torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    with pytest.raises(ValueError, match="backend='cuda'.*CPU tensors"):
        wk.gaussian_wasserstein(f_s, f_t, backend="cuda")
    with pytest.raises(ValueError, match="`precision` must be one of"):
        wk.gaussian_wasserstein(f_s, f_t, precision="tf32")
    want = wk.gaussian_wasserstein(f_s, f_t, num_iters=40)
    assert torch.equal(wk.gaussian_wasserstein(f_s, f_t, num_iters=40, backend="cpu", precision="tf32x3"), want)
    for path in ("low_rank", "dense"):
        got = wk.gaussian_wasserstein(f_s.to(dev), f_t.to(dev), num_iters=40, path=path, backend="triton")
        assert _rel(got.cpu(), wk.gaussian_wasserstein(f_s, f_t, num_iters=40, path=path)) <= 1e-9, path
    terms = wk.gaussian_wasserstein_terms(f_s.to(dev), f_t.to(dev), num_iters=40, backend="triton")
    assert _rel((terms.mean + terms.cov).cpu(), want) <= 1e-9


def test_cell_index_cache_is_bounded_and_reused():
    """The cell gather indices of the low-rank path are cached per (H, W, grid, device) for reuse, but a run over many
    feature-map sizes keeps at most CELL_INDEX_CACHE_SIZE of them (least recently used dropped)."""
    import importlib

    gw = importlib.import_module("wkd_kernels.ops.gaussian_wasserstein")  # the module, not the function

    first = gw.cell_gather_index(5, 6, 2, torch.device("cpu"))
    assert gw.cell_gather_index(5, 6, 2, "cpu")[0] is first[0]  # reused, not rebuilt
    for H in range(2, gw.CELL_INDEX_CACHE_SIZE + 40):
        m = gw.cell_gather_index(H, 3, 2, "cpu")[2]
        assert m.tolist() == [float(c) for c in cell_sizes(H, 3, 2)]
        assert gw._cached_cell_gather_index.cache_info().currsize <= gw.CELL_INDEX_CACHE_SIZE


@pytest.mark.parametrize("scale", [1e-15, 1e-10, 1e10], ids=lambda s: f"{s:g}")
def test_low_rank_path_float32_at_extreme_feature_magnitudes(gaussian_backend, scale):
    """Feature maps of magnitude ~1e-10 make the cross-Gram of the low-rank path ~1e-20, whose squared norm underflows
    float32 (a NaN loss before the nuclear norm scaled its input); the low-rank path must agree with the dense one and
    the float64 reference at any magnitude the statistics can represent."""
    g = torch.Generator().manual_seed(5)
    f_s, f_t = ((torch.randn(2, 6, 3, 3, generator=g, dtype=torch.float64) + 0.5) * scale for _ in range(2))
    want = ref.gaussian_wasserstein_reference(f_s, f_t, "full", 1, eps=0.0)
    dev_s, dev_t = gaussian_backend.to(f_s.float(), f_t.float())
    for path in ("low_rank", "dense"):
        got = wk.gaussian_wasserstein(dev_s, dev_t, eps=0.0, path=path, backend=gaussian_backend.name)
        assert_close(got, want.reshape(got.shape), 1e-4, what=f"{path} path at {scale:g} ({gaussian_backend})",
                     mode="entry")


# ---------------------------------------- the low-rank path to float64 accuracy (Newton-Schulz iterated to convergence)

def small_singular_value_pair(C=96, H=5, W=5, small=1e-6, seed=0):
    """A 96-channel 5 x 5 feature pair whose cross-Gram has one small non-zero singular value."""
    g = torch.Generator().manual_seed(seed)
    f_s = torch.randn(1, C, H, W, generator=g, dtype=F64)
    m = H * W
    w = torch.randn(m, generator=g, dtype=F64)
    w = w - w.mean()
    w = w / w.norm()  # w is orthogonal to the ones vector: R keeps the means and the centring
    R = torch.eye(m, dtype=F64) - (1 - small) * torch.outer(w, w)
    f_t = (f_s.flatten(2) @ R).view(1, C, H, W)
    return f_s, f_t


def exact_low_rank_w2(f_s, f_t):
    xs, xt = f_s.flatten(2)[0], f_t.flatten(2)[0]
    m = xs.shape[1]
    Xs, Xt = xs - xs.mean(1, keepdim=True), xt - xt.mean(1, keepdim=True)
    nuc = torch.linalg.svdvals(Xs.T @ Xt).sum()
    return (xs.mean(1) - xt.mean(1)).square().sum() + ((Xs * Xs).sum() + (Xt * Xt).sum() - 2 * nuc) / (m - 1)


def test_low_rank_wkdf_reaches_float64_accuracy():
    f_s, f_t = small_singular_value_pair()
    want = exact_low_rank_w2(f_s, f_t)
    got = wk.gaussian_wasserstein(f_s, f_t)  # default num_iters: chosen from the dtype
    assert abs(got.item() - want.item()) <= 1e-12 * want.abs().item(), (got.item(), want.item())
    # the case is hard: the old fixed 20 steps stop short
    assert abs(wk.gaussian_wasserstein(f_s, f_t, num_iters=20).item() - want.item()) > 1e-9 * want.abs().item()
    M = torch.randn(8, 25, 25, generator=torch.Generator().manual_seed(1), dtype=F64)
    M[:, :, 0] *= 1e-7
    assert rel_error(wk.nuclear_norm(M), torch.linalg.svdvals(M).sum(-1)) < 1e-13


# ---------------------------------------------------------- errors name the user's arguments; scalar arguments; eps = 0

def test_errors_name_the_users_arguments():
    f = torch.randn(2, 8, 3, 3, dtype=F64)
    g = f.clone()
    g[0, 0, 0, 0] = float("nan")
    for path in ("low_rank", "dense"):
        with pytest.raises(ValueError, match="`f_t` contains non-finite"):
            wk.gaussian_wasserstein(f, g, path=path)  # was `M` / `x`
        with pytest.raises(ValueError, match="`f_s` contains non-finite"):
            wk.gaussian_wasserstein(g, f, path=path)


def test_numpy_scalars_accepted():
    f = torch.randn(2, 3, 4, 4, dtype=F64)
    assert torch.equal(wk.gaussian_wasserstein(f, f.flip(0), "diag", np.int64(2), np.float32(1e-5)),
                       wk.gaussian_wasserstein(f, f.flip(0), "diag", 2, float(np.float32(1e-5))))


@pytest.mark.parametrize("covariance,path", [("diag", "auto"), ("full", "low_rank"), ("full", "dense")])
def test_eps0_constant_feature_map_gradient_is_finite(covariance, path):
    from wkd_kernels.losses import wkd_feature_loss

    f_s = torch.ones(2, 3, 4, 4, dtype=F64, requires_grad=True)  # constant: every variance is 0
    f_t = torch.randn(2, 3, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    w = wk.gaussian_wasserstein(f_s, f_t, covariance, eps=0.0, path=path)
    (gw,) = torch.autograd.grad(w.sum(), f_s)
    assert torch.isfinite(gw).all()  # was all NaN
    if covariance == "diag":
        loss = wkd_feature_loss(f_s, f_t, eps=0.0).loss
        (gl,) = torch.autograd.grad(loss, f_s)
        assert torch.isfinite(gl).all()
