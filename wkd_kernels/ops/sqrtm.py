"""sqrtm: fake kernels, Triton registration, autograd and the public :func:`sqrtm`.

Contract: the schema comment of ``wkd::sqrtm`` in csrc/ops.cpp (docs/design.md section 4). Kernels: CPU
csrc/cpu/sqrtm.cpp (``wkd::sqrtm``; the shared matrix-function bodies in csrc/cpu/matfun.h), Triton
wkd_kernels/triton/sqrtm.py (``wkd::sqrtm_triton`` on every device type, and the CUDA kernel of ``wkd::sqrtm`` at
precision "ieee": there is no CUDA C++ one), ATen wkd_kernels/aten/sqrtm.py (``wkd::sqrtm_torch`` on every device type,
and the CPU kernel of ``wkd::sqrtm`` without the compiled extension). Reference:
:func:`wkd_kernels.reference.sqrtm_reference`.

Accuracy of the two methods (pinned by python_tests/test_sqrtm.py): see :func:`sqrtm`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _build, settings
from ..aten import sqrtm as aten_sqrtm
from .checks import (check_finite_values, check_precision, check_method, check_psd_values, check_sqrtm_args,
                     check_sqrtm_backward_args, check_square_batch, check_symmetric_values, values_check_requested)
from .common import (check_dtype_on_device, first_order_only, nan_unless_psd_trace, resolve_backend, resolve_iters,
                     reverse_mode_only, upcast)

__all__ = ["sqrtm"]


def _fake(S, method="newton_schulz", num_iters=20, precision="ieee"):
    check_precision(precision, "gaussian", "wkd.sqrtm")
    check_sqrtm_args(S, method, num_iters)
    return torch.empty_like(S)


def _backward_fake(grad_Y, Y, method="newton_schulz", num_iters=20, precision="ieee"):
    check_precision(precision, "gaussian", "wkd.sqrtm_backward")
    check_sqrtm_backward_args(grad_Y, Y, method, num_iters)
    return torch.empty_like(Y)


def _triton_forward(S, method="newton_schulz", num_iters=20, precision="ieee"):
    from ..triton import sqrtm as tri

    _fake(S, method, num_iters, precision)  # the checks (the launchers do not check)
    return tri.sqrtm_forward(S, method, num_iters, precision)[0]


def _triton_backward(grad_Y, Y, method="newton_schulz", num_iters=20, precision="ieee"):
    from ..triton import sqrtm as tri

    _backward_fake(grad_Y, Y, method, num_iters, precision)
    return tri.sqrtm_backward(grad_Y, Y, method, num_iters, precision)


for _op, _dev in (("sqrtm", "cuda"), ("sqrtm_triton", None)):
    torch.library.register_fake(f"wkd::{_op}")(_fake)
    torch.library.register_fake(f"wkd::{_op}_backward")(_backward_fake)
    torch.library.register_kernel(f"wkd::{_op}", _dev)(_triton_forward)
    torch.library.register_kernel(f"wkd::{_op}_backward", _dev)(_triton_backward)


def _torch_forward(S, method="newton_schulz", num_iters=20):
    check_sqrtm_args(S, method, num_iters, "wkd.sqrtm_torch")
    check_dtype_on_device(S, "wkd.sqrtm_torch")
    return aten_sqrtm.sqrtm_forward(S, method, num_iters)


def _torch_backward(grad_Y, Y, method="newton_schulz", num_iters=20):
    check_sqrtm_backward_args(grad_Y, Y, method, num_iters, "wkd.sqrtm_torch_backward")
    check_dtype_on_device(Y, "wkd.sqrtm_torch_backward")
    return aten_sqrtm.sqrtm_backward(grad_Y, Y, method, num_iters)


torch.library.register_fake("wkd::sqrtm_torch")(_fake)
torch.library.register_fake("wkd::sqrtm_torch_backward")(_backward_fake)
for _op, _dev in (("sqrtm_torch", None),) + ((("sqrtm", "cpu"),) if not _build.HAS_C_EXT else ()):
    torch.library.register_kernel(f"wkd::{_op}", _dev)(_torch_forward)
    torch.library.register_kernel(f"wkd::{_op}_backward", _dev)(_torch_backward)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output)
    ctx.extra = tuple(inputs[1:])  # method, num_iters (and precision for the Triton op)


def _make_backward(backward_op):
    def _backward(ctx, grad_Y):
        (Y,) = ctx.saved_tensors
        with torch.no_grad():
            gS = backward_op(grad_Y.contiguous(), Y, *ctx.extra)
        (gS,) = first_order_only((gS,), (Y, grad_Y), "wkd.sqrtm")
        return (gS,) + (None,) * len(ctx.extra)

    return _backward


torch.library.register_autograd("wkd::sqrtm", _make_backward(torch.ops.wkd.sqrtm_backward),
                                setup_context=_setup_context)
torch.library.register_autograd("wkd::sqrtm_triton", _make_backward(torch.ops.wkd.sqrtm_triton_backward),
                                setup_context=_setup_context)
torch.library.register_autograd("wkd::sqrtm_torch", _make_backward(torch.ops.wkd.sqrtm_torch_backward),
                                setup_context=_setup_context)


def sqrtm_op(S: Tensor, method: str, num_iters: int, kind: str, precision: str) -> Tensor:
    """The op of backend ``kind`` ("cpu", "triton" or "torch") on ``S`` [B, n, n] (arguments already checked)."""
    if kind == "triton":
        return torch.ops.wkd.sqrtm_triton(S, method, int(num_iters), precision)
    if kind == "torch":
        return torch.ops.wkd.sqrtm_torch(S, method, int(num_iters))
    return torch.ops.wkd.sqrtm(S, method, int(num_iters))


def sqrtm(S: Tensor, method: str = "newton_schulz", num_iters: Optional[int] = None, *,
          backend: Optional[str] = None, precision: Optional[str] = None,
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
            in float32, 100 in float64 (:func:`wkd_kernels.ops.common.default_num_iters`). Ignored by ``"eigh"``.
        backend: ``"auto"``, ``"torch"`` (ATen ops, any device type; "eigh" in float64 where the device has it),
            ``"cpu"`` or ``"triton"`` (no CUDA C++ kernel); None: the setting.
        precision: float32 product precision of the Triton kernels, ``"ieee"`` or ``"tf32x3"``; None: the setting
            (:mod:`wkd_kernels.settings`, default ``"ieee"``). The CPU kernel computes in IEEE and ignores it.
        check_values: check finiteness, symmetry and positive semi-definiteness (always on CPU; on CUDA only when
            True or the setting says so).

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
    (S,) = reverse_mode_only(op, upcast(S))
    num_iters = resolve_iters(num_iters, S.dtype, op)
    lead, n = S.shape[:-2], S.shape[-1]
    S3 = S.reshape(-1, S.shape[-2], n)
    check_square_batch(S3, "S", op)
    precision = settings.resolve_precision(precision, "gaussian", op)
    kind = resolve_backend(backend, S3, op, has_cuda_cpp=False)
    python_checks = values_check_requested(check_values, kind, S3.device)
    if python_checks:
        check_finite_values(S3, "S", op)
        check_symmetric_values(S3, "S", op)
        check_psd_values(S3, "S", op)
    Y = sqrtm_op(S3, method, num_iters, kind, precision)
    if kind != "cpu" and not python_checks:
        Y = nan_unless_psd_trace(S3, Y)
    return Y.reshape(*lead, n, n)
