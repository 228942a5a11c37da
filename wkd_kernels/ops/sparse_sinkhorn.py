"""Sinkhorn over one shared sparse cost (vocabulary-scale WKD-L / LLM distillation): :func:`sparse_sinkhorn` and its
autograd (the sparse costs, e.g. the k-nearest-neighbour cost of embeddings: wkd_kernels/ops/sparse_costs.py).

A dense C x C cost stops fitting at LLM vocabularies (GPT-2, C = 50,257: 10 GB in float32; Qwen, C = 151,936:
92 GB). Keeping only the couplings between each token and its k nearest neighbours in the teacher's embedding space
(the sparse kernel of WASD, github.com/aailab-kaist/WASD) makes the kernel O(C k). Kernels: ATen
(any device type) wkd_kernels/aten/sparse_sinkhorn.py, C++ (CPU) csrc/cpu/sparse_sinkhorn.cpp, Triton (scaling domain,
unvalidated on GPU hardware) wkd_kernels/triton/sparse_sinkhorn.py; what, why, measurements: docs/vocabulary_ot.md.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from ..aten.sparse_sinkhorn import (EmbeddingCost, SparseCost, embedding_path, sparse_sinkhorn_backward,
                                    sparse_sinkhorn_forward)
from .. import _build, settings
from .checks import as_bool, as_int, as_log_domain, as_real, auto_log_domain, values_check_requested
from .common import check_dtype_on_device, first_order_only, resolve_backend, reverse_mode_only

__all__ = ["SparseSinkhornResult", "SparseCost", "EmbeddingCost", "sparse_sinkhorn", "sparse_cost", "embedding_cost"]

_OP = "wkd.sparse_sinkhorn"


def _envelope_grad(log_s: Tensor, mass: Tensor, reg: float, g: Tensor) -> Tensor:
    """g * (reg * log_s centred over the support of ``mass``), 0 off it: [C, B] (columns = rows of masses), a
    transposed view of [B, C] memory: the layout of the gradient of the [B, C] masses, which autograd then keeps
    without a copy. One boolean [C, B] temporary besides the result (the support count is summed in the result's
    buffer first)."""
    out = torch.empty(log_s.shape[1], log_s.shape[0], dtype=log_s.dtype, device=log_s.device).t()
    # |supp| per column as a sum of ones in the gradient's buffer (a boolean sum would make an int64 [C, B] copy)
    count = torch.gt(mass, 0, out=out).sum(0, keepdim=True).clamp_min(1)
    off = mass <= 0
    f = torch.mul(log_s, reg, out=out).masked_fill_(off, 0.0)
    return f.sub_(f.sum(0, keepdim=True) / count).masked_fill_(off, 0.0).mul_(g.unsqueeze(0))


class _SparseSinkhorn(torch.autograd.Function):
    """value [B] of the fixed-iteration Sinkhorn over masses a, b [B, C] and the shared sparse cost; log_u, log_v
    [B, C] (not differentiable)."""

    @staticmethod
    def forward(ctx, a, b, K, num_iters, eps, log_domain, exact, chunk_elements):
        if exact or log_domain:  # the reverse sweep and the segment reductions want [C, B] memory
            aT, bT = a.t().contiguous(), b.t().contiguous()
        else:  # the scaling iterations read a and b elementwise only: transposed views, no copy
            aT, bT = a.t(), b.t()
        value, u, v, hist_r, hist_s, y = sparse_sinkhorn_forward(aT, bT, K, num_iters, eps, log_domain, exact,
                                                                 chunk_elements)
        log_u, log_v = (u, v) if log_domain else (u.log_(), v.log_())  # u, v are not used again
        ctx.K, ctx.eps, ctx.log_domain, ctx.exact, ctx.chunk = K, eps, log_domain, exact, chunk_elements
        # a and b themselves (no copy) anchor the double-backward error of first_order_only, as in wk.sinkhorn
        if exact:
            ctx.save_for_backward(a, b, aT, bT, hist_r, hist_s, y)
        else:
            ctx.save_for_backward(a, b, aT, bT, log_u, log_v)
        ctx.mark_non_differentiable(log_u, log_v)
        ctx.set_materialize_grads(False)  # no [B, C] zero gradients for log_u, log_v
        return value, log_u.t(), log_v.t()

    @staticmethod
    def backward(ctx, grad_value, grad_log_u, grad_log_v):
        if grad_value is None:
            return (None,) * 8
        K = ctx.K
        with torch.no_grad():
            if ctx.exact:
                a, b, aT, bT, hist_r, hist_s, y = ctx.saved_tensors
                ga, gb = sparse_sinkhorn_backward(grad_value.contiguous(), aT, bT, K, hist_r, hist_s, y,
                                                  ctx.log_domain, ctx.eps, ctx.chunk)
            else:
                a, b, aT, bT, log_u, log_v = ctx.saved_tensors
                ga = _envelope_grad(log_u, aT, K.reg, grad_value) if ctx.needs_input_grad[0] else None
                gb = _envelope_grad(log_v, bT, K.reg, grad_value) if ctx.needs_input_grad[1] else None
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ga, gb = first_order_only((ga.t() if need_a else None, gb.t() if need_b else None), (a, b, grad_value),
                                  _OP)
        return ga, gb, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------
# The ops wkd::sparse_sinkhorn / wkd::sparse_sinkhorn_backward (schemas and contract: csrc/ops.cpp) and their ATen
# twins wkd::sparse_sinkhorn_torch / _torch_backward: argument checks, fake kernels, ATen kernels, autograd
# ----------------------------------------------------------------------------------------------------------
_INDEX = (torch.int32, torch.int64)


def _check_op_args(a, b, crow, col, cost, crow_t, col_t, cost_t, reg, num_iters=1, eps=0.0, op=_OP) -> None:
    """Shapes, dtypes and devices of the op's arguments (no value read): errors name the argument."""
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError(f"{op}: `{name}` must be a [C, B] tensor, got "
                             f"{list(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if a.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: `a` must be float32 or float64, got {a.dtype}")
    if b.shape != a.shape:
        raise ValueError(f"{op}: `b` must have the shape of `a` {list(a.shape)}, got {list(b.shape)}")
    if b.dtype != a.dtype:
        raise TypeError(f"{op}: `b` must have the dtype of `a` ({a.dtype}), got {b.dtype}")
    C = a.shape[0]
    for suffix, (cr, cl, cv) in (("", (crow, col, cost)), ("_t", (crow_t, col_t, cost_t))):
        if not isinstance(cr, Tensor) or cr.dim() != 1 or cr.shape[0] != C + 1 or cr.dtype not in _INDEX:
            raise ValueError(f"{op}: `crow{suffix}` must be an int32/int64 [C + 1] = [{C + 1}] tensor, got "
                             f"{getattr(cr, 'dtype', type(cr).__name__)} {list(getattr(cr, 'shape', []))}")
        if not isinstance(cl, Tensor) or cl.dim() != 1 or cl.dtype not in _INDEX:
            raise ValueError(f"{op}: `col{suffix}` must be an int32/int64 [nnz] tensor")
        if not isinstance(cv, Tensor) or cv.dim() != 1 or cv.shape[0] != cl.shape[0]:
            raise ValueError(f"{op}: `cost{suffix}` must be [nnz] like `col{suffix}` ({cl.shape[0]}), got "
                             f"{list(getattr(cv, 'shape', []))}")
        if cv.dtype != a.dtype:
            raise TypeError(f"{op}: `cost{suffix}` must have the dtype of `a` ({a.dtype}), got {cv.dtype}")
    if col_t.shape[0] != col.shape[0]:
        raise ValueError(f"{op}: `col_t` must hold the nnz = {col.shape[0]} entries of `col`, got {col_t.shape[0]}")
    for name, t in (("b", b), ("crow", crow), ("col", col), ("cost", cost), ("crow_t", crow_t), ("col_t", col_t),
                    ("cost_t", cost_t)):
        if t.device != a.device:
            raise ValueError(f"{op}: `{name}` is on {t.device}, `a` on {a.device}")
    if not (reg > 0 and math.isfinite(reg)):
        raise ValueError(f"{op}: `reg` must be a positive finite number, got {reg}")
    if num_iters < 1:
        raise ValueError(f"{op}: `num_iters` must be >= 1, got {num_iters}")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"{op}: `eps` must be a finite number >= 0, got {eps}")


def _check_backward_args(grad_value, a, b, crow, col, cost, crow_t, col_t, cost_t, hist_r, hist_s, y, reg, eps,
                         op) -> None:
    _check_op_args(a, b, crow, col, cost, crow_t, col_t, cost_t, reg, 1, 0.0 if eps is None else eps, op)
    C, B = a.shape
    if not isinstance(grad_value, Tensor) or list(grad_value.shape) != [B] or grad_value.dtype != a.dtype:
        raise ValueError(f"{op}: `grad_value` must be a [{B}] tensor of dtype {a.dtype}")
    for name, t in (("hist_r", hist_r), ("hist_s", hist_s)):
        if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[0] < 1 or list(t.shape[1:]) != [C, B]:
            raise ValueError(f"{op}: `{name}` must be the [T, C, B] = [T, {C}, {B}] history of a keep_history=True "
                             f"forward (T >= 1), got {list(getattr(t, 'shape', []))}")
    if hist_s.shape[0] != hist_r.shape[0]:
        raise ValueError(f"{op}: `hist_r` and `hist_s` must have the same T, got {hist_r.shape[0]}, {hist_s.shape[0]}")
    if not isinstance(y, Tensor) or list(y.shape) != [C, B]:
        raise ValueError(f"{op}: `y` must be [C, B] = [{C}, {B}], got {list(getattr(y, 'shape', []))}")
    for name, t in (("grad_value", grad_value), ("hist_r", hist_r), ("hist_s", hist_s), ("y", y)):
        if t.dtype != a.dtype or t.device != a.device:
            raise ValueError(f"{op}: `{name}` must have the dtype and device of `a` ({a.dtype}, {a.device})")


def _forward_fake(a, b, crow, col, cost, crow_t, col_t, cost_t, reg, num_iters, eps=0.0, log_domain=False,
                  keep_history=True, chunk_elements=None, _op=_OP):
    _check_op_args(a, b, crow, col, cost, crow_t, col_t, cost_t, reg, num_iters, eps, _op)
    C, B = a.shape
    T = num_iters if keep_history else 0
    return (a.new_empty(B), a.new_empty(C, B), a.new_empty(C, B), a.new_empty(T, C, B), a.new_empty(T, C, B),
            a.new_empty(C if keep_history else 0, B))


def _backward_fake(grad_value, a, b, crow, col, cost, crow_t, col_t, cost_t, hist_r, hist_s, y, reg,
                   log_domain=False, eps=None, chunk_elements=None, _op=_OP + "_backward"):
    _check_backward_args(grad_value, a, b, crow, col, cost, crow_t, col_t, cost_t, hist_r, hist_s, y, reg, eps, _op)
    return a.new_empty(a.shape), b.new_empty(b.shape)


def _long(*idx):
    return tuple(t.long() for t in idx)


def _torch_forward(a, b, crow, col, cost, crow_t, col_t, cost_t, reg, num_iters, eps=0.0, log_domain=False,
                   keep_history=True, chunk_elements=None, _op=_OP + "_torch"):
    _check_op_args(a, b, crow, col, cost, crow_t, col_t, cost_t, reg, num_iters, eps, _op)
    check_dtype_on_device(a, _op)
    crow, col, crow_t, col_t = _long(crow, col, crow_t, col_t)
    K = SparseCost.from_arrays(crow, col, cost, crow_t, col_t, cost_t, reg)
    if log_domain:  # the segment reductions want [C, B] memory (the scaling domain reads a, b elementwise)
        a, b = a.contiguous(), b.contiguous()
    out = sparse_sinkhorn_forward(a, b, K, num_iters, eps, log_domain, keep_history, chunk_elements)
    if not log_domain:  # the op returns log-scalings in both domains (u, v are fresh buffers)
        out = (out[0], out[1].log_(), out[2].log_()) + out[3:]
    if not keep_history:  # the schema's empty history: [0, C, B]
        out = out[:3] + (a.new_empty(0, *a.shape), a.new_empty(0, *a.shape)) + out[5:]
    return out


def _torch_backward(grad_value, a, b, crow, col, cost, crow_t, col_t, cost_t, hist_r, hist_s, y, reg,
                    log_domain=False, eps=None, chunk_elements=None, _op=_OP + "_torch_backward"):
    _check_backward_args(grad_value, a, b, crow, col, cost, crow_t, col_t, cost_t, hist_r, hist_s, y, reg, eps, _op)
    check_dtype_on_device(a, _op)
    crow, col, crow_t, col_t = _long(crow, col, crow_t, col_t)
    K = SparseCost.from_arrays(crow, col, cost, crow_t, col_t, cost_t, reg)
    ga, gb = sparse_sinkhorn_backward(grad_value.contiguous(), a.contiguous(), b.contiguous(), K, hist_r, hist_s,
                                      y, log_domain, eps, chunk_elements)
    return ga.contiguous(), gb.contiguous()


torch.library.register_fake("wkd::sparse_sinkhorn")(_forward_fake)
torch.library.register_fake("wkd::sparse_sinkhorn_backward")(_backward_fake)
torch.library.register_fake("wkd::sparse_sinkhorn_torch")(
    lambda *args, **kwargs: _forward_fake(*args, **kwargs, _op=_OP + "_torch"))
torch.library.register_fake("wkd::sparse_sinkhorn_torch_backward")(
    lambda *args, **kwargs: _backward_fake(*args, **kwargs, _op=_OP + "_torch_backward"))
# the ATen kernels: the twins on every device type; the base ops on every device type but CPU (whose kernel is the
# C++ one, csrc/cpu/sparse_sinkhorn.cpp), and on CPU too in an installation without the compiled extension
torch.library.register_kernel("wkd::sparse_sinkhorn_torch", None)(_torch_forward)
torch.library.register_kernel("wkd::sparse_sinkhorn_torch_backward", None)(_torch_backward)
_BASE_DEVICES = ("cuda", "xpu", "mps") + (() if _build.HAS_C_EXT else ("cpu",))
torch.library.register_kernel("wkd::sparse_sinkhorn", _BASE_DEVICES)(
    lambda *args, **kwargs: _torch_forward(*args, **kwargs, _op=_OP))
torch.library.register_kernel("wkd::sparse_sinkhorn_backward", _BASE_DEVICES)(
    lambda *args, **kwargs: _torch_backward(*args, **kwargs, _op=_OP + "_backward"))


def _setup_context(ctx, inputs, output):
    args = (list(inputs) + [0.0, False, True, None][len(inputs) - 10:])[:14]  # the schema's defaults
    a, b, crow, col, cost, crow_t, col_t, cost_t, reg, _, eps, log_domain, _, chunk = args
    if cost.requires_grad or cost_t.requires_grad:
        raise NotImplementedError(f"{_OP}: the gradient w.r.t. `cost` is not implemented; pass cost.detach()")
    _, u, v, hist_r, hist_s, y = output
    ctx.mark_non_differentiable(u, v, hist_r, hist_s, y)
    ctx.set_materialize_grads(False)  # no zero tensors for the gradients of u, v and the history
    # u, v: only the envelope gradient (no history) reads them, each for its own input's gradient
    envelope = hist_r.shape[0] == 0
    keep_u, keep_v = (u if envelope and ctx.needs_input_grad[0] else None,
                      v if envelope and ctx.needs_input_grad[1] else None)
    ctx.save_for_backward(a, b, crow, col, cost, crow_t, col_t, cost_t, keep_u, keep_v, hist_r, hist_s, y)
    ctx.reg, ctx.log_domain, ctx.eps, ctx.chunk, ctx.n_inputs = reg, log_domain, eps, chunk, len(inputs)


def _make_backward(backward_op):
    def _backward(ctx, grad_value, *unused):
        a, b, crow, col, cost, crow_t, col_t, cost_t, u, v, hist_r, hist_s, y = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_a or need_b) or grad_value is None:
            return (None,) * ctx.n_inputs
        with torch.no_grad():
            if hist_r.shape[0] > 0:
                ga, gb = backward_op(grad_value.contiguous(), a, b, crow, col, cost, crow_t, col_t, cost_t, hist_r,
                                     hist_s, y, ctx.reg, ctx.log_domain, ctx.eps, ctx.chunk)
            else:  # envelope gradient (no history kept)
                ga = _envelope_grad(u, a, ctx.reg, grad_value) if need_a else None
                gb = _envelope_grad(v, b, ctx.reg, grad_value) if need_b else None
        ga, gb = first_order_only((ga if need_a else None, gb if need_b else None), (a, b, grad_value), _OP)
        return (ga, gb) + (None,) * (ctx.n_inputs - 2)
    return _backward


torch.library.register_autograd("wkd::sparse_sinkhorn", _make_backward(torch.ops.wkd.sparse_sinkhorn_backward),
                                setup_context=_setup_context)
torch.library.register_autograd("wkd::sparse_sinkhorn_torch",
                                _make_backward(torch.ops.wkd.sparse_sinkhorn_torch_backward),
                                setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# wkd::sparse_sinkhorn_triton / _triton_backward (schemas: _schemas.PYTHON_TRITON_SCHEMAS), wkd_kernels/triton/
# sparse_sinkhorn.py: scaling domain only, every device type; `chunk_elements` ignored; unvalidated on GPU hardware
# ----------------------------------------------------------------------------------------------------------
_TRITON_OP = _OP + "_triton"


def _check_triton(a, log_domain, op) -> None:
    if log_domain:
        raise ValueError(f"{op}: `log_domain`=True is not implemented by the Triton kernel (scaling domain only); the "
                         "log domain runs on ATen ops: backend='torch' (torch.ops.wkd.sparse_sinkhorn_torch)")
    if not (a.device.type == "cuda" or (a.device.type == "cpu" and settings.TRITON_INTERPRET)):
        raise ValueError(f"{op}: the Triton kernel runs on CUDA tensors (on CPU tensors only under "
                         f"TRITON_INTERPRET=1, set before triton is imported); these are on {a.device}")


def _triton_forward(a, b, crow, col, cost, crow_t, col_t, cost_t, reg, num_iters, eps=0.0, log_domain=False,
                    keep_history=True, chunk_elements=None, _fake=False):
    _check_op_args(a, b, crow, col, cost, crow_t, col_t, cost_t, reg, num_iters, eps, _TRITON_OP)
    _check_triton(a, log_domain, _TRITON_OP)
    if _fake:
        return _forward_fake(a, b, crow, col, cost, crow_t, col_t, cost_t, reg, num_iters, eps, log_domain,
                             keep_history, chunk_elements, _op=_TRITON_OP)
    check_dtype_on_device(a, _TRITON_OP)
    from ..triton import sparse_sinkhorn as tri
    return tri.sparse_sinkhorn_forward(a, b, crow, col, cost, crow_t, col_t, cost_t, reg, num_iters, eps,
                                       keep_history)


def _triton_backward(grad_value, a, b, crow, col, cost, crow_t, col_t, cost_t, hist_r, hist_s, y, reg,
                     log_domain=False, eps=None, chunk_elements=None, _fake=False):
    op = _TRITON_OP + "_backward"
    _check_backward_args(grad_value, a, b, crow, col, cost, crow_t, col_t, cost_t, hist_r, hist_s, y, reg, eps, op)
    _check_triton(a, log_domain, op)
    if _fake:
        return a.new_empty(a.shape), b.new_empty(b.shape)
    check_dtype_on_device(a, op)
    from ..triton import sparse_sinkhorn as tri
    ga, gb = tri.sparse_sinkhorn_backward(grad_value.contiguous(), a.contiguous(), b.contiguous(), crow, col, cost,
                                          crow_t, col_t, cost_t, hist_r, hist_s, y, reg, eps)
    return ga.contiguous(), gb.contiguous()


for _name, _kernel in (("sparse_sinkhorn_triton", _triton_forward),
                       ("sparse_sinkhorn_triton_backward", _triton_backward)):
    torch.library.register_fake("wkd::" + _name)(lambda *args, _kernel=_kernel, **kw: _kernel(*args, **kw, _fake=True))
    torch.library.register_kernel("wkd::" + _name, None)(_kernel)
torch.library.register_autograd("wkd::sparse_sinkhorn_triton",
                                _make_backward(torch.ops.wkd.sparse_sinkhorn_triton_backward),
                                setup_context=_setup_context)


# The exact gradient of the public function is computed in the forward, a chunk of rows at a time (see
# _RowGradientsInForward): one chunk's history (2 num_iters [C] vectors per row) and the reverse sweep's own
# vectors (about SWEEP_VECTORS_PER_ROW [C] vectors per row, its float64 gauge sums counted twice; measured) hold at
# most ROW_CHUNK_ELEMENTS numbers (2^24: 64 MiB in float32).
ROW_CHUNK_ELEMENTS = 1 << 24
SWEEP_VECTORS_PER_ROW = 20


def rows_per_chunk(num_iters: int, C: int) -> int:
    """Rows of one chunk of the exact gradient computed in the forward (at least one)."""
    return max(1, ROW_CHUNK_ELEMENTS // ((2 * num_iters + SWEEP_VECTORS_PER_ROW) * max(1, C)))


class _RowGradientsInForward(torch.autograd.Function):
    """value [B] of ``op`` (wkd::sparse_sinkhorn or its ATen twin) with its exact gradient computed in the forward.

    value_b depends on row b of ``a`` and ``b`` only, so d L / d a_b = grad_value_b * d value_b / d a_b: the forward
    runs the op and its backward op (grad_value = 1) on chunks of ``rows`` rows, keeps d value / d a and d value /
    d b ([B, C] each, for the inputs that need a gradient) and drops the chunk's history; the backward scales them by
    grad_value. Extra memory: those gradients and one chunk's history, instead of the whole 2 num_iters [C, B]
    history the op's own autograd keeps until the backward (2 GB at C = 50,257, B = 512, 10 iterations, float32).
    The numbers are the backward op's, scaled by grad_value after instead of before the sweep (the sweep is linear in
    it). The cost: the backward's work is done even if no backward follows."""

    @staticmethod
    def forward(ctx, a, b, op, backward_op, arrays, reg, num_iters, eps, log_domain, chunk_elements, rows):
        B, C = a.shape
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        value = a.new_empty(B)
        log_u, log_v = a.new_empty(B, C), a.new_empty(B, C)
        ga = a.new_empty(B, C) if need_a else None
        gb = a.new_empty(B, C) if need_b else None
        for r0 in range(0, B, rows):
            r1 = min(B, r0 + rows)
            ac, bc = a[r0:r1].t(), b[r0:r1].t()  # [C, rows] views, as the op takes its masses
            val, lu, lv, hist_r, hist_s, y = op(ac, bc, *arrays, reg, num_iters, eps, log_domain, True,
                                                chunk_elements)
            value[r0:r1] = val
            log_u[r0:r1] = lu.t()
            log_v[r0:r1] = lv.t()
            gac, gbc = backward_op(torch.ones_like(val), ac, bc, *arrays, hist_r, hist_s, y, reg, log_domain, eps,
                                   chunk_elements)
            del hist_r, hist_s, y
            if need_a:
                ga[r0:r1] = gac.t()
            if need_b:
                gb[r0:r1] = gbc.t()
        ctx.save_for_backward(a, b, *(g for g in (ga, gb) if g is not None))
        ctx.mark_non_differentiable(log_u, log_v)
        ctx.set_materialize_grads(False)
        return value, log_u, log_v

    @staticmethod
    def backward(ctx, grad_value, grad_log_u, grad_log_v):
        if grad_value is None:
            return (None,) * 11
        a, b, *grads = ctx.saved_tensors
        grads = iter(grads)
        scale = grad_value.unsqueeze(1)
        ga = next(grads) * scale if ctx.needs_input_grad[0] else None
        gb = next(grads) * scale if ctx.needs_input_grad[1] else None
        ga, gb = first_order_only((ga, gb), (a, b, grad_value), _OP)
        return (ga, gb) + (None,) * 9


class SparseSinkhornResult(NamedTuple):
    """Result of :func:`sparse_sinkhorn`.

    value: [B] transport cost sum_ij P_ij c_ij per row over the stored couplings (or the Sinkhorn divergence with
        ``divergence=True``); differentiable w.r.t. ``a`` and ``b``.
    log_u, log_v: [B, C] log-scalings of the problem (a, b) (-inf off the support); not differentiable.
    log_domain: whether the log-domain iterations ran (``log_domain="auto"`` decides per call).
    path: which kernel ran: ``"sparse"`` (CSR), ``"dense"`` (K stored whole), ``"dense_bf16"`` (K stored whole
        in bfloat16) or ``"implicit"`` (K recomputed per row tile from embeddings); see :func:`embedding_cost`.
    """

    value: Tensor
    log_u: Tensor
    log_v: Tensor
    log_domain: bool
    path: str


def sparse_cost(cost: Tensor, reg: float) -> SparseCost:
    """Prepare a sparse CSR [C, C] cost once for many :func:`sparse_sinkhorn` calls with the same ``reg`` (K and K^T
    as CSR, their log-domain structure); checks ``cost`` as :func:`sparse_sinkhorn` does."""
    reg = as_real(reg, "reg", _OP)
    _check_cost(cost, reg)
    return SparseCost(cost, reg)


def embedding_cost(embeddings: Tensor, reg: float, cost: str = "cosine", *, max_kernel_bytes: int = 1 << 30,
                   tile_rows: Optional[int] = None, path: Optional[str] = None) -> EmbeddingCost:
    """Every coupling allowed, with the cost between C embeddings (``"cosine"``: 1 - cos, ``"sqeuclidean"``), for
    :func:`sparse_sinkhorn` in place of a sparse cost. ``path=None`` chooses by size: K stored whole
    (``"dense"``) when the C x C cost, K and K∘c fit in ``max_kernel_bytes``; else K and K∘c stored as bfloat16
    (``"dense_bf16"``, 4 C^2 bytes; value measured within a relative 1.4e-3 of float64, see
    :class:`EmbeddingCost`) when they fit; else recomputed tile by tile at every product (``"implicit"``: memory
    O(tile_rows C), never C x C; ``tile_rows`` default: 2^22 / C rows). An explicit ``path`` is honoured even
    where it exceeds ``max_kernel_bytes``. The result (and ``SparseSinkhornResult.path``) reports the path."""
    op = "wkd.embedding_cost"
    reg = as_real(reg, "reg", op)
    if not (reg > 0 and math.isfinite(reg)):
        raise ValueError(f"{op}: `reg` must be a positive finite number, got {reg}")
    if not isinstance(embeddings, Tensor) or embeddings.dim() != 2 or embeddings.shape[0] < 1:
        raise ValueError(f"{op}: `embeddings` must be [C, d], got "
                         f"{list(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__}")
    if embeddings.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: `embeddings` must be float32 or float64, got {embeddings.dtype}")
    if cost not in ("cosine", "sqeuclidean"):
        raise ValueError(f"{op}: `cost` must be 'cosine' or 'sqeuclidean', got {cost!r}")
    if not bool(torch.isfinite(embeddings).all()):
        raise ValueError(f"{op}: `embeddings` contains non-finite values (inf or nan)")
    if cost == "cosine" and bool((embeddings.norm(dim=1) == 0).any()):
        raise ValueError(f"{op}: `embeddings` has zero rows, whose cosine distance is undefined")
    C = embeddings.shape[0]
    max_kernel_bytes = as_int(max_kernel_bytes, "max_kernel_bytes", op)
    path = embedding_path(C, embeddings.element_size(), max_kernel_bytes, path, op)
    rows = max(1, (1 << 22) // C) if tile_rows is None else as_int(tile_rows, "tile_rows", op)
    if rows < 1:
        raise ValueError(f"{op}: `tile_rows` must be >= 1, got {rows}")
    return EmbeddingCost(embeddings, reg, cost, path, rows)


def _check_cost(cost, reg: float) -> None:
    if not (reg > 0 and math.isfinite(reg)):
        raise ValueError(f"{_OP}: `reg` must be a positive finite number, got {reg}")
    if not isinstance(cost, Tensor) or cost.layout != torch.sparse_csr:
        layout = cost.layout if isinstance(cost, Tensor) else type(cost).__name__
        raise TypeError(f"{_OP}: `cost` must be a sparse CSR tensor [C, C] (tensor.to_sparse_csr(), or "
                        f"wkd_kernels.knn_kernel), got {layout}")
    if cost.dim() != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"{_OP}: `cost` must be square [C, C], got {list(cost.shape)}")
    if cost.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{_OP}: `cost` must be float32 or float64, got {cost.dtype}")
    if cost.requires_grad:
        raise NotImplementedError(f"{_OP}: the gradient w.r.t. `cost` is not implemented; pass cost.detach()")
    val, crow = cost.values(), cost.crow_indices()
    if not bool(torch.isfinite(val).all()):
        raise ValueError(f"{_OP}: `cost` has non-finite stored values (inf or nan)")
    if bool((val < 0).any()):
        raise ValueError(f"{_OP}: `cost` must be non-negative (stored values < 0 found)")
    empty_rows = int(((crow[1:] - crow[:-1]) == 0).sum())
    if empty_rows:
        raise ValueError(f"{_OP}: `cost` has {empty_rows} empty row(s): every class needs at least one allowed "
                         "coupling (include the diagonal, as knn_kernel does)")
    empty_cols = cost.shape[1] - int(torch.unique(cost.col_indices()).numel())
    if empty_cols:
        raise ValueError(f"{_OP}: `cost` has {empty_cols} empty column(s): every class needs at least one allowed "
                         "coupling (include the diagonal, as knn_kernel does)")


def _check_masses(a, b, C: int, dtype, device, check_values: bool) -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError(f"{_OP}: `{name}` must be a [B, C] tensor, got "
                             f"{list(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if t.shape[1] != C:
            raise ValueError(f"{_OP}: `{name}` has {t.shape[1]} classes but `cost` is [{C}, {C}]")
        if t.dtype != dtype:
            raise TypeError(f"{_OP}: `{name}` must have the dtype of `cost` ({dtype}), got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{_OP}: `{name}` is on {t.device}, `cost` on {device}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{_OP}: `a` and `b` must have the same number of rows, got {a.shape[0]} and {b.shape[0]}")
    if check_values and a.numel() > 0:
        # reductions only (no [B, C] temporary), one host read: min and max propagate NaN, so every entry is finite
        # exactly when both are; non-negative when the min is >= 0; a row's mass is its sum
        stats = torch.stack([torch.stack((t.amin(), t.amax(), t.sum(1).amin())) for t in (a, b)]).tolist()
        for name, (lo, hi, row_mass) in zip(("a", "b"), stats, strict=True):
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f"{_OP}: `{name}` contains non-finite values (inf or nan)")
            if lo < 0:
                raise ValueError(f"{_OP}: `{name}` must be non-negative (a probability vector per row)")
            if not row_mass > 0:
                raise ValueError(f"{_OP}: every row of `{name}` needs positive mass (a row sums to 0)")


_OPS_OF_KIND = {  # (op, backward op) of each backend
    "cpu": (torch.ops.wkd.sparse_sinkhorn, torch.ops.wkd.sparse_sinkhorn_backward),
    "torch": (torch.ops.wkd.sparse_sinkhorn_torch, torch.ops.wkd.sparse_sinkhorn_torch_backward),
    "triton": (torch.ops.wkd.sparse_sinkhorn_triton, torch.ops.wkd.sparse_sinkhorn_triton_backward)}


def sparse_sinkhorn(a: Tensor, b: Tensor, cost: Union[Tensor, SparseCost], reg: float, num_iters: int, *,
                    eps: float = 0.0, grad: str = "exact", log_domain: Union[bool, str] = "auto",
                    divergence: bool = False, check_values: Optional[bool] = None,
                    chunk_elements: Optional[int] = None, backend: Optional[str] = None) -> SparseSinkhornResult:
    """Fixed-iteration entropic OT per row over ONE shared sparse cost: :func:`wkd_kernels.sinkhorn`'s contract with
    K = exp(-cost / reg) on the stored entries of ``cost`` and 0 elsewhere (excluded couplings).

    Per row: u0 = 1/|supp a| on supp a, then ``num_iters`` times ``v = b / (K^T u + eps); u = a / (K v + eps)``;
    value = sum_ij u_i K_ij c_ij v_j (the transport cost of the plan, not the entropic objective). With a cost that
    stores every entry this equals :func:`wkd_kernels.sinkhorn` on the dense cost. Zero masses remove their entries.
    Memory: O(nnz) for the kernel, O(B C) per iteration vector, never B x C x C or C x C.

    Args:
        a, b: [B, C] non-negative masses (rows summing to 1), float32/float64, the dtype and device of ``cost``.
        cost: sparse CSR [C, C] (``dense.to_sparse_csr()`` or :func:`knn_kernel`): stored entries are the allowed
            couplings with their cost (>= 0; a stored 0 is an allowed coupling at cost 0); every row and column
            needs at least one entry. Or a :class:`SparseCost` from :func:`sparse_cost` (prepared once, same
            ``reg``), or an :class:`EmbeddingCost` from :func:`embedding_cost` (every coupling, the cost from
            embeddings, K stored or recomputed per tile). No gradient w.r.t. the cost.
        reg: entropic regularisation > 0, in the units of the cost.
        num_iters: iterations (>= 1); no convergence test.
        eps: added to every denominator (0 matches POT's ``ot.sinkhorn2`` on the dense problem).
        grad: ``"exact"``: the gradient of this fixed-iteration computation (reverse sweep). When a gradient is
            needed it is computed in the forward, a chunk of rows at a time (each row's value depends on that row
            only), and kept as [B, C] per input: the extra memory is that and one chunk's history and sweep (at
            most :data:`ROW_CHUNK_ELEMENTS` numbers), not 2 T [C, B] denominators; the backward scales it by the
            upstream gradient. Inside ``torch.compile`` the op's own autograd (whole history) runs instead.
            ``"envelope"``: the centred dual potentials reg*log u, reg*log v (POT's envelope gradient,
            what WASD uses; keeps nothing but u and v).
        log_domain: ``True``: iterate on log-scalings with sparse log-sum-exp (segment max + sum over the CSR rows;
            needed when reg is small, e.g. 1e-3 with costs in [0, 2]); ``False``: the scaling domain (faster);
            ``"auto"`` (default): the log domain exactly when exp(-max stored cost / reg) leaves the normal range of
            the dtype (it reads the largest stored cost). A non-finite result is an error, never a silent NaN.
            With ``False`` and a reg so small that every off-diagonal entry of a k-NN kernel underflows, K is its
            diagonal (cost 0 keeps it at 1) and the result is finite but meaningless: keep ``"auto"``.
        divergence: return the Sinkhorn divergence S(a, b) = OT(a, b) - OT(a, a)/2 - OT(b, b)/2 (the three
            problems run as one batch of 3B rows; gradients w.r.t. both ``a`` and ``b``).
        check_values: the value checks of ``a``/``b`` (finite, non-negative, positive mass) and of the result;
            None: always on CPU, on other devices per :mod:`wkd_kernels.settings`.
        chunk_elements: largest nnz x columns temporary of the log domain (default
            :data:`wkd_kernels.aten.sparse_sinkhorn.CHUNK_ELEMENTS`).
        backend: for a CSR cost, ``"torch"`` (ATen ops, any device type), ``"cpu"`` (the C++ kernel,
            csrc/cpu/sparse_sinkhorn.cpp) or ``"triton"`` (wkd_kernels/triton/sparse_sinkhorn.py, CUDA tensors;
            scaling domain only: a log domain, asked for or chosen by ``"auto"``, is an error; unvalidated on GPU
            hardware: tested under TRITON_INTERPRET=1 only, never timed);
            ``"auto"``: the ATen ops on every device (on CPU they measured faster than the C++ kernel in all four
            cells of docs/benchmarks.md, "Vocabulary-scale Sinkhorn": envelope and exact gradient at V = 50,257
            and 151,936), never Triton; None: the setting
            (:mod:`wkd_kernels.settings`). The ops are ``torch.ops.wkd.sparse_sinkhorn`` (C++ on CPU),
            ``torch.ops.wkd.sparse_sinkhorn_torch`` and ``torch.ops.wkd.sparse_sinkhorn_triton``. An
            :class:`EmbeddingCost` always runs ATen ops.

    Returns:
        :class:`SparseSinkhornResult` ``(value [B], log_u [B, C], log_v [B, C], log_domain, path)``.
    """
    if grad not in ("exact", "envelope"):
        raise ValueError(f"{_OP}: `grad` must be 'exact' or 'envelope', got {grad!r}")
    reg, num_iters, eps = as_real(reg, "reg", _OP), as_int(num_iters, "num_iters", _OP), as_real(eps, "eps", _OP)
    log_domain = as_log_domain(log_domain, _OP)
    divergence = as_bool(divergence, "divergence", _OP)
    if num_iters < 1:
        raise ValueError(f"{_OP}: `num_iters` must be >= 1, got {num_iters}")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"{_OP}: `eps` must be a finite number >= 0, got {eps}")
    if isinstance(cost, (SparseCost, EmbeddingCost)):
        if not (reg > 0 and math.isfinite(reg)):
            raise ValueError(f"{_OP}: `reg` must be a positive finite number, got {reg}")
        if cost.reg != reg:
            raise ValueError(f"{_OP}: `cost` was prepared with reg = {cost.reg}, called with `reg` = {reg}")
        K = cost
    else:
        _check_cost(cost, reg)
        K = SparseCost(cost, reg)
    if backend is None:  # the setting; one naming a GPU-only backend leaves this op's choice to "auto"
        backend = settings.current().backend
        backend = "auto" if backend in ("triton", "cuda") else backend
    if backend == "cuda":
        raise ValueError(f"{_OP}: there is no CUDA C++ kernel for this op; use backend='torch' (every device type), "
                         "'cpu', 'triton' or 'auto'")
    if isinstance(K, EmbeddingCost):
        backend = "torch"
    kind = resolve_backend(backend, torch.empty(0, device=K.device), _OP, has_cuda_cpp=False)
    kind = "torch" if backend == "auto" and kind == "triton" else kind  # "auto" never picks Triton (unmeasured)
    checks = values_check_requested(check_values, "torch", K.device, _OP)
    _check_masses(a, b, K.size, K.dtype, K.device, checks)
    a, b = reverse_mode_only(_OP, a, b)
    if log_domain == "auto":
        log_domain = auto_log_domain(float(K.max_cost), reg, K.dtype)
    if kind == "triton" and log_domain:
        raise ValueError(f"{_OP}: backend='triton' runs the scaling domain only, and `log_domain` is (or 'auto' "
                         "chose) True: the log domain runs on ATen ops, use backend='torch' (or log_domain=False)")
    B = a.shape[0]
    # the history only when a gradient will be asked for (no_grad / inference: the envelope path's memory)
    exact = grad == "exact" and torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    if backend == "auto" and kind == "cpu":
        # measured (docs/benchmarks.md, "Vocabulary-scale Sinkhorn"): the ATen path beats the C++ kernel with both
        # gradients; the log domain runs ATen either way
        kind = "torch"
    if divergence:
        a, b = torch.cat([a, a, b]), torch.cat([b, a, b])
    if isinstance(K, EmbeddingCost):
        value, log_u, log_v = _SparseSinkhorn.apply(a, b, K, num_iters, eps, log_domain, exact, chunk_elements)
    elif exact and not torch.compiler.is_compiling():  # the gradient computed in the forward, row chunk by chunk
        op, backward_op = _OPS_OF_KIND.get(kind, _OPS_OF_KIND["torch"])
        rows = rows_per_chunk(num_iters, K.size)
        value, log_u, log_v = _RowGradientsInForward.apply(a, b, op, backward_op, K.arrays, reg, num_iters, eps,
                                                           bool(log_domain), chunk_elements, rows)
    else:  # no gradient asked for (or the envelope's), or inside torch.compile: the op and its registered autograd
        op = _OPS_OF_KIND.get(kind, _OPS_OF_KIND["torch"])[0]
        # [C, B] views of the masses (the kernels read them with their strides: no copy)
        value, log_u, log_v, *_ = op(a.t(), b.t(), *K.arrays, reg, num_iters, eps, bool(log_domain), exact,
                                     chunk_elements)
        log_u, log_v = log_u.t(), log_v.t()
    if divergence:
        value = value[:B] - 0.5 * (value[B:2 * B] + value[2 * B:])
        log_u, log_v = log_u[:B], log_v[:B]
    if checks and not bool(torch.isfinite(value).all()):
        raise ValueError(
            f"{_OP}: the iterations gave a non-finite value ({'log' if log_domain else 'scaling'} domain, `reg` = "
            f"{reg}, {str(K.dtype).replace('torch.', '')}). "
            + ("K = exp(-cost / reg) underflows or the scalings overflow: use log_domain=True or a larger `reg`. "
               if not log_domain else "")
            + "Or the stored couplings of `cost` cannot carry the masses (some mass of `a` has no stored coupling "
              "to the support of `b`): include the diagonal / more neighbours")
    return SparseSinkhornResult(value, log_u, log_v, bool(log_domain), getattr(K, "path", "sparse"))
