"""The ops wkd::sparse_sinkhorn_triton / wkd::sparse_sinkhorn_triton_backward: the Triton kernels of
:func:`wkd_kernels.sparse_sinkhorn` (wkd_kernels/triton/sparse_sinkhorn.py), scaling domain only.

Schemas: those of wkd::sparse_sinkhorn / _backward (csrc/ops.cpp) renamed, defined in Python
(``wkd_kernels._schemas.PYTHON_TRITON_SCHEMAS``); the kernels are registered here for every device type (CUDA
tensors, or CPU tensors under TRITON_INTERPRET=1), with fake kernels and the autograd formula of wkd::sparse_sinkhorn.
``log_domain=True`` is an error naming the argument: the log domain runs on ATen ops (wkd::sparse_sinkhorn_torch,
``backend="torch"``). ``chunk_elements`` is accepted and ignored (the kernel has no nnz x columns temporary).
Not validated on GPU hardware (no GPU has run it); ``backend="auto"`` never selects it.
"""
from __future__ import annotations

import torch

from .. import settings
from .common import check_dtype_on_device
from .sparse_sinkhorn import (_OP, _backward_fake, _check_backward_args, _check_op_args, _forward_fake,
                              _make_backward, _setup_context)

__all__ = ["OP", "BACKWARD_OP"]

OP = _OP + "_triton"
BACKWARD_OP = _OP + "_triton_backward"


def _check_triton_args(a, log_domain, op) -> None:
    if log_domain:
        raise ValueError(f"{op}: `log_domain`=True is not implemented by the Triton kernel (scaling domain only); the "
                         "log domain runs on ATen ops: backend='torch' (torch.ops.wkd.sparse_sinkhorn_torch)")
    if a.device.type not in ("cuda", "cpu") or (a.device.type == "cpu" and not settings.TRITON_INTERPRET):
        raise ValueError(f"{op}: the Triton kernel runs on CUDA tensors (on CPU tensors only under "
                         f"TRITON_INTERPRET=1, set before triton is imported); these are on {a.device}")


def _triton_forward(a, b, crow, col, cost, crow_t, col_t, cost_t, reg, num_iters, eps=0.0, log_domain=False,
                    keep_history=True, chunk_elements=None):
    _check_op_args(a, b, crow, col, cost, crow_t, col_t, cost_t, reg, num_iters, eps, OP)
    _check_triton_args(a, log_domain, OP)
    check_dtype_on_device(a, OP)
    from ..triton import sparse_sinkhorn as tri

    return tri.sparse_sinkhorn_forward(a, b, crow, col, cost, crow_t, col_t, cost_t, reg, num_iters, eps,
                                       keep_history)


def _triton_backward(grad_value, a, b, crow, col, cost, crow_t, col_t, cost_t, hist_r, hist_s, y, reg,
                     log_domain=False, eps=None, chunk_elements=None):
    _check_backward_args(grad_value, a, b, crow, col, cost, crow_t, col_t, cost_t, hist_r, hist_s, y, reg, eps,
                         BACKWARD_OP)
    _check_triton_args(a, log_domain, BACKWARD_OP)
    check_dtype_on_device(a, BACKWARD_OP)
    from ..triton import sparse_sinkhorn as tri

    ga, gb = tri.sparse_sinkhorn_backward(grad_value.contiguous(), a.contiguous(), b.contiguous(), crow, col, cost,
                                          crow_t, col_t, cost_t, hist_r, hist_s, y, reg, eps)
    return ga.contiguous(), gb.contiguous()


def _triton_forward_fake(a, b, crow, col, cost, crow_t, col_t, cost_t, reg, num_iters, eps=0.0, log_domain=False,
                         keep_history=True, chunk_elements=None):
    if log_domain:  # the same error as the kernel's, also under torch.compile
        _check_triton_args(a, log_domain, OP)
    return _forward_fake(a, b, crow, col, cost, crow_t, col_t, cost_t, reg, num_iters, eps, log_domain,
                         keep_history, chunk_elements, _op=OP)


def _triton_backward_fake(grad_value, a, b, crow, col, cost, crow_t, col_t, cost_t, hist_r, hist_s, y, reg,
                          log_domain=False, eps=None, chunk_elements=None):
    if log_domain:
        _check_triton_args(a, log_domain, BACKWARD_OP)
    return _backward_fake(grad_value, a, b, crow, col, cost, crow_t, col_t, cost_t, hist_r, hist_s, y, reg,
                          log_domain, eps, chunk_elements, _op=BACKWARD_OP)


torch.library.register_fake("wkd::sparse_sinkhorn_triton")(_triton_forward_fake)
torch.library.register_fake("wkd::sparse_sinkhorn_triton_backward")(_triton_backward_fake)
torch.library.register_kernel("wkd::sparse_sinkhorn_triton", None)(_triton_forward)
torch.library.register_kernel("wkd::sparse_sinkhorn_triton_backward", None)(_triton_backward)
torch.library.register_autograd("wkd::sparse_sinkhorn_triton",
                                _make_backward(torch.ops.wkd.sparse_sinkhorn_triton_backward),
                                setup_context=_setup_context)
