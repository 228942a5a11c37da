"""Triton kernels of ``wkd::feature_stats`` and ``wkd::feature_stats_backward`` (docs/design.md section 4).

x [N, C, H, W] -> per sample n, grid cell p (G x G adaptive-pooling cells, row-major; start = floor(i H / G),
end = ceil((i + 1) H / G)) and channel c: mean [N, P, C] and either var [N, P, C] or cov [N, P, C, C], divided by
m_p - 1 (unbiased) or m_p. Accumulation in float32 (float64 for float64 input); float32 outputs for half input.

Kernels (one pass over the input each):
  _feature_stats_diag_fwd  program = (sample*cell, channel block): streams the cell in chunks, exact two-pass
                           statistics per chunk merged with Chan's parallel update (no E[x^2] - E[x]^2 cancellation),
                           on shifted values (shift = the cell's first value per channel: no digits lost to a large
                           mean offset).
  _feature_stats_full_fwd  program = (sample*cell, channel tile i, channel tile j): shifted GEMM over the cell
                           (shift = the cell's first value per channel), cov = (S_xy - s_x s_y / m) / den.
  Both forward kernels multiply the shifted values by r = 2^-round(log2(den)/2) (exact): the accumulated sums are
  of the order of the result, so they do not overflow where the covariance itself is representable.
  _feature_stats_diag_bwd  program = (sample, channel block, position block): every cell that intersects the block adds
                           grad_mean / m_p + 2 grad_var (x - mean_p) / den_p (overlapping cells sum; deterministic).
  _feature_stats_full_bwd  same tiling; the cell term is ((G + G^T) / den_p) (x - mean_p) as a tile GEMM over channels.
No host-device traffic in the launchers (cell geometry is recomputed in the kernels): CUDA-graph capturable.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._support import acc_dtype, explain_compile_errors

# ------------------------------------------------------------------------------------------------------------------
# Constants
# ------------------------------------------------------------------------------------------------------------------
# Tile sizes chosen from the sm_90 register report (no spills; the register report of
# python_tests/triton_compile_matrix.py): the fp32 "ieee" tl.dot runs on FMA units and replicates its operands
# across threads, so tiles stay small.
_DIAG_BLOCK_C = 16        # channels per program (diag forward/backward)
_DIAG_MAX_BLOCK_M = 256   # cell positions per chunk (diag forward)
_BWD_BLOCK_Q = 128        # spatial positions per program (diag backward)
_FULL_BLOCK = 32          # channel tile of the covariance (full forward/backward), >= 16 for tl.dot
_FULL_BLOCK_K = 16        # positions per GEMM step (full forward)
_FULL_BWD_BLOCK_J = 16    # channels per GEMM step (full backward)
_FULL_BWD_BLOCK_Q = 64    # spatial positions per program (full backward)

_HALF = (torch.float16, torch.bfloat16)


def _stats_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


# ------------------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _cell_bounds(p, G, H, W):
    gi = p // G
    gj = p % G
    h0 = (gi * H) // G
    h1 = ((gi + 1) * H + G - 1) // G
    w0 = (gj * W) // G
    w1 = ((gj + 1) * W + G - 1) // G
    return h0, h1, w0, w1


@triton.jit
def _den_scale(den):
    """r = 2^-round(log2(den) / 2) ~ 1 / sqrt(den), a power of two (exact): values shifted and multiplied by r give
    sums of products r^2 sum (x - s)(y - s) of the order of the covariance, not m times it (no float32 overflow at
    values ~1e18), and den r^2 lies in [0.5, 2)."""
    return tl.exp2(-tl.floor(tl.log2(den) * 0.5 + 0.5))


@triton.jit
def _feature_stats_diag_fwd(x_ptr, mean_ptr, var_ptr, C, H, W, G, P, unbiased_sub,
                            ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_np = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    n = pid_np // P
    p = pid_np % P
    h0, h1, w0, w1 = _cell_bounds(p, G, H, W)
    cw = w1 - w0
    m = (h1 - h0) * cw
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    HW = H.to(tl.int64) * W
    row = x_ptr + (n * C + offs_c.to(tl.int64)) * HW
    # centred on the cell's first value per channel and scaled by r: a large mean offset costs no digits (the chunk
    # means of raw float32 values ~1e7 std would round by ~1 std) and the sums of squares do not overflow
    shift = tl.load(row + h0 * W + w0, mask=cmask, other=0.0).to(ACC)
    den = (m - unbiased_sub).to(ACC)
    r = _den_scale(den)
    cnt = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for k0 in range(0, m, BLOCK_M):
        k = k0 + tl.arange(0, BLOCK_M)
        kmask = k < m
        pos = (h0 + k // cw) * W + (w0 + k % cw)
        msk = cmask[:, None] & kmask[None, :]
        xt = tl.load(row[:, None] + pos[None, :], mask=msk, other=0.0).to(ACC)
        xt = tl.where(msk, (xt - shift[:, None]) * r, 0.0)
        nb = tl.minimum(m - k0, BLOCK_M).to(ACC)
        mb = tl.sum(xt, axis=1) / nb
        d = tl.where(msk, xt - mb[:, None], 0.0)
        m2b = tl.sum(d * d, axis=1)
        tot = cnt + nb
        delta = mb - mean
        mean = mean + delta * (nb / tot)
        m2 = m2 + m2b + delta * delta * (cnt * nb / tot)
        cnt = tot
    out = (n * P + p) * C + offs_c
    tl.store(mean_ptr + out, shift + mean / r, mask=cmask)
    tl.store(var_ptr + out, m2 / (den * r * r), mask=cmask)


@triton.jit
def _feature_stats_full_fwd(x_ptr, mean_ptr, cov_ptr, C, H, W, G, P, unbiased_sub,
                            ACC: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    pid_np = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1)
    pid_j = tl.program_id(2)
    n = pid_np // P
    p = pid_np % P
    h0, h1, w0, w1 = _cell_bounds(p, G, H, W)
    cw = w1 - w0
    m = (h1 - h0) * cw
    HW = H.to(tl.int64) * W
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    imask = offs_i < C
    jmask = offs_j < C
    row_i = x_ptr + (n * C + offs_i.to(tl.int64)) * HW
    row_j = x_ptr + (n * C + offs_j.to(tl.int64)) * HW
    first = h0 * W + w0
    shift_i = tl.load(row_i + first, mask=imask, other=0.0).to(ACC)
    shift_j = tl.load(row_j + first, mask=jmask, other=0.0).to(ACC)
    den = (m - unbiased_sub).to(ACC)
    r = _den_scale(den)  # shifted values times r: acc is r^2 S_xy ~ cov, no overflow at values ~1e18 in float32
    acc = tl.zeros([BLOCK_I, BLOCK_J], dtype=ACC)
    s_i = tl.zeros([BLOCK_I], dtype=ACC)
    s_j = tl.zeros([BLOCK_J], dtype=ACC)
    for k0 in range(0, m, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < m
        pos = (h0 + k // cw) * W + (w0 + k % cw)
        mi = imask[:, None] & kmask[None, :]
        mj = jmask[:, None] & kmask[None, :]
        a = tl.load(row_i[:, None] + pos[None, :], mask=mi, other=0.0).to(ACC)
        b = tl.load(row_j[:, None] + pos[None, :], mask=mj, other=0.0).to(ACC)
        a = tl.where(mi, (a - shift_i[:, None]) * r, 0.0)
        b = tl.where(mj, (b - shift_j[:, None]) * r, 0.0)
        acc += tl.dot(a, tl.trans(b), input_precision="ieee")
        s_i += tl.sum(a, axis=1)
        s_j += tl.sum(b, axis=1)
    mf = m.to(ACC)
    mean_i = s_i / mf  # r times the mean of the shifted values; (s_i / m) s_j does not overflow, s_i s_j would
    cov = (acc - mean_i[:, None] * s_j[None, :]) / (den * r * r)
    cov_base = cov_ptr + (n * P + p) * C * C
    tl.store(cov_base + offs_i[:, None].to(tl.int64) * C + offs_j[None, :], cov,
             mask=imask[:, None] & jmask[None, :])
    if pid_j == 0:
        tl.store(mean_ptr + (n * P + p) * C + offs_i, shift_i + mean_i / r, mask=imask)


@triton.jit
def _feature_stats_diag_bwd(x_ptr, gm_ptr, gv_ptr, mean_ptr, gx_ptr, C, H, W, G, P, unbiased_sub,
                            ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    pid_q = tl.program_id(2)
    HW = H * W
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    cmask = offs_c < C
    qmask = offs_q < HW
    msk = cmask[:, None] & qmask[None, :]
    h = offs_q // W
    w = offs_q % W
    r_lo = (pid_q * BLOCK_Q) // W
    r_hi = (tl.minimum(pid_q * BLOCK_Q + BLOCK_Q, HW) - 1) // W
    ptrs = (n * C + offs_c.to(tl.int64))[:, None] * HW + offs_q[None, :]
    x = tl.load(x_ptr + ptrs, mask=msk, other=0.0).to(ACC)
    acc = tl.zeros([BLOCK_C, BLOCK_Q], dtype=ACC)
    for p in range(P):
        h0, h1, w0, w1 = _cell_bounds(p, G, H, W)
        if (h0 <= r_hi) & (h1 > r_lo):
            m = (h1 - h0) * (w1 - w0)
            inside = (h >= h0) & (h < h1) & (w >= w0) & (w < w1)
            o = (n * P + p) * C + offs_c
            gm = tl.load(gm_ptr + o, mask=cmask, other=0.0).to(ACC)
            gv = tl.load(gv_ptr + o, mask=cmask, other=0.0).to(ACC)
            mu = tl.load(mean_ptr + o, mask=cmask, other=0.0).to(ACC)
            a = gm / m.to(ACC)
            b = 2.0 * gv / (m - unbiased_sub).to(ACC)
            acc += tl.where(inside[None, :], a[:, None] + b[:, None] * (x - mu[:, None]), 0.0)
    tl.store(gx_ptr + ptrs, acc, mask=msk)


@triton.jit
def _feature_stats_full_bwd(x_ptr, gm_ptr, gc_ptr, mean_ptr, gx_ptr, C, H, W, G, P, unbiased_sub,
                            ACC: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                            BLOCK_Q: tl.constexpr):
    # gc = grad_cov [N, P, C, C]; the cell term is ((gc + gc^T) / den_p) (x - mean_p)
    n = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1)
    pid_q = tl.program_id(2)
    HW = H * W
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    imask = offs_i < C
    qmask = offs_q < HW
    h = offs_q // W
    w = offs_q % W
    r_lo = (pid_q * BLOCK_Q) // W
    r_hi = (tl.minimum(pid_q * BLOCK_Q + BLOCK_Q, HW) - 1) // W
    acc = tl.zeros([BLOCK_I, BLOCK_Q], dtype=ACC)
    for p in range(P):
        h0, h1, w0, w1 = _cell_bounds(p, G, H, W)
        if (h0 <= r_hi) & (h1 > r_lo):
            m = (h1 - h0) * (w1 - w0)
            inside = (h >= h0) & (h < h1) & (w >= w0) & (w < w1)
            np_ = n * P + p
            gm = tl.load(gm_ptr + np_ * C + offs_i, mask=imask, other=0.0).to(ACC)
            contrib = tl.zeros([BLOCK_I, BLOCK_Q], dtype=ACC)
            for j0 in range(0, C, BLOCK_J):
                offs_j = j0 + tl.arange(0, BLOCK_J)
                jmask = offs_j < C
                mij = imask[:, None] & jmask[None, :]
                g_ij = tl.load(gc_ptr + np_ * C * C + offs_i[:, None].to(tl.int64) * C + offs_j[None, :], mask=mij,
                               other=0.0).to(ACC)
                g_ji = tl.load(gc_ptr + np_ * C * C + offs_j[None, :].to(tl.int64) * C + offs_i[:, None], mask=mij,
                               other=0.0).to(ACC)
                mu_j = tl.load(mean_ptr + np_ * C + offs_j, mask=jmask, other=0.0).to(ACC)
                mj = jmask[:, None] & qmask[None, :]
                xj = tl.load(x_ptr + (n * C + offs_j.to(tl.int64))[:, None] * HW + offs_q[None, :], mask=mj,
                             other=0.0).to(ACC)
                xj = tl.where(mj, xj - mu_j[:, None], 0.0)
                contrib += tl.dot(g_ij + g_ji, xj, input_precision="ieee")
            den = (m - unbiased_sub).to(ACC)
            acc += tl.where(inside[None, :], gm[:, None] / m.to(ACC) + contrib / den, 0.0)
    ptrs = (n * C + offs_i.to(tl.int64))[:, None] * HW + offs_q[None, :]
    tl.store(gx_ptr + ptrs, acc, mask=imask[:, None] & qmask[None, :])


# ------------------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------------------
def _cells_max_m(H: int, W: int, G: int) -> int:
    ch = max(((i + 1) * H + G - 1) // G - (i * H) // G for i in range(G))
    cw = max(((j + 1) * W + G - 1) // G - (j * W) // G for j in range(G))
    return ch * cw


@explain_compile_errors("wkd.feature_stats (Triton feature_stats_forward)")
def feature_stats_forward(x: torch.Tensor, grid: int, full: bool, unbiased: bool):
    """mean [N, P, C] and var [N, P, C] / cov [N, P, C, C] of x [N, C, H, W] (arguments checked by the caller)."""
    x = x.contiguous()
    N, C, H, W = x.shape
    G = int(grid)
    P = G * G
    sdt = _stats_dtype(x.dtype)
    acc = acc_dtype(x.dtype)
    mean = torch.empty((N, P, C), dtype=sdt, device=x.device)
    var = torch.empty((N, P, C, C) if full else (N, P, C), dtype=sdt, device=x.device)
    if N == 0:
        return mean, var
    sub = 1 if unbiased else 0
    if not full:
        block_m = min(_DIAG_MAX_BLOCK_M, max(16, triton.next_power_of_2(_cells_max_m(H, W, G))))
        block_c = min(_DIAG_BLOCK_C, max(2, triton.next_power_of_2(C)))
        _feature_stats_diag_fwd[(N * P, triton.cdiv(C, block_c))](
            x, mean, var, C, H, W, G, P, sub, ACC=acc, BLOCK_C=block_c, BLOCK_M=block_m, num_warps=4)
    else:
        blk = _FULL_BLOCK if C > 16 else 16
        _feature_stats_full_fwd[(N * P, triton.cdiv(C, blk), triton.cdiv(C, blk))](
            x, mean, var, C, H, W, G, P, sub, ACC=acc, BLOCK_I=blk, BLOCK_J=blk, BLOCK_K=_FULL_BLOCK_K, num_warps=8)
    return mean, var


@explain_compile_errors("wkd.feature_stats (Triton feature_stats_backward)")
def feature_stats_backward(grad_mean: torch.Tensor, grad_var: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                           grid: int, full: bool, unbiased: bool) -> torch.Tensor:
    """Gradient w.r.t. x of <grad_mean, mean> + <grad_var, var or cov> (arguments checked by the caller)."""
    x = x.contiguous()
    N, C, H, W = x.shape
    G = int(grid)
    P = G * G
    acc = acc_dtype(x.dtype)
    gx = torch.empty_like(x)
    if N == 0:
        return gx
    gm = grad_mean.contiguous()
    mean = mean.contiguous()
    block_q = min(_BWD_BLOCK_Q, max(16, triton.next_power_of_2(H * W)))
    sub = 1 if unbiased else 0
    if not full:
        block_c = min(_DIAG_BLOCK_C, max(2, triton.next_power_of_2(C)))
        _feature_stats_diag_bwd[(N, triton.cdiv(C, block_c), triton.cdiv(H * W, block_q))](
            x, gm, grad_var.contiguous(), mean, gx, C, H, W, G, P, sub, ACC=acc, BLOCK_C=block_c, BLOCK_Q=block_q,
            num_warps=4)
    else:
        blk = _FULL_BLOCK if C > 16 else 16
        bq = min(_FULL_BWD_BLOCK_Q, block_q)
        _feature_stats_full_bwd[(N, triton.cdiv(C, blk), triton.cdiv(H * W, bq))](
            x, gm, grad_var.contiguous(), mean, gx, C, H, W, G, P, sub, ACC=acc, BLOCK_I=blk,
            BLOCK_J=_FULL_BWD_BLOCK_J, BLOCK_Q=bq, num_warps=4)
    return gx
