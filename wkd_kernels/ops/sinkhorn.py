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

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from .. import _build, settings
from ..aten import sinkhorn as aten_sinkhorn
from .checks import (HALF, as_int, check_precision, as_log_domain, as_real, auto_log_domain, check_sinkhorn_args,
                     check_sinkhorn_backward_args, check_sinkhorn_kernel_range, check_sinkhorn_values,
                     values_check_requested)
from .common import check_dtype_on_device, first_order_only, resolve_backend, reverse_mode_only

__all__ = ["SinkhornResult", "sinkhorn"]


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
if not _build.HAS_C_EXT:
    torch.library.register_kernel("wkd::sinkhorn", "cpu")(
        lambda *args, **kwargs: _torch_forward(*args, **kwargs, _op="wkd.sinkhorn"))
    torch.library.register_kernel("wkd::sinkhorn_backward", "cpu")(
        lambda *args, **kwargs: _torch_backward(*args, **kwargs, _op="wkd.sinkhorn_backward"))


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
            if getattr(ctx, "torch_backend", False):
                ga, gb = torch.ops.wkd.sinkhorn_torch_backward(g, a, b, cost, hist_r, hist_s, y, ctx.reg,
                                                               ctx.log_domain, ctx.eps)
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
             grad: str = "exact", log_domain: Union[bool, str] = False, backend: Optional[str] = None,
             precision: Optional[str] = None, check_values: Optional[bool] = None) -> SinkhornResult:
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
    python_checks = values_check_requested(check_values, kind, a.device)
    if python_checks:
        check_sinkhorn_values(a, b, cost)
        check_sinkhorn_kernel_range(cost, reg, log_domain)
    needs_grad = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    keep_history = needs_grad and grad == "exact"
    args = (a, b, cost, float(reg), int(num_iters), float(eps), bool(log_domain), keep_history)
    if kind == "triton":
        value, u, v, *_ = torch.ops.wkd.sinkhorn_triton(*args, precision)
    elif kind == "torch":
        value, u, v, *_ = torch.ops.wkd.sinkhorn_torch(*args)
        if python_checks and not log_domain and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{op}: the scaling-domain iterations gave a non-finite value with `reg` = {reg} in "
                             f"{str(a.dtype).replace('torch.', '')}: K = exp(-cost / reg) underflows (cost / reg > "
                             f"{87 if a.dtype == torch.float32 else 708} somewhere) or the scalings overflow. Use "
                             "log_domain=True, or a larger `reg`")
    else:  # "cpu" and "cuda": the C++ kernels registered on wkd::sinkhorn for the tensors' device
        value, u, v, *_ = torch.ops.wkd.sinkhorn(*args)
    if log_domain:
        log_u, log_v = u, v
    else:
        log_u, log_v = torch.log(u), torch.log(v)
    return SinkhornResult(value, log_u, log_v)
