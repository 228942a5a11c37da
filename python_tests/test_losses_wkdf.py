"""WKD-F (wkd_kernels.losses.WKDFeatureLoss / wkd_feature_loss) against literal float64 formulations.

diag: the published lines, written out literally (Python loops over the adaptive-pooling cells, torch.var, sqrt,
F.mse_loss(reduction='sum') / (grid^2 N)). full: per-cell Gaussian W^2 from an eigendecomposition in float64.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import wkd_kernels as wk
from conftest import rel_error
from wkd_kernels.losses import WKDFeatureLoss, WKDFeatureLossOutput, make_projector, wkd_feature_loss
from wkd_kernels import _build


# ------------------------------------------------------------------------------------------------ references
def _start(i, G, size):
    return int(math.floor(i * size / G))


def _end(i, G, size):
    return int(math.ceil((i + 1) * size / G))


def literal_wkdf(f_s, f_t, eps=1e-5, grid=1, mean_cov_ratio=2.0):
    """The published WKD-F lines: (mean_loss, cov_loss, mean_cov_ratio * mean_loss + cov_loss)."""
    f_t = f_t.detach()
    if grid == 1:
        s_avg, t_avg = f_s.mean(dim=(-1, -2)), f_t.mean(dim=(-1, -2))
        s_std, t_std = torch.sqrt(f_s.var(dim=(-1, -2)) + eps), torch.sqrt(f_t.var(dim=(-1, -2)) + eps)
        mean_loss = F.mse_loss(s_avg, t_avg, reduction="sum") / f_s.size(0)
        cov_loss = F.mse_loss(s_std, t_std, reduction="sum") / f_s.size(0)
    else:
        def pool(x):
            b, c, H, W = x.shape
            avg, std = [], []
            for oh in range(grid):
                for ow in range(grid):
                    block = x[:, :, _start(oh, grid, H):_end(oh, grid, H), _start(ow, grid, W):_end(ow, grid, W)]
                    avg.append(block.mean(dim=(-1, -2)))
                    std.append(torch.sqrt(block.var(dim=(-1, -2)) + eps))
            return torch.stack(avg, -1), torch.stack(std, -1)

        s_avg, s_std = pool(f_s)
        t_avg, t_std = pool(f_t)
        mean_loss = F.mse_loss(s_avg, t_avg, reduction="sum") / (grid ** 2 * f_s.size(0))
        cov_loss = F.mse_loss(s_std, t_std, reduction="sum") / (grid ** 2 * f_s.size(0))
    return mean_loss, cov_loss, mean_cov_ratio * mean_loss + cov_loss


def _psd_sqrt(S):
    lam, V = torch.linalg.eigh(S)
    return (V * lam.clamp_min(0).sqrt()) @ V.T


def eig_gaussian_w2(f_s, f_t, grid=1, eps_diag=0.0):
    """float64 per-cell Gaussian W^2 split into (sum of mean terms, sum of covariance terms), by eigh."""
    f_s, f_t = f_s.detach().double(), f_t.detach().double()
    N, C, H, W = f_s.shape
    mean_sum, cov_sum = 0.0, 0.0
    for n in range(N):
        for oh in range(grid):
            for ow in range(grid):
                sl = (slice(_start(oh, grid, H), _end(oh, grid, H)), slice(_start(ow, grid, W), _end(ow, grid, W)))
                Xs = f_s[n][:, sl[0], sl[1]].reshape(C, -1)
                Xt = f_t[n][:, sl[0], sl[1]].reshape(C, -1)
                mu_s, mu_t = Xs.mean(1), Xt.mean(1)
                Ss = torch.cov(Xs) + eps_diag * torch.eye(C, dtype=torch.float64)
                St = torch.cov(Xt) + eps_diag * torch.eye(C, dtype=torch.float64)
                r = _psd_sqrt(Ss)
                mid = torch.linalg.eigvalsh(r @ St @ r).clamp_min(0).sqrt().sum()
                mean_sum += float((mu_s - mu_t).square().sum())
                cov_sum += float(torch.trace(Ss) + torch.trace(St) - 2 * mid)
    return mean_sum / (N * grid * grid), cov_sum / (N * grid * grid)


def _rel(a, b):
    """Relative error of a scalar (conftest.rel_error, mode "entry")."""
    return rel_error(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), "entry",
                     floor=1e-30)


def _feats(N, C, H, W, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    f_s = torch.randn(N, C, H, W, generator=g, dtype=torch.float64) * scale + 0.3
    f_t = torch.randn(N, C, H, W, generator=g, dtype=torch.float64) * 1.5 * scale - 0.2
    return f_s.to(dtype), f_t.to(dtype)


# ------------------------------------------------------------------------------------------------ diag parity
@pytest.mark.parametrize("shape,grid", [((3, 5, 7, 7), 1), ((3, 5, 7, 7), 4), ((2, 6, 9, 10), 4),
                                        ((2, 4, 5, 11), 2), ((4, 3, 8, 8), 4), ((2, 3, 6, 13), 3)])
def test_diag_matches_literal_float64(shape, grid):
    f_s, f_t = _feats(*shape)
    out = wkd_feature_loss(f_s, f_t, "diag", grid=grid, mean_cov_ratio=2.0, eps=1e-5)
    assert isinstance(out, WKDFeatureLossOutput) and out.loss.dtype == torch.float64
    ref_m, ref_c, ref = literal_wkdf(f_s, f_t, eps=1e-5, grid=grid, mean_cov_ratio=2.0)
    assert _rel(out.mean_loss, ref_m) < 1e-12
    assert _rel(out.cov_loss, ref_c) < 1e-12
    assert _rel(out.loss, ref) < 1e-12


def test_diag_matches_literal_float32_values_and_grads():
    f_s64, f_t64 = _feats(4, 16, 7, 7, seed=3)
    for grid in (1, 2, 4):
        f_s = f_s64.float().requires_grad_()
        out = wkd_feature_loss(f_s, f_t64.float(), "diag", grid=grid, mean_cov_ratio=2.0)
        (g,) = torch.autograd.grad(out.loss, f_s)
        f_ref = f_s64.clone().requires_grad_()
        _, _, ref = literal_wkdf(f_ref, f_t64, grid=grid)
        (g_ref,) = torch.autograd.grad(ref, f_ref)
        assert _rel(out.loss, ref) < 1e-5
        assert float((g.double() - g_ref).abs().max() / g_ref.abs().max()) < 1e-4


def test_weight_and_ratio():
    f_s, f_t = _feats(2, 4, 6, 6, seed=1)
    out = wkd_feature_loss(f_s, f_t, grid=2, mean_cov_ratio=0.5, weight=3.0)
    ref_m, ref_c, _ = literal_wkdf(f_s, f_t, grid=2)
    assert _rel(out.loss, 3.0 * (0.5 * ref_m + ref_c)) < 1e-12
    assert _rel(out.mean_loss, ref_m) < 1e-12  # the parts are not scaled
    assert float(wkd_feature_loss(f_t, f_t, grid=2).loss) == 0.0


def test_teacher_gets_no_gradient():
    f_s, f_t = _feats(2, 4, 6, 6, seed=2)
    f_s.requires_grad_()
    f_t.requires_grad_()
    for cov in ("diag", "full"):
        out = wkd_feature_loss(f_s, f_t, cov, grid=2)
        g_s, g_t = torch.autograd.grad(out.loss, (f_s, f_t), allow_unused=True)
        assert g_t is None and g_s is not None and float(g_s.abs().sum()) > 0


# ------------------------------------------------------------------------------------------------ module + projector
@pytest.mark.parametrize("projector", ["conv1x1", "bottleneck", None])
def test_module_projector_matches_literal(projector):
    torch.manual_seed(0)
    cs, ct = (6, 6) if projector is None else (5, 7)
    crit = WKDFeatureLoss(cs, ct, covariance="diag", grid=2, projector=projector, hidden_channels=8).double()
    ref_proj = make_projector(projector, cs, ct, 8).double()
    ref_proj.load_state_dict(crit.projector.state_dict())
    x = torch.randn(3, cs, 7, 6, dtype=torch.float64)
    f_t = torch.randn(3, ct, 7, 6, dtype=torch.float64)
    out = crit(x, f_t)
    _, _, ref = literal_wkdf(ref_proj(x), f_t, grid=2)
    assert _rel(out.loss, ref) < 1e-12
    params = [p for p in crit.parameters()]
    if params:
        g = torch.autograd.grad(out.loss, params)
        g_ref = torch.autograd.grad(ref, list(ref_proj.parameters()))
        for a, b in zip(g, g_ref, strict=False):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_default_projector_is_bottleneck():
    crit = WKDFeatureLoss(4, 8)
    convs = [m for m in crit.projector.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(1, 1), (3, 3), (1, 1)] and convs[0].out_channels == 256


# ------------------------------------------------------------------------------------------------ full covariance
@pytest.mark.parametrize("shape,grid,path", [((2, 12, 3, 3), 1, "auto"),     # m = 9 < C: low-rank nuclear norm
                                             ((2, 10, 7, 7), 2, "auto"),     # cells of 16 positions >= C: dense C x C
                                             ((2, 6, 4, 5), 1, "dense"),
                                             ((2, 16, 5, 5), 2, "low_rank")])
def test_full_matches_eigh_float64(shape, grid, path):
    f_s, f_t = _feats(*shape, seed=5)
    eps = 1e-5
    C = shape[1]
    H, W = shape[2], shape[3]
    cells = [(_end(i, grid, H) - _start(i, grid, H)) * (_end(j, grid, W) - _start(j, grid, W))
             for i in range(grid) for j in range(grid)]
    dense = path == "dense" or (path == "auto" and max(cells) >= C)
    ref_m, ref_c = eig_gaussian_w2(f_s, f_t, grid, eps_diag=eps if dense else 0.0)
    # The eigh reference itself errs by ~sqrt(eps_float64 |S|) per near-null direction of rank-deficient
    # covariances (low-rank cases): 1e-7 relative is what both sides can promise there.
    for method, tol in (("newton_schulz", 1e-6), ("eigh", 1e-7)):
        out = wkd_feature_loss(f_s, f_t, "full", grid=grid, eps=eps, method=method, num_iters=30, path=path,
                               mean_cov_ratio=2.0)
        assert _rel(out.mean_loss, ref_m) < 1e-12
        assert _rel(out.cov_loss, ref_c) < tol, (method, float(out.cov_loss), ref_c)
        assert _rel(out.loss, 2.0 * ref_m + ref_c) < tol


def test_full_equals_diag_for_diagonal_gaussians():
    """Channels orthogonal after centring give diagonal covariances: full W^2 == diag W^2 (eps=0)."""
    N, C, m = 2, 3, 9
    g = torch.Generator().manual_seed(0)
    # orthonormal basis of the centred subspace (orthogonal to the all-ones vector) of R^9
    basis = torch.linalg.qr(torch.cat([torch.ones(m, 1, dtype=torch.float64),
                                       torch.randn(m, C, generator=g, dtype=torch.float64)], 1))[0][:, 1:]
    f_s = torch.empty(N, C, 3, 3, dtype=torch.float64)
    f_t = torch.empty_like(f_s)
    for n in range(N):
        a = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
        b = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
        f_s[n] = (a[:, None] * basis.T + torch.randn(C, 1, generator=g, dtype=torch.float64)).reshape(C, 3, 3)
        f_t[n] = (b[:, None] * basis.T + torch.randn(C, 1, generator=g, dtype=torch.float64)).reshape(C, 3, 3)
    full = wkd_feature_loss(f_s, f_t, "full", eps=0.0, method="eigh", path="dense")
    diag = wkd_feature_loss(f_s, f_t, "diag", eps=0.0)
    assert _rel(full.cov_loss, diag.cov_loss) < 1e-8
    assert _rel(full.mean_loss, diag.mean_loss) < 1e-12


# ------------------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("grid", [1, 2])
def test_gradcheck_diag(grid):
    f_s, f_t = _feats(2, 3, 5, 4, seed=7)
    f_s.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: wkd_feature_loss(x, f_t, "diag", grid=grid).loss, (f_s,))


@pytest.mark.parametrize("grid,path,method", [(1, "dense", "eigh"), (1, "low_rank", "newton_schulz"),
                                              (2, "auto", "eigh")])
def test_gradcheck_full(grid, path, method):
    f_s, f_t = _feats(2, 3, 4, 4, seed=8)
    f_s.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: wkd_feature_loss(x, f_t, "full", grid=grid, path=path, method=method, num_iters=40).loss,
        (f_s,), atol=1e-6, rtol=1e-4)


def test_full_grad_float32_vs_float64_reference():
    f_s64, f_t64 = _feats(2, 12, 3, 3, seed=9)  # low-rank path
    f_s = f_s64.float().requires_grad_()
    out = wkd_feature_loss(f_s, f_t64.float(), "full")
    (g,) = torch.autograd.grad(out.loss, f_s)
    x = f_s64.clone().requires_grad_()
    ref = wkd_feature_loss(x, f_t64, "full", method="eigh").loss
    (g_ref,) = torch.autograd.grad(ref, x)
    assert _rel(out.loss, ref) < 1e-4
    assert float((g.double() - g_ref).abs().max() / g_ref.abs().max()) < 1e-3


# ------------------------------------------------------------------------------------------------ dtypes, compile
def test_autocast_bf16_module():
    torch.manual_seed(0)
    crit = WKDFeatureLoss(6, 8, grid=2, projector="conv1x1")
    x = torch.randn(3, 6, 7, 7)
    f_t = torch.randn(3, 8, 7, 7).bfloat16()
    for cov in ("diag", "full"):
        crit.covariance = cov
        with torch.autocast("cpu", dtype=torch.bfloat16):
            p = crit.projector(x)
            out = crit(x, f_t)
        assert p.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
        if cov == "diag":
            _, _, ref = literal_wkdf(p.double(), f_t.double(), grid=2)
        else:
            m, c = eig_gaussian_w2(p.double(), f_t.double(), grid=2,
                                   eps_diag=1e-5)  # cells of 16 positions > 8 channels: dense path, eps I
            ref = 2.0 * m + c
        assert _rel(out.loss, ref) < 1e-4, cov
        out.loss.backward()
        assert crit.projector[0].weight.grad is not None and torch.isfinite(crit.projector[0].weight.grad).all()
        crit.zero_grad()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_features(dtype):
    f_s, f_t = _feats(2, 5, 6, 7, dtype=dtype, seed=11)
    f_s.requires_grad_()
    out = wkd_feature_loss(f_s, f_t, "diag", grid=3)
    _, _, ref = literal_wkdf(f_s.detach().double(), f_t.double(), grid=3)
    assert out.loss.dtype == torch.float32 and _rel(out.loss, ref) < 1e-5
    out.loss.backward()
    assert f_s.grad.dtype == dtype and torch.isfinite(f_s.grad.float()).all()
    full = wkd_feature_loss(f_s.detach(), f_t, "full", grid=1)
    m, c = eig_gaussian_w2(f_s.detach().double(), f_t.double(), 1, eps_diag=1e-5)  # 42 positions > 5 channels
    assert _rel(full.loss, 2 * m + c) < 1e-4


@pytest.mark.parametrize("cov", ["diag", "full"])
def test_channels_last_and_strided_inputs(cov):
    f_s, f_t = _feats(2, 6, 7, 9, seed=13)
    ref = wkd_feature_loss(f_s, f_t, cov, grid=3)
    cl = wkd_feature_loss(f_s.contiguous(memory_format=torch.channels_last),
                          f_t.contiguous(memory_format=torch.channels_last), cov, grid=3)
    big = torch.randn(2, 6, 9, 11, dtype=torch.float64)
    big[:, :, 1:8, 1:10] = f_s
    sl = wkd_feature_loss(big[:, :, 1:8, 1:10], f_t, cov, grid=3)
    for out in (cl, sl):
        for a, b in zip(out, ref, strict=False):
            assert _rel(a, b) < 1e-12


def test_mixed_dtypes():
    f_s, f_t = _feats(2, 4, 5, 5, seed=12)
    out = wkd_feature_loss(f_s.float(), f_t.bfloat16(), "full", grid=1)
    m, c = eig_gaussian_w2(f_s.float(), f_t.bfloat16(), 1, eps_diag=1e-5)
    assert _rel(out.loss, 2 * m + c) < 1e-4


@pytest.mark.parametrize("cov", ["diag", "full"])
def test_torch_compile(cov):
    torch.manual_seed(0)
    crit = WKDFeatureLoss(4, 6, covariance=cov, grid=2, projector="conv1x1").double()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    f_t = torch.randn(2, 6, 6, 6, dtype=torch.float64)
    eager = crit(x, f_t)
    g_eager = torch.autograd.grad(eager.loss, list(crit.parameters()))
    compiled = torch.compile(crit, backend="aot_eager", fullgraph=True)
    out = compiled(x, f_t)
    g = torch.autograd.grad(out.loss, list(crit.parameters()))
    for a, b in zip(out, eager, strict=False):
        assert _rel(a, b) < 1e-10
    for a, b in zip(g, g_eager, strict=False):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_input_module():
    crit = WKDFeatureLoss(4, 6, grid=2, projector="conv1x1")
    good_s, good_t = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5)
    with pytest.raises(ValueError, match="student_features.*4-D"):
        crit(torch.randn(2, 4, 5), good_t)
    with pytest.raises(ValueError, match="teacher_features.*4-D"):
        crit(good_s, torch.randn(2, 6, 5, 5, 1))
    with pytest.raises(ValueError, match="student_features.*4 channels"):
        crit(torch.randn(2, 5, 5, 5), good_t)
    with pytest.raises(ValueError, match="teacher_features.*6 channels"):
        crit(good_s, torch.randn(2, 7, 5, 5))
    with pytest.raises(ValueError, match="spatial sizes differ"):
        crit(good_s, torch.randn(2, 6, 5, 4))
    with pytest.raises(ValueError, match="batch size"):
        crit(good_s, torch.randn(3, 6, 5, 5))
    with pytest.raises(TypeError, match="student_features"):
        crit(good_s.numpy(), good_t)
    with pytest.raises(TypeError, match="teacher_features.*float"):
        crit(good_s, good_t.long())
    big = WKDFeatureLoss(4, 6, grid=6, projector="conv1x1")
    with pytest.raises(ValueError, match="`grid` \\(6\\).*5 x 5"):
        big(good_s, good_t)
    tiny = WKDFeatureLoss(4, 6, grid=2, projector="conv1x1")
    with pytest.raises(ValueError, match="`grid`.*at least 2 positions"):
        tiny(torch.randn(2, 4, 2, 2), torch.randn(2, 6, 2, 2))
    with pytest.raises(ValueError, match="teacher_features.*non-finite"):
        crit(good_s, good_t.clone().index_fill_(0, torch.tensor([1]), float("nan")))


def test_bad_arguments():
    with pytest.raises(ValueError, match="projector"):
        WKDFeatureLoss(4, 6, projector="mlp")
    with pytest.raises(ValueError, match="projector=None.*4 and 6"):
        WKDFeatureLoss(4, 6, projector=None)
    with pytest.raises(ValueError, match="student_channels"):
        WKDFeatureLoss(0, 6)
    with pytest.raises(ValueError, match="covariance"):
        WKDFeatureLoss(4, 6, covariance="low")
    with pytest.raises(ValueError, match="grid"):
        WKDFeatureLoss(4, 6, grid=0)
    with pytest.raises(ValueError, match="mean_cov_ratio"):
        WKDFeatureLoss(4, 6, mean_cov_ratio=-1.0)
    with pytest.raises(ValueError, match="eps"):
        WKDFeatureLoss(4, 6, eps=float("nan"))
    crit = WKDFeatureLoss(4, 6)
    with pytest.raises(ValueError, match="weight"):
        crit.weight = -0.5
    f = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match="channels"):
        wkd_feature_loss(f, torch.randn(2, 5, 5, 5))
    with pytest.raises(ValueError, match="method"):
        wkd_feature_loss(f, f, "full", method="svd")
    with pytest.raises(ValueError, match="path"):
        wkd_feature_loss(f, f, "full", path="fast")
    with pytest.raises(ValueError, match="`grid` \\(7\\)"):
        wkd_feature_loss(f, f, grid=7)


@pytest.mark.parametrize("cov", ["diag", "full"])
def test_backend_and_precision_arguments(cov, dev):
    """The loss passes backend= / precision= to the Gaussian ops (function and module, argument and setting):
    backend="cuda" on CPU tensors is an error, a bad precision names the argument, the CPU kernels accept and ignore
    "tf32x3", and backend="triton" (CPU tensors under the interpreter, or CUDA) gives the CPU loss and gradient."""
    if not _build.HAS_C_EXT:
        pytest.skip("compares with the C++ CPU kernels: installed without the compiled extension")
    g = torch.Generator().manual_seed(11)
    f_s = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    f_t = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend='cuda'"):
        wkd_feature_loss(f_s, f_t, covariance=cov, backend="cuda")
    with pytest.raises(ValueError, match="`precision` must be one of"):
        wkd_feature_loss(f_s, f_t, covariance=cov, precision="fast")
    with pytest.raises(ValueError, match="`precision` must be one of"):
        WKDFeatureLoss(4, 4, covariance=cov, precision="tf32")
    want = wkd_feature_loss(f_s, f_t, covariance=cov, num_iters=40).loss
    (gw,) = torch.autograd.grad(want, f_s)
    assert torch.equal(wkd_feature_loss(f_s, f_t, covariance=cov, num_iters=40, backend="cpu",
                                        precision="tf32x3").loss, want)
    with wk.settings.override(backend="cuda"):
        with pytest.raises(ValueError, match="backend='cuda'"):
            wkd_feature_loss(f_s, f_t, covariance=cov)
    xs = f_s.detach().to(dev).requires_grad_()
    got = wkd_feature_loss(xs, f_t.to(dev), covariance=cov, num_iters=40, backend="triton").loss
    (gg,) = torch.autograd.grad(got, xs)
    assert rel_error(got, want, "entry") <= 1e-9
    assert rel_error(gg, gw) <= 1e-8
    with wk.settings.override(backend="triton"):
        assert rel_error(wkd_feature_loss(xs, f_t.to(dev), covariance=cov, num_iters=40).loss, want, "entry") <= 1e-9
