"""bures_wasserstein: fake kernels, the Triton composition, autograd and the public :func:`bures_wasserstein`.

Contract: the schema comment of ``wkd::bures_wasserstein`` in csrc/ops.cpp (docs/design.md section 4). Kernels:
CPU csrc/cpu/bures_wasserstein.cpp (``wkd::bures_wasserstein``); on GPUs the op is composed here from the Triton
square-root, polar and Lyapunov kernels (wkd_kernels/triton/sqrtm.py, nuclear_norm.py: each launched once for S1 and
S2 together) and batched torch (cuBLAS) n x n products, registered as ``wkd::bures_wasserstein_triton`` on every
device type and as the CUDA kernel of ``wkd::bures_wasserstein`` at precision "ieee"; in ATen ops only
(wkd_kernels/aten/bures_wasserstein.py) as ``wkd::bures_wasserstein_torch`` on every device type (and the CPU kernel of
``wkd::bures_wasserstein`` without the compiled extension).

  W^2 = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 |R2 R1|_*,   R_i = S_i^1/2   (|R2 R1|_* = tr (R1 S2 R1)^1/2)
  newton_schulz: R1, R2 by coupled Newton-Schulz; (|R2 R1|_*, polar factor Q) by the polar Newton-Schulz iteration.
  eigh:          R1, R2, (R1 S2 R1)^1/2 and its pseudo-inverse by the Jacobi kernel; Q = R2 R1 (R1 S2 R1)^+1/2.
  backward:      dW^2/dS1 = I + X1, R1 X1 + X1 R1 = -(R2 Q + Q^T R2);
                 dW^2/dS2 = I + X2, R2 X2 + X2 R2 = -(Q R1 + R1 Q^T)
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _build, settings
from ..aten import bures_wasserstein as aten_bures
from .checks import (check_bures_all, check_bures_backward_args, check_finite_values, check_precision, check_psd_values,
                     check_symmetric_values, values_check_requested)
from .common import (check_dtype_on_device, first_order_only, nan_unless_psd_trace, resolve_backend, resolve_iters,
                     reverse_mode_only, upcast)

__all__ = ["bures_wasserstein"]


def _fake(mu1, S1, mu2, S2, method="newton_schulz", num_iters=20, precision="ieee"):
    check_precision(precision, "gaussian", "wkd.bures_wasserstein")
    check_bures_all(mu1, S1, mu2, S2, method, num_iters)
    return S1.new_empty((S1.shape[0],)), torch.empty_like(S1), torch.empty_like(S1), torch.empty_like(S1)


def _backward_fake(grad_w2, mu1, mu2, sqrt_S1, sqrt_S2, polar, method="newton_schulz", num_iters=20,
                   precision="ieee"):
    check_precision(precision, "gaussian", "wkd.bures_wasserstein_backward")
    check_bures_backward_args(grad_w2, mu1, mu2, sqrt_S1, sqrt_S2, polar, method, num_iters)
    return torch.empty_like(mu1), torch.empty_like(sqrt_S1), torch.empty_like(mu2), torch.empty_like(sqrt_S1)


def _sym(S: Tensor) -> Tensor:
    return (S + S.transpose(-1, -2)) * 0.5


def _tr(A: Tensor) -> Tensor:
    return A.diagonal(0, -2, -1).sum(-1)


def _triton_forward(mu1, S1, mu2, S2, method="newton_schulz", num_iters=20, precision="ieee"):
    """(w2 [B], sqrt_S1, sqrt_S2, polar [B, n, n]) from the Triton kernels (arguments checked by the caller)."""
    from ..triton import nuclear_norm as tri_nn
    from ..triton import sqrtm as tri_sq

    _fake(mu1, S1, mu2, S2, method, num_iters, precision)  # the checks (the launchers do not check)
    B = S1.shape[0]
    S1, S2 = _sym(S1), _sym(S2)
    R, _ = tri_sq.sqrtm_forward(torch.cat([S1, S2], 0), method, num_iters, precision)
    R1, R2 = R[:B].clone(), R[B:].clone()  # op outputs must not alias
    if method == "eigh":
        Proot, Pinv = tri_sq.sqrtm_forward(_sym(R1 @ S2 @ R1), "eigh", num_iters, precision, want_inverse=True)
        cross = _tr(Proot)
        Q = R2 @ R1 @ Pinv
    else:
        cross, Q = tri_nn.nuclear_norm_forward(R2 @ R1, num_iters, precision)
    w2 = (mu1 - mu2).square().sum(-1) + _tr(S1) + _tr(S2) - 2.0 * cross
    return w2, R1, R2, Q


def _triton_backward(grad, mu1, mu2, R1, R2, Q, method="newton_schulz", num_iters=20, precision="ieee"):
    """(grad_mu1, grad_S1, grad_mu2, grad_S2) of W^2 (arguments checked by the caller)."""
    from ..triton import sqrtm as tri_sq

    _backward_fake(grad, mu1, mu2, R1, R2, Q, method, num_iters, precision)
    B, n, _ = R1.shape
    g = grad.view(B, 1, 1)
    eye = torch.eye(n, dtype=R1.dtype, device=R1.device)
    d = (mu1 - mu2) * (2.0 * grad.view(B, 1))
    X = tri_sq.lyapunov(torch.cat([R1, R2], 0), -2.0 * torch.cat([R2 @ Q, Q @ R1], 0), method, num_iters, precision)
    return d, (eye + X[:B]) * g, -d, (eye + X[B:]) * g


for _op, _dev in (("bures_wasserstein", "cuda"), ("bures_wasserstein_triton", None)):
    torch.library.register_fake(f"wkd::{_op}")(_fake)
    torch.library.register_fake(f"wkd::{_op}_backward")(_backward_fake)
    torch.library.register_kernel(f"wkd::{_op}", _dev)(_triton_forward)
    torch.library.register_kernel(f"wkd::{_op}_backward", _dev)(_triton_backward)


def _torch_forward(mu1, S1, mu2, S2, method="newton_schulz", num_iters=20):
    check_bures_all(mu1, S1, mu2, S2, method, num_iters, "wkd.bures_wasserstein_torch")
    check_dtype_on_device(S1, "wkd.bures_wasserstein_torch")
    return aten_bures.bures_wasserstein_forward(mu1, S1, mu2, S2, method, num_iters)


def _torch_backward(grad, mu1, mu2, R1, R2, Q, method="newton_schulz", num_iters=20):
    check_bures_backward_args(grad, mu1, mu2, R1, R2, Q, method, num_iters, "wkd.bures_wasserstein_torch_backward")
    check_dtype_on_device(R1, "wkd.bures_wasserstein_torch_backward")
    return aten_bures.bures_wasserstein_backward(grad, mu1, mu2, R1, R2, Q, method, num_iters)


torch.library.register_fake("wkd::bures_wasserstein_torch")(_fake)
torch.library.register_fake("wkd::bures_wasserstein_torch_backward")(_backward_fake)
_TORCH_KEYS = (("bures_wasserstein_torch", None),) + ((("bures_wasserstein", "cpu"),) if not _build.HAS_C_EXT else ())
for _op, _dev in _TORCH_KEYS:
    torch.library.register_kernel(f"wkd::{_op}", _dev)(_torch_forward)
    torch.library.register_kernel(f"wkd::{_op}_backward", _dev)(_torch_backward)


def _setup_context(ctx, inputs, output):
    mu1, S1, mu2, S2 = inputs[:4]
    _, R1, R2, Q = output
    ctx.mark_non_differentiable(R1, R2, Q)
    ctx.set_materialize_grads(False)  # no zero [B, n, n] tensors for the three unused outputs
    # The anchor of the double-backward error (first_order_only) must be an input that requires grad: the means
    # are saved anyway; a covariance is kept only when no mean requires grad (a reference to an input).
    anchor = None if (mu1.requires_grad or mu2.requires_grad) else (S1 if S1.requires_grad else S2)
    ctx.save_for_backward(mu1, mu2, R1, R2, Q, anchor)
    ctx.extra = tuple(inputs[4:])  # method, num_iters (and precision for the Triton op)


def _make_backward(backward_op):
    def _backward(ctx, grad_w2, grad_R1, grad_R2, grad_Q):
        mu1, mu2, R1, R2, Q, anchor = ctx.saved_tensors
        if grad_w2 is None:
            return (None,) * (4 + len(ctx.extra))
        with torch.no_grad():
            g = backward_op(grad_w2.contiguous(), mu1, mu2, R1, R2, Q, *ctx.extra)
        g = first_order_only(tuple(gi if need else None for gi, need in zip(g, ctx.needs_input_grad[:4], strict=True)),
                             (mu1, mu2, anchor, grad_w2), "wkd.bures_wasserstein")
        return tuple(g) + (None,) * len(ctx.extra)

    return _backward


torch.library.register_autograd("wkd::bures_wasserstein", _make_backward(torch.ops.wkd.bures_wasserstein_backward),
                                setup_context=_setup_context)
torch.library.register_autograd("wkd::bures_wasserstein_triton",
                                _make_backward(torch.ops.wkd.bures_wasserstein_triton_backward),
                                setup_context=_setup_context)
torch.library.register_autograd("wkd::bures_wasserstein_torch",
                                _make_backward(torch.ops.wkd.bures_wasserstein_torch_backward),
                                setup_context=_setup_context)


def bures_wasserstein_op(mu1: Tensor, S1: Tensor, mu2: Tensor, S2: Tensor, method: str, num_iters: int, kind: str,
                         precision: str) -> Tensor:
    """w2 [B] by the op of backend ``kind`` ("cpu", "triton" or "torch"; arguments already checked)."""
    if kind == "triton":
        return torch.ops.wkd.bures_wasserstein_triton(mu1, S1, mu2, S2, method, int(num_iters), precision)[0]
    if kind == "torch":
        return torch.ops.wkd.bures_wasserstein_torch(mu1, S1, mu2, S2, method, int(num_iters))[0]
    return torch.ops.wkd.bures_wasserstein(mu1, S1, mu2, S2, method, int(num_iters))[0]


def bures_wasserstein(mu1: Tensor, S1: Tensor, mu2: Tensor, S2: Tensor, method: str = "newton_schulz",
                      num_iters: Optional[int] = None, *, backend: Optional[str] = None,
                      precision: Optional[str] = None, check_values: Optional[bool] = None) -> Tensor:
    """Squared 2-Wasserstein distance between Gaussians N(mu1, S1) and N(mu2, S2), batched:

        W^2 = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1^1/2 S2 S1^1/2)^1/2

    Args:
        mu1, mu2: [..., n] means; S1, S2: [..., n, n] symmetric PSD covariances (same batch shape, dtype, device).
        method, num_iters: ``"newton_schulz"``: S1^1/2 and S2^1/2 by :func:`wkd_kernels.sqrtm` (one batched launch)
            and the cross term as the nuclear norm |S2^1/2 S1^1/2|_* = tr (S1^1/2 S2 S1^1/2)^1/2 by the polar
            Newton-Schulz iteration (:func:`wkd_kernels.nuclear_norm`) -- never a root of the mid matrix
            S1^1/2 S2 S1^1/2, whose condition number is the product of both (and which the coupled iteration cannot
            take stably when it is singular). ``"eigh"``: the three roots by eigendecomposition (exact).
            ``num_iters=None`` (default): the bound from the dtype, see :func:`wkd_kernels.sqrtm` and
            :func:`wkd_kernels.nuclear_norm` (float64 accuracy for a float64 caller).
            Clearly indefinite covariances are rejected as in :func:`wkd_kernels.sqrtm`: always on CPU, on CUDA with
            value checks. On CUDA without value checks (the default, :mod:`wkd_kernels.settings`) they are not
            detected: a negative trace gives NaN, but an indefinite covariance with positive trace gives a wrong
            squared distance, which can be negative (its negative eigenvalues are clamped to 0 in the roots).
        backend, precision, check_values: see :func:`wkd_kernels.sqrtm`.
    Returns:
        [...] squared distance in squared units of mu (POT's ``ot.gaussian.bures_wasserstein_distance`` squared).
        Differentiable w.r.t. all four inputs. Where a covariance is singular the gradient w.r.t. the other one is
        unbounded (d sqrt(l)/dl); add eps I to the covariances (as :func:`wkd_kernels.gaussian_wasserstein` does).
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
    mu1, S1, mu2, S2 = reverse_mode_only(op, *(upcast(t) for t in (mu1, S1, mu2, S2)))
    num_iters = resolve_iters(num_iters, S1.dtype, op)
    a, A, b, Bm = mu1.reshape(-1, n), S1.reshape(-1, S1.shape[-2], n), mu2.reshape(-1, n), S2.reshape(-1, n, n)
    check_bures_all(a, A, b, Bm, method, num_iters, op)
    precision = settings.resolve_precision(precision, "gaussian", op)
    kind = resolve_backend(backend, A, op, has_cuda_cpp=False)
    python_checks = values_check_requested(check_values, kind, A.device)
    if python_checks:
        for name, t in (("mu1", a), ("S1", A), ("mu2", b), ("S2", Bm)):
            check_finite_values(t, name, op)
        check_symmetric_values(A, "S1", op)
        check_symmetric_values(Bm, "S2", op)
        check_psd_values(A, "S1", op)
        check_psd_values(Bm, "S2", op)
    w2 = bures_wasserstein_op(a, A, b, Bm, method, num_iters, kind, precision)
    if kind != "cpu" and not python_checks:
        w2 = nan_unless_psd_trace(Bm, nan_unless_psd_trace(A, w2))
    return w2.reshape(lead)
