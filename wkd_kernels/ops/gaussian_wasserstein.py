"""gaussian_wasserstein: the WKD-F distance between the Gaussians of two feature maps (Python composition of the
feature_stats, nuclear_norm, sqrtm and bures_wasserstein ops; docs/design.md section 4, the low-rank path)."""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import settings
from .bures_wasserstein import bures_wasserstein_op
from .checks import (as_real, cell_bounds, cell_sizes, check_feature_stats_args, check_finite_values, check_method,
                     check_same, stats_dtype, values_check_requested)
from .common import resolve_backend, resolve_iters, reverse_mode_only, upcast
from .feature_layout import as_nchw
from .feature_stats import feature_stats_op
from .nuclear_norm import nuclear_norm_op
from .sqrtm import sqrtm_op

__all__ = ["gaussian_wasserstein", "gaussian_wasserstein_terms", "GaussianW2Terms", "sqrt_zero_subgradient"]


class GaussianW2Terms(NamedTuple):
    """The two terms of W^2 per sample (and cell): ``mean`` = |mu_s - mu_t|^2 and ``cov`` = the covariance term
    (diag: sum_c (sqrt(var_s + eps) - sqrt(var_t + eps))^2; full: tr S_s + tr S_t - 2 tr (S_s^1/2 S_t S_s^1/2)^1/2).
    Shapes [N] (grid == 1) or [N, grid*grid]; W^2 = mean + cov."""

    mean: Tensor
    cov: Tensor


def sqrt_zero_subgradient(v: Tensor) -> Tensor:
    """sqrt(v) whose gradient at v = 0 is 0 instead of inf (a constant channel with eps = 0 would otherwise give
    inf * 0 = NaN in every entry of its gradient); 0 is a subgradient of the distance there."""
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), torch.zeros_like(v))


# Cell gather indices per (H, W, grid, device): built once, then reused, so that eager calls copy nothing from the
# host after the first. A bounded cache of constants derived from the arguments (not a setting): the least recently
# used entries are dropped beyond CELL_INDEX_CACHE_SIZE, so that a run over many feature-map sizes (e.g. varying
# input resolutions) does not keep every one's indices alive.
CELL_INDEX_CACHE_SIZE = 64


def _build_cell_gather_index(H: int, W: int, grid: int, device):
    cells = [[h * W + w for h in range(h0, h1) for w in range(w0, w1)]
             for h0, h1 in cell_bounds(H, grid) for w0, w1 in cell_bounds(W, grid)]
    max_m = max(len(c) for c in cells)
    idx = torch.tensor([c + [0] * (max_m - len(c)) for c in cells], dtype=torch.long, device=device)
    mask = torch.tensor([[1.0] * len(c) + [0.0] * (max_m - len(c)) for c in cells], device=device)
    m = torch.tensor([float(len(c)) for c in cells], device=device)
    return idx, mask, m


@functools.lru_cache(maxsize=CELL_INDEX_CACHE_SIZE)
def _cached_cell_gather_index(H: int, W: int, grid: int, device: str):
    return _build_cell_gather_index(H, W, grid, torch.device(device))


def cell_gather_index(H: int, W: int, grid: int, device):
    """Flat positions of every cell, padded: idx [P, max_m] (long), mask [P, max_m], m [P]. Cached per device (the
    CELL_INDEX_CACHE_SIZE most recently used sizes), so that eager calls copy nothing from the host after the first
    (no synchronisation, CUDA-graph capturable)."""
    if torch.compiler.is_compiling():
        return _build_cell_gather_index(H, W, grid, device)
    return _cached_cell_gather_index(int(H), int(W), int(grid), str(torch.device(device)))


def _low_rank_terms(f_s: Tensor, f_t: Tensor, grid: int, unbiased: bool, method: str, num_iters: int, kind: str,
                    precision: str) -> GaussianW2Terms:
    """The W^2 terms per sample and cell with tr (S_s^1/2 S_t S_s^1/2)^1/2 = |Xs^T Xt|_* / den (docs/design.md
    section 4): [N, P] each."""
    N, C, H, W = f_s.shape
    xs, xt = f_s.flatten(2), f_t.flatten(2)
    if grid == 1:
        Xs, Xt = xs.unsqueeze(1), xt.unsqueeze(1)  # [N, 1, C, m]
        m = torch.full((1,), float(H * W), dtype=f_s.dtype, device=f_s.device)
        mask = None
    else:
        idx, mask, m = cell_gather_index(H, W, grid, f_s.device)
        mask, m = mask.to(f_s.dtype), m.to(f_s.dtype)
        Xs = xs[:, :, idx].permute(0, 2, 1, 3) * mask[None, :, None, :]  # [N, P, C, max_m], zero padding
        Xt = xt[:, :, idx].permute(0, 2, 1, 3) * mask[None, :, None, :]
    mu_s = Xs.sum(-1) / m[:, None]
    mu_t = Xt.sum(-1) / m[:, None]
    Xcs, Xct = Xs - mu_s.unsqueeze(-1), Xt - mu_t.unsqueeze(-1)
    if mask is not None:
        Xcs, Xct = Xcs * mask[None, :, None, :], Xct * mask[None, :, None, :]
    M = Xcs.mT @ Xct  # [N, P, max_m, max_m] cross-Gram
    P_ = M.shape[1]
    if method == "newton_schulz":
        nuc = nuclear_norm_op(M.flatten(0, 1), num_iters, kind, precision)[0].view(N, P_)
    else:  # tr (M^T M)^1/2 by the exact square root
        A = M.flatten(0, 1)
        nuc = sqrtm_op(A.mT @ A, "eigh", num_iters, kind, precision).diagonal(0, -2, -1).sum(-1).view(N, P_)
    den = m - (1.0 if unbiased else 0.0)
    tr_s = (Xcs * Xcs).sum((-1, -2))  # (x * x: aten::pow is several times slower on CPU)
    tr_t = (Xct * Xct).sum((-1, -2))
    return GaussianW2Terms((mu_s - mu_t).square().sum(-1), (tr_s + tr_t - 2.0 * nuc) / den)




def gaussian_wasserstein_terms(f_s: Tensor, f_t: Tensor, covariance: str = "full", grid: int = 1, eps: float = 1e-5,
                               *, unbiased: bool = True, method: str = "newton_schulz",
                               num_iters: Optional[int] = None, path: str = "auto", backend: Optional[str] = None,
                               precision: Optional[str] = None, check_values: Optional[bool] = None,
                               layout: str = "nchw", num_prefix_tokens: int = 0) -> GaussianW2Terms:
    """:func:`gaussian_wasserstein` split into its mean and covariance terms (:class:`GaussianW2Terms`), each
    statistic computed once (WKD-F weighs the two terms differently). Same arguments as
    :func:`gaussian_wasserstein`."""
    op = "wkd.gaussian_wasserstein"
    if covariance not in ("diag", "full"):
        raise ValueError(f"{op}: `covariance` must be 'full' or 'diag', got {covariance!r}")
    if path not in ("auto", "low_rank", "dense"):
        raise ValueError(f"{op}: `path` must be 'auto', 'low_rank' or 'dense', got {path!r}")
    # token sequences / channels-last maps -> [N, C, H, W] views (ops/feature_layout.py)
    f_s = as_nchw(f_s, layout, num_prefix_tokens, name="f_s", fn=op)
    f_t = as_nchw(f_t, layout, num_prefix_tokens, name="f_t", fn=op) if isinstance(f_t, Tensor) else f_t
    check_feature_stats_args(f_s, grid, unbiased, op)
    if not isinstance(f_t, Tensor) or list(f_t.shape) != list(f_s.shape):
        raise ValueError(f"{op}: `f_t` must have the shape of `f_s` {list(f_s.shape)}, got "
                         f"{list(f_t.shape) if isinstance(f_t, Tensor) else type(f_t).__name__}")
    check_same(f_t, f_s, "f_t", "f_s", op)
    f_s, f_t = reverse_mode_only(op, f_s, f_t)
    try:
        eps = as_real(eps, "eps", op)
    except ValueError:
        raise ValueError(f"{op}: `eps` must be a finite number >= 0 (Python/NumPy scalar or 0-d tensor), got "
                         f"{type(eps).__name__} {eps!r}") from None
    if not (eps >= 0) or math.isinf(eps):
        raise ValueError(f"{op}: `eps` must be a finite number >= 0, got {eps!r}")
    check_method(method, op)
    num_iters = resolve_iters(num_iters, stats_dtype(f_s.dtype), op)
    precision = settings.resolve_precision(precision, "gaussian", op)
    kind = resolve_backend(backend, f_s, op, has_cuda_cpp=False)
    if kind == "cpu" and not torch.compiler.is_compiling() or values_check_requested(check_values, kind, f_s.device):
        # here (also on CPU, where the kernels would check their own arguments), so that errors name f_s / f_t
        check_finite_values(f_s, "f_s", op)
        check_finite_values(f_t, "f_t", op)
    N, C, H, W = f_s.shape
    f_s, f_t = upcast(f_s), upcast(f_t)
    grid, unbiased = int(grid), bool(unbiased)
    if covariance == "diag":
        mu_s, v_s = feature_stats_op(f_s, grid, False, unbiased, kind)
        mu_t, v_t = feature_stats_op(f_t, grid, False, unbiased, kind)
        terms = GaussianW2Terms((mu_s - mu_t).square().sum(-1),
                                (sqrt_zero_subgradient(v_s + eps) - sqrt_zero_subgradient(v_t + eps)).square().sum(-1))
    elif path == "low_rank" or (path == "auto" and max(cell_sizes(H, W, grid)) < C):
        terms = _low_rank_terms(f_s, f_t, grid, unbiased, method, num_iters, kind, precision)
    else:
        mu_s, S_s = feature_stats_op(f_s, grid, True, unbiased, kind)
        mu_t, S_t = feature_stats_op(f_t, grid, True, unbiased, kind)
        if eps > 0:
            eye = torch.eye(C, dtype=S_s.dtype, device=S_s.device)
            S_s, S_t = S_s + eps * eye, S_t + eps * eye
        P_ = grid * grid
        zero = mu_s.new_zeros(N * P_, C)  # the covariance term alone: Bures between zero-mean Gaussians
        cov = bures_wasserstein_op(zero, S_s.reshape(N * P_, C, C), zero, S_t.reshape(N * P_, C, C), method,
                                   num_iters, kind, precision).view(N, P_)
        terms = GaussianW2Terms((mu_s - mu_t).square().sum(-1).view(N, P_), cov)
    if grid == 1:
        terms = GaussianW2Terms(terms.mean.reshape(N), terms.cov.reshape(N))
    return terms


def gaussian_wasserstein(f_s: Tensor, f_t: Tensor, covariance: str = "full", grid: int = 1, eps: float = 1e-5, *,
                         unbiased: bool = True, method: str = "newton_schulz", num_iters: Optional[int] = None,
                         path: str = "auto", backend: Optional[str] = None, precision: Optional[str] = None,
                         check_values: Optional[bool] = None, layout: str = "nchw",
                         num_prefix_tokens: int = 0) -> Tensor:
    """Squared 2-Wasserstein distance between the Gaussians of two feature maps, per sample (and grid cell): WKD-F.

    Each sample (each cell of a ``grid`` x ``grid`` adaptive-pooling partition) of a feature map [N, C, H, W] is
    modelled as a Gaussian over its m spatial positions (mean and (co)variance of the C channels, see
    :func:`wkd_kernels.feature_stats`), and W^2 = |mu_s - mu_t|^2 + tr S_s + tr S_t - 2 tr (S_s^1/2 S_t S_s^1/2)^1/2.

    covariance="diag": W^2 = sum_c (mu_s - mu_t)^2 + (sqrt(var_s + eps) - sqrt(var_t + eps))^2 -- the published WKD-F
        formula (per-sample sum; the published loss sums these over the batch and divides by N * grid^2).
    covariance="full", low-rank path (``path="auto"`` takes it when every cell has m < C positions): with the
        centred cell features X [C, m], S = X X^T / den and tr (S_s^1/2 S_t S_s^1/2)^1/2 = |X_s^T X_t|_* / den
        exactly: a nuclear norm of the m x m cross-Gram (Newton-Schulz polar iteration), never a C x C root. This
        path is exact at any rank and needs no regularisation (its gradient, the polar factor, is bounded), so it
        ignores ``eps``.
    covariance="full", C x C path (m >= C): covariances by :func:`wkd_kernels.feature_stats`, plus eps I, then
        :func:`wkd_kernels.bures_wasserstein`.

    Args:
        f_s, f_t: student and teacher features of the same shape, dtype and device (half computed in float32), in
            ``layout``: ``"nchw"`` [N, C, H, W], ``"nlc"`` transformer tokens [N, P + H*W, D] (positions = the H*W
            patch tokens, a square grid; channels = D), ``"nhwc"`` [N, H, W, D] (Swin), or ``"auto"`` (4-D is NCHW,
            3-D is tokens); default ``"nchw"``; see ``wkd_kernels.ops.feature_layout``.
        covariance: ``"full"`` or ``"diag"``.
        grid: cells per side (1 <= grid <= min(H, W)).
        eps: >= 0, added to the variances (diag) or to the covariance diagonal (C x C path); keeps the gradient
            finite for constant channels. 1e-5 is the published WKD-F value. With eps = 0 the diag path's
            sqrt(var) takes the subgradient 0 at a zero variance (a finite gradient, not NaN).
        unbiased: divide by m - 1 (published) or m.
        method, num_iters: square-root / nuclear-norm method (see :func:`wkd_kernels.sqrtm`; ``"eigh"`` on the
            low-rank path computes tr (M^T M)^1/2 with the exact root, which squares M's condition number: less
            accurate in float32). ``num_iters=None`` (default): the bound from the dtype (float32 45, float64 100;
            each matrix stops once converged), so that the low-rank path is float64-accurate for a float64 caller.
        path: ``"auto"``, ``"low_rank"`` or ``"dense"`` (C x C) to force one full-covariance path.
        backend, precision: which kernels, and the float32 product precision of the Triton ones (see
            :func:`wkd_kernels.sqrtm`); None: the settings (:mod:`wkd_kernels.settings`).
        check_values: see :func:`wkd_kernels.sqrtm`.
        layout, num_prefix_tokens: the layout of ``f_s`` and ``f_t`` (above) and, for tokens, how many leading
            class / distillation / register tokens to leave out (timm's ``model.num_prefix_tokens``).

    Returns:
        [N] (grid == 1) or [N, grid*grid] squared distances in squared feature units. Rounding can make values that
        are ~0 slightly negative; they are not clamped (the gradient stays that of the formula).
        :func:`gaussian_wasserstein_terms` returns the mean and covariance terms separately.
    """
    t = gaussian_wasserstein_terms(f_s, f_t, covariance, grid, eps, unbiased=unbiased, method=method,
                                   num_iters=num_iters, path=path, backend=backend, precision=precision,
                                   check_values=check_values, layout=layout, num_prefix_tokens=num_prefix_tokens)
    return t.mean + t.cov
