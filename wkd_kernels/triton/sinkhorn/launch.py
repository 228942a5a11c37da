"""Host-side launchers of the Triton Sinkhorn kernels: output and work-buffer allocation, the host scalars split
for the kernels, and the launch sequences of the per-half-iteration kernels (tl.dot or row-wise) and of the
single-launch kernels. The tile tables come in as arguments (the package's dispatch passes its own DOT_CONFIG,
ROWS_CONFIG, ONCHIP_CONFIG and ONCHIP_K_BUFFER). Arguments are not validated here (wkd_kernels/ops/checks.py
does, before any kernel); inputs are made contiguous. No launch reads device data on the host.
"""
from __future__ import annotations

import math
import struct

import torch
import triton

from .._support import dot_precision
from .config import ACCURATE, ELEM_BLOCK, FP32_PRECISIONS, GAUGE_BLOCK_B, GAUGE_BLOCK_N, INIT_BLOCK
from .dot_kernels import sinkhorn_bwd_dot_kernel, sinkhorn_fwd_dot_kernel, sinkhorn_kpad_kernel
from .onchip_kernels import sinkhorn_bwd_onchip_kernel, sinkhorn_fwd_onchip_kernel
from .row_kernels import sinkhorn_bwd_rows_kernel, sinkhorn_fwd_rows_kernel, sinkhorn_kmat_kernel
from .setup_kernels import sinkhorn_bwd_gauge_kernel, sinkhorn_bwd_init_kernel, sinkhorn_fwd_init_kernel


# ----------------------------------------------------------------------------------------------------------
# Host scalars, buffers and kernel matrices
# ----------------------------------------------------------------------------------------------------------
def split_float(x: float) -> tuple[float, float]:
    """x = hi + lo with hi exactly representable in float32. Triton passes every Python float as a float32 scalar;
    the kernels rebuild x as hi + lo: in float64 to ~1e-15 relative, in float32 the nearest float32. Values outside
    float32's normal range are passed as they are (rounded by Triton: irrelevant for reg, eps and log eps)."""
    x = float(x)
    try:
        hi = struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return x, 0.0
    if hi == 0.0 or math.isinf(hi) or abs(hi) < 2.0 ** -126:
        return x, 0.0
    return hi, x - hi


def _eps_args(eps: float) -> tuple[float, float, float, float]:
    """(eps_hi, eps_lo, log_eps_hi, log_eps_lo) as the kernels take them (log eps 0 when eps = 0: unused)."""
    return split_float(eps) + (split_float(math.log(eps)) if eps > 0 else (0.0, 0.0))


def _gauge_args(eps):
    """(correct, has_eps, eps_hi, eps_lo, log_eps_hi, log_eps_lo) for the gauge correction; eps None: none."""
    if eps is None:
        return False, False, 0.0, 0.0, 0.0, 0.0
    eps = float(eps)
    return (True, eps > 0) + _eps_args(eps)


def _dot_precision(dtype: torch.dtype, precision: str) -> str:
    assert precision in FP32_PRECISIONS, precision
    return dot_precision(precision, dtype)


def _pad16(size: int) -> int:
    """size rounded up to a multiple of 16 elements: the leading dimension of the padded buffers of the tl.dot
    kernels (16-byte rows in float32 and float64, and a multiple Triton specialises on: divisibility by 16)."""
    return (int(size) + 15) // 16 * 16


def _forward_outputs(a, b, num_iters, keep_history):
    """Uninitialised u [B, n], v [B, m], hist_r [T, B, n], hist_s [T, B, m], y [B, n] (the history ones [0, B, n],
    [0, B, m], [0, n] without keep_history), in a's dtype and device."""
    B, n, m = a.shape[0], a.shape[1], b.shape[1]
    T = int(num_iters)
    dt, dev = a.dtype, a.device
    u = torch.empty(B, n, dtype=dt, device=dev)
    v = torch.empty(B, m, dtype=dt, device=dev)
    hist_r = torch.empty(T if keep_history else 0, B, n, dtype=dt, device=dev)
    hist_s = torch.empty(T if keep_history else 0, B, m, dtype=dt, device=dev)
    y = torch.empty(B if keep_history else 0, n, dtype=dt, device=dev)
    return u, v, hist_r, hist_s, y


def _backward_inputs(grad_value, a, b, cost, hist_r, hist_s, y):
    """The backward's inputs made contiguous, followed by the uninitialised gradients ga [B, n], gb [B, m]."""
    a, b, cost = a.contiguous(), b.contiguous(), cost.contiguous()
    g, hist_r, hist_s, y = grad_value.contiguous(), hist_r.contiguous(), hist_s.contiguous(), y.contiguous()
    ga = torch.empty(a.shape[0], a.shape[1], dtype=a.dtype, device=a.device)
    gb = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    return g, a, b, cost, hist_r, hist_s, y, ga, gb


def _kernel_matrix(cost, reg_hi, reg_lo, log_domain):
    """K = exp(-cost/reg) (scaling domain) or L = -cost/reg (log domain) of a shared [n, m] cost (one launch)."""
    n, m = cost.shape
    mat = torch.empty(n, m, dtype=cost.dtype, device=cost.device)
    sinkhorn_kmat_kernel[(triton.cdiv(n * m, ELEM_BLOCK),)](cost, mat, n * m, reg_hi, reg_lo, LOG=log_domain,
                                                             ACCURATE=ACCURATE, BLOCK=ELEM_BLOCK)
    return mat


def _rows_matrix(cost, reg_hi, reg_lo, log_domain):
    """(matrix, batch stride) the row kernels read: the prebuilt K / L of a shared cost (stride 0), or the per-row
    cost itself (stride n * m; K or L computed on the fly)."""
    if cost.dim() == 2:
        return _kernel_matrix(cost, reg_hi, reg_lo, log_domain), 0
    return cost, cost.shape[1] * cost.shape[2]


def _padded_kernel_matrices(cost, n_pad, m_pad, reg_hi, reg_lo):
    """K = exp(-cost/reg) and K∘cost of a shared [n, m] cost as two zero-padded [n_pad, m_pad] buffers (one
    launch): the tl.dot kernels read them with leading dimension m_pad."""
    n, m = cost.shape
    buf = torch.empty(2, n_pad, m_pad, dtype=cost.dtype, device=cost.device)
    sinkhorn_kpad_kernel[(triton.cdiv(n_pad * m_pad, ELEM_BLOCK),)](cost, buf[0], buf[1], n, m, m_pad, n_pad * m_pad,
                                                                     reg_hi, reg_lo, ACCURATE=ACCURATE,
                                                                     BLOCK=ELEM_BLOCK)
    return buf[0], buf[1]


# ----------------------------------------------------------------------------------------------------------
# Per-half-iteration kernels (tl.dot for a shared cost in the scaling domain, row-wise otherwise)
# ----------------------------------------------------------------------------------------------------------
def launch_forward(a, b, cost, reg, num_iters, eps, log_domain, keep_history, precision, dot_config, rows_config):
    """The forward as 2 * num_iters half-iteration launches plus 2 or 3 small ones; dot_config / rows_config: the
    tile tables (DOT_CONFIG, ROWS_CONFIG). Returns (value, u, v, hist_r, hist_s, y)."""
    assert a.dim() == 2 and b.dim() == 2 and cost.dim() in (2, 3) and num_iters >= 1, "validated by the caller"
    shared = cost.dim() == 2
    a, b, cost = a.contiguous(), b.contiguous(), cost.contiguous()
    B, n, m = a.shape[0], a.shape[1], b.shape[1]
    T = int(num_iters)
    dt, dev = a.dtype, a.device
    u, v, hist_r, hist_s, y = _forward_outputs(a, b, T, keep_history)
    if B == 0:
        return torch.empty(0, dtype=dt, device=dev), u, v, hist_r, hist_s, y
    reg_hi, reg_lo = split_float(reg)
    eps_hi, eps_lo, leps_hi, leps_lo = _eps_args(eps)
    dummy = torch.empty(1, dtype=dt, device=dev)  # never-written placeholder for disabled outputs

    def slot(h, t):
        return h[t] if keep_history else dummy

    y_out = y if keep_history else dummy

    dot = shared and not log_domain
    # the tl.dot kernels keep the scalings in work buffers with padded rows (the outputs themselves when no padding
    # is needed; with padding, the last iteration also writes the outputs); the row kernels use the outputs
    n_pad, m_pad = (_pad16(n), _pad16(m)) if dot else (n, m)
    u_w = u if n_pad == n else torch.empty(B, n_pad, dtype=dt, device=dev)
    v_w = v if m_pad == m else torch.empty(B, m_pad, dtype=dt, device=dev)
    sinkhorn_fwd_init_kernel[(B,)](a, u_w, n, n_pad, LOG=log_domain, ACCURATE=ACCURATE, BLOCK=INIT_BLOCK)

    if dot:
        prec = _dot_precision(dt, precision)
        BB, BN, BK, warps = dot_config[(dt, prec)]
        kmat, kc = _padded_kernel_matrices(cost, n_pad, m_pad, reg_hi, reg_lo)
        n_part = triton.cdiv(n, BN)
        part = torch.empty(B, n_part, dtype=dt, device=dev)
        for t in range(T):
            final = t == T - 1
            sinkhorn_fwd_dot_kernel[(triton.cdiv(B, BB), triton.cdiv(m, BN))](
                u_w, kmat, kc, b, v_w, v, slot(hist_s, t), dummy, dummy, B, n_pad, m, m_pad, m_pad, 1, 1,
                eps_hi, eps_lo, FINAL=False, STORE_HIST=keep_history, STORE_OUT=final and m_pad != m, PREC=prec,
                BLOCK_B=BB, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps)
            sinkhorn_fwd_dot_kernel[(triton.cdiv(B, BB), n_part)](
                v_w, kmat, kc, a, u_w, u, slot(hist_r, t), y_out if final else dummy, part if final else dummy,
                B, m_pad, n, n_pad, 1, m_pad, n_part, eps_hi, eps_lo,
                FINAL=final, STORE_HIST=keep_history, STORE_OUT=final and n_pad != n, PREC=prec, BLOCK_B=BB,
                BLOCK_N=BN, BLOCK_K=BK, num_warps=warps)
    else:
        BN, BK, warps = rows_config[dt]
        mat, stride_b = _rows_matrix(cost, reg_hi, reg_lo, log_domain)  # log domain, shared: L built once
        n_part = triton.cdiv(n, BN)
        part = torch.empty(B, n_part, dtype=dt, device=dev)
        common = dict(LOG=log_domain, FROM_COST=not shared, HAS_EPS=eps > 0, ACCURATE=ACCURATE, BLOCK_N=BN,
                      BLOCK_K=BK, num_warps=warps)
        for t in range(T):
            final = t == T - 1
            sinkhorn_fwd_rows_kernel[(B, triton.cdiv(m, BN))](
                u, mat, cost, b, v, slot(hist_s, t), dummy, dummy,
                n, m, stride_b, m, 1, stride_b, 1, reg_hi, reg_lo, eps_hi, eps_lo, leps_hi, leps_lo,
                FINAL=False, STORE_HIST=keep_history, **common)
            sinkhorn_fwd_rows_kernel[(B, n_part)](
                v, mat, cost, a, u, slot(hist_r, t), y_out if final else dummy, part if final else dummy,
                m, n, stride_b, 1, m, stride_b, n_part, reg_hi, reg_lo, eps_hi, eps_lo, leps_hi, leps_lo,
                FINAL=final, STORE_HIST=keep_history, **common)
    value = part.sum(1)
    return value, u, v, hist_r, hist_s, y


def launch_backward(grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain, precision, eps, dot_config,
                    rows_config):
    """The reverse sweep as 2 * num_iters - 1 product launches plus 1 or 2 small ones (and one gauge-correction
    launch per step when eps is not None); tile tables as in :func:`launch_forward`. Returns (grad_a, grad_b)."""
    assert hist_r.dim() == 3 and hist_r.shape[0] >= 1 and hist_s.shape[0] == hist_r.shape[0], "validated by the caller"
    shared = cost.dim() == 2
    g, a, b, cost, hist_r, hist_s, y, ga, gb = _backward_inputs(grad_value, a, b, cost, hist_r, hist_s, y)
    B, n, m = a.shape[0], a.shape[1], b.shape[1]
    T = hist_s.shape[0]
    dt, dev = a.dtype, a.device
    if B == 0:
        return ga, gb
    reg_hi, reg_lo = split_float(reg)

    dot = shared and not log_domain
    n_pad, m_pad = (_pad16(n), _pad16(m)) if dot else (n, m)  # rows of the work buffers (padded for tl.dot)
    x = torch.empty(B, n_pad, dtype=dt, device=dev)  # work buffer: left operand of the S-side products
    zv = torch.empty(B, m_pad, dtype=dt, device=dev)  # work buffer: left operand of the R-side products
    sinkhorn_bwd_init_kernel[(triton.cdiv(B * n_pad, ELEM_BLOCK),)](
        g, a, hist_r[T - 1], y, ga, x, B * n_pad, n, n_pad, LOG=log_domain, ACCURATE=ACCURATE, BLOCK=ELEM_BLOCK)
    correct, has_eps, eps_hi, eps_lo, leps_hi, leps_lo = _gauge_args(eps)
    state = torch.empty(2, B, dtype=dt, device=dev) if correct else None

    def gauge(t):  # after the S-side product of step t (z_t in zv, gb), before the R-side one (which reads zv)
        if correct:
            sinkhorn_bwd_gauge_kernel[(triton.cdiv(B, GAUGE_BLOCK_B),)](
                state, x, n_pad, a, hist_r[t], zv, m_pad, b, hist_s[t], gb, B, n, m, eps_hi, eps_lo, leps_hi,
                leps_lo, FIRST=t == T - 1, LOG=log_domain, HAS_EPS=has_eps, ACCURATE=ACCURATE,
                BLOCK_B=GAUGE_BLOCK_B, BLOCK_N=GAUGE_BLOCK_N)

    if dot:
        prec = _dot_precision(dt, precision)
        BB, BN, BK, warps = dot_config[(dt, prec)]
        kmat, kc = _padded_kernel_matrices(cost, n_pad, m_pad, reg_hi, reg_lo)
        for t in range(T - 1, -1, -1):
            sinkhorn_bwd_dot_kernel[(triton.cdiv(B, BB), triton.cdiv(m, BN))](
                x, kmat, kc, a, hist_r[T - 1], g, hist_s[t], b, gb, zv, B, n, n_pad, m, m_pad, m_pad, 1,
                SIDE_S=True, FIRST=t == T - 1, WRITE_OUT=t > 0 or correct, PREC=prec, BLOCK_B=BB, BLOCK_N=BN,
                BLOCK_K=BK, num_warps=warps)
            gauge(t)
            if t > 0:
                sinkhorn_bwd_dot_kernel[(triton.cdiv(B, BB), triton.cdiv(n, BN))](
                    zv, kmat, kc, a, hist_r[T - 1], g, hist_r[t - 1], a, ga, x, B, m, m_pad, n, n_pad, 1, m_pad,
                    SIDE_S=False, FIRST=False, WRITE_OUT=True, PREC=prec, BLOCK_B=BB, BLOCK_N=BN, BLOCK_K=BK,
                    num_warps=warps)
    else:
        BN, BK, warps = rows_config[dt]
        mat, stride_b = _rows_matrix(cost, reg_hi, reg_lo, log_domain)
        common = dict(LOG=log_domain, FROM_COST=not shared, ACCURATE=ACCURATE, BLOCK_N=BN, BLOCK_K=BK,
                      num_warps=warps)
        for t in range(T - 1, -1, -1):
            sinkhorn_bwd_rows_kernel[(B, triton.cdiv(m, BN))](
                x, a, hist_r[t], mat, cost, g, hist_s[t], b, gb, zv,
                n, m, stride_b, m, 1, stride_b, reg_hi, reg_lo,
                SIDE_S=True, FIRST=t == T - 1, WRITE_OUT=t > 0 or correct, **common)
            gauge(t)
            if t > 0:
                sinkhorn_bwd_rows_kernel[(B, triton.cdiv(n, BN))](
                    zv, b, hist_s[t], mat, cost, g, hist_r[t - 1], a, ga, x,
                    m, n, stride_b, 1, m, stride_b, reg_hi, reg_lo,
                    SIDE_S=False, FIRST=False, WRITE_OUT=True, **common)
    return ga, gb


# ----------------------------------------------------------------------------------------------------------
# Single-launch kernels (shared cost, n, m <= ONCHIP_MAX_C)
# ----------------------------------------------------------------------------------------------------------
def onchip_config(table, dtype: torch.dtype, log_domain: bool):
    """(BLOCK_B, BLOCK_N, BLOCK_K, num_warps) from an ONCHIP_CONFIG table."""
    return table[dtype]["log" if log_domain else "scaling"]


def _onchip_dot(log_domain: bool, block_b: int) -> bool:
    """The scaling domain's products: tl.dot for BLOCK_B >= 16, else the broadcast multiply-sum (_onchip_mac)."""
    return not log_domain and int(block_b) >= 16


def _onchip_prec(precision: str, dtype: torch.dtype, log_domain: bool, block_b: int) -> str:
    """tl.dot input precision: the requested one for float32 in the scaling domain with tl.dot, else "ieee" (float64;
    the log domain and the broadcast products have no tl.dot: one compiled variant instead of three)."""
    return str(precision) if dtype == torch.float32 and _onchip_dot(log_domain, block_b) else "ieee"


def _onchip_kmat(cost, reg_hi, reg_lo, log_domain, dtype, k_buffer_table):
    """The K buffer (scaling domain with k_buffer_table[dtype], an ONCHIP_K_BUFFER table) built by one launch, or
    None (K computed per tile)."""
    if log_domain or not k_buffer_table[dtype]:
        return None
    return _kernel_matrix(cost, reg_hi, reg_lo, False)


def launch_forward_onchip(a, b, cost, reg, num_iters, eps, log_domain, keep_history, precision, config_table,
                          k_buffer_table):
    """The forward in one launch (two with the K buffer); config_table / k_buffer_table: ONCHIP_CONFIG and
    ONCHIP_K_BUFFER. Returns (value, u, v, hist_r, hist_s, y)."""
    a, b, cost = a.contiguous(), b.contiguous(), cost.contiguous()
    B, n, m = a.shape[0], a.shape[1], b.shape[1]
    T = int(num_iters)
    dt, dev = a.dtype, a.device
    value = torch.empty(B, dtype=dt, device=dev)
    u, v, hist_r, hist_s, y = _forward_outputs(a, b, T, keep_history)
    if B == 0:
        return value, u, v, hist_r, hist_s, y
    bb, bn, bk, warps = onchip_config(config_table, dt, log_domain)
    reg_hi, reg_lo = split_float(reg)
    eps_hi, eps_lo, leps_hi, leps_lo = _eps_args(eps)
    kmat = _onchip_kmat(cost, reg_hi, reg_lo, log_domain, dt, k_buffer_table)
    dummy = torch.empty(1, dtype=dt, device=dev)  # never-written placeholder for disabled outputs
    sinkhorn_fwd_onchip_kernel[(triton.cdiv(B, bb),)](
        a, b, cost, cost if kmat is None else kmat, value, u, v,
        hist_r if keep_history else dummy, hist_s if keep_history else dummy, y if keep_history else dummy,
        B, n, m, T, reg_hi, reg_lo, eps_hi, eps_lo, leps_hi, leps_lo,
        LOG=bool(log_domain), FROM_COST=kmat is None, HAS_EPS=bool(log_domain) and eps > 0,
        STORE_HIST=bool(keep_history), ACCURATE=ACCURATE, PREC=_onchip_prec(precision, dt, log_domain, bb),
        DOT=_onchip_dot(log_domain, bb), BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return value, u, v, hist_r, hist_s, y


def launch_backward_onchip(grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain, precision, eps, config_table,
                           k_buffer_table):
    """The reverse sweep (gauge correction when eps is not None) in one launch (two with the K buffer); tables as
    in :func:`launch_forward_onchip`. Returns (grad_a, grad_b)."""
    g, a, b, cost, hist_r, hist_s, y, ga, gb = _backward_inputs(grad_value, a, b, cost, hist_r, hist_s, y)
    B, n, m = a.shape[0], a.shape[1], b.shape[1]
    T = hist_s.shape[0]
    dt, dev = a.dtype, a.device
    if B == 0:
        return ga, gb
    bb, bn, bk, warps = onchip_config(config_table, dt, log_domain)
    reg_hi, reg_lo = split_float(reg)
    correct, has_eps, eps_hi, eps_lo, leps_hi, leps_lo = _gauge_args(eps)
    kmat = _onchip_kmat(cost, reg_hi, reg_lo, log_domain, dt, k_buffer_table)
    xs = torch.empty(B, n, dtype=dt, device=dev)  # scratch: the left operands of the S-side / R-side products
    zs = torch.empty(B, m, dtype=dt, device=dev)
    sinkhorn_bwd_onchip_kernel[(triton.cdiv(B, bb),)](
        g, a, b, cost, cost if kmat is None else kmat, hist_r, hist_s, y, ga, gb, xs, zs, B, n, m, T, (T - 1) * B * n,
        (T - 1) * B * m, reg_hi, reg_lo, eps_hi, eps_lo, leps_hi, leps_lo,
        LOG=bool(log_domain), FROM_COST=kmat is None, ACCURATE=ACCURATE,
        PREC=_onchip_prec(precision, dt, log_domain, bb), DOT=_onchip_dot(log_domain, bb), BLOCK_B=bb, BLOCK_N=bn,
        BLOCK_K=bk, GAUGE=correct, HAS_EPS=has_eps, num_warps=warps)
    return ga, gb
