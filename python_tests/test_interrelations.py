"""wkd_kernels.interrelations against straightforward per-pair float64 implementations."""
import math

import pytest
import torch

from wkd_kernels import interrelations as ir

F64 = torch.float64


# ------------------------------------------------------------------ per-pair float64 references (literal)
def _centering(K):
    n = K.shape[0]
    H = torch.eye(n, dtype=F64) - torch.ones(n, n, dtype=F64) / n
    return H @ K @ H


def _rbf(X, sigma=None):
    GX = X @ X.T
    KX = torch.diag(GX) - GX + (torch.diag(GX) - GX).T
    if sigma is None:
        sigma = math.sqrt(float(_np_median(KX[KX != 0])))  # np.median of the non-zero squared distances
    return torch.exp(KX * (-0.5 / (sigma * sigma)))


def _np_median(v):
    v, _ = torch.sort(v.flatten())
    k = v.numel()
    return v[(k - 1) // 2] if k % 2 else 0.5 * (v[k // 2 - 1] + v[k // 2])


def _hsic(KX, KY):
    return torch.sum(_centering(KX) * _centering(KY))


def linear_cka_pair(X, Y):
    """The published formula: CKA = ||Y~^T X~||_F^2 / (||X~^T X~||_F ||Y~^T Y~||_F), X~ centred over rows."""
    X = X - X.mean(0)
    Y = Y - Y.mean(0)
    return (torch.linalg.norm(Y.T @ X) ** 2 / (torch.linalg.norm(X.T @ X) * torch.linalg.norm(Y.T @ Y))).item()


def kernel_cka_pair(KX, KY):
    return (_hsic(KX, KY) / torch.sqrt(_hsic(KX, KX) * _hsic(KY, KY))).item()


def per_pair_distance(feats, kernel, **kw):
    feats = feats.to(F64)
    C, n, D = feats.shape
    out = torch.zeros(C, C, dtype=F64)
    for i in range(C):
        for j in range(C):
            Xi, Xj = feats[i], feats[j]
            if kernel == "linear":
                cka = linear_cka_pair(Xi, Xj)
            elif kernel == "polynomial":
                g = kw.get("gamma") or 1.0 / D
                d, c0 = kw.get("degree", 3), kw.get("coef0", 1.0)
                cka = kernel_cka_pair((g * Xi @ Xi.T + c0) ** d, (g * Xj @ Xj.T + c0) ** d)
            else:
                s = kw.get("sigma")
                cka = kernel_cka_pair(_rbf(Xi, s), _rbf(Xj, s))
            out[i, j] = 1.0 - cka
    return out


def feats(C=6, n=9, D=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # class-dependent structure so distances are spread out
    base = torch.randn(C, 1, D, generator=g, dtype=F64)
    mix = torch.randn(C, D, D, generator=g, dtype=F64) * 0.3 + torch.eye(D, dtype=F64)
    x = torch.randn(C, n, D, generator=g, dtype=F64) @ mix + base
    return x.to(dtype)


# ------------------------------------------------------------------ CKA
@pytest.mark.parametrize("C,n,D", [(1, 2, 1), (5, 7, 3), (6, 9, 20), (4, 17, 2)])
@pytest.mark.parametrize("kernel", ["linear", "polynomial", "rbf"])
def test_cka_matches_per_pair(C, n, D, kernel):
    x = feats(C, n, D)
    got = ir.cka_distance(x, kernel)
    ref = per_pair_distance(x, kernel)
    assert got.shape == (C, C) and got.dtype == torch.float32
    ref.fill_diagonal_(0)
    assert (got.double() - ref).abs().max() < 1e-6
    assert torch.equal(got, got.T) and bool((got.diagonal() == 0).all())
    assert bool((got >= 0).all()) and bool((got <= 1).all())


@pytest.mark.parametrize("kernel,kw", [("polynomial", dict(degree=2, gamma=0.3, coef0=0.5)),
                                       ("rbf", dict(sigma=1.7))])
def test_cka_kernel_parameters(kernel, kw):
    x = feats(5, 8, 4, dtype=F64)
    got = ir.cka_distance(x, kernel, **kw)
    ref = per_pair_distance(x, kernel, **kw)
    ref.fill_diagonal_(0)
    assert got.dtype == F64
    assert (got - ref).abs().max() < 1e-12


@pytest.mark.parametrize("kernel", ["linear", "polynomial", "rbf"])
def test_cka_chunking_is_exact(kernel):
    """A tiny memory budget (one Gram row and one class per block) gives the same numbers as one block."""
    x = feats(7, 11, 6, dtype=F64)
    full = ir.cka_distance(x, kernel)
    tiny = ir.cka_distance(x, kernel, max_chunk_bytes=1)
    assert (full - tiny).abs().max() < 1e-13


def test_rbf_median_ignores_duplicate_samples():
    """Duplicated samples give zero distances, which the median heuristic skips (as np.median(KX[KX != 0]))."""
    x = feats(4, 9, 3, dtype=F64)
    x[:, 1] = x[:, 0]
    x[:, 5] = x[:, 2]
    ref = per_pair_distance(x, "rbf")
    ref.fill_diagonal_(0)
    assert (ir.cka_distance(x, "rbf") - ref).abs().max() < 1e-12


def test_median_nonzero_rows():
    g = torch.Generator().manual_seed(3)
    v = torch.rand(6, 11, generator=g, dtype=F64)
    v[v < 0.3] = 0
    v[5] = 0
    got = ir._median_nonzero_rows(v)
    for i in range(5):
        assert got[i] == _np_median(v[i][v[i] != 0])
    assert got[5] == 0


def test_cka_float32_compute_and_half_input():
    x = feats(6, 10, 8)
    ref = ir.cka_distance(x)
    assert (ir.cka_distance(x, compute_dtype=torch.float32) - ref).abs().max() < 1e-5
    h = ir.cka_distance(x.to(torch.bfloat16))
    assert h.dtype == torch.float32 and h.shape == (6, 6)


def test_cka_properties():
    x = feats(4, 10, 6, dtype=F64)
    # linear CKA is invariant to isotropic scaling, orthogonal transforms and translation of each class
    Q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=F64, generator=torch.Generator().manual_seed(5)))
    y = 3.0 * x @ Q + 2.0
    assert (ir.cka_distance(x) - ir.cka_distance(y)).abs().max() < 1e-12
    # identical classes are at distance 0
    z = torch.cat([x[:1], x[:1]])
    assert ir.cka_distance(z).abs().max() < 1e-12


# ------------------------------------------------------------------ cosine distances, sharpen
def test_classifier_cosine_distance():
    W = torch.randn(7, 5, generator=torch.Generator().manual_seed(2))
    got = ir.classifier_cosine_distance(W)
    Wd = W.double()
    ref = torch.zeros(7, 7, dtype=F64)
    for i in range(7):
        for j in range(7):
            ref[i, j] = 1 - torch.dot(Wd[i], Wd[j]) / (Wd[i].norm() * Wd[j].norm())
    ref.fill_diagonal_(0)
    assert got.dtype == torch.float32 and (got.double() - ref).abs().max() < 1e-6
    # the published one-liner (F.normalize, 1 - W W^T) off the diagonal
    Wn = torch.nn.functional.normalize(W, p=2, dim=-1)
    pub = 1 - Wn @ Wn.T
    off = ~torch.eye(7, dtype=torch.bool)
    assert (got - pub)[off].abs().max() < 1e-6


def test_centroid_cosine_distance():
    x = feats(5, 6, 4)
    got = ir.centroid_cosine_distance(x)
    mu = x.double().mean(1)
    ref = torch.zeros(5, 5, dtype=F64)
    for i in range(5):
        for j in range(5):
            ref[i, j] = 1 - torch.dot(mu[i], mu[j]) / (mu[i].norm() * mu[j].norm())
    ref.fill_diagonal_(0)
    assert (got.double() - ref).abs().max() < 1e-6


def test_sharpen():
    d = torch.rand(5, 5, dtype=F64)
    for kappa in (0.5, 1, 2.0):
        assert (ir.sharpen(d, kappa) - (1 - torch.exp(-kappa * d))).abs().max() < 1e-15
    d32 = d.float().requires_grad_()
    out = ir.sharpen(d32, 1.0)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert torch.allclose(d32.grad, torch.exp(-d32.detach()))


def test_sharpen_kappa_zero_is_no_sharpening():
    """kappa = 0 leaves the distance as the cost (the published code sharpens only for kappa > 0), as a copy."""
    d = torch.rand(4, 4, dtype=F64)
    for kappa in (0, 0.0):
        c = ir.sharpen(d, kappa)
        assert torch.equal(c, d) and c.data_ptr() != d.data_ptr() and c.dtype == d.dtype
    d32 = d.float().requires_grad_()
    ir.sharpen(d32, 0).sum().backward()
    assert torch.equal(d32.grad, torch.ones_like(d32))


def test_real_matrix_roundtrip():
    """The released CIFAR-100 matrix: sharpening keeps it in [0, 1)."""
    from conftest import load_cost_matrix

    d = load_cost_matrix("cifar100_resnet32x4_cka_distance.pth")
    c = ir.sharpen(d, 1.0)
    assert c.shape == (100, 100) and bool((c >= 0).all()) and bool((c < 1).all())


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call,match", [
    (lambda: ir.cka_distance(torch.randn(3, 4)), "class_features"),
    (lambda: ir.cka_distance(torch.randn(3, 1, 4)), "n >= 2"),
    (lambda: ir.cka_distance(torch.randint(0, 3, (3, 4, 2))), "class_features"),
    (lambda: ir.cka_distance(torch.full((3, 4, 2), float("nan"))), "non-finite"),
    (lambda: ir.cka_distance(torch.randn(3, 4, 2), "cosine"), "kernel"),
    (lambda: ir.cka_distance(torch.randn(3, 4, 2), "rbf", sigma=-1.0), "sigma"),
    (lambda: ir.cka_distance(torch.randn(3, 4, 2), "polynomial", degree=0), "degree"),
    (lambda: ir.cka_distance(torch.randn(3, 4, 2), max_chunk_bytes=0), "max_chunk_bytes"),
    (lambda: ir.cka_distance(torch.ones(3, 4, 2)), "CKA undefined"),
    (lambda: ir.cka_distance([[1.0]]), "class_features"),
    (lambda: ir.classifier_cosine_distance(torch.randn(3, 4, 2)), "weight"),
    (lambda: ir.classifier_cosine_distance(torch.zeros(3, 4)), "zero-norm"),
    (lambda: ir.centroid_cosine_distance(torch.randn(3, 4)), "class_features"),
    (lambda: ir.sharpen(torch.rand(3, 3), -1.0), "kappa"),
    (lambda: ir.sharpen(torch.rand(3, 3), float("nan")), "kappa"),
    (lambda: ir.sharpen([0.1], 1.0), "distance"),
])
def test_bad_input(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.parametrize("kernel", ["linear", "polynomial", "rbf"])
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.float64])
def test_cka_class_of_identical_samples_is_an_error_for_every_kernel(kernel, compute_dtype):
    # the mean of n copies of a value is not that value in floating point (0.1 * 7 / 7 != 0.1): the centred Gram
    # matrix of such a class must still be exactly zero, reported as undefined CKA, not turned into distances
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 7, 5, generator=g, dtype=torch.float64)
    x[2] = (0.1 + 7.3 * torch.rand(5, generator=g, dtype=torch.float64))[None, :].expand(7, 5)
    with pytest.raises(ValueError, match=r"CKA undefined\), e.g. classes \[2\]"):
        ir.cka_distance(x, kernel, compute_dtype=compute_dtype)
