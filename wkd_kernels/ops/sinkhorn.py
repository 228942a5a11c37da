"""Sinkhorn: fake kernels, Triton registration, autograd and the public :func:`sinkhorn`.

The op contract (recurrences, outputs, history layout) is stated once, in the schema comment of ``wkd::sinkhorn`` in
csrc/ops.cpp (summarised in docs/design.md section 3). Kernels: CPU csrc/cpu/sinkhorn.cpp and CUDA C++
csrc/cuda/sinkhorn.cu (both registered in C++ on ``wkd::sinkhorn``), Triton wkd_kernels/triton/sinkhorn/
(``wkd::sinkhorn_triton``, registered here for every device type, so that it also runs on CPU tensors under
TRITON_INTERPRET=1), ATen wkd_kernels/aten/sinkhorn.py (``wkd::sinkhorn_torch``, every device type; also the CPU
kernel of ``wkd::sinkhorn`` in an installation without the compiled extension). Reference:
:func:`wkd_kernels.reference.sinkhorn_reference`.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from .. import _build, settings
from ..aten import sinkhorn as aten_sinkhorn
from .checks import (HALF, as_int, check_precision, as_log_domain, as_real, auto_log_domain, check_sinkhorn_args,
                     check_sinkhorn_backward_args, check_sinkhorn_kernel_range, check_sinkhorn_values,
                     values_check_requested)
from .common import check_dtype_on_device, first_order_only, resolve_backend, reverse_mode_only

__all__ = ["GibbsKernel", "SinkhornResult", "gibbs_kernel", "sinkhorn"]


# ----------------------------------------------------------------------------------------------------------
# Fake kernels (shapes for torch.compile and opcheck); the Triton ops have the same outputs
# ----------------------------------------------------------------------------------------------------------
def _sinkhorn_fake(a, b, cost, reg, num_iters, eps=0.0, log_domain=False, keep_history=True, precision="ieee",
                   _op="wkd.sinkhorn"):
    check_precision(precision, "sinkhorn", _op)
    check_sinkhorn_args(a, b, cost, reg, num_iters, eps, op=_op)
    B, n, m = a.shape[0], a.shape[1], b.shape[1]
    T = num_iters if keep_history else 0
    return (a.new_empty(B), a.new_empty(B, n), b.new_empty(B, m), a.new_empty(T, B, n), a.new_empty(T, B, m),
            a.new_empty(B if keep_history else 0, n))


def _sinkhorn_backward_fake(grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain=False, precision="ieee",
                            eps=None, _op="wkd.sinkhorn_backward"):
    check_precision(precision, "sinkhorn", _op)
    check_sinkhorn_backward_args(grad_value, a, b, cost, hist_r, hist_s, y, reg, op=_op)
    if eps is not None:
        check_sinkhorn_args(a, b, cost, reg, 1, eps, op=_op)
    return torch.empty_like(a), torch.empty_like(b)


torch.library.register_fake("wkd::sinkhorn")(_sinkhorn_fake)
torch.library.register_fake("wkd::sinkhorn_triton")(
    lambda *args, **kwargs: _sinkhorn_fake(*args, **kwargs, _op="wkd.sinkhorn_triton"))
torch.library.register_fake("wkd::sinkhorn_backward")(
    lambda grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain=False, eps=None:
    _sinkhorn_backward_fake(grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain, eps=eps))
torch.library.register_fake("wkd::sinkhorn_triton_backward")(
    lambda *args, **kwargs: _sinkhorn_backward_fake(*args, **kwargs, _op="wkd.sinkhorn_triton_backward"))
torch.library.register_fake("wkd::sinkhorn_torch")(
    lambda *args, **kwargs: _sinkhorn_fake(*args, **kwargs, _op="wkd.sinkhorn_torch"))
torch.library.register_fake("wkd::sinkhorn_torch_backward")(  # the schema of wkd::sinkhorn_backward (no precision)
    lambda grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain=False, eps=None:
    _sinkhorn_backward_fake(grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain, eps=eps,
                            _op="wkd.sinkhorn_torch_backward"))


def check_gibbs_args(a, b, K, KC, num_iters, eps, op="wkd.sinkhorn_gibbs"):
    """The argument checks of ``wkd::sinkhorn_gibbs`` (those of wkd::sinkhorn with K as a shared cost; messages as the
    C++ kernel's)."""
    for name, t in (("K", K), ("KC", KC)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: `{name}` must be a tensor")
    if K.dim() != 2:
        raise ValueError(f"{op}: `K` must be [n, m] (the Gibbs kernel of a cost shared by the batch), got shape "
                         f"{list(K.shape)}")
    if KC.shape != K.shape:
        raise ValueError(f"{op}: `KC` must have the shape of `K` {list(K.shape)}, got {list(KC.shape)}")
    check_sinkhorn_args(a, b, K, 1.0, num_iters, eps, op=op)
    if KC.dtype != a.dtype:
        raise TypeError(f"{op}: `KC` has dtype {KC.dtype} but `a` has {a.dtype}; all inputs must share one dtype")
    if KC.device != a.device:
        raise ValueError(f"{op}: `KC` is on {KC.device} but `a` is on {a.device}")


def _gibbs_fake(a, b, K, KC, num_iters, eps=0.0, keep_history=True, _op="wkd.sinkhorn_gibbs"):
    check_gibbs_args(a, b, K, KC, num_iters, eps, op=_op)
    B, n, m = a.shape[0], a.shape[1], b.shape[1]
    T = num_iters if keep_history else 0
    return (a.new_empty(B), a.new_empty(B, n), b.new_empty(B, m), a.new_empty(T, B, n), a.new_empty(T, B, m),
            a.new_empty(B if keep_history else 0, n))


def _gibbs_backward_fake(grad_value, a, b, K, KC, hist_r, hist_s, y, eps=None, _op="wkd.sinkhorn_gibbs_backward"):
    check_gibbs_args(a, b, K, KC, 1, 0.0 if eps is None else eps, op=_op)
    check_sinkhorn_backward_args(grad_value, a, b, K, hist_r, hist_s, y, 1.0, op=_op)
    return torch.empty_like(a), torch.empty_like(b)


torch.library.register_fake("wkd::sinkhorn_gibbs")(_gibbs_fake)
torch.library.register_fake("wkd::sinkhorn_gibbs_torch")(
    lambda *args, **kwargs: _gibbs_fake(*args, **kwargs, _op="wkd.sinkhorn_gibbs_torch"))
torch.library.register_fake("wkd::sinkhorn_gibbs_backward")(_gibbs_backward_fake)
torch.library.register_fake("wkd::sinkhorn_gibbs_torch_backward")(
    lambda *args, **kwargs: _gibbs_backward_fake(*args, **kwargs, _op="wkd.sinkhorn_gibbs_torch_backward"))


# ----------------------------------------------------------------------------------------------------------
# ATen kernels (the torch backend): wkd::sinkhorn_torch on every device type; also wkd::sinkhorn on CPU when the
# compiled extension is absent, so that torch.ops.wkd.sinkhorn works in every installation
# ----------------------------------------------------------------------------------------------------------
def _torch_forward(a, b, cost, reg, num_iters, eps=0.0, log_domain=False, keep_history=True, _op="wkd.sinkhorn_torch"):
    check_sinkhorn_args(a, b, cost, reg, num_iters, eps, op=_op)
    check_dtype_on_device(a, _op)
    return aten_sinkhorn.sinkhorn_forward(a, b, cost, reg, num_iters, eps, log_domain, keep_history)


def _torch_backward(grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain=False, eps=None,
                    _op="wkd.sinkhorn_torch_backward"):
    check_sinkhorn_backward_args(grad_value, a, b, cost, hist_r, hist_s, y, reg, op=_op)
    if eps is not None:
        check_sinkhorn_args(a, b, cost, reg, 1, eps, op=_op)
    check_dtype_on_device(a, _op)
    return aten_sinkhorn.sinkhorn_backward(grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain, eps)


torch.library.register_kernel("wkd::sinkhorn_torch", None)(_torch_forward)
torch.library.register_kernel("wkd::sinkhorn_torch_backward", None)(_torch_backward)
def _gibbs_torch_forward(a, b, K, KC, num_iters, eps=0.0, keep_history=True, _op="wkd.sinkhorn_gibbs_torch"):
    check_gibbs_args(a, b, K, KC, num_iters, eps, op=_op)
    check_dtype_on_device(a, _op)
    return aten_sinkhorn.sinkhorn_gibbs_forward(a, b, K, KC, num_iters, eps, keep_history)


def _gibbs_torch_backward(grad_value, a, b, K, KC, hist_r, hist_s, y, eps=None,
                          _op="wkd.sinkhorn_gibbs_torch_backward"):
    _gibbs_backward_fake(grad_value, a, b, K, KC, hist_r, hist_s, y, eps, _op=_op)  # the checks (no allocation)
    check_dtype_on_device(a, _op)
    return aten_sinkhorn.sinkhorn_gibbs_backward(grad_value, a, b, K, KC, hist_r, hist_s, y, eps)


torch.library.register_kernel("wkd::sinkhorn_gibbs_torch", None)(_gibbs_torch_forward)
torch.library.register_kernel("wkd::sinkhorn_gibbs_torch_backward", None)(_gibbs_torch_backward)
if not _build.HAS_C_EXT:
    torch.library.register_kernel("wkd::sinkhorn", "cpu")(
        lambda *args, **kwargs: _torch_forward(*args, **kwargs, _op="wkd.sinkhorn"))
    torch.library.register_kernel("wkd::sinkhorn_backward", "cpu")(
        lambda *args, **kwargs: _torch_backward(*args, **kwargs, _op="wkd.sinkhorn_backward"))
    torch.library.register_kernel("wkd::sinkhorn_gibbs", "cpu")(
        lambda *args, **kwargs: _gibbs_torch_forward(*args, **kwargs, _op="wkd.sinkhorn_gibbs"))
    torch.library.register_kernel("wkd::sinkhorn_gibbs_backward", "cpu")(
        lambda *args, **kwargs: _gibbs_torch_backward(*args, **kwargs, _op="wkd.sinkhorn_gibbs_backward"))


# ----------------------------------------------------------------------------------------------------------
# Triton kernels: wkd::sinkhorn_triton on every device type; also wkd::sinkhorn on CUDA in builds without the
# CUDA C++ kernels, so that torch.ops.wkd.sinkhorn works on CUDA tensors in every build
# ----------------------------------------------------------------------------------------------------------
def _triton_forward(a, b, cost, reg, num_iters, eps=0.0, log_domain=False, keep_history=True, precision="ieee",
                    _op="wkd.sinkhorn_triton"):
    from ..triton import sinkhorn as tri

    check_precision(precision, "sinkhorn", _op)
    check_sinkhorn_args(a, b, cost, reg, num_iters, eps, op=_op)  # the launchers do not check
    return tri.sinkhorn_forward(a, b, cost, reg, num_iters, eps, log_domain, keep_history, precision)


def _triton_backward(grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain=False, precision="ieee", eps=None,
                     _op="wkd.sinkhorn_triton_backward"):
    from ..triton import sinkhorn as tri

    check_precision(precision, "sinkhorn", _op)
    check_sinkhorn_backward_args(grad_value, a, b, cost, hist_r, hist_s, y, reg, op=_op)
    if eps is not None:
        check_sinkhorn_args(a, b, cost, reg, 1, eps, op=_op)
    return tri.sinkhorn_backward(grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain, precision, eps)


torch.library.register_kernel("wkd::sinkhorn_triton", None)(_triton_forward)
torch.library.register_kernel("wkd::sinkhorn_triton_backward", None)(_triton_backward)
if not _build.HAS_CUDA_EXT:
    torch.library.register_kernel("wkd::sinkhorn", "cuda")(
        lambda a, b, cost, reg, num_iters, eps=0.0, log_domain=False, keep_history=True:
        _triton_forward(a, b, cost, reg, num_iters, eps, log_domain, keep_history, _op="wkd.sinkhorn"))
    torch.library.register_kernel("wkd::sinkhorn_backward", "cuda")(
        lambda grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain=False, eps=None:
        _triton_backward(grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain, eps=eps,
                         _op="wkd.sinkhorn_backward"))


# ----------------------------------------------------------------------------------------------------------
# Autograd (the same formula for both ops; the Triton one passes its precision on to its backward)
# ----------------------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    a, b, cost, reg, num_iters, eps, log_domain, keep_history = inputs[:8]
    ctx.precision = inputs[8] if len(inputs) > 8 else None
    ctx.n_inputs = len(inputs)
    if cost.requires_grad:
        raise NotImplementedError("wkd.sinkhorn: the gradient w.r.t. `cost` is not implemented; pass cost.detach()")
    value, u, v, hist_r, hist_s, y = output
    ctx.mark_non_differentiable(u, v, hist_r, hist_s, y)
    # no zero tensors for the unused gradients of u, v and the history (a second history's worth of memory)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(a, b, cost, u, v, hist_r, hist_s, y)
    ctx.reg, ctx.log_domain, ctx.eps = reg, log_domain, eps


def _envelope_potential(scaling: Tensor, mass: Tensor, reg: float, log_domain: bool) -> Tensor:
    """reg * log(scaling), centred over the support of `mass`, 0 on zero-mass entries (POT's envelope)."""
    log_s = scaling if log_domain else torch.log(scaling)
    supp = mass > 0
    f = torch.where(supp, reg * log_s, torch.zeros_like(log_s))
    mean = f.sum(1, keepdim=True) / supp.sum(1, keepdim=True).clamp_min(1)
    return torch.where(supp, f - mean, torch.zeros_like(f))


def _backward(ctx, grad_value, grad_u, grad_v, grad_hist_r, grad_hist_s, grad_y):
    a, b, cost, u, v, hist_r, hist_s, y = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    n_inputs = ctx.n_inputs
    if not (need_a or need_b) or grad_value is None:
        return (None,) * n_inputs
    with torch.no_grad():
        if hist_r.shape[0] > 0:
            g = grad_value.contiguous()
            if getattr(ctx, "torch_backend", False):  # the ATen sweep itself (the op's kernel), told what is needed
                ga, gb = aten_sinkhorn.sinkhorn_backward(g, a, b, cost, hist_r, hist_s, y, ctx.reg, ctx.log_domain,
                                                         ctx.eps, need_b=need_b)
            elif ctx.precision is None:
                ga, gb = torch.ops.wkd.sinkhorn_backward(g, a, b, cost, hist_r, hist_s, y, ctx.reg, ctx.log_domain,
                                                         ctx.eps)
            else:
                ga, gb = torch.ops.wkd.sinkhorn_triton_backward(g, a, b, cost, hist_r, hist_s, y, ctx.reg,
                                                                ctx.log_domain, ctx.precision, ctx.eps)
        else:  # envelope gradient (no history kept)
            g = grad_value.unsqueeze(1)
            ga = g * _envelope_potential(u, a, ctx.reg, ctx.log_domain)
            gb = g * _envelope_potential(v, b, ctx.reg, ctx.log_domain)
    ga, gb = first_order_only((ga if need_a else None, gb if need_b else None), (a, b, grad_value), "wkd.sinkhorn")
    return (ga, gb) + (None,) * (n_inputs - 2)


torch.library.register_autograd("wkd::sinkhorn", _backward, setup_context=_setup_context)
torch.library.register_autograd("wkd::sinkhorn_triton", _backward, setup_context=_setup_context)


def _setup_context_torch(ctx, inputs, output):
    _setup_context(ctx, inputs, output)
    ctx.torch_backend = True


torch.library.register_autograd("wkd::sinkhorn_torch", _backward, setup_context=_setup_context_torch)


def _gibbs_setup_context(ctx, inputs, output):
    a, b, K, KC, num_iters, eps, keep_history = inputs
    if K.requires_grad or KC.requires_grad:
        raise NotImplementedError("wkd.sinkhorn_gibbs: the gradient w.r.t. `K` and `KC` is not implemented; pass "
                                  "them detached")
    value, u, v, hist_r, hist_s, y = output
    ctx.mark_non_differentiable(u, v, hist_r, hist_s, y)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(a, b, K, KC, hist_r, hist_s, y)
    ctx.eps = eps


def _gibbs_backward(ctx, grad_value, grad_u, grad_v, grad_hist_r, grad_hist_s, grad_y):
    a, b, K, KC, hist_r, hist_s, y = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_a or need_b) or grad_value is None:
        return (None,) * 7
    if hist_r.shape[0] == 0:
        raise RuntimeError("wkd.sinkhorn_gibbs: the gradient needs the history: run the forward with "
                           "keep_history=True (the envelope gradient needs reg: use wkd::sinkhorn)")
    with torch.no_grad():
        if getattr(ctx, "torch_backend", False):  # the ATen sweep itself (the op's kernel), told what is needed
            ga, gb = aten_sinkhorn.sinkhorn_gibbs_backward(grad_value, a, b, K, KC, hist_r, hist_s, y, ctx.eps,
                                                           need_b=need_b)
        else:
            ga, gb = torch.ops.wkd.sinkhorn_gibbs_backward(grad_value.contiguous(), a, b, K, KC, hist_r, hist_s, y,
                                                           ctx.eps)
    ga, gb = first_order_only((ga if need_a else None, gb if need_b else None), (a, b, grad_value),
                              "wkd.sinkhorn_gibbs")
    return (ga, gb) + (None,) * 5


def _gibbs_setup_context_torch(ctx, inputs, output):
    _gibbs_setup_context(ctx, inputs, output)
    ctx.torch_backend = True


torch.library.register_autograd("wkd::sinkhorn_gibbs", _gibbs_backward, setup_context=_gibbs_setup_context)
torch.library.register_autograd("wkd::sinkhorn_gibbs_torch", _gibbs_backward,
                                setup_context=_gibbs_setup_context_torch)


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


class GibbsKernel(NamedTuple):
    """The Gibbs kernel of a shared cost, computed once for many :func:`sinkhorn` calls (:func:`gibbs_kernel`).

    K: [n, m] exp(-cost / reg); KC: [n, m] K∘cost; reg: the ``reg`` they were computed with.
    """

    K: Tensor
    KC: Tensor
    reg: float


def gibbs_kernel(cost: Tensor, reg: float, *, check_values: Optional[bool] = None) -> GibbsKernel:
    """K = exp(-cost / reg) and K∘cost of a shared cost [n, m], for ``sinkhorn(..., kernel=)``.

    Computed with the ATen ops and rounding of the kernels (the values of a per-call K, bit for bit). With the value
    checks (always on CPU; on other devices when ``check_values`` or the setting asks: they synchronise), ``cost``
    must be finite and non-negative and K must have no row or column entirely 0 (else the scaling iterations
    divide by 0: the same errors as :func:`sinkhorn`'s). Memory: two [n, m] tensors.
    """
    op = "wkd.gibbs_kernel"
    reg = as_real(reg, "reg", op)
    if not isinstance(cost, Tensor) or cost.dim() != 2:
        raise ValueError(f"{op}: `cost` must be a shared [n, m] tensor, got "
                         f"{list(cost.shape) if isinstance(cost, Tensor) else type(cost).__name__}")
    if cost.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: `cost` must be float32 or float64, got {cost.dtype}")
    if isinstance(reg, bool) or not (reg > 0) or reg == float("inf"):
        raise ValueError(f"{op}: `reg` must be a finite number > 0, got {reg!r}")
    cost = cost.detach()
    if values_check_requested(check_values, "torch", cost.device, op) and not torch.compiler.is_compiling():
        ones = cost.new_ones(1, 1)
        check_sinkhorn_values(ones, ones, cost, op)
        check_sinkhorn_kernel_range(cost, reg, False, op)
    K = torch.exp(cost / -reg)
    return GibbsKernel(K, K * cost, float(reg))


def _values_look_valid(a: Tensor, b: Tensor, cost: Optional[Tensor], reg: float, log_domain: bool) -> bool:
    """The value checks of the Python path (check_sinkhorn_values, check_sinkhorn_kernel_range) as a handful of
    reductions and one host read: True when they would pass; False sends the caller to them, which name the problem.
    Every entry finite and >= 0 (NaN fails every comparison), every row of a and b with mass; with ``cost``, no row
    or column of K = exp(-cost / reg) (L = -cost / reg) entirely 0 (-inf): exp(-x / reg) decreases with x, so that
    is K's value at the largest row / column minimum of the cost. Empty inputs and, in float32, a reg that may not
    be a normal float32 go to the exact checks."""
    if (min(a.numel(), b.numel()) == 0 or (cost is not None and cost.numel() == 0)
            or (a.dtype == torch.float32 and not reg > 1e-30)):
        return False
    big = torch.finfo(a.dtype).max
    a, b = a.detach(), b.detach()  # no autograd graph for the checks
    row_a, row_b = a.amax(1), b.amax(1)
    low = [a.amin(), b.amin(), row_a.amin(), row_b.amin()]  # >= 0, >= 0, > 0, > 0
    high = [row_a.amax(), row_b.amax()]  # <= big
    if cost is not None:
        worst = torch.stack((cost.amin(-1).amax(), cost.amin(-2).amax())) / -reg
        low.append(cost.amin())
        high.append(cost.amax())
        live = torch.isfinite(worst) if log_domain else torch.exp(worst) > 0
    lo, hi = torch.stack(low), torch.stack(high)
    ok = (lo[:2] >= 0).all() & (lo[2:4] > 0).all() & (hi <= big).all()
    if cost is not None:
        ok = ok & (lo[4] >= 0) & live.all()
    return bool(ok)


def _checks_fold(a: Tensor, b: Tensor, cost: Optional[Tensor], reg: float) -> bool:
    """Whether :func:`_scaling_values_ok` applies (else the exact checks run before the op): non-empty inputs, and in
    float32 a reg that is a normal float32 (as :func:`_values_look_valid`)."""
    return (min(a.numel(), b.numel()) > 0 and (cost is None or cost.numel() > 0)
            and not (a.dtype == torch.float32 and not reg > 1e-30))


def _scaling_values_ok(a: Tensor, b: Tensor, cost: Optional[Tensor], reg: float, eps: float, value: Tensor) -> bool:
    """The value checks of the scaling-domain ATen loop, read on the host after it has run: True when the inputs were
    valid and the value is finite (False: the exact checks then name the problem).

    Every entry of a, b (and ``cost``) >= 0 is a minimum (NaN fails the comparison). The rest shows in the value
    when eps = 0: a non-finite entry of a, b or cost, a row without mass (u0 = 0, then b / 0) and a row or column of
    K that underflows whole (a division by 0) all make it inf or NaN. With eps > 0 the denominators are never 0, so
    the rows with mass and K's range (exp(-x / reg) of the largest row / column minimum of the cost) are checked
    too. On CPU tensors the reductions are read one by one (no synchronisation there); elsewhere they are read once."""
    a, b, value = a.detach(), b.detach(), value.detach()  # no autograd graph for the checks
    if a.device.type == "cpu":  # reading a scalar of a CPU tensor costs no synchronisation: a few reads, no stacking
        # the value's sum is finite when every value is (unless it overflows: then the exact test decides)
        ok = (float(a.amin()) >= 0 and float(b.amin()) >= 0 and (cost is None or float(cost.amin()) >= 0)
              and (math.isfinite(float(value.sum())) or bool(torch.isfinite(value).all())))
        if ok and eps > 0:
            ok = float(a.amax(1).amin()) > 0 and float(b.amax(1).amin()) > 0 and (cost is None or float(
                torch.exp(torch.maximum(cost.amin(-1).amax(), cost.amin(-2).amax()) / -reg)) > 0)
        return ok
    return _scaling_values_ok_one_read(a, b, cost, reg, eps, value)


def _scaling_values_ok_one_read(a: Tensor, b: Tensor, cost: Optional[Tensor], reg: float, eps: float,
                                value: Tensor) -> bool:
    """:func:`_scaling_values_ok` with one host read (one synchronisation on a GPU)."""
    mins = [a.amin(), b.amin()] + ([] if cost is None else [cost.amin()])
    ok = (torch.stack(mins).amin() >= 0) & torch.isfinite(value).all()
    if eps > 0:
        positive = [a.amax(1).amin(), b.amax(1).amin()]
        if cost is not None:
            worst = torch.maximum(cost.amin(-1).amax(), cost.amin(-2).amax())
            positive.append(torch.exp(worst / -reg))
        ok = ok & (torch.stack(positive).amin() > 0)
    return bool(ok)


def _name_input_problem(a: Tensor, b: Tensor, cost: Tensor, reg: float, log_domain: bool, cost_checked: bool) -> None:
    """The exact checks (they raise, naming the argument and the problem, when an input is invalid); ``cost_checked``:
    a and b only (a given Gibbs kernel was checked with its cost when it was built)."""
    check_sinkhorn_values(a, b, a.new_ones(1, 1) if cost_checked else cost)
    if not cost_checked:
        check_sinkhorn_kernel_range(cost, reg, log_domain)


def _check_kernel(kernel, cost: Tensor, reg: float, op: str) -> None:
    if not isinstance(kernel, GibbsKernel):
        raise TypeError(f"{op}: `kernel` must be a GibbsKernel (wkd_kernels.gibbs_kernel(cost, reg)), got "
                        f"{type(kernel).__name__}")
    if kernel.reg != reg:
        raise ValueError(f"{op}: `kernel` was computed with reg = {kernel.reg}, the call has `reg` = {reg}")
    if kernel.K.shape != cost.shape or kernel.K.dtype != cost.dtype or kernel.K.device != cost.device:
        raise ValueError(f"{op}: `kernel` ({list(kernel.K.shape)}, {kernel.K.dtype}, {kernel.K.device}) does not "
                         f"match `cost` ({list(cost.shape)}, {cost.dtype}, {cost.device}); build it with "
                         "wkd_kernels.gibbs_kernel(cost, reg) for this cost")


def sinkhorn(a: Tensor, b: Tensor, cost: Tensor, reg: float, num_iters: int, *, eps: float = 0.0,
             grad: str = "exact", log_domain: Union[bool, str] = False, backend: Optional[str] = None,
             precision: Optional[str] = None, check_values: Optional[bool] = None,
             kernel: Optional[GibbsKernel] = None) -> SinkhornResult:
    """Fixed-iteration entropic OT (Sinkhorn) per row, batched, without ever forming a B x n x m tensor.

    With K = exp(-cost / reg) and per row: u0 = 1/|supp a| on the support of a (0 elsewhere), then ``num_iters``
    times ``v = b / (K^T u + eps); u = a / (K v + eps)``; the result is the transport cost
    ``value = sum_ij u_i K_ij v_j cost_ij`` (not the entropic objective). With ``eps=0`` each row equals POT's
    ``ot.sinkhorn2(a_i, b_i, cost, reg, numItermax=num_iters, stopThr=0)``. Zero entries of ``a``/``b`` remove
    those rows/columns exactly (the result equals the reduced problem), which is how WKD-L drops the target class
    while keeping one shared cost matrix. The full contract: the schema comment of ``wkd::sinkhorn`` (csrc/ops.cpp).

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
            ``b`` (what autograd through the loop gives in exact arithmetic), storing O(B (n + m) num_iters)
            numbers. Its reverse sweep restores the gauge identity of the adjoint (docs/design.md section 3), without
            which rounding is amplified by up to exp(max cost / reg) at zero-mass entries: in float64 every entry is
            accurate to ~1e-12 relative, or to some ulps of the gradient's scale for entries far below it, one-hot
            and near-one-hot marginals at small reg included; in float32 zero-mass entries reach ~1e-4 (scaling) to
            3e-3 (log domain) relative error at reg 0.02 with near-one-hot marginals (cost in [0, 1]), <= 6e-5 at
            reg >= 0.05;
            ``"envelope"``: the dual potentials reg*log u, reg*log v centred over the support (POT's
            ``grad='envelope'``; cheaper, approximate for the transport cost, 0 on zero-mass entries).
        log_domain: ``True``: iterate on log-scalings with log-sum-exp, needed when ``cost/reg`` is large enough
            for K to underflow (e.g. reg=1e-3 with cost in [0, 1] in float32); slower. ``False`` (default): the
            scaling domain. ``"auto"``: the log domain exactly when some entry of K would leave the normal range of
            the compute dtype, max(cost) / reg > -log(tiny) (float32: 87.3, float64: 708.4); it reads max(cost), a
            synchronisation on a GPU (the losses, whose cost is a fixed buffer, decide once per cost instead).
            Inside ``torch.compile`` it cannot read it and takes the log domain (pass ``False`` there when K is known
            not to underflow: the scaling domain is faster).
            In the scaling domain an underflowing K is never silent on CPU: a whole row or column of K at 0 raises
            a ValueError naming ``reg`` and ``log_domain``, and so does a non-finite value or gradient. On CUDA the
            kernels do not read the values: there an underflowing K gives NaN unless ``check_values=True``, which
            runs the same row/column test.
        backend: ``"auto"``, ``"torch"`` (ATen ops, any device type), ``"cpu"``, ``"triton"`` or ``"cuda"`` (the
            CUDA C++ kernels); None: the setting (:mod:`wkd_kernels.settings`, where the rule of ``"auto"`` is
            defined). ``"torch"`` runs the value checks (and reports a non-finite scaling-domain value) on CPU
            tensors unless ``check_values=False``, elsewhere only with ``check_values``; it ignores ``precision``.
        precision: float32 product precision of the Triton kernels: ``"ieee"``, ``"tf32x3"`` or ``"tf32"`` (error
            bounds in docs/precision.md); None: the setting (default ``"ieee"``). The CPU and CUDA C++
            kernels compute in IEEE only (another precision with ``backend="cuda"`` is an error; with ``"auto"`` it
            selects Triton on CUDA tensors; on CPU tensors the C++ kernel ignores it).
        check_values: check for non-finite or negative entries, empty rows, and (see ``log_domain``) the range of
            K. Always done on CPU; on CUDA only when True (or the ``check_values`` setting) since it synchronises
            with the device.
        kernel: ``gibbs_kernel(cost, reg)`` of this (shared) cost, computed once for many calls: the scaling domain
            on the ``"cpu"`` and ``"torch"`` backends then runs ``wkd::sinkhorn_gibbs`` on it instead of forming K
            and K∘cost (and, with the value checks, reading ``cost``) per call; the same numbers, bit for bit.
            Ignored by the log domain, the envelope gradient and the Triton and CUDA C++ kernels (they take
            ``cost``). It must belong to ``cost``: its reg, shape, dtype and device are checked, its values are not.
        Scalars (``reg``, ``num_iters``, ``eps``) may be Python, NumPy or 0-d tensor scalars.

    Returns:
        :class:`SinkhornResult` ``(value [B], log_u [B, n], log_v [B, m])``, float32 for half inputs.
    """
    op = "wkd.sinkhorn"
    if grad not in ("exact", "envelope"):
        raise ValueError(f"{op}: `grad` must be 'exact' or 'envelope', got {grad!r}")
    reg, num_iters, eps = as_real(reg, "reg", op), as_int(num_iters, "num_iters", op), as_real(eps, "eps", op)
    log_domain = as_log_domain(log_domain, op)
    precision = settings.resolve_precision(precision, "sinkhorn", op)
    check_sinkhorn_args(a, b, cost, reg, num_iters, eps, allow_half=True)
    kind = resolve_backend(backend, a, op, has_cuda_cpp=True, precision=precision)
    if cost.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError("wkd.sinkhorn: the gradient w.r.t. `cost` is not implemented; pass cost.detach()")
    if a.dtype in HALF:
        a, b, cost = a.float(), b.float(), cost.float()
    a, b = reverse_mode_only(op, a, b)
    if log_domain == "auto":
        # a compiled graph cannot read max(cost) on the host: there "auto" takes the log domain, right in every regime
        log_domain = torch.compiler.is_compiling() or (
            a.shape[0] > 0 and auto_log_domain(float(cost.max()), reg, a.dtype))
    needs_grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    keep_history = needs_grad and grad == "exact"
    if kernel is not None:
        _check_kernel(kernel, cost, reg, op)
    gibbs_ok = kind in ("cpu", "torch") and not log_domain and cost.dim() == 2 and (keep_history or not needs_grad)
    use_kernel = kernel is not None and gibbs_ok
    # the cost's values and the range of K were checked when a given kernel was built: then a and b only
    checked_cost = None if use_kernel else cost
    python_checks = values_check_requested(check_values, kind, a.device)
    # The ATen loop in the scaling domain (the torch backend, the Gibbs ops): the checks are a few reductions read
    # once, with the value's finiteness, after the op (_scaling_values_ok); elsewhere they run before the kernel.
    aten_scaling = not log_domain and (kind == "torch" or use_kernel)
    folded = python_checks and aten_scaling and _checks_fold(a, b, checked_cost, reg)
    if python_checks and not folded and not _values_look_valid(a, b, checked_cost, reg, log_domain):
        _name_input_problem(a, b, cost, reg, log_domain, use_kernel)
    if kind == "torch" and gibbs_ok and kernel is None:
        # K and K∘cost formed once per call (as wkd::sinkhorn_torch forms them) and given to the Gibbs op, whose
        # autograd keeps them for the backward: wkd::sinkhorn_torch_backward would form them again
        K = torch.exp(cost / -reg)
        kernel, use_kernel = GibbsKernel(K, K * cost, float(reg)), True
    args = (a, b, cost, float(reg), int(num_iters), float(eps), bool(log_domain), keep_history)
    if use_kernel and kind == "torch" and not needs_grad and not torch.compiler.is_compiling():
        # no autograd and no graph to trace: the op's ATen kernel itself (arguments checked above), without the
        # custom op's Python dispatch (~40 us a call, 3% of a forward at B = 256, C = 100)
        value, u, v, *_ = aten_sinkhorn.sinkhorn_gibbs_forward(a, b, kernel.K, kernel.KC, int(num_iters), float(eps),
                                                               False)
    elif use_kernel:
        gibbs = torch.ops.wkd.sinkhorn_gibbs_torch if kind == "torch" else torch.ops.wkd.sinkhorn_gibbs
        value, u, v, *_ = gibbs(a, b, kernel.K, kernel.KC, int(num_iters), float(eps), keep_history)
    elif kind == "triton":
        value, u, v, *_ = torch.ops.wkd.sinkhorn_triton(*args, precision)
    elif kind == "torch":
        value, u, v, *_ = torch.ops.wkd.sinkhorn_torch(*args)
    else:  # "cpu" and "cuda": the C++ kernels registered on wkd::sinkhorn for the tensors' device
        value, u, v, *_ = torch.ops.wkd.sinkhorn(*args)
    if folded:
        ok = _scaling_values_ok(a, b, checked_cost, reg, eps, value)
    else:
        ok = not (python_checks and aten_scaling) or bool(torch.isfinite(value).all())
    if not ok:
        if folded:
            _name_input_problem(a, b, cost, reg, log_domain, checked_cost is None)
        if checked_cost is None:
            raise ValueError(f"{op}: the scaling-domain iterations gave a non-finite value in {a.dtype}: entries of K "
                             "underflow where the problem needs them, or the scalings overflow. Use log_domain=True, "
                             "or a larger `reg`")
        raise ValueError(f"{op}: the scaling-domain iterations gave a non-finite value with `reg` = {reg} in "
                         f"{str(a.dtype).replace('torch.', '')}: K = exp(-cost / reg) underflows (cost / reg > "
                         f"{87 if a.dtype == torch.float32 else 708} somewhere) or the scalings overflow. Use "
                         "log_domain=True, or a larger `reg`")
    if log_domain:
        log_u, log_v = u, v
    else:
        log_u, log_v = torch.log(u), torch.log(v)
    return SinkhornResult(value, log_u, log_v)
