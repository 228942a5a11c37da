"""Typed wrappers over torch.ops.wkd.*, fake kernels, autograd and the Triton registrations.

The op schemas (and the Sinkhorn contract) live in csrc/ops.cpp, the CPU kernels in csrc/cpu/, the CUDA C++ kernels
in csrc/cuda/ (registered on the CUDA key of wkd::sinkhorn / wkd::sinkhorn_backward) and the Triton kernels in
wkd_kernels/triton/ (wkd::sinkhorn_triton / wkd::sinkhorn_triton_backward, registered here for every device type;
also the CUDA kernels of wkd::sinkhorn when the package was built without CUDA C++). This module adds what Python
does best: argument checks before the Triton kernels, fake (meta) kernels for torch.compile, the autograd formulas,
the choice between the Triton and CUDA C++ kernels for CUDA tensors, and the user-facing functions with their docs.
"""
from __future__ import annotations

import math
import numbers
import operator
import os
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from . import _build

__all__ = ["SinkhornResult", "sinkhorn", "set_cuda_backend", "get_cuda_backend"]

_HALF = (torch.float16, torch.bfloat16)

# ----------------------------------------------------------------------------------------------------------
# CUDA backend switch
# ----------------------------------------------------------------------------------------------------------
_CUDA_BACKENDS = ("auto", "triton", "cuda")
_cuda_backend = os.environ.get("WKD_CUDA_BACKEND", "auto").strip().lower()
if _cuda_backend not in _CUDA_BACKENDS:
    raise ValueError(f"WKD_CUDA_BACKEND must be one of {_CUDA_BACKENDS}, got {_cuda_backend!r}")


def set_cuda_backend(backend: str) -> None:
    """Choose which kernels :func:`sinkhorn` uses on CUDA tensors.

    ``"triton"``: the Triton kernels (``torch.ops.wkd.sinkhorn_triton``, wkd_kernels/triton); ``"cuda"``: the
    hand-written CUDA C++ kernels (the CUDA kernels of ``torch.ops.wkd.sinkhorn``, csrc/cuda, needs the package
    built with CUDA); ``"auto"`` (default): the CUDA C++ kernels when built, else Triton (not yet a measured choice,
    see the README). The environment variable ``WKD_CUDA_BACKEND`` sets the initial value. ``torch.ops.wkd.sinkhorn``
    itself always runs the CUDA C++ kernels on CUDA tensors when they were built (Triton otherwise).
    """
    global _cuda_backend
    if backend not in _CUDA_BACKENDS:
        raise ValueError(f"set_cuda_backend: `backend` must be one of {_CUDA_BACKENDS}, got {backend!r}")
    if backend == "cuda" and not _build.HAS_CUDA_EXT:
        raise RuntimeError(
            "set_cuda_backend('cuda'): this build has no CUDA C++ kernels "
            f"(build info: {_build.build_info()}); rebuild with a CUDA toolkit or use 'triton'"
        )
    _cuda_backend = backend


def get_cuda_backend() -> str:
    """The backend CUDA tensors use now: ``"triton"`` or ``"cuda"`` (``"auto"`` resolved)."""
    if _cuda_backend == "auto":
        # Measured default: see README "Choosing the CUDA backend". Falls back to what is available.
        return "cuda" if _build.HAS_CUDA_EXT else "triton"
    return _cuda_backend


# tl.dot input precision of the Triton Sinkhorn kernels for float32 when the caller does not choose one (wk.sinkhorn
# and wkd::sinkhorn's Triton CUDA kernel): "ieee" (float32 FMA accuracy), "tf32x3" or "tf32" (tensor cores).
# Read once from WKD_TRITON_FP32_PRECISION.
_TRITON_PRECISIONS = ("ieee", "tf32x3", "tf32")
_triton_fp32_precision = os.environ.get("WKD_TRITON_FP32_PRECISION", "ieee").strip().lower()
if _triton_fp32_precision not in _TRITON_PRECISIONS:
    raise ValueError(f"WKD_TRITON_FP32_PRECISION must be one of {_TRITON_PRECISIONS}, got {_triton_fp32_precision!r}")


def _values_check_requested(check_values: Optional[bool]) -> bool:
    if check_values is not None:
        return bool(check_values)
    return os.environ.get("WKD_CHECK_VALUES", "0").strip().lower() in ("1", "true", "yes", "on")


# ----------------------------------------------------------------------------------------------------------
# Scalar arguments: Python, NumPy and 0-d tensor scalars are accepted and converted; anything else is named
# ----------------------------------------------------------------------------------------------------------
def as_real(value, name: str, op: str) -> float:
    """``value`` as a Python float: int, float, NumPy scalars and 0-d real tensors are accepted (not bool)."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{op}: `{name}` must be a real number (a Python/NumPy scalar or a 0-d tensor), got a "
                            f"tensor of shape {list(value.shape)} and dtype {value.dtype}")
        return float(value.item())
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Real):
        raise ValueError(f"{op}: `{name}` must be a real number (a Python/NumPy scalar or a 0-d tensor), got "
                        f"{type(value).__name__} {value!r}")
    return float(value)


def as_int(value, name: str, op: str) -> int:
    """``value`` as a Python int: int, NumPy integers and 0-d integer tensors (not bool, not floats)."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise ValueError(f"{op}: `{name}` must be an integer (a Python/NumPy integer or a 0-d integer tensor), "
                             f"got a tensor of shape {list(value.shape)} and dtype {value.dtype}")
        return int(value.item())
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        raise ValueError(f"{op}: `{name}` must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{op}: `{name}` must be an integer, got {type(value).__name__} {value!r}") from None


def as_log_domain(value, op: str):
    """``log_domain`` as True, False or "auto" (the Sinkhorn wrapper and the WKD-L losses accept the same values)."""
    if isinstance(value, str) and value == "auto":
        return "auto"
    try:
        return as_bool(value, "log_domain", op)
    except TypeError:
        raise TypeError(f"{op}: `log_domain` must be True, False or 'auto', got {value!r}") from None


def as_bool(value, name: str, op: str) -> bool:
    """``value`` as a bool: True/False (also NumPy bools and 0-d bool tensors); strings, numbers etc. are rejected."""
    if isinstance(value, Tensor) and value.dim() == 0 and value.dtype == torch.bool:
        return bool(value.item())
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(f"{op}: `{name}` must be True or False, got {type(value).__name__} {value!r}")


# ----------------------------------------------------------------------------------------------------------
# Double backward: not supported by any op; differentiating a gradient raises this clear error
# ----------------------------------------------------------------------------------------------------------
class _FirstOrderOnly(torch.autograd.Function):
    """Identity on ``x`` whose backward raises: attached to the gradients an op's backward returns under
    ``create_graph=True`` (anchored on the op's differentiable input, so that the result requires grad)."""

    @staticmethod
    def forward(ctx, x, anchor, op):
        ctx.op = op
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(f"{ctx.op}: double backward (differentiating a gradient computed with create_graph=True) "
                           "is not supported; the first-order gradient is exact")


def first_order_only(grads, anchors, op: str):
    """Mark the gradients returned by an op's backward as not differentiable again (no cost without create_graph)."""
    if not torch.is_grad_enabled():
        return grads
    anchor = next((t for t in anchors if isinstance(t, Tensor) and t.requires_grad), None)
    if anchor is None:
        return grads
    return tuple(_FirstOrderOnly.apply(g, anchor, op) if isinstance(g, Tensor) else g for g in grads)


# ----------------------------------------------------------------------------------------------------------
# Sinkhorn: argument checks shared by the fake kernels and the Triton kernels (the C++ kernels check in C++,
# csrc/sinkhorn_common.h, with the same messages)
# ----------------------------------------------------------------------------------------------------------
def check_sinkhorn_args(a: Tensor, b: Tensor, cost: Tensor, reg: float, num_iters: int, eps: float,
                        op: str = "wkd.sinkhorn", allow_half: bool = False) -> bool:
    """Validate shapes, dtypes, devices and scalars; return True when ``cost`` is shared ([n, m])."""
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or not isinstance(cost, Tensor):
        raise TypeError(f"{op}: `a`, `b` and `cost` must be tensors")
    if a.dim() != 2:
        raise ValueError(f"{op}: `a` must be 2-D [B, n], got shape {list(a.shape)}")
    if b.dim() != 2:
        raise ValueError(f"{op}: `b` must be 2-D [B, m], got shape {list(b.shape)}")
    if cost.dim() not in (2, 3):
        raise ValueError(f"{op}: `cost` must be [n, m] (shared by the batch) or [B, n, m], got shape "
                         f"{list(cost.shape)}")
    B, n, m = a.shape[0], a.shape[1], b.shape[1]
    if b.shape[0] != B:
        raise ValueError(f"{op}: batch mismatch: `a` has {B} rows but `b` has {b.shape[0]}")
    if n == 0 or m == 0:
        raise ValueError(f"{op}: `a` and `b` need at least one column, got n={n}, m={m}")
    shared = cost.dim() == 2
    want = [n, m] if shared else [B, n, m]
    if list(cost.shape) != want:
        raise ValueError(f"{op}: `cost` must be {want} to match `a` [B, n] and `b` [B, m], got {list(cost.shape)}")
    ok = (torch.float32, torch.float64) + (_HALF if allow_half else ())
    if a.dtype not in ok:
        raise TypeError(f"{op}: `a` must be one of {[str(d) for d in ok]}, got {a.dtype}")
    for name, t in (("b", b), ("cost", cost)):
        if t.dtype != a.dtype:
            raise TypeError(f"{op}: `{name}` has dtype {t.dtype} but `a` has {a.dtype}; all inputs must share "
                            "one dtype")
        if t.device != a.device:
            raise ValueError(f"{op}: `{name}` is on {t.device} but `a` is on {a.device}")
    if isinstance(reg, bool) or not isinstance(reg, (int, float)) or not (reg > 0) or reg == float("inf"):
        raise ValueError(f"{op}: `reg` must be a finite number > 0, got {reg!r}")
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 1:
        raise ValueError(f"{op}: `num_iters` must be an integer >= 1, got {num_iters!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps >= 0) or eps == float("inf"):
        raise ValueError(f"{op}: `eps` must be a finite number >= 0, got {eps!r}")
    return shared


def check_sinkhorn_backward_args(grad_value: Tensor, a: Tensor, b: Tensor, hist_r: Tensor, hist_s: Tensor, y: Tensor,
                                 op: str = "wkd.sinkhorn_backward") -> None:
    """The backward's tensors beyond (a, b, cost): grad_value [B] and the history hist_r [T, B, n], hist_s [T, B, m],
    y [B, n] of a keep_history=True forward (T >= 1), in the dtype and on the device of ``a``."""
    B, n, m = a.shape[0], a.shape[1], b.shape[1]
    if grad_value.dim() != 1 or grad_value.shape[0] != B:
        raise ValueError(f"{op}: `grad_value` must be [B] = [{B}], got {list(grad_value.shape)}")
    if hist_r.dim() != 3 or hist_r.shape[0] < 1 or hist_r.shape[1] != B or hist_r.shape[2] != n:
        raise ValueError(f"{op}: `hist_r` must be [num_iters, B, n] with num_iters >= 1 (run the forward with "
                         f"keep_history=True), got {list(hist_r.shape)}")
    want = [hist_r.shape[0], B, m]
    if list(hist_s.shape) != want:
        raise ValueError(f"{op}: `hist_s` must be [num_iters, B, m] = {want}, got {list(hist_s.shape)}")
    if list(y.shape) != [B, n]:
        raise ValueError(f"{op}: `y` must be [B, n] = {[B, n]} (run the forward with keep_history=True), got "
                         f"{list(y.shape)}")
    for name, t in (("grad_value", grad_value), ("hist_r", hist_r), ("hist_s", hist_s), ("y", y)):
        if t.dtype != a.dtype:
            raise TypeError(f"{op}: all tensors must share the dtype of `a` ({a.dtype}), `{name}` is {t.dtype}")
        if t.device != a.device:
            raise ValueError(f"{op}: all tensors must be on the device of `a` ({a.device}), `{name}` is on "
                             f"{t.device}")


def check_triton_precision(precision, op: str = "wkd.sinkhorn_triton") -> None:
    if precision not in _TRITON_PRECISIONS:
        raise ValueError(f"{op}: `precision` must be one of {_TRITON_PRECISIONS}, got {precision!r}")


def check_sinkhorn_values(a: Tensor, b: Tensor, cost: Tensor, op: str = "wkd.sinkhorn") -> None:
    """Value checks (non-finite, negative, empty rows). They read the data: on a GPU they synchronise."""
    for name, t in (("a", a), ("b", b), ("cost", cost)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{op}: `{name}` contains non-finite values (inf or nan)")
    for name, t in (("a", a), ("b", b)):
        if bool((t < 0).any()):
            raise ValueError(f"{op}: `{name}` must be non-negative (a probability vector per row)")
        if bool((t.sum(1) <= 0).any()):
            raise ValueError(f"{op}: every row of `{name}` needs positive mass (a row sums to 0)")
    if bool((cost < 0).any()):
        raise ValueError(f"{op}: `cost` must be non-negative")


# exp(x) underflows to 0 (below the smallest subnormal) for x < -UNDERFLOW[dtype]
_UNDERFLOW = {torch.float32: 103.0, torch.float64: 745.0}


def kernel_underflows(cost: Tensor, reg: float) -> bool:
    """True when K = exp(-cost / reg) has a row or a column that is entirely 0 in the dtype of ``cost`` (reads
    the values: a synchronisation on a GPU). The scaling iterations then divide by 0."""
    K = torch.exp(cost / -reg)
    nz = K > 0
    return bool((~nz.any(-1)).any()) or bool((~nz.any(-2)).any())


def check_sinkhorn_kernel_range(cost: Tensor, reg: float, log_domain: bool, op: str = "wkd.sinkhorn") -> None:
    """The CUDA counterpart of the CPU op's check (run with check_values=True): K must not underflow on a whole
    row or column in the scaling domain, -cost/reg must not overflow on one in the log domain."""
    if cost.dtype == torch.float32 and float(torch.tensor(reg, dtype=torch.float32)) == 0.0:
        raise ValueError(f"{op}: `reg` = {reg} underflows to 0 in float32 (cost / reg is computed in the dtype of the "
                         "inputs); use a larger `reg` or float64")
    if not log_domain:
        if kernel_underflows(cost, reg):
            raise ValueError(f"{op}: K = exp(-cost / reg) underflows to 0 in {cost.dtype} on a whole row or column of "
                             f"`cost` with `reg` = {reg} (it underflows where cost / reg > "
                             f"{_UNDERFLOW[cost.dtype]:.0f}): the scaling iterations would divide by 0. Use "
                             "log_domain=True, or a larger `reg`")
    else:
        fin = torch.isfinite(cost / -reg)
        if bool((~fin.any(-1)).any()) or bool((~fin.any(-2)).any()):
            raise ValueError(f"{op}: -cost / reg overflows to -inf in {cost.dtype} on a whole row or column of `cost` "
                             f"with `reg` = {reg} (even with log_domain=True): use a larger `reg` or rescale `cost`")


def auto_log_domain(cost_max: float, reg: float, dtype: torch.dtype) -> bool:
    """The rule of ``log_domain="auto"`` (the losses, whose cost is a fixed buffer): the log domain exactly when
    some entry of K = exp(-cost / reg) would leave the normal range of the compute dtype, i.e. when
    max(cost) / reg > -log(tiny) (float32: 87.3; float64: 708.4); the faster scaling domain otherwise."""
    return cost_max / reg > -math.log(torch.finfo(dtype).tiny)


# ----------------------------------------------------------------------------------------------------------
# Fake kernels
# ----------------------------------------------------------------------------------------------------------
def _sinkhorn_meta(op, a, b, cost, reg, num_iters, eps, keep_history):
    check_sinkhorn_args(a, b, cost, reg, num_iters, eps, op=op)
    B, n, m = a.shape[0], a.shape[1], b.shape[1]
    H = num_iters if keep_history else 0
    return (a.new_empty(B), a.new_empty(B, n), b.new_empty(B, m), a.new_empty(H, B, n), a.new_empty(H, B, m),
            a.new_empty(B if keep_history else 0, n))


def _sinkhorn_backward_meta(op, grad_value, a, b, cost, hist_r, hist_s, y, reg):
    check_sinkhorn_args(a, b, cost, reg, 1, 0.0, op=op)
    check_sinkhorn_backward_args(grad_value, a, b, hist_r, hist_s, y, op=op)
    return torch.empty_like(a), torch.empty_like(b)


@torch.library.register_fake("wkd::sinkhorn")
def _sinkhorn_fake(a, b, cost, reg, num_iters, eps=0.0, log_domain=False, keep_history=True):
    return _sinkhorn_meta("wkd.sinkhorn", a, b, cost, reg, num_iters, eps, keep_history)


@torch.library.register_fake("wkd::sinkhorn_backward")
def _sinkhorn_backward_fake(grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain=False):
    return _sinkhorn_backward_meta("wkd.sinkhorn_backward", grad_value, a, b, cost, hist_r, hist_s, y, reg)


@torch.library.register_fake("wkd::sinkhorn_triton")
def _sinkhorn_triton_fake(a, b, cost, reg, num_iters, eps=0.0, log_domain=False, keep_history=True, precision="ieee"):
    check_triton_precision(precision, "wkd.sinkhorn_triton")
    return _sinkhorn_meta("wkd.sinkhorn_triton", a, b, cost, reg, num_iters, eps, keep_history)


@torch.library.register_fake("wkd::sinkhorn_triton_backward")
def _sinkhorn_triton_backward_fake(grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain=False,
                                   precision="ieee"):
    check_triton_precision(precision, "wkd.sinkhorn_triton_backward")
    return _sinkhorn_backward_meta("wkd.sinkhorn_triton_backward", grad_value, a, b, cost, hist_r, hist_s, y, reg)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels: wkd::sinkhorn_triton(_backward) on every device type (CUDA, or CPU under TRITON_INTERPRET=1),
# checked here first (the launchers do not check); also wkd::sinkhorn(_backward) on CUDA when the package was
# built without the CUDA C++ kernels (otherwise csrc/cuda/sinkhorn.cu registers those on the CUDA key)
# ----------------------------------------------------------------------------------------------------------
def _triton_forward(op, a, b, cost, reg, num_iters, eps, log_domain, keep_history, precision):
    check_triton_precision(precision, op)
    check_sinkhorn_args(a, b, cost, reg, num_iters, eps, op=op)
    from .triton import sinkhorn as _tri

    return _tri.sinkhorn_forward(a, b, cost, reg, num_iters, eps, log_domain, keep_history, precision)


def _triton_backward(op, grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain, precision):
    check_triton_precision(precision, op)
    check_sinkhorn_args(a, b, cost, reg, 1, 0.0, op=op)
    check_sinkhorn_backward_args(grad_value, a, b, hist_r, hist_s, y, op=op)
    from .triton import sinkhorn as _tri

    return _tri.sinkhorn_backward(grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain, precision)


@torch.library.register_kernel("wkd::sinkhorn_triton", None)
def _sinkhorn_triton(a, b, cost, reg, num_iters, eps=0.0, log_domain=False, keep_history=True, precision="ieee"):
    return _triton_forward("wkd.sinkhorn_triton", a, b, cost, reg, num_iters, eps, log_domain, keep_history,
                           precision)


@torch.library.register_kernel("wkd::sinkhorn_triton_backward", None)
def _sinkhorn_triton_backward(grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain=False, precision="ieee"):
    return _triton_backward("wkd.sinkhorn_triton_backward", grad_value, a, b, cost, hist_r, hist_s, y, reg,
                            log_domain, precision)


if not _build.HAS_CUDA_EXT:
    @torch.library.register_kernel("wkd::sinkhorn", "cuda")
    def _sinkhorn_cuda(a, b, cost, reg, num_iters, eps=0.0, log_domain=False, keep_history=True):
        return _triton_forward("wkd.sinkhorn", a, b, cost, reg, num_iters, eps, log_domain, keep_history,
                               _triton_fp32_precision)

    @torch.library.register_kernel("wkd::sinkhorn_backward", "cuda")
    def _sinkhorn_backward_cuda(grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain=False):
        return _triton_backward("wkd.sinkhorn_backward", grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain,
                                _triton_fp32_precision)


# ----------------------------------------------------------------------------------------------------------
# Autograd (the same formula for wkd::sinkhorn and wkd::sinkhorn_triton; each calls its own backward op)
# ----------------------------------------------------------------------------------------------------------
def _sinkhorn_setup_context(ctx, inputs, output):
    a, b, cost, reg, num_iters, eps, log_domain, keep_history = inputs[:8]
    if cost.requires_grad:
        raise NotImplementedError("wkd.sinkhorn: the gradient w.r.t. `cost` is not implemented; pass cost.detach()")
    value, u, v, hist_r, hist_s, y = output
    ctx.mark_non_differentiable(u, v, hist_r, hist_s, y)
    # no zero tensors for the unused gradients of u, v and the history (a second history's worth of memory)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(a, b, cost, u, v, hist_r, hist_s, y)
    ctx.reg, ctx.log_domain = reg, log_domain
    ctx.precision = inputs[8] if len(inputs) > 8 else None  # wkd::sinkhorn_triton only


def _envelope_potential(scaling: Tensor, mass: Tensor, reg: float, log_domain: bool) -> Tensor:
    """reg * log(scaling), centred over the support of `mass`, 0 on zero-mass entries (POT's envelope)."""
    log_s = scaling if log_domain else torch.log(scaling)
    supp = mass > 0
    f = torch.where(supp, reg * log_s, torch.zeros_like(log_s))
    mean = f.sum(1, keepdim=True) / supp.sum(1, keepdim=True).clamp_min(1)
    return torch.where(supp, f - mean, torch.zeros_like(f))


def _sinkhorn_backward(ctx, grad_value, *unused_grads):
    a, b, cost, u, v, hist_r, hist_s, y = ctx.saved_tensors
    n_inputs = 8 if ctx.precision is None else 9
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_a or need_b) or grad_value is None:
        return (None,) * n_inputs
    with torch.no_grad():
        if hist_r.shape[0] > 0:
            g = grad_value.contiguous()
            if ctx.precision is None:
                ga, gb = torch.ops.wkd.sinkhorn_backward(g, a, b, cost, hist_r, hist_s, y, ctx.reg, ctx.log_domain)
            else:
                ga, gb = torch.ops.wkd.sinkhorn_triton_backward(g, a, b, cost, hist_r, hist_s, y, ctx.reg,
                                                                ctx.log_domain, ctx.precision)
        else:  # envelope gradient (no history kept)
            g = grad_value.unsqueeze(1)
            ga = g * _envelope_potential(u, a, ctx.reg, ctx.log_domain)
            gb = g * _envelope_potential(v, b, ctx.reg, ctx.log_domain)
    ga, gb = first_order_only((ga if need_a else None, gb if need_b else None), (a, b, grad_value), "wkd.sinkhorn")
    return (ga, gb) + (None,) * (n_inputs - 2)


torch.library.register_autograd("wkd::sinkhorn", _sinkhorn_backward, setup_context=_sinkhorn_setup_context)
torch.library.register_autograd("wkd::sinkhorn_triton", _sinkhorn_backward, setup_context=_sinkhorn_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------
class SinkhornResult(NamedTuple):
    """Result of :func:`sinkhorn`.

    value: [B] transport cost sum_ij P_ij cost_ij per row (differentiable w.r.t. ``a`` and ``b``), in the units
        of ``cost``.
    log_u: [B, n] log of the final row scaling u (-inf on zero-mass entries of ``a``); not differentiable.
    log_v: [B, m] log of the final column scaling v; not differentiable.
    The transport plan is P = exp(log_u[:, :, None] - cost / reg + log_v[:, None, :]) (never formed by the op);
    f = reg * log_u and g = reg * log_v are the dual potentials in the units of ``cost``.
    """

    value: Tensor
    log_u: Tensor
    log_v: Tensor


def sinkhorn(a: Tensor, b: Tensor, cost: Tensor, reg: float, num_iters: int, *, eps: float = 0.0,
             grad: str = "exact", log_domain: Union[bool, str] = False,
             check_values: Optional[bool] = None) -> SinkhornResult:
    """Fixed-iteration entropic OT (Sinkhorn) per row, batched, without ever forming a B x n x m tensor.

    With K = exp(-cost / reg) and per row: u0 = 1/|supp a| on the support of a (0 elsewhere), then ``num_iters``
    times ``v = b / (K^T u + eps); u = a / (K v + eps)``; the result is the transport cost
    ``value = sum_ij u_i K_ij v_j cost_ij`` (not the entropic objective). With ``eps=0`` each row equals POT's
    ``ot.sinkhorn2(a_i, b_i, cost, reg, numItermax=num_iters, stopThr=0)``. Zero entries of ``a``/``b`` remove
    those rows/columns exactly (the result equals the reduced problem), which is how WKD-L drops the target class
    while keeping one shared cost matrix.

    Args:
        a: [B, n] non-negative source masses, each row summing to 1 (float32/float64; float16/bfloat16 are
            computed in float32).
        b: [B, m] non-negative target masses, same dtype and device.
        cost: [n, m] cost shared by every row (the fast path) or [B, n, m] one per row; non-negative, same dtype
            and device. Treated as a constant (no gradient).
        reg: entropic regularisation lambda > 0, in the units of ``cost``.
        num_iters: number of Sinkhorn iterations (>= 1); no convergence test, no host synchronisation.
        eps: added to every denominator (WKD-L's published code uses 1e-8); 0 matches POT.
        grad: ``"exact"`` (default): the exact gradient of this fixed-iteration computation w.r.t. ``a`` and
            ``b`` (what autograd through the loop gives), storing O(B (n + m) num_iters) numbers;
            ``"envelope"``: the dual potentials reg*log u, reg*log v centred over the support (POT's
            ``grad='envelope'``; cheaper, approximate for the transport cost, 0 on zero-mass entries).
        log_domain: ``True``: iterate on log-scalings with log-sum-exp, needed when ``cost/reg`` is large enough
            for K to underflow (e.g. reg=1e-3 with cost in [0, 1] in float32); slower. ``False`` (default): the
            scaling domain. ``"auto"``: the log domain exactly when some entry of K would leave the normal range of
            the compute dtype, max(cost) / reg > -log(tiny) (float32: 87.3, float64: 708.4); it reads max(cost), a
            synchronisation on a GPU (the losses, whose cost is a fixed buffer, decide once per cost instead).
            In the scaling domain an underflowing K is never silent on CPU: a whole row or column of K at 0 raises
            a ValueError naming ``reg`` and ``log_domain``, and so does a non-finite value or gradient. On CUDA the
            kernels do not read the values: there an underflowing K gives NaN unless ``check_values=True``, which
            runs the same row/column test.
        check_values: check for non-finite or negative entries, empty rows, and (see ``log_domain``) the range of
            K. Always done on CPU; on CUDA only when True (or env ``WKD_CHECK_VALUES=1``) since it synchronises
            with the device.
        Scalars (``reg``, ``num_iters``, ``eps``) may be Python, NumPy or 0-d tensor scalars.

    Returns:
        :class:`SinkhornResult` ``(value [B], log_u [B, n], log_v [B, m])``, float32 for half inputs.
    """
    op = "wkd.sinkhorn"
    if grad not in ("exact", "envelope"):
        raise ValueError(f"{op}: `grad` must be 'exact' or 'envelope', got {grad!r}")
    reg, num_iters, eps = as_real(reg, "reg", op), as_int(num_iters, "num_iters", op), as_real(eps, "eps", op)
    log_domain = as_log_domain(log_domain, op)
    check_sinkhorn_args(a, b, cost, reg, num_iters, eps, allow_half=True)
    if cost.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("wkd.sinkhorn: the gradient w.r.t. `cost` is not implemented; pass cost.detach()")
    if a.dtype in _HALF:
        a, b, cost = a.float(), b.float(), cost.float()
    if log_domain == "auto":
        log_domain = a.shape[0] > 0 and auto_log_domain(float(cost.max()), reg, a.dtype)
    if a.is_cuda and _values_check_requested(check_values):
        check_sinkhorn_values(a, b, cost)
        check_sinkhorn_kernel_range(cost, reg, log_domain)
    needs_grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    keep_history = needs_grad and grad == "exact"
    args = (a, b, cost, float(reg), int(num_iters), float(eps), bool(log_domain), keep_history)
    if a.is_cuda and get_cuda_backend() == "triton":
        value, u, v = torch.ops.wkd.sinkhorn_triton(*args, _triton_fp32_precision)[:3]
    else:
        value, u, v = torch.ops.wkd.sinkhorn(*args)[:3]
    if log_domain:
        log_u, log_v = u, v
    else:
        log_u, log_v = torch.log(u), torch.log(v)
    return SinkhornResult(value, log_u, log_v)
