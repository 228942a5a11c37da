"""nuclear_norm: fake kernels, Triton registration, autograd and the public :func:`nuclear_norm`.

Contract: the schema comment of ``wkd::nuclear_norm`` in csrc/ops.cpp (docs/design.md section 4). Kernels: CPU
csrc/cpu/nuclear_norm.cpp (``wkd::nuclear_norm``; the polar iteration in csrc/cpu/matfun.h), Triton
wkd_kernels/triton/nuclear_norm.py (``wkd::nuclear_norm_triton`` on every device type, and the CUDA kernel of
``wkd::nuclear_norm`` at precision "ieee"), ATen wkd_kernels/aten/nuclear_norm.py (``wkd::nuclear_norm_torch`` on every
device type, and the CPU kernel of ``wkd::nuclear_norm`` without the compiled extension). The backward is
grad * polar (no kernel).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _build, settings
from ..aten import nuclear_norm as aten_nuclear_norm
from .checks import check_finite_values, check_nuclear_norm_args, check_precision, values_check_requested
from .common import (check_dtype_on_device, first_order_only, resolve_backend, resolve_iters, reverse_mode_only,
                     upcast)

__all__ = ["nuclear_norm"]


def _fake(M, num_iters=20, precision="ieee"):
    check_precision(precision, "gaussian", "wkd.nuclear_norm")
    check_nuclear_norm_args(M, num_iters)
    return M.new_empty((M.shape[0],)), torch.empty_like(M)


def _triton_forward(M, num_iters=20, precision="ieee"):
    from ..triton import nuclear_norm as tri

    _fake(M, num_iters, precision)  # the checks (the launchers do not check)
    return tri.nuclear_norm_forward(M, num_iters, precision)


for _op, _dev in (("nuclear_norm", "cuda"), ("nuclear_norm_triton", None)):
    torch.library.register_fake(f"wkd::{_op}")(_fake)
    torch.library.register_kernel(f"wkd::{_op}", _dev)(_triton_forward)


def _torch_forward(M, num_iters=20):
    check_nuclear_norm_args(M, num_iters, "wkd.nuclear_norm_torch")
    check_dtype_on_device(M, "wkd.nuclear_norm_torch")
    return aten_nuclear_norm.nuclear_norm_forward(M, num_iters)


torch.library.register_fake("wkd::nuclear_norm_torch")(_fake)
for _op, _dev in (("nuclear_norm_torch", None),) + ((("nuclear_norm", "cpu"),) if not _build.HAS_C_EXT else ()):
    torch.library.register_kernel(f"wkd::{_op}", _dev)(_torch_forward)


def _setup_context(ctx, inputs, output):
    _, polar = output
    ctx.mark_non_differentiable(polar)
    ctx.set_materialize_grads(False)  # no zero [B, p, q] for the unused polar output
    # M only as the anchor of the double-backward error (first_order_only): a reference, the size of polar
    ctx.save_for_backward(polar, inputs[0])
    ctx.n_inputs = len(inputs)


def _backward(ctx, grad_value, grad_polar):
    polar, M = ctx.saved_tensors
    if grad_value is None:
        return (None,) * ctx.n_inputs
    with torch.no_grad():
        gM = grad_value[:, None, None] * polar
    (gM,) = first_order_only((gM,), (M, grad_value), "wkd.nuclear_norm")
    return (gM,) + (None,) * (ctx.n_inputs - 1)


for _op in ("nuclear_norm", "nuclear_norm_triton", "nuclear_norm_torch"):
    torch.library.register_autograd(f"wkd::{_op}", _backward, setup_context=_setup_context)


def nuclear_norm_op(M: Tensor, num_iters: int, kind: str, precision: str):
    """(value [B], polar [B, p, q]) by the op of backend ``kind`` ("cpu", "triton" or "torch"; arguments already
    checked)."""
    if kind == "triton":
        return torch.ops.wkd.nuclear_norm_triton(M, int(num_iters), precision)
    if kind == "torch":
        return torch.ops.wkd.nuclear_norm_torch(M, int(num_iters))
    return torch.ops.wkd.nuclear_norm(M, int(num_iters))


def nuclear_norm(M: Tensor, num_iters: Optional[int] = None, *, backend: Optional[str] = None,
                 precision: Optional[str] = None, check_values: Optional[bool] = None) -> Tensor:
    """Nuclear norm (sum of singular values) of a batch of matrices by the Newton-Schulz polar iteration.

    X0 = M / |M|_F, then at most ``num_iters`` times X <- X (3I - X^T X) / 2; the value is <X, M>. Singular values s
    with s / |M|_F >~ 1.5^-num_iters converge; smaller ones are under-counted (error <= their sum). After
    log(1/eps)/log(1.5) steps (float32 40, float64 89: every s >= eps |M|_F has converged) a matrix stops once a
    step raises its value by at most min(p, q) eps of it. With the default ``num_iters=None`` (float32 45, float64
    100) the value is accurate to ~min(p, q) eps relative: a float64 caller gets float64 accuracy. The gradient is
    the polar factor U V^T (bounded, a subgradient where M is rank-deficient); double backward raises an error.

    Args:
        M: [..., p, q] float32/float64 (half computed in float32).
        num_iters: bound on the steps; ``None``: from the dtype (see above).
        backend, precision, check_values: see :func:`wkd_kernels.sqrtm`.
    Returns:
        [...] in the units of M.
    """
    op = "wkd.nuclear_norm"
    if not isinstance(M, Tensor) or M.dim() < 2:
        raise ValueError(f"{op}: `M` must be a tensor [..., p, q]")
    (M,) = reverse_mode_only(op, upcast(M))
    num_iters = resolve_iters(num_iters, M.dtype, op)
    lead = M.shape[:-2]
    M3 = M.reshape(-1, M.shape[-2], M.shape[-1])
    check_nuclear_norm_args(M3, num_iters, op)
    precision = settings.resolve_precision(precision, "gaussian", op)
    kind = resolve_backend(backend, M3, op, has_cuda_cpp=False)
    if values_check_requested(check_values, kind, M3.device):
        check_finite_values(M3, "M", op)
    return nuclear_norm_op(M3, num_iters, kind, precision)[0].reshape(lead)
