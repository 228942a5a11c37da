"""Gaussian ops for WKD-F (docs/design.md section 4): typed wrappers, fake kernels, autograd, CUDA routing, public API.

Ops (schemas in csrc/ops.cpp, CPU kernels in csrc/cpu/{feature_stats,sqrtm,nuclear_norm,bures_wasserstein}.cpp,
GPU kernels in wkd_kernels/triton/{feature_stats,sqrtm,nuclear_norm,bures_wasserstein}.py):

  wkd::feature_stats(x, grid, full, unbiased) -> (mean [N,P,C], var [N,P,C] | cov [N,P,C,C])   + _backward
  wkd::sqrtm(S, method, num_iters) -> S^1/2                                                    + _backward
  wkd::nuclear_norm(M, num_iters) -> (value [B], polar [B,p,q])          (backward = grad * polar, no kernel)
  wkd::bures_wasserstein(mu1, S1, mu2, S2, method, num_iters)
      -> (w2 [B], S1^1/2, S2^1/2, polar factor of S2^1/2 S1^1/2)                                + _backward

Public functions: :func:`feature_stats`, :func:`sqrtm`, :func:`nuclear_norm`, :func:`bures_wasserstein`,
:func:`gaussian_wasserstein` (the WKD-F distance between feature maps, with the low-rank path of docs/design.md 4).

Accuracy of the two square-root methods (documented in :func:`sqrtm`, pinned by python_tests/test_gaussian_sqrtm.py
and test_edge_cases.py): Newton-Schulz converges for every eigenvalue l with l / tr S >~ 1.5^(-2 num_iters); with the
default ``num_iters=None`` the bound comes from the dtype (float32 45, float64 100 steps) and each matrix stops once
converged (its residual |I - Z Y|_F, which sees every eigenvalue, below sqrt(n eps); one more step squares it), so a
float64 caller gets a float64-accurate root of well-conditioned input; on rank-deficient input it stops (per matrix) before rounding in the
null space is amplified, leaving relative errors of the root ~1e-4 in float32 (~1e-8 in float64). ``eigh`` is exact
to rounding; on rank-deficient input the error is that of the eigenvalues near 0, ~n eps |S| each, ~sqrt(n eps |S|)
in the root. The polar iteration of :func:`nuclear_norm` likewise runs at least log(1/eps)/log(1.5) steps (float32 40,
float64 89: every singular value >= eps |M|_F converged) and then stops per matrix once the value no longer grows.
Clearly indefinite input (an eigenvalue below -max(sqrt(eps), 100 n eps) |S|_F, or a negative trace) is an error on
CPU and with ``check_values=True``; on CUDA without value checks a negative trace gives NaN. Double backward
(differentiating a gradient) raises a clear error.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _build  # noqa: F401  (loads wkd_kernels._C, which defines the schemas)
from .ops import as_int, as_real, first_order_only

__all__ = ["feature_stats", "sqrtm", "nuclear_norm", "bures_wasserstein", "gaussian_wasserstein"]

_HALF = (torch.float16, torch.bfloat16)
_FLOATS = (torch.float32, torch.float64)
_METHODS = ("newton_schulz", "eigh")


# ----------------------------------------------------------------------------------------------------------
# Argument checks (shapes, dtypes, scalars: free). Python mirror of csrc/gaussian_common.h, used by the fake
# kernels and the CUDA path; the CPU kernels check in C++. Same exception types (ValueError / TypeError).
# ----------------------------------------------------------------------------------------------------------
def cell_bounds(size: int, grid: int) -> List[Tuple[int, int]]:
    """Adaptive-pooling cells along one axis: (floor(i size / grid), ceil((i + 1) size / grid)) for i < grid."""
    return [((i * size) // grid, ((i + 1) * size + grid - 1) // grid) for i in range(grid)]


def _cell_sizes(H: int, W: int, grid: int) -> List[int]:
    return [(h1 - h0) * (w1 - w0) for h0, h1 in cell_bounds(H, grid) for w0, w1 in cell_bounds(W, grid)]


def _is_int(v) -> bool:
    """Python and NumPy integers (not bool)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_feature_stats_args(x: Tensor, grid: int, unbiased: bool, op: str = "wkd.feature_stats") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: `x` must be a tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: `x` must be 4-D [N, C, H, W], got shape {list(x.shape)}")
    if x.dtype not in _FLOATS + _HALF:
        raise TypeError(f"{op}: `x` must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.shape[1] < 1 or x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{op}: `x` needs at least one channel and one spatial position, got shape {list(x.shape)}")
    if not _is_int(grid) or grid < 1:
        raise ValueError(f"{op}: `grid` must be an integer >= 1, got {grid!r}")
    H, W = x.shape[2], x.shape[3]
    if grid > H or grid > W:
        raise ValueError(f"{op}: `grid` ({grid}) must not exceed the spatial size H x W = {H} x {W} of `x`")
    if unbiased:
        m_min = min(_cell_sizes(H, W, grid))
        if m_min < 2:
            raise ValueError(f"{op}: `unbiased` statistics need at least 2 positions per cell, but `grid`={grid} on a "
                             f"{H} x {W} map gives a cell of {m_min} position; use a smaller grid or unbiased=False")


def check_square_batch(S: Tensor, name: str, op: str) -> None:
    if not isinstance(S, Tensor):
        raise TypeError(f"{op}: `{name}` must be a tensor, got {type(S).__name__}")
    if S.dim() != 3:
        raise ValueError(f"{op}: `{name}` must be 3-D [B, n, n] (a batch of square matrices), got shape "
                         f"{list(S.shape)}")
    if S.shape[1] != S.shape[2]:
        raise ValueError(f"{op}: `{name}` must hold square matrices [B, n, n], got shape {list(S.shape)}")
    if S.shape[1] < 1:
        raise ValueError(f"{op}: `{name}` must hold matrices of size n >= 1, got shape {list(S.shape)}")
    if S.dtype not in _FLOATS:
        raise TypeError(f"{op}: `{name}` must be float32 or float64, got {S.dtype} (the Python wrappers compute "
                        "float16/bfloat16 in float32)")


def check_method(method: str, op: str) -> None:
    if method not in _METHODS:
        raise ValueError(f"{op}: `method` must be 'newton_schulz' or 'eigh', got {method!r}")


def check_num_iters(num_iters: int, op: str) -> None:
    if not _is_int(num_iters) or num_iters < 1:
        raise ValueError(f"{op}: `num_iters` must be an integer >= 1, got {num_iters!r}")


def _check_same(t: Tensor, ref: Tensor, name: str, ref_name: str, op: str) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{op}: `{name}` has dtype {t.dtype} but `{ref_name}` has {ref.dtype}; all inputs must share "
                        "one dtype")
    if t.device != ref.device:
        raise ValueError(f"{op}: `{name}` is on {t.device} but `{ref_name}` is on {ref.device}")


def check_bures_args(mu1: Tensor, S1: Tensor, mu2: Tensor, S2: Tensor, op: str = "wkd.bures_wasserstein") -> None:
    for name, t in (("mu1", mu1), ("mu2", mu2), ("S2", S2)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: `{name}` must be a tensor, got {type(t).__name__}")
    check_square_batch(S1, "S1", op)
    B, n = S1.shape[0], S1.shape[1]
    if list(S2.shape) != [B, n, n]:
        raise ValueError(f"{op}: `S2` must be [B, n, n] = {[B, n, n]} like `S1`, got {list(S2.shape)}")
    for name, t in (("mu1", mu1), ("mu2", mu2)):
        if list(t.shape) != [B, n]:
            raise ValueError(f"{op}: `{name}` must be [B, n] = {[B, n]} to match `S1`, got {list(t.shape)}")
    _check_same(S2, S1, "S2", "S1", op)
    _check_same(mu1, S1, "mu1", "S1", op)
    _check_same(mu2, S1, "mu2", "S1", op)


def check_nuclear_norm_args(M: Tensor, num_iters: int, op: str = "wkd.nuclear_norm") -> None:
    if not isinstance(M, Tensor):
        raise TypeError(f"{op}: `M` must be a tensor, got {type(M).__name__}")
    if M.dim() != 3:
        raise ValueError(f"{op}: `M` must be 3-D [B, p, q], got shape {list(M.shape)}")
    if M.shape[1] < 1 or M.shape[2] < 1:
        raise ValueError(f"{op}: `M` must hold matrices with p, q >= 1, got shape {list(M.shape)}")
    if M.dtype not in _FLOATS:
        raise TypeError(f"{op}: `M` must be float32 or float64, got {M.dtype} (the Python wrappers compute "
                        "float16/bfloat16 in float32)")
    check_num_iters(num_iters, op)


# Value checks: they read the data (a device-to-host sync on GPU). The CPU kernels always run them (in C++); on CUDA
# the public functions run them when check_values=True or WKD_CHECK_VALUES=1.
def _values_check_requested(check_values: Optional[bool]) -> bool:
    if check_values is not None:
        return bool(check_values)
    return os.environ.get("WKD_CHECK_VALUES", "0").strip().lower() in ("1", "true", "yes", "on")


def check_finite_values(t: Tensor, name: str, op: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{op}: `{name}` contains non-finite values (inf or nan)")


def check_symmetric_values(S: Tensor, name: str, op: str) -> None:
    if S.numel() == 0:
        return
    scale = S.abs().amax((-1, -2))
    asym = (S - S.mT).abs().amax((-1, -2))
    if not bool((asym <= scale * 1e-4).all()):
        raise ValueError(f"{op}: `{name}` must be symmetric (|S - S^T| <= 1e-4 max|S| per matrix); the largest "
                         f"asymmetry is {float(asym.max())}")


def check_psd_values(S: Tensor, name: str, op: str) -> None:
    """The CUDA counterpart (check_values=True) of the CPU kernels' test (csrc/gaussian_common.h, check_psd):
    reject S with an eigenvalue below -tau |S|_F, tau = max(sqrt(eps), 100 n eps); rounding-level ones pass."""
    if S.numel() == 0:
        return
    n = S.shape[-1]
    eps = torch.finfo(S.dtype).eps
    tau = max(math.sqrt(eps), 100.0 * n * eps)
    Sd = ((S + S.mT) * 0.5).double()
    fro = Sd.flatten(1).norm(dim=1)[:, None, None]
    eye = torch.eye(n, dtype=torch.float64, device=S.device)
    info = torch.linalg.cholesky_ex(Sd + eye * (fro * tau + torch.finfo(torch.float64).tiny)).info
    bad = info != 0
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        lmin = float(torch.linalg.eigvalsh(Sd[b]).min())
        raise ValueError(f"{op}: `{name}` must be positive semi-definite, but matrix {b} of the batch has the "
                         f"eigenvalue {lmin:.6g} (|S|_F = {float(fro[b]):.6g}); negative eigenvalues below "
                         f"-{tau:.3g} |S|_F are rejected (rounding-level ones are clamped to 0)")


def _nan_unless_psd_trace(S: Tensor, out: Tensor) -> Tensor:
    """Without value checks (CUDA): NaN for a matrix whose trace is negative, or zero while S != 0 (never PSD),
    instead of the huge finite numbers of a root divided by a clamped trace. Device-side, no synchronisation."""
    tr = S.diagonal(0, -2, -1).sum(-1)
    bad = (tr < 0) | ((tr <= 0) & (S.flatten(1).abs().amax(1) > 0))
    shape = [-1] + [1] * (out.dim() - 1)
    return torch.where(bad.view(shape), torch.full_like(out, float("nan")), out)


_AUTO_ITERS = {torch.float32: 45, torch.float64: 100}


def default_num_iters(dtype: torch.dtype) -> int:
    """Bound on the Newton-Schulz steps when ``num_iters=None`` (the default): 45 in float32, 100 in float64 --
    enough for every singular value / eigenvalue above eps (|M|_F or tr S) to converge (they grow by 1.5 per
    step, then converge quadratically). Each matrix stops as soon as it has converged -- roots (and the backward's
    Lyapunov solve): once the residual |I - Z Y|_F^2 (|B^2 - I|_F^2) <= n eps, which sees every eigenvalue; polar
    iteration: after log(1/eps)/log(1.5) steps (float32 40, float64 89; a small singular value cannot be told from 0
    earlier) once a step raises the value by at most min(p, q) eps of it -- so the bound is only reached by matrices
    that need it (rank-deficient roots stop at the |Z| safeguard instead)."""
    return _AUTO_ITERS.get(dtype, 45)


def _resolve_iters(num_iters, dtype: torch.dtype, op: str) -> int:
    if num_iters is None:
        return default_num_iters(dtype)
    try:
        return as_int(num_iters, "num_iters", op)
    except ValueError:
        raise ValueError(f"{op}: `num_iters` must be an integer >= 1 or None, got {num_iters!r}") from None


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


# ----------------------------------------------------------------------------------------------------------
# Fake kernels
# ----------------------------------------------------------------------------------------------------------
@torch.library.register_fake("wkd::feature_stats")
def _feature_stats_fake(x, grid=1, full=False, unbiased=True):
    check_feature_stats_args(x, grid, unbiased)
    N, C, P = x.shape[0], x.shape[1], grid * grid
    sdt = _stats_dtype(x.dtype)
    return x.new_empty((N, P, C), dtype=sdt), x.new_empty((N, P, C, C) if full else (N, P, C), dtype=sdt)


@torch.library.register_fake("wkd::feature_stats_backward")
def _feature_stats_backward_fake(grad_mean, grad_var, x, mean, grid, full, unbiased):
    check_feature_stats_args(x, grid, unbiased, op="wkd.feature_stats_backward")
    return torch.empty_like(x)


def _check_sqrtm_args(S, method, num_iters, op="wkd.sqrtm"):
    check_square_batch(S, "S", op)
    check_method(method, op)
    check_num_iters(num_iters, op)


@torch.library.register_fake("wkd::sqrtm")
def _sqrtm_fake(S, method="newton_schulz", num_iters=20):
    _check_sqrtm_args(S, method, num_iters)
    return torch.empty_like(S)


@torch.library.register_fake("wkd::sqrtm_backward")
def _sqrtm_backward_fake(grad_Y, Y, method="newton_schulz", num_iters=20):
    _check_sqrtm_backward_args(grad_Y, Y, method, num_iters)
    return torch.empty_like(Y)


@torch.library.register_fake("wkd::nuclear_norm")
def _nuclear_norm_fake(M, num_iters=20):
    check_nuclear_norm_args(M, num_iters)
    return M.new_empty((M.shape[0],)), torch.empty_like(M)


@torch.library.register_fake("wkd::bures_wasserstein")
def _bures_wasserstein_fake(mu1, S1, mu2, S2, method="newton_schulz", num_iters=20):
    _check_bures_all(mu1, S1, mu2, S2, method, num_iters)
    return S1.new_empty((S1.shape[0],)), torch.empty_like(S1), torch.empty_like(S1), torch.empty_like(S1)


@torch.library.register_fake("wkd::bures_wasserstein_backward")
def _bures_wasserstein_backward_fake(grad_w2, mu1, mu2, sqrt_S1, sqrt_S2, polar, method="newton_schulz",
                                     num_iters=20):
    _check_bures_backward_args(grad_w2, mu1, mu2, sqrt_S1, sqrt_S2, polar, method, num_iters)
    return torch.empty_like(mu1), torch.empty_like(sqrt_S1), torch.empty_like(mu2), torch.empty_like(sqrt_S1)


def _check_sqrtm_backward_args(grad_Y, Y, method, num_iters, op="wkd.sqrtm_backward"):
    check_square_batch(Y, "Y", op)
    check_method(method, op)
    check_num_iters(num_iters, op)
    if list(grad_Y.shape) != list(Y.shape):
        raise ValueError(f"{op}: `grad_Y` must have the shape of `Y` {list(Y.shape)}, got {list(grad_Y.shape)}")
    _check_same(grad_Y, Y, "grad_Y", "Y", op)


def _check_bures_all(mu1, S1, mu2, S2, method, num_iters, op="wkd.bures_wasserstein"):
    check_bures_args(mu1, S1, mu2, S2, op)
    check_method(method, op)
    check_num_iters(num_iters, op)


def _check_bures_backward_args(grad_w2, mu1, mu2, sqrt_S1, sqrt_S2, polar, method, num_iters,
                               op="wkd.bures_wasserstein_backward"):
    check_square_batch(sqrt_S1, "sqrt_S1", op)
    check_method(method, op)
    check_num_iters(num_iters, op)
    B, n = sqrt_S1.shape[0], sqrt_S1.shape[1]
    for name, t, shape in (("sqrt_S2", sqrt_S2, [B, n, n]), ("polar", polar, [B, n, n]), ("mu1", mu1, [B, n]),
                           ("mu2", mu2, [B, n]), ("grad_w2", grad_w2, [B])):
        if list(t.shape) != shape:
            raise ValueError(f"{op}: `{name}` must be {shape}, got {list(t.shape)}")
        _check_same(t, sqrt_S1, name, "sqrt_S1", op)


def _check_feature_stats_backward_args(grad_mean, grad_var, x, mean, grid, full, unbiased,
                                       op="wkd.feature_stats_backward"):
    check_feature_stats_args(x, grid, unbiased, op)
    N, C, P = x.shape[0], x.shape[1], grid * grid
    want = [N, P, C]
    for name, t, shape in (("grad_mean", grad_mean, want), ("mean", mean, want),
                           ("grad_var", grad_var, want + [C] if full else want)):
        if list(t.shape) != shape:
            raise ValueError(f"{op}: `{name}` must be {shape}, got {list(t.shape)}")
        if t.dtype != _stats_dtype(x.dtype):
            raise TypeError(f"{op}: `{name}` must be {_stats_dtype(x.dtype)} (the statistics dtype of `x`), got "
                            f"{t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: all tensors must be on the device of `x` ({x.device}), got {t.device}")


# ----------------------------------------------------------------------------------------------------------
# CUDA kernels: the Triton launchers (shape checks here; value checks on request in the public functions)
# ----------------------------------------------------------------------------------------------------------
@torch.library.register_kernel("wkd::feature_stats", "cuda")
def _feature_stats_cuda(x, grid=1, full=False, unbiased=True):
    check_feature_stats_args(x, grid, unbiased)
    from .triton import feature_stats as _tri

    return _tri.feature_stats_forward(x, grid, full, unbiased)


@torch.library.register_kernel("wkd::feature_stats_backward", "cuda")
def _feature_stats_backward_cuda(grad_mean, grad_var, x, mean, grid, full, unbiased):
    _check_feature_stats_backward_args(grad_mean, grad_var, x, mean, grid, full, unbiased)
    from .triton import feature_stats as _tri

    return _tri.feature_stats_backward(grad_mean, grad_var, x, mean, grid, full, unbiased)


@torch.library.register_kernel("wkd::sqrtm", "cuda")
def _sqrtm_cuda(S, method="newton_schulz", num_iters=20):
    _check_sqrtm_args(S, method, num_iters)
    from .triton import sqrtm as _tri

    return _tri.sqrtm_forward(S, method, num_iters)[0]


@torch.library.register_kernel("wkd::sqrtm_backward", "cuda")
def _sqrtm_backward_cuda(grad_Y, Y, method="newton_schulz", num_iters=20):
    _check_sqrtm_backward_args(grad_Y, Y, method, num_iters)
    from .triton import sqrtm as _tri

    return _tri.sqrtm_backward(grad_Y, Y, method, num_iters)


@torch.library.register_kernel("wkd::nuclear_norm", "cuda")
def _nuclear_norm_cuda(M, num_iters=20):
    check_nuclear_norm_args(M, num_iters)
    from .triton import nuclear_norm as _tri

    return _tri.nuclear_norm_forward(M, num_iters)


@torch.library.register_kernel("wkd::bures_wasserstein", "cuda")
def _bures_wasserstein_cuda(mu1, S1, mu2, S2, method="newton_schulz", num_iters=20):
    _check_bures_all(mu1, S1, mu2, S2, method, num_iters)
    from .triton import bures_wasserstein as _tri

    return _tri.bures_wasserstein_forward(mu1, S1, mu2, S2, method, num_iters)


@torch.library.register_kernel("wkd::bures_wasserstein_backward", "cuda")
def _bures_wasserstein_backward_cuda(grad_w2, mu1, mu2, sqrt_S1, sqrt_S2, polar, method="newton_schulz",
                                     num_iters=20):
    _check_bures_backward_args(grad_w2, mu1, mu2, sqrt_S1, sqrt_S2, polar, method, num_iters)
    from .triton import bures_wasserstein as _tri

    return _tri.bures_wasserstein_backward(grad_w2, mu1, mu2, sqrt_S1, sqrt_S2, polar, method, num_iters)


# ----------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------
def _feature_stats_setup_context(ctx, inputs, output):
    x, grid, full, unbiased = inputs
    mean, _ = output
    ctx.set_materialize_grads(False)  # an unused output gets no zero tensor (the backward fills in what it needs)
    ctx.save_for_backward(x, mean)
    ctx.grid, ctx.full, ctx.unbiased = grid, full, unbiased
    ctx.var_shape = output[1].shape


def _feature_stats_backward(ctx, grad_mean, grad_var):
    x, mean = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or (grad_mean is None and grad_var is None):
        return None, None, None, None
    if grad_mean is None:
        grad_mean = torch.zeros_like(mean)
    if grad_var is None:
        grad_var = mean.new_zeros(ctx.var_shape)
    with torch.no_grad():
        gx = torch.ops.wkd.feature_stats_backward(grad_mean.contiguous(), grad_var.contiguous(), x, mean, ctx.grid,
                                                  ctx.full, ctx.unbiased)
    (gx,) = first_order_only((gx,), (x, grad_mean, grad_var), "wkd.feature_stats")
    return gx, None, None, None


torch.library.register_autograd("wkd::feature_stats", _feature_stats_backward,
                                setup_context=_feature_stats_setup_context)


def _sqrtm_setup_context(ctx, inputs, output):
    _, method, num_iters = inputs
    ctx.save_for_backward(output)
    ctx.method, ctx.num_iters = method, num_iters


def _sqrtm_backward(ctx, grad_Y):
    (Y,) = ctx.saved_tensors
    with torch.no_grad():
        gS = torch.ops.wkd.sqrtm_backward(grad_Y.contiguous(), Y, ctx.method, ctx.num_iters)
    (gS,) = first_order_only((gS,), (Y, grad_Y), "wkd.sqrtm")
    return gS, None, None


torch.library.register_autograd("wkd::sqrtm", _sqrtm_backward, setup_context=_sqrtm_setup_context)


def _nuclear_norm_setup_context(ctx, inputs, output):
    _, polar = output
    ctx.mark_non_differentiable(polar)
    ctx.set_materialize_grads(False)  # no zero [B, p, q] for the unused polar output
    ctx.save_for_backward(polar)


def _nuclear_norm_backward(ctx, grad_value, grad_polar):
    (polar,) = ctx.saved_tensors
    if grad_value is None:
        return None, None
    with torch.no_grad():
        gM = grad_value[:, None, None] * polar
    (gM,) = first_order_only((gM,), (polar, grad_value), "wkd.nuclear_norm")
    return gM, None


torch.library.register_autograd("wkd::nuclear_norm", _nuclear_norm_backward,
                                setup_context=_nuclear_norm_setup_context)


def _bures_setup_context(ctx, inputs, output):
    mu1, _, mu2, _, method, num_iters = inputs
    _, R1, R2, Q = output
    ctx.mark_non_differentiable(R1, R2, Q)
    ctx.set_materialize_grads(False)  # no zero [B, n, n] tensors for the three unused outputs
    ctx.save_for_backward(mu1, mu2, R1, R2, Q)
    ctx.method, ctx.num_iters = method, num_iters


def _bures_backward(ctx, grad_w2, grad_R1, grad_R2, grad_Q):
    mu1, mu2, R1, R2, Q = ctx.saved_tensors
    if grad_w2 is None:
        return None, None, None, None, None, None
    with torch.no_grad():
        g = torch.ops.wkd.bures_wasserstein_backward(grad_w2.contiguous(), mu1, mu2, R1, R2, Q, ctx.method,
                                                     ctx.num_iters)
    g = first_order_only(tuple(gi if need else None for gi, need in zip(g, ctx.needs_input_grad[:4])),
                         (mu1, mu2, R1, grad_w2), "wkd.bures_wasserstein")
    return tuple(g) + (None, None)


torch.library.register_autograd("wkd::bures_wasserstein", _bures_backward, setup_context=_bures_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------
def _upcast(t: Tensor) -> Tensor:
    return t.float() if t.dtype in _HALF else t


def feature_stats(x: Tensor, grid: int = 1, covariance: str = "diag", unbiased: bool = True, *,
                  check_values: Optional[bool] = None) -> Tuple[Tensor, Tensor]:
    """Per-sample, per-channel mean and variance (or full covariance) of a feature map over its spatial positions,
    optionally per cell of a ``grid`` x ``grid`` partition, in one pass over ``x``.

    Cells follow adaptive pooling: along H, cell i covers rows floor(i H / grid) .. ceil((i + 1) H / grid) - 1 (the
    same along W), so neighbouring cells may overlap; cells are numbered row-major, p = i * grid + j.

    Args:
        x: [N, C, H, W] features (float16/bfloat16/float32/float64; half inputs are accumulated and returned in float32).
        grid: cells per side, 1 <= grid <= min(H, W).
        covariance: ``"diag"`` (per-channel variance) or ``"full"`` (C x C covariance).
        unbiased: divide by m - 1 (torch.var's default, the published WKD-F code) instead of m, m = positions per cell.
        check_values: check for non-finite entries (always on CPU; on CUDA only when True or WKD_CHECK_VALUES=1).

    Returns:
        ``(mean, var)``: with grid == 1, mean [N, C] and var [N, C] (diag) or cov [N, C, C] (full); with grid > 1 a
        cell dimension follows N: [N, grid*grid, C] and [N, grid*grid, C] / [N, grid*grid, C, C]. Units: those of x
        (mean) and x squared (variance / covariance). Differentiable w.r.t. x.
    """
    if covariance not in ("diag", "full"):
        raise ValueError(f"wkd.feature_stats: `covariance` must be 'diag' or 'full', got {covariance!r}")
    check_feature_stats_args(x, grid, unbiased)
    if x.is_cuda and _values_check_requested(check_values):
        check_finite_values(x, "x", "wkd.feature_stats")
    mean, var = torch.ops.wkd.feature_stats(x, int(grid), covariance == "full", bool(unbiased))
    if grid == 1:
        mean, var = mean.squeeze(1), var.squeeze(1)
    return mean, var


def sqrtm(S: Tensor, method: str = "newton_schulz", num_iters: Optional[int] = None, *,
          check_values: Optional[bool] = None) -> Tensor:
    """Principal square root of a batch of symmetric positive semi-definite matrices, with backward.

    Args:
        S: [..., n, n] symmetric PSD (symmetric to 1e-4 relative; read as (S + S^T) / 2). float32/float64
            (float16/bfloat16 computed and returned in float32).
        method: ``"newton_schulz"`` (default): coupled Newton-Schulz with trace pre-normalisation,
            Y0 = S / tr S, Z0 = I, T = (3I - Z Y) / 2, Y <- Y T, Z <- T Z, for at most ``num_iters`` steps -- GEMMs
            only, the fast path on GPU. Eigenvalues l with l / tr S >~ 1.5^(-2 num_iters) converge (quadratically at
            the end); smaller ones are under-estimated (error <= sqrt(l) each). A matrix stops once converged:
            |I - Z Y|_F^2 <= n eps (the residual sees every eigenvalue, small ones included; the step taken then
            squares it), a per-matrix mask (no host synchronisation on GPU). With the default bound a float64
            caller gets float64 accuracy on well-conditioned S (relative error ~ n eps cond(S)^1/2).
            On rank-deficient S the coupled iteration would
            diverge after ~20 steps in float32 (~45 in float64: Z grows by 1.5 per step in the null space and
            amplifies rounding), and on rounding-level negative eigenvalues sooner; each matrix therefore stops early
            once |Z|_F^2 > 1/eps or before a step whose T leaves [1, 1.5] (num_iters is an upper bound). Accuracy
            on rank-deficient S: relative error of the root ~1e-4 in float32 (tests bound it by 1e-3), ~1e-8 in
            float64 once converged. Assumes PSD input.
            ``"eigh"``: eigendecomposition (CPU: LAPACK in float64; GPU: one-program parallel Jacobi for n <= 64,
            torch.linalg.eigh above), negative eigenvalues clamped to 0: exact to rounding, also on rank-deficient S,
            where the error is that of the eigenvalues (~ n eps |S| each, ~ sqrt(n eps |S|) in the root: ~1e-6
            relative in float32, ~1e-8 in float64).
            Both methods accept rounding-level negative eigenvalues (clamped) and reject clearly indefinite S: an
            eigenvalue below -max(sqrt(eps), 100 n eps) |S|_F (float32, n = 64: 7.6e-4; float64: 1.5e-8) raises a
            ValueError on CPU and with check_values on CUDA; without value checks on CUDA a negative trace gives NaN.
        num_iters: Newton-Schulz steps (forward and backward; an upper bound, see above); ``None`` (default): 45
            in float32, 100 in float64 (:func:`default_num_iters`). Ignored by ``"eigh"``.
        check_values: check finiteness, symmetry and positive semi-definiteness (always on CPU; on CUDA only when
            True or WKD_CHECK_VALUES=1).

    Returns:
        [..., n, n] S^1/2 in the units of sqrt(S). The backward solves S^1/2 X + X S^1/2 = sym(grad) (Newton-Schulz on
        the sign of [[S^1/2, grad], [0, -S^1/2]], with the same safeguard and convergence test, or the eigenbasis).
        Where S is singular the true gradient is infinite: ``eigh`` drops the pairs of (numerically) zero eigenvalues
        (pseudo-inverse, below 10 n eps max l), Newton-Schulz returns a finite value (its iteration stops once the
        solution grows past |grad| / sqrt(eps); at S = 0 both return 0). Double backward is not supported (a clear
        error).
    """
    op = "wkd.sqrtm"
    if not isinstance(S, Tensor):
        raise TypeError(f"{op}: `S` must be a tensor, got {type(S).__name__}")
    if S.dim() < 2:
        raise ValueError(f"{op}: `S` must be [..., n, n], got shape {list(S.shape)}")
    check_method(method, op)
    S = _upcast(S)
    num_iters = _resolve_iters(num_iters, S.dtype, op)
    check_num_iters(num_iters, op)
    lead, n = S.shape[:-2], S.shape[-1]
    S3 = S.reshape(-1, S.shape[-2], n)
    check_square_batch(S3, "S", op)
    checked = not S3.is_cuda or _values_check_requested(check_values)
    if S3.is_cuda and checked:
        check_finite_values(S3, "S", op)
        check_symmetric_values(S3, "S", op)
        check_psd_values(S3, "S", op)
    Y = torch.ops.wkd.sqrtm(S3, method, int(num_iters))
    if not checked:
        Y = _nan_unless_psd_trace(S3, Y)
    return Y.reshape(*lead, n, n)


def nuclear_norm(M: Tensor, num_iters: Optional[int] = None, *, check_values: Optional[bool] = None) -> Tensor:
    """Nuclear norm (sum of singular values) of a batch of matrices by the Newton-Schulz polar iteration.

    X0 = M / |M|_F, then at most ``num_iters`` times X <- X (3I - X^T X) / 2; the value is <X, M>. Singular values s
    with s / |M|_F >~ 1.5^-num_iters converge; smaller ones are under-counted (error <= their sum). After
    log(1/eps)/log(1.5) steps (float32 40, float64 89: every s >= eps |M|_F has converged) a matrix stops once a
    step raises its value by at most min(p, q) eps of it. With the default ``num_iters=None`` (float32 45, float64
    100) the value is accurate to ~min(p, q) eps relative: a float64 caller gets float64 accuracy. The gradient is
    the polar factor U V^T (bounded, a subgradient where M is rank-deficient); double backward raises an error.

    Args:
        M: [..., p, q] float32/float64 (half computed in float32). check_values: see :func:`sqrtm`.
        num_iters: bound on the steps; ``None``: from the dtype (see above).
    Returns:
        [...] in the units of M.
    """
    op = "wkd.nuclear_norm"
    if not isinstance(M, Tensor) or M.dim() < 2:
        raise ValueError(f"{op}: `M` must be a tensor [..., p, q]")
    M = _upcast(M)
    num_iters = _resolve_iters(num_iters, M.dtype, op)
    lead = M.shape[:-2]
    M3 = M.reshape(-1, M.shape[-2], M.shape[-1])
    check_nuclear_norm_args(M3, num_iters, op)
    if M3.is_cuda and _values_check_requested(check_values):
        check_finite_values(M3, "M", op)
    return torch.ops.wkd.nuclear_norm(M3, int(num_iters))[0].reshape(lead)


def bures_wasserstein(mu1: Tensor, S1: Tensor, mu2: Tensor, S2: Tensor, method: str = "newton_schulz",
                      num_iters: Optional[int] = None, *, check_values: Optional[bool] = None) -> Tensor:
    """Squared 2-Wasserstein distance between Gaussians N(mu1, S1) and N(mu2, S2), batched:

        W^2 = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1^1/2 S2 S1^1/2)^1/2

    Args:
        mu1, mu2: [..., n] means; S1, S2: [..., n, n] symmetric PSD covariances (same batch shape, dtype, device).
        method, num_iters: ``"newton_schulz"``: S1^1/2 and S2^1/2 by :func:`sqrtm` (one batched launch) and the
            cross term as the nuclear norm |S2^1/2 S1^1/2|_* = tr (S1^1/2 S2 S1^1/2)^1/2 by the polar Newton-Schulz
            iteration (:func:`nuclear_norm`) -- never a root of the mid matrix S1^1/2 S2 S1^1/2, whose condition number
            is the product of both (and which the coupled iteration cannot take stably when it is singular).
            ``"eigh"``: the three roots by eigendecomposition (exact). ``num_iters=None`` (default): the bound from
            the dtype, see :func:`sqrtm` and :func:`nuclear_norm` (float64 accuracy for a float64 caller).
            Clearly indefinite covariances are rejected as in :func:`sqrtm` (NaN on CUDA without value checks
            when a trace is negative), never a negative squared distance from them.
        check_values: see :func:`sqrtm`.
    Returns:
        [...] squared distance in squared units of mu (POT's ``ot.gaussian.bures_wasserstein_distance`` squared).
        Differentiable w.r.t. all four inputs. Where a covariance is singular the gradient w.r.t. the other one is
        unbounded (d sqrt(l)/dl); add eps I to the covariances (as :func:`gaussian_wasserstein` does).
    """
    op = "wkd.bures_wasserstein"
    for name, t in (("mu1", mu1), ("S1", S1), ("mu2", mu2), ("S2", S2)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: `{name}` must be a tensor, got {type(t).__name__}")
    if S1.dim() < 2 or mu1.dim() < 1:
        raise ValueError(f"{op}: `mu1` must be [..., n] and `S1` [..., n, n], got {list(mu1.shape)} and "
                         f"{list(S1.shape)}")
    lead, n = S1.shape[:-2], S1.shape[-1]
    for name, t, want in (("mu1", mu1, list(lead) + [n]), ("mu2", mu2, list(lead) + [n]),
                          ("S2", S2, list(lead) + [n, n])):
        if list(t.shape) != want:
            raise ValueError(f"{op}: `{name}` must be {want} to match `S1` {list(S1.shape)}, got {list(t.shape)}")
    mu1, S1, mu2, S2 = (_upcast(t) for t in (mu1, S1, mu2, S2))
    num_iters = _resolve_iters(num_iters, S1.dtype, op)
    a, A, b, Bm = mu1.reshape(-1, n), S1.reshape(-1, S1.shape[-2], n), mu2.reshape(-1, n), S2.reshape(-1, n, n)
    _check_bures_all(a, A, b, Bm, method, num_iters, op)
    checked = not A.is_cuda or _values_check_requested(check_values)
    if A.is_cuda and checked:
        for name, t in (("mu1", a), ("S1", A), ("mu2", b), ("S2", Bm)):
            check_finite_values(t, name, op)
        check_symmetric_values(A, "S1", op)
        check_symmetric_values(Bm, "S2", op)
        check_psd_values(A, "S1", op)
        check_psd_values(Bm, "S2", op)
    w2 = torch.ops.wkd.bures_wasserstein(a, A, b, Bm, method, int(num_iters))[0]
    if not checked:
        w2 = _nan_unless_psd_trace(Bm, _nan_unless_psd_trace(A, w2))
    return w2.reshape(lead)


def sqrt_zero_subgradient(v: Tensor) -> Tensor:
    """sqrt(v) whose gradient at v = 0 is 0 instead of inf (a constant channel with eps = 0 would otherwise give
    inf * 0 = NaN in every entry of its gradient); 0 is a subgradient of the distance there."""
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), torch.zeros_like(v))


_CELL_INDEX_CACHE: dict = {}


def _cell_gather_index(H: int, W: int, grid: int, device):
    """Flat positions of every cell, padded: idx [P, max_m] (long), mask [P, max_m], m [P]. Cached per device, so
    that eager calls copy nothing from the host after the first (no synchronisation, CUDA-graph capturable)."""
    key = (H, W, grid, str(device))
    if not torch.compiler.is_compiling() and key in _CELL_INDEX_CACHE:
        return _CELL_INDEX_CACHE[key]
    cells = [[h * W + w for h in range(h0, h1) for w in range(w0, w1)]
             for h0, h1 in cell_bounds(H, grid) for w0, w1 in cell_bounds(W, grid)]
    max_m = max(len(c) for c in cells)
    idx = torch.tensor([c + [0] * (max_m - len(c)) for c in cells], dtype=torch.long, device=device)
    mask = torch.tensor([[1.0] * len(c) + [0.0] * (max_m - len(c)) for c in cells], device=device)
    m = torch.tensor([float(len(c)) for c in cells], device=device)
    if not torch.compiler.is_compiling():
        _CELL_INDEX_CACHE[key] = (idx, mask, m)
    return idx, mask, m


def _low_rank_w2(f_s: Tensor, f_t: Tensor, grid: int, unbiased: bool, method: str, num_iters: int) -> Tensor:
    """W^2 per sample and cell with tr (S_s^1/2 S_t^1/2 ...)^1/2 = |Xs^T Xt|_* / den (docs/design.md section 4): [N, P]."""
    N, C, H, W = f_s.shape
    xs, xt = f_s.flatten(2), f_t.flatten(2)
    if grid == 1:
        Xs, Xt = xs.unsqueeze(1), xt.unsqueeze(1)  # [N, 1, C, m]
        m = torch.full((1,), float(H * W), dtype=f_s.dtype, device=f_s.device)
        mask = None
    else:
        idx, mask, m = _cell_gather_index(H, W, grid, f_s.device)
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
        nuc = torch.ops.wkd.nuclear_norm(M.flatten(0, 1), int(num_iters))[0].view(N, P_)
    else:  # tr (M^T M)^1/2 by the exact square root
        A = M.flatten(0, 1)
        nuc = torch.ops.wkd.sqrtm(A.mT @ A, "eigh", int(num_iters)).diagonal(0, -2, -1).sum(-1).view(N, P_)
    den = m - (1.0 if unbiased else 0.0)
    tr_s = (Xcs * Xcs).sum((-1, -2))  # (x * x: aten::pow is several times slower on CPU)
    tr_t = (Xct * Xct).sum((-1, -2))
    return (mu_s - mu_t).square().sum(-1) + (tr_s + tr_t - 2.0 * nuc) / den


def gaussian_wasserstein(f_s: Tensor, f_t: Tensor, covariance: str = "full", grid: int = 1, eps: float = 1e-5, *,
                         unbiased: bool = True, method: str = "newton_schulz", num_iters: Optional[int] = None,
                         path: str = "auto", check_values: Optional[bool] = None) -> Tensor:
    """Squared 2-Wasserstein distance between the Gaussians of two feature maps, per sample (and grid cell): WKD-F.

    Each sample (each cell of a ``grid`` x ``grid`` adaptive-pooling partition) of a feature map [N, C, H, W] is
    modelled as a Gaussian over its m spatial positions (mean and (co)variance of the C channels, see
    :func:`feature_stats`), and W^2 = |mu_s - mu_t|^2 + tr S_s + tr S_t - 2 tr (S_s^1/2 S_t S_s^1/2)^1/2.

    covariance="diag": W^2 = sum_c (mu_s - mu_t)^2 + (sqrt(var_s + eps) - sqrt(var_t + eps))^2 -- the published WKD-F
        formula (per-sample sum; the published loss sums these over the batch and divides by N * grid^2).
    covariance="full", low-rank path (``path="auto"`` takes it when every cell has m < C positions): with the
        centred cell features X [C, m], S = X X^T / den and tr (S_s^1/2 S_t S_s^1/2)^1/2 = |X_s^T X_t|_* / den
        exactly: a nuclear norm of the m x m cross-Gram (Newton-Schulz polar iteration), never a C x C root. This
        path is exact at any rank and needs no regularisation (its gradient, the polar factor, is bounded), so it
        ignores ``eps``.
    covariance="full", C x C path (m >= C): covariances by :func:`feature_stats`, plus eps I, then
        :func:`bures_wasserstein`.

    Args:
        f_s, f_t: [N, C, H, W] student and teacher features (same shape, dtype, device; half computed in float32).
        covariance: ``"full"`` or ``"diag"``.
        grid: cells per side (1 <= grid <= min(H, W)).
        eps: >= 0, added to the variances (diag) or to the covariance diagonal (C x C path); keeps the gradient
            finite for constant channels. 1e-5 is the published WKD-F value. With eps = 0 the diag path's
            sqrt(var) takes the subgradient 0 at a zero variance (a finite gradient, not NaN).
        unbiased: divide by m - 1 (published) or m.
        method, num_iters: square-root / nuclear-norm method (see :func:`sqrtm`; ``"eigh"`` on the low-rank path
            computes tr (M^T M)^1/2 with the exact root, which squares M's condition number: less accurate in float32).
            ``num_iters=None`` (default): the bound from the dtype (float32 45, float64 100; each matrix stops once
            converged), so that the low-rank path is float64-accurate for a float64 caller even when the cross-Gram
            has a small non-zero singular value (the former fixed 20 steps left W^2 off by ~1e-5 relative there).
        path: ``"auto"``, ``"low_rank"`` or ``"dense"`` (C x C) to force one full-covariance path.
        check_values: see :func:`sqrtm`.

    Returns:
        [N] (grid == 1) or [N, grid*grid] squared distances in squared feature units. Rounding can make values that
        are ~0 slightly negative; they are not clamped (the gradient stays that of the formula).
    """
    op = "wkd.gaussian_wasserstein"
    if covariance not in ("diag", "full"):
        raise ValueError(f"{op}: `covariance` must be 'full' or 'diag', got {covariance!r}")
    if path not in ("auto", "low_rank", "dense"):
        raise ValueError(f"{op}: `path` must be 'auto', 'low_rank' or 'dense', got {path!r}")
    check_feature_stats_args(f_s, grid, unbiased, op)
    if not isinstance(f_t, Tensor) or list(f_t.shape) != list(f_s.shape):
        raise ValueError(f"{op}: `f_t` must have the shape of `f_s` {list(f_s.shape)}, got "
                         f"{list(f_t.shape) if isinstance(f_t, Tensor) else type(f_t).__name__}")
    _check_same(f_t, f_s, "f_t", "f_s", op)
    try:
        eps = as_real(eps, "eps", op)
    except ValueError:
        raise ValueError(f"{op}: `eps` must be a finite number >= 0 (Python/NumPy scalar or 0-d tensor), got "
                         f"{type(eps).__name__} {eps!r}") from None
    if not (eps >= 0) or math.isinf(eps):
        raise ValueError(f"{op}: `eps` must be a finite number >= 0, got {eps!r}")
    check_method(method, op)
    num_iters = _resolve_iters(num_iters, _stats_dtype(f_s.dtype), op)
    check_num_iters(num_iters, op)
    if not torch.compiler.is_compiling() and (not f_s.is_cuda or _values_check_requested(check_values)):
        # here (also on CPU, where the kernels would check their own arguments), so that errors name f_s / f_t
        check_finite_values(f_s, "f_s", op)
        check_finite_values(f_t, "f_t", op)
    N, C, H, W = f_s.shape
    f_s, f_t = _upcast(f_s), _upcast(f_t)
    if covariance == "diag":
        mu_s, v_s = torch.ops.wkd.feature_stats(f_s, int(grid), False, bool(unbiased))
        mu_t, v_t = torch.ops.wkd.feature_stats(f_t, int(grid), False, bool(unbiased))
        w2 = (mu_s - mu_t).square().sum(-1) + (sqrt_zero_subgradient(v_s + eps)
                                               - sqrt_zero_subgradient(v_t + eps)).square().sum(-1)
    else:
        low_rank = path == "low_rank" or (path == "auto" and max(_cell_sizes(H, W, grid)) < C)
        if low_rank:
            w2 = _low_rank_w2(f_s, f_t, int(grid), bool(unbiased), method, int(num_iters))
        else:
            mu_s, S_s = torch.ops.wkd.feature_stats(f_s, int(grid), True, bool(unbiased))
            mu_t, S_t = torch.ops.wkd.feature_stats(f_t, int(grid), True, bool(unbiased))
            if eps > 0:
                eye = torch.eye(C, dtype=S_s.dtype, device=S_s.device)
                S_s, S_t = S_s + eps * eye, S_t + eps * eye
            P_ = grid * grid
            w2 = torch.ops.wkd.bures_wasserstein(mu_s.reshape(N * P_, C), S_s.reshape(N * P_, C, C),
                                                 mu_t.reshape(N * P_, C), S_t.reshape(N * P_, C, C), method,
                                                 int(num_iters))[0].view(N, P_)
    return w2.squeeze(1) if grid == 1 else w2
