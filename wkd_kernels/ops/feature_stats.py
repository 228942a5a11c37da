"""feature_stats: fake kernels, Triton registration, autograd and the public :func:`feature_stats`.

Contract: the schema comment of ``wkd::feature_stats`` in csrc/ops.cpp (docs/design.md section 4). Kernels: CPU
csrc/cpu/feature_stats.cpp (``wkd::feature_stats``), Triton wkd_kernels/triton/feature_stats.py
(``wkd::feature_stats_triton`` on every device type, and the CUDA kernel of ``wkd::feature_stats``: there is no
CUDA C++ one), ATen wkd_kernels/aten/feature_stats.py (``wkd::feature_stats_torch`` on every device type, and the CPU
kernel of ``wkd::feature_stats`` without the compiled extension). Reference:
:func:`wkd_kernels.reference.feature_stats_reference`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _build
from ..aten import feature_stats as aten_feature_stats
from .checks import (check_feature_stats_args, check_feature_stats_backward_args, check_finite_values,
                     stats_dtype, values_check_requested)
from .common import check_dtype_on_device, first_order_only, resolve_backend, reverse_mode_only

__all__ = ["feature_stats"]


def _fake(x, grid=1, full=False, unbiased=True):
    check_feature_stats_args(x, grid, unbiased)
    N, C, P = x.shape[0], x.shape[1], grid * grid
    sdt = stats_dtype(x.dtype)
    return x.new_empty((N, P, C), dtype=sdt), x.new_empty((N, P, C, C) if full else (N, P, C), dtype=sdt)


def _backward_fake(grad_mean, grad_var, x, mean, grid, full, unbiased):
    check_feature_stats_backward_args(grad_mean, grad_var, x, mean, grid, full, unbiased)
    return torch.empty_like(x)


def _triton_forward(x, grid=1, full=False, unbiased=True):
    from ..triton import feature_stats as tri

    check_feature_stats_args(x, grid, unbiased)  # the launchers do not check
    return tri.feature_stats_forward(x, grid, full, unbiased)


def _triton_backward(grad_mean, grad_var, x, mean, grid, full, unbiased):
    from ..triton import feature_stats as tri

    check_feature_stats_backward_args(grad_mean, grad_var, x, mean, grid, full, unbiased)
    return tri.feature_stats_backward(grad_mean, grad_var, x, mean, grid, full, unbiased)


for _op, _fwd, _bwd in (("feature_stats", "cuda", "cuda"), ("feature_stats_triton", None, None)):
    torch.library.register_fake(f"wkd::{_op}")(_fake)
    torch.library.register_fake(f"wkd::{_op}_backward")(_backward_fake)
    torch.library.register_kernel(f"wkd::{_op}", _fwd)(_triton_forward)
    torch.library.register_kernel(f"wkd::{_op}_backward", _bwd)(_triton_backward)


def _torch_forward(x, grid=1, full=False, unbiased=True):
    check_feature_stats_args(x, grid, unbiased, "wkd.feature_stats_torch")
    check_dtype_on_device(x, "wkd.feature_stats_torch")
    return aten_feature_stats.feature_stats_forward(x, grid, full, unbiased)


def _torch_backward(grad_mean, grad_var, x, mean, grid, full, unbiased):
    check_feature_stats_backward_args(grad_mean, grad_var, x, mean, grid, full, unbiased,
                                      "wkd.feature_stats_torch_backward")
    check_dtype_on_device(x, "wkd.feature_stats_torch_backward")
    return aten_feature_stats.feature_stats_backward(grad_mean, grad_var, x, mean, grid, full, unbiased)


torch.library.register_fake("wkd::feature_stats_torch")(_fake)
torch.library.register_fake("wkd::feature_stats_torch_backward")(_backward_fake)
for _op, _dev in (("feature_stats_torch", None),) + ((("feature_stats", "cpu"),) if not _build.HAS_C_EXT else ()):
    torch.library.register_kernel(f"wkd::{_op}", _dev)(_torch_forward)
    torch.library.register_kernel(f"wkd::{_op}_backward", _dev)(_torch_backward)


def _setup_context(ctx, inputs, output):
    x, grid, full, unbiased = inputs
    mean, _ = output
    ctx.set_materialize_grads(False)  # an unused output gets no zero tensor (the backward fills in what it needs)
    ctx.save_for_backward(x, mean)
    ctx.grid, ctx.full, ctx.unbiased = grid, full, unbiased
    ctx.var_shape = output[1].shape


def _make_backward(backward_op):
    def _backward(ctx, grad_mean, grad_var):
        x, mean = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (grad_mean is None and grad_var is None):
            return None, None, None, None
        if grad_mean is None:
            grad_mean = torch.zeros_like(mean)
        if grad_var is None:
            grad_var = mean.new_zeros(ctx.var_shape)
        with torch.no_grad():
            gx = backward_op(grad_mean.contiguous(), grad_var.contiguous(), x, mean, ctx.grid, ctx.full, ctx.unbiased)
        (gx,) = first_order_only((gx,), (x, grad_mean, grad_var), "wkd.feature_stats")
        return gx, None, None, None

    return _backward


torch.library.register_autograd("wkd::feature_stats", _make_backward(torch.ops.wkd.feature_stats_backward),
                                setup_context=_setup_context)
torch.library.register_autograd("wkd::feature_stats_triton",
                                _make_backward(torch.ops.wkd.feature_stats_triton_backward),
                                setup_context=_setup_context)
torch.library.register_autograd("wkd::feature_stats_torch",
                                _make_backward(torch.ops.wkd.feature_stats_torch_backward),
                                setup_context=_setup_context)


def feature_stats_op(x: Tensor, grid: int, full: bool, unbiased: bool, kind: str) -> Tuple[Tensor, Tensor]:
    """The op of backend ``kind`` ("cpu", "triton" or "torch", from resolve_backend; arguments already checked):
    (mean [N, P, C], var [N, P, C] | cov [N, P, C, C])."""
    op = {"triton": torch.ops.wkd.feature_stats_triton,
          "torch": torch.ops.wkd.feature_stats_torch}.get(kind, torch.ops.wkd.feature_stats)
    return op(x, int(grid), bool(full), bool(unbiased))


def feature_stats(x: Tensor, grid: int = 1, covariance: str = "diag", unbiased: bool = True, *,
                  backend: Optional[str] = None, check_values: Optional[bool] = None) -> Tuple[Tensor, Tensor]:
    """Per-sample, per-channel mean and variance (or full covariance) of a feature map over its spatial positions,
    optionally per cell of a ``grid`` x ``grid`` partition, in one pass over ``x``.

    Cells follow adaptive pooling: along H, cell i covers rows floor(i H / grid) .. ceil((i + 1) H / grid) - 1 (the
    same along W), so neighbouring cells may overlap; cells are numbered row-major, p = i * grid + j.

    Args:
        x: [N, C, H, W] features (float16/bfloat16/float32/float64; half inputs are accumulated and returned in
            float32).
        grid: cells per side, 1 <= grid <= min(H, W).
        covariance: ``"diag"`` (per-channel variance) or ``"full"`` (C x C covariance).
        unbiased: divide by m - 1 (torch.var's default, the published WKD-F code) instead of m, m = positions per cell.
        backend: ``"auto"``, ``"torch"`` (ATen ops, any device type), ``"cpu"`` or ``"triton"`` (no CUDA C++
            kernel); None: the setting
            (:mod:`wkd_kernels.settings`). The kernels compute in IEEE arithmetic (no precision argument).
        check_values: check for non-finite entries (always on CPU; on CUDA only when True or the setting says so).

    Returns:
        ``(mean, var)``: with grid == 1, mean [N, C] and var [N, C] (diag) or cov [N, C, C] (full); with grid > 1 a
        cell dimension follows N: [N, grid*grid, C] and [N, grid*grid, C] / [N, grid*grid, C, C]. Units: those of x
        (mean) and x squared (variance / covariance). Differentiable w.r.t. x.
    """
    if covariance not in ("diag", "full"):
        raise ValueError(f"wkd.feature_stats: `covariance` must be 'diag' or 'full', got {covariance!r}")
    check_feature_stats_args(x, grid, unbiased)
    (x,) = reverse_mode_only("wkd.feature_stats", x)
    kind = resolve_backend(backend, x, "wkd.feature_stats", has_cuda_cpp=False)
    if values_check_requested(check_values, kind, x.device):
        check_finite_values(x, "x", "wkd.feature_stats")
    mean, var = feature_stats_op(x, grid, covariance == "full", bool(unbiased), kind)
    if grid == 1:
        mean, var = mean.squeeze(1), var.squeeze(1)
    return mean, var
