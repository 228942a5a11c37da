"""Triton kernels of ``torch.ops.wkd.sinkhorn_triton`` and ``torch.ops.wkd.sinkhorn_triton_backward``.

Contract: the schema comment of wkd::sinkhorn in csrc/ops.cpp; same recurrences and output layout as the CPU
kernels (csrc/cpu/sinkhorn.cpp): value [B], u [B, n], v [B, m], hist_r [T, B, n], hist_s [T, B, m], y [B, n]
(logs in the log domain; [0, B, *] and [0, n] without history). The backward is the exact gradient of value w.r.t.
a and b through the fixed loop, a reverse sweep over the stored r_t, s_t and y (never B x n x m).

The dispatch below picks one of three kernel families; launch.py holds their host-side launchers, config.py the
tile tables and size rule, _device.py the @triton.jit helpers they share:

* shared cost, n, m <= ONCHIP_MAX_C (onchip_kernels.py): one launch runs every half-iteration of BLOCK_B rows.
* shared cost [n, m], scaling domain (the WKD-L case), larger C (dot_kernels.py): K = exp(-cost/reg) and K∘cost are
  built once per call (``sinkhorn_kpad_kernel``) into zero-padded [n_pad, m_pad] buffers, n_pad and m_pad = n, m
  rounded up to 16; each half-iteration is ``sinkhorn_fwd_dot_kernel``: a tiled product of the [B, n_pad] (or
  [B, m_pad]) scaling work buffer with K (or K^T, by strides) over BLOCK_B x BLOCK_K by BLOCK_K x BLOCK_N
  ``tl.dot`` tiles, with +eps, the division b/s (a/r), the stores of v (u) and of the history slot fused into the
  epilogue. The last r-half also accumulates y = (K∘cost) v_T in the same k-loop and writes per-tile partial sums
  of u_T * y. The backward uses ``sinkhorn_bwd_dot_kernel`` the same way (the first step also computes
  (K∘C)^T u_T). Padding: with every leading dimension and mask bound a multiple of 16, Triton proves 16-byte
  alignment, so the k-loop copies its operands with 16-byte cp.async instead of 4-byte ones at C = 1000
  (python_tests/triton_compile_matrix.py --check-load-widths, for sm_90); the padding is zero and adds nothing.
  The work buffers are the u / v outputs themselves when n, m are multiples of 16; otherwise the last iteration
  also writes the outputs.
* log domain (shared cost: L = -cost/reg built once; per-row cost: computed on the fly) and per-row cost
  [B, n, m] in the scaling domain (K computed on the fly from the user's cost), larger C or per-row cost
  (row_kernels.py): ``sinkhorn_fwd_rows_kernel`` / ``sinkhorn_bwd_rows_kernel``, one program per (row, BLOCK_N
  outputs), looping over the reduced dimension with an online max-shifted log-sum-exp (log domain) or a plain sum
  (scaling domain), same epilogues.
Both per-half-iteration families share the small kernels of setup_kernels.py (initial scaling, backward
initialisation, gauge correction).

float32 inputs compute and accumulate in float32, float64 in float64. ``tl.dot`` on float32 uses
``input_precision=precision`` (the launchers' argument: "ieee", float32 FMA accuracy; "tf32x3": tensor cores, 3 TF32
products, near float32 accuracy; "tf32": one TF32 product, relative error ~1e-3); float64 always "ieee". Launches
never read device data on the host (no ``.item()``, no data-dependent Python branching): the ops are CUDA-graph
capturable. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (the tests do that). The launchers do not
validate their arguments (wkd_kernels/ops/checks.py does, before any kernel); they only make the inputs contiguous.

Tuning tables: the dispatch reads DOT_CONFIG, ROWS_CONFIG, ONCHIP_MAX_C, ONCHIP_CONFIG and ONCHIP_K_BUFFER from this
module's namespace at every call, so rebinding or mutating them here takes effect (the tests and benchmarks do).
"""
from __future__ import annotations

import contextlib

import torch

from .._support import explain_compile_errors
from .config import (DOT_CONFIG, DOT_CONFIG_CANDIDATES, FP32_PRECISIONS, ONCHIP_CONFIG, ONCHIP_CONFIG_CANDIDATES,
                     ONCHIP_K_BUFFER, ONCHIP_MAX_C, ROWS_CONFIG)
from .launch import launch_backward, launch_backward_onchip, launch_forward, launch_forward_onchip, onchip_config
from .launch import split_float as _split  # noqa: F401  (the host-scalar split, under the name the tests use)

__all__ = ["sinkhorn_forward", "sinkhorn_backward", "FP32_PRECISIONS", "DOT_CONFIG", "DOT_CONFIG_CANDIDATES",
           "ROWS_CONFIG", "sinkhorn_forward_onchip", "sinkhorn_backward_onchip", "onchip_fits", "ONCHIP_CONFIG",
           "ONCHIP_CONFIG_CANDIDATES", "ONCHIP_K_BUFFER", "ONCHIP_MAX_C"]


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def onchip_fits(n: int, m: int, dtype: torch.dtype) -> bool:
    """Size rule of the single-launch kernels (shared cost only; the caller checks that): 1 <= n, m <= 256 and a
    float32 / float64 dtype. Larger C uses the per-half-iteration kernels."""
    return dtype in ONCHIP_CONFIG and 1 <= int(n) <= ONCHIP_MAX_C and 1 <= int(m) <= ONCHIP_MAX_C


def _onchip_config(dtype: torch.dtype, log_domain: bool):
    """(BLOCK_B, BLOCK_N, BLOCK_K, num_warps) from ONCHIP_CONFIG."""
    return onchip_config(ONCHIP_CONFIG, dtype, log_domain)


@explain_compile_errors("wkd.sinkhorn_triton (Triton sinkhorn_forward)")
def sinkhorn_forward(a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, reg: float, num_iters: int,
                     eps: float = 0.0, log_domain: bool = False, keep_history: bool = True, precision: str = "ieee"):
    """Triton forward of ``torch.ops.wkd.sinkhorn_triton`` (the arguments and outputs of ``wkd::sinkhorn``, whose
    contract is in csrc/ops.cpp, plus the float32 ``tl.dot`` input ``precision``: "ieee" | "tf32x3" | "tf32").

    a [B, n], b [B, m], cost [n, m] (shared) or [B, n, m]; float32 or float64, on one device (CUDA, or CPU under
    TRITON_INTERPRET=1); not validated here. Returns ``(value [B], u [B, n], v [B, m], hist_r [T, B, n],
    hist_s [T, B, m], y [B, n])`` ([0, B, n], [0, B, m], [0, n] without ``keep_history``).
    A shared cost with ``onchip_fits(n, m, dtype)`` (n, m <= ONCHIP_MAX_C) runs the single-launch kernel
    (:func:`sinkhorn_forward_onchip`: one launch); otherwise 2 * num_iters fused half-iteration kernels plus 2 or 3
    small ones. No host synchronisation either way.
    """
    args = (a, b, cost, reg, num_iters, eps, log_domain, keep_history, precision)
    with _device_guard(a):
        if cost.dim() == 2 and onchip_fits(a.shape[1], b.shape[1], a.dtype):
            return launch_forward_onchip(*args, ONCHIP_CONFIG, ONCHIP_K_BUFFER)
        return launch_forward(*args, DOT_CONFIG, ROWS_CONFIG)


@explain_compile_errors("wkd.sinkhorn_triton_backward (Triton sinkhorn_backward)")
def sinkhorn_backward(grad_value: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor,
                      hist_r: torch.Tensor, hist_s: torch.Tensor, y: torch.Tensor, reg: float,
                      log_domain: bool = False, precision: str = "ieee", eps: float | None = None):
    """Triton backward of ``torch.ops.wkd.sinkhorn_triton_backward``: the exact gradient of value w.r.t. a and b
    from the history (hist_r, hist_s, y) of a keep_history=True forward; not validated here. ``eps``: the forward's
    eps, for the gauge correction of the adjoint (csrc/ops.cpp; None skips it: the plain sweep, whose rounding
    residual is amplified by up to exp(max cost / reg) at zero-mass entries).

    Returns ``(grad_a [B, n], grad_b [B, m])``. Size rule as in :func:`sinkhorn_forward`: the single-launch kernel
    (:func:`sinkhorn_backward_onchip`) for a small shared cost, else 2 * num_iters - 1 fused product kernels plus 1
    or 2 small ones; extra memory O(B (n + m)) plus the [n, m] kernel buffer; no host synchronisation.
    """
    args = (grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain, precision, eps)
    with _device_guard(a):
        if cost.dim() == 2 and onchip_fits(a.shape[1], b.shape[1], a.dtype):  # the same rule as the forward's
            return launch_backward_onchip(*args, ONCHIP_CONFIG, ONCHIP_K_BUFFER)
        return launch_backward(*args, DOT_CONFIG, ROWS_CONFIG)


@explain_compile_errors("wkd.sinkhorn (Triton sinkhorn_forward_onchip)")
def sinkhorn_forward_onchip(a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, reg: float, num_iters: int,
                            eps: float = 0.0, log_domain: bool = False, keep_history: bool = True,
                            precision: str = "ieee"):
    """Single-launch Triton forward for a shared cost [n, m] with ``onchip_fits(n, m, dtype)``.

    Returns ``(value [B], u [B, n], v [B, m], hist_r, hist_s, y)`` in the new layout: hist_r [T, B, n] = r_1..r_T,
    hist_s [T, B, m] = s_1..s_T, y [B, n] = (K∘cost) v_T (logs in the log domain), or [0, B, n], [0, B, m], [0, n]
    without history. ``precision``: tl.dot input precision for float32 in the scaling domain ("ieee", "tf32x3",
    "tf32"); float64 and the log domain ignore it. Arguments are not validated (the op's validator does that).
    One launch (two with ONCHIP_K_BUFFER), no host synchronisation.
    """
    with _device_guard(a):
        return launch_forward_onchip(a, b, cost, reg, num_iters, eps, log_domain, keep_history, precision,
                                     ONCHIP_CONFIG, ONCHIP_K_BUFFER)


@explain_compile_errors("wkd.sinkhorn (Triton sinkhorn_backward_onchip)")
def sinkhorn_backward_onchip(grad_value: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor,
                             hist_r: torch.Tensor, hist_s: torch.Tensor, y: torch.Tensor, reg: float,
                             log_domain: bool = False, precision: str = "ieee", eps: float | None = None):
    """Single-launch Triton backward (exact gradient of value w.r.t. a and b through the fixed loop) from the
    history of :func:`sinkhorn_forward_onchip` (new layout, keep_history=True), with the gauge correction when
    ``eps`` (the forward's) is given (see :func:`sinkhorn_backward`). Returns ``(grad_a, grad_b)``.
    One launch (two with ONCHIP_K_BUFFER), no host synchronisation, extra memory two [B, n], [B, m] scratch buffers."""
    with _device_guard(a):
        return launch_backward_onchip(grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain, precision, eps,
                                      ONCHIP_CONFIG, ONCHIP_K_BUFFER)
