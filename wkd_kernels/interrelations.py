"""Category interrelations -> cost matrices for WKD-L.

WKD-L needs a [C, C] cost c_ij between classes. The paper derives it from the teacher: per class i, a matrix
X_i [n, D] of teacher features (logits or pooled feature maps) of n samples of that class, and
d_ij = 1 - CKA(X_i, X_j) (centred kernel alignment), then sharpens it: c = 1 - exp(-kappa * d).

The published tool evaluates CKA pair by pair in a Python loop (C^2 = 10^6 calls on ImageNet). Here every pair
comes from a few batched matrix products: with K~_i the centred n x n kernel (Gram) matrix of class i,

    HSIC(i, j) = <K~_i, K~_j>_F,     CKA_ij = HSIC(i, j) / sqrt(HSIC(i, i) HSIC(j, j)),

so CKA is the cosine similarity between the flattened centred Gram matrices, and all C^2 inner products are one
[C, n^2] x [n^2, C] product. It is accumulated over row blocks of the Gram matrices so that at most
``max_chunk_bytes`` of them exist at a time (memory O(C * rows * n), independent of C^2 * n^2).
For the linear kernel K~_i = X~_i X~_i^T (X~_i centred over its n rows) and
<K~_i, K~_j>_F = ||X~_j^T X~_i||_F^2, the published definition.

Distances are unitless, in [0, 1] for CKA and [0, 2] for the cosine distances; every function returns a
symmetric [C, C] matrix with an exact zero diagonal.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["cka_distance", "classifier_cosine_distance", "centroid_cosine_distance", "sharpen"]

_KERNELS = ("linear", "polynomial", "rbf")
_DEFAULT_CHUNK_BYTES = 256 * 2**20


# ----------------------------------------------------------------------------------------------------------
# argument checks
# ----------------------------------------------------------------------------------------------------------
def _check_float_tensor(x, name: str, fn: str, dims: int, shape_doc: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: `{name}` must be a torch.Tensor {shape_doc}, got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"{fn}: `{name}` must be {dims}-D {shape_doc}, got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: `{name}` must be a floating-point tensor, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{fn}: `{name}` is empty (shape {list(x.shape)})")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{fn}: `{name}` contains non-finite values (inf or nan)")


def _check_positive(value, name: str, fn: str, allow_none: bool = False, integer: bool = False) -> None:
    if value is None and allow_none:
        return
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not (value > 0) or math.isinf(value):
        what = "an integer >= 1" if integer else "a finite number > 0"
        raise ValueError(f"{fn}: `{name}` must be {what}, got {value!r}")


def _out_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _finish(d: Tensor, upper: float, out_dtype: torch.dtype) -> Tensor:
    """Symmetrise, clamp rounding to [0, upper], exact zero diagonal."""
    d = 0.5 * (d + d.transpose(0, 1))
    d = d.clamp(0.0, upper)
    d.fill_diagonal_(0.0)
    return d.to(out_dtype)


# ----------------------------------------------------------------------------------------------------------
# CKA
# ----------------------------------------------------------------------------------------------------------
def _median_nonzero_rows(values: Tensor) -> Tensor:
    """Per row, the numpy-style median (mean of the two middle values for an even count) of the non-zero
    entries of values [R, N] -> [R] (0 for a row without non-zero entries). Vectorised, no host sync."""
    inf = torch.tensor(float("inf"), dtype=values.dtype, device=values.device)
    v, _ = torch.sort(torch.where(values != 0, values, inf), dim=1)  # zeros sorted to the end as +inf
    k = (values != 0).sum(1, keepdim=True)
    lo = ((k - 1).clamp_min(0) // 2)
    hi = (k // 2).clamp_max(values.shape[1] - 1)
    a, b = v.gather(1, lo), v.gather(1, hi)
    med = torch.where(k % 2 == 1, a, 0.5 * (a + b)).squeeze(1)
    return torch.where(k.squeeze(1) > 0, med, torch.zeros_like(med))


def _rbf_inv_two_sigma2(X: Tensor, sigma: Optional[float], chunk_classes: int) -> Tensor:
    """Per class 1 / (2 sigma_i^2) [C]; sigma_i^2 = median non-zero squared distance within class i if not given."""
    C, n, _ = X.shape
    if sigma is not None:
        return X.new_full((C,), 0.5 / (sigma * sigma))
    out = X.new_empty(C)
    iu = torch.triu_indices(n, n, offset=1, device=X.device)
    for c0 in range(0, C, chunk_classes):
        d2 = _sq_dists(X[c0:c0 + chunk_classes], X[c0:c0 + chunk_classes])
        med = _median_nonzero_rows(d2[:, iu[0], iu[1]])
        # all samples of a class identical: K = 1 everywhere, its centred Gram is 0 and the CKA check reports it
        out[c0:c0 + med.shape[0]] = torch.where(med > 0, 0.5 / med, torch.zeros_like(med))
    return out


def _sq_dists(A: Tensor, X: Tensor) -> Tensor:
    """Squared distances between rows: A [c, r, D], X [c, n, D] -> [c, r, n], clamped at 0."""
    g = torch.bmm(A, X.transpose(1, 2))
    na = (A * A).sum(-1, keepdim=True)
    nx = (X * X).sum(-1).unsqueeze(1)
    return (na + nx - 2.0 * g).clamp_min(0.0)


def _kernel_rows(X: Tensor, r0: int, r1: int, kernel: str, gamma: float, coef0: float, degree: int,
                 inv_2s2: Optional[Tensor]) -> Tensor:
    """Rows r0:r1 of the (uncentred) kernel matrix of every class: [C, r1 - r0, n]."""
    A = X[:, r0:r1]
    if kernel == "linear":
        return torch.bmm(A, X.transpose(1, 2))
    if kernel == "polynomial":
        return (gamma * torch.bmm(A, X.transpose(1, 2)) + coef0).pow(degree)
    d2 = _sq_dists(A, X)
    # exact zeros on the diagonal, as K(x, x) = 1
    idx = torch.arange(r0, r1, device=X.device)
    d2[:, idx - r0, idx] = 0.0
    return torch.exp(-d2 * inv_2s2.view(-1, 1, 1))


def cka_distance(class_features: Tensor, kernel: str = "linear", *, degree: int = 3, gamma: Optional[float] = None,
                 coef0: float = 1.0, sigma: Optional[float] = None, compute_dtype: torch.dtype = torch.float64,
                 max_chunk_bytes: int = _DEFAULT_CHUNK_BYTES) -> Tensor:
    """Class distance d_ij = 1 - CKA(X_i, X_j) for all pairs of classes at once.

    Args:
        class_features: [C, n, D] features of n samples for each of C classes (the same n for every class;
            sample k of class i is paired with sample k of class j, as in the published definition).
        kernel: ``"linear"`` (the paper's choice): CKA = ||X~_j^T X~_i||_F^2 / (||X~_i^T X~_i||_F ||X~_j^T X~_j||_F)
            with X~ centred over its n rows; ``"polynomial"``: k(x, y) = (gamma x.y + coef0)^degree;
            ``"rbf"``: k(x, y) = exp(-||x - y||^2 / (2 sigma^2)). For the non-linear kernels HSIC is computed on
            the centred n x n Gram matrices H K H.
        degree, gamma, coef0: polynomial kernel parameters (gamma defaults to 1/D, as scikit-learn).
        sigma: RBF bandwidth in feature units; ``None`` (default) uses per class sigma_i = sqrt(median of the
            non-zero squared distances between the n samples of class i) (the common CKA reference code).
        compute_dtype: dtype of the computation (float64 by default; float32 is faster on GPUs).
        max_chunk_bytes: bound on the memory of the Gram-matrix blocks held at once (the result, the inputs and
            O(C * n) statistics come on top).

    Returns:
        [C, C] distances in [0, 1] (unitless), symmetric, zero diagonal, in the dtype of ``class_features``
        (float32 for half inputs), on its device.

    Raises:
        ValueError if a class has a zero centred Gram matrix (e.g. all n samples identical), where CKA is undefined.
    """
    fn = "cka_distance"
    _check_float_tensor(class_features, "class_features", fn, 3, "[C, n, D]")
    if kernel not in _KERNELS:
        raise ValueError(f"{fn}: `kernel` must be one of {_KERNELS}, got {kernel!r}")
    if compute_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{fn}: `compute_dtype` must be torch.float32 or torch.float64, got {compute_dtype}")
    _check_positive(max_chunk_bytes, "max_chunk_bytes", fn, integer=True)
    C, n, D = class_features.shape
    if n < 2:
        raise ValueError(f"{fn}: `class_features` needs n >= 2 samples per class, "
                         f"got shape {list(class_features.shape)}")
    if kernel == "polynomial":
        _check_positive(degree, "degree", fn, integer=True)
        _check_positive(gamma, "gamma", fn, allow_none=True)
        if isinstance(coef0, bool) or not isinstance(coef0, (int, float)) or not math.isfinite(coef0):
            raise ValueError(f"{fn}: `coef0` must be a finite number, got {coef0!r}")
    if kernel == "rbf":
        _check_positive(sigma, "sigma", fn, allow_none=True)
    gamma = (1.0 / D) if gamma is None else float(gamma)

    X = class_features.to(compute_dtype)
    itemsize = X.element_size()
    # rows of the Gram matrices per block: C * rows * n numbers (x2 for temporaries) within the budget
    rows = max(1, min(n, max_chunk_bytes // max(1, 2 * C * n * itemsize)))
    chunk_classes = max(1, min(C, max_chunk_bytes // max(1, 3 * n * n * itemsize)))

    inv_2s2 = None
    if kernel != "polynomial":
        # linear and RBF Gram matrices are unchanged (after centring) by a shift of the samples: shifted by the first
        # sample, a class of identical samples is exactly zero, so its centred Gram matrix is exactly zero (reported
        # below) instead of rounding noise (e.g. of na + nx - 2 x.y in the squared distances), and a large common
        # offset does not cost digits.
        X = X - X[:, :1]
    if kernel == "rbf":
        inv_2s2 = _rbf_inv_two_sigma2(X, sigma, chunk_classes)
    if kernel == "linear":
        X = X - X.mean(1, keepdim=True)  # centring X centres its linear Gram matrix: H X X^T H = X~ X~^T
        row_mean = total_mean = None
    else:
        # pass 1: row means m_i [C, n] and grand means M_i [C] of each class's kernel matrix, for
        # K~ = H K H: K~_kl = K_kl - m_k - m_l + M (K symmetric)
        # K~ is unchanged by a constant added to K: K is shifted by its first entry per class, so that a constant
        # kernel matrix (all samples identical) centres to exact zeros rather than to the rounding of its means.
        k_shift = _kernel_rows(X, 0, 1, kernel, gamma, coef0, degree, inv_2s2)[:, 0, :1].unsqueeze(1)  # [C, 1, 1]
        row_mean = X.new_empty(C, n)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            row_mean[:, r0:r1] = (_kernel_rows(X, r0, r1, kernel, gamma, coef0, degree, inv_2s2) - k_shift).mean(-1)
        total_mean = row_mean.mean(1)

    # pass 2: S = sum over row blocks of Z_blk Z_blk^T, Z_blk = centred Gram rows flattened [C, rows * n]
    S = X.new_zeros(C, C)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        Kb = _kernel_rows(X, r0, r1, kernel, gamma, coef0, degree, inv_2s2)
        if row_mean is not None:
            Kb = Kb - k_shift - row_mean[:, r0:r1].unsqueeze(2) - row_mean.unsqueeze(1) + total_mean.view(-1, 1, 1)
        Z = Kb.reshape(C, -1)
        S.addmm_(Z, Z.transpose(0, 1))
        del Kb, Z

    diag = S.diagonal().clone()
    bad = (diag <= 0) | ~torch.isfinite(diag)
    if bool(bad.any()):
        idx = torch.nonzero(bad).flatten()[:5].tolist()
        raise ValueError(f"{fn}: `class_features` has classes whose centred {kernel} Gram matrix is zero or not "
                         f"finite (CKA undefined), e.g. classes {idx}: are all samples of a class identical?")
    norm = diag.sqrt()
    cka = S / norm.unsqueeze(1) / norm.unsqueeze(0)
    return _finish(1.0 - cka, 1.0, _out_dtype(class_features))


# ----------------------------------------------------------------------------------------------------------
# cosine distances
# ----------------------------------------------------------------------------------------------------------
def _cosine_distance(V: Tensor, fn: str, name: str, compute_dtype: torch.dtype) -> Tensor:
    Vc = V.to(compute_dtype)
    norms = Vc.norm(dim=1)
    if bool((norms == 0).any()):
        idx = torch.nonzero(norms == 0).flatten()[:5].tolist()
        raise ValueError(f"{fn}: `{name}` has zero-norm rows (cosine undefined), e.g. rows {idx}")
    Vn = Vc / norms.unsqueeze(1)
    return _finish(1.0 - Vn @ Vn.transpose(0, 1), 2.0, _out_dtype(V))


def classifier_cosine_distance(weight: Tensor, *, compute_dtype: torch.dtype = torch.float64) -> Tensor:
    """d_ij = 1 - cos(w_i, w_j) between the rows of the teacher's last linear layer (the paper's "fc" variant).

    Args:
        weight: [C, D] classifier weight (``teacher.fc.weight``: one row per class).
        compute_dtype: dtype of the computation (float64 by default).

    Returns:
        [C, C] distances in [0, 2] (unitless), symmetric, zero diagonal, in the dtype of ``weight`` (float32 for
        half inputs). No gradient is intended (the weight is detached).
    """
    fn = "classifier_cosine_distance"
    _check_float_tensor(weight, "weight", fn, 2, "[C, D]")
    if compute_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{fn}: `compute_dtype` must be torch.float32 or torch.float64, got {compute_dtype}")
    return _cosine_distance(weight.detach(), fn, "weight", compute_dtype)


def centroid_cosine_distance(class_features: Tensor, *, compute_dtype: torch.dtype = torch.float64) -> Tensor:
    """d_ij = 1 - cos(mu_i, mu_j) between class centroids mu_i = mean of the n feature vectors of class i.

    Args:
        class_features: [C, n, D] features of n samples for each of C classes.
        compute_dtype: dtype of the computation (float64 by default).

    Returns:
        [C, C] distances in [0, 2] (unitless), symmetric, zero diagonal, dtype of ``class_features`` (float32 for
        half inputs).
    """
    fn = "centroid_cosine_distance"
    _check_float_tensor(class_features, "class_features", fn, 3, "[C, n, D]")
    if compute_dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{fn}: `compute_dtype` must be torch.float32 or torch.float64, got {compute_dtype}")
    centroids = class_features.detach().to(compute_dtype).mean(1)
    out = _cosine_distance(centroids, fn, "class_features", compute_dtype)
    return out.to(_out_dtype(class_features))


# ----------------------------------------------------------------------------------------------------------
# sharpening
# ----------------------------------------------------------------------------------------------------------
def sharpen(distance: Tensor, kappa: float) -> Tensor:
    """c = 1 - exp(-kappa * d): the paper's sharpening of a class distance into a WKD-L cost.

    Args:
        distance: [C, C] (or any shape) non-negative distances d, unitless.
        kappa: sharpening factor >= 0 (1 for ResNet34->ResNet18 and CIFAR-100, 2 for ResNet50->MobileNetV1).
            Larger kappa pushes every non-zero distance towards 1. ``kappa = 0`` means "no sharpening", as in the
            published WKD code (which sharpens only when kappa > 0): the distance itself is the cost (a copy of
            ``distance`` is returned; ``1 - exp(-0 * d)`` would be all zeros, a cost that makes WKD-L vanish).

    Returns:
        Tensor of the shape and dtype of ``distance``, values in [0, 1) for d >= 0 and kappa > 0 (``distance``'s
        values for kappa = 0). Differentiable.
    """
    fn = "sharpen"
    if not isinstance(distance, Tensor):
        raise TypeError(f"{fn}: `distance` must be a torch.Tensor, got {type(distance).__name__}")
    if not distance.is_floating_point():
        raise TypeError(f"{fn}: `distance` must be a floating-point tensor, got {distance.dtype}")
    if not (isinstance(kappa, (int, float)) and not isinstance(kappa, bool) and kappa == 0):
        _check_positive(kappa, "kappa", fn)
    if kappa == 0:
        return distance.clone()
    return -torch.expm1(-float(kappa) * distance)
