"""Row-wise kernels of the per-half-iteration Sinkhorn: the log domain (shared cost: L = -cost/reg built once by
``sinkhorn_kmat_kernel``; per-row cost: computed on the fly) and the per-row cost [B, n, m] in the scaling domain
(K computed on the fly). One program per (row, BLOCK_N outputs), looping over the reduced dimension with an online
max-shifted log-sum-exp (log domain) or a plain sum (scaling domain), epilogues fused as in the tl.dot kernels.
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._device import (bwd_epilogue_log, bwd_epilogue_scaling, div_rn, exp, half_update, host_scalar, lse_update,
                      value_terms)


@triton.jit
def _row_tiles(mat_ptr, cost_ptr, off, mask, reg, LOG: tl.constexpr, FROM_COST: tl.constexpr,
               WANT_COST: tl.constexpr, ACCURATE: tl.constexpr):
    """A tile of K (scaling) or L = -cost/reg (log), from the prebuilt buffer or computed from the cost tile, and the
    cost tile when WANT_COST (the products that also sum K∘cost; else the raw tile again, unused).

    Returns (tile, cost tile). (Inner-loop helpers call no other helper: each helper call costs a lot under the
    interpreter.)"""
    raw = tl.load(mat_ptr + off, mask=mask, other=0.0)
    if FROM_COST:
        if raw.dtype == tl.float32:
            neg = -tl.math.div_rn(raw, reg)
        else:
            neg = -(raw / reg)
        if LOG:
            tile = neg
        else:
            if ACCURATE:
                tile = libdevice.exp(neg)
            else:
                tile = tl.exp(neg)
    else:
        tile = raw
    if WANT_COST:
        if FROM_COST:
            ct = raw
        else:
            ct = tl.load(cost_ptr + off, mask=mask, other=0.0)
    else:
        ct = raw
    return tile, ct


@triton.jit
def sinkhorn_kmat_kernel(cost_ptr, out_ptr, numel, reg_hi, reg_lo, LOG: tl.constexpr, ACCURATE: tl.constexpr,
                          BLOCK: tl.constexpr):
    """out = exp(-cost / reg) (scaling domain) or -cost / reg (log domain), element-wise over a shared [n, m] cost."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c = tl.load(cost_ptr + offs, mask=mask, other=0.0)
    reg = host_scalar(reg_hi, reg_lo, c.dtype)
    neg = -div_rn(c, reg)
    if LOG:
        out = neg
    else:
        out = exp(neg, ACCURATE)
    tl.store(out_ptr + offs, out, mask=mask)


@triton.jit
def sinkhorn_fwd_rows_kernel(
    x_ptr,  # [B, KD] u or v (log u or log v in the log domain)
    mat_ptr,  # K or L [n, m] (prebuilt, stride_mb = 0) or the cost [B, n, m] (FROM_COST)
    cost_ptr,  # cost, [n, m] (stride_cb = 0) or [B, n, m] (FINAL)
    mass_ptr, scal_ptr, hist_ptr, y_ptr, part_ptr,  # as in sinkhorn_fwd_dot_kernel
    KD, ND, stride_mb, stride_mk, stride_mn, stride_cb, n_part,
    reg_hi, reg_lo, eps_hi, eps_lo, leps_hi, leps_lo,
    LOG: tl.constexpr, FROM_COST: tl.constexpr, FINAL: tl.constexpr, STORE_HIST: tl.constexpr,
    HAS_EPS: tl.constexpr, ACCURATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One half-iteration of one row: scaling den = x @ M_row + eps, scal = mass / den; log domain
    den = log(sum_k exp(x_k + L_kj) + eps) (online max shift), scal = log(mass) - den."""
    row = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    DT = x_ptr.dtype.element_ty
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cmask = cols < ND
    mbase = mat_ptr + row * stride_mb
    cbase = cost_ptr + row * stride_cb
    reg = host_scalar(reg_hi, reg_lo, DT)
    mx = tl.full([BLOCK_N], float("-inf"), DT)
    sm = tl.zeros([BLOCK_N], dtype=DT)  # scaling domain: the plain sums
    sm2 = tl.zeros([BLOCK_N], dtype=DT)
    for k0 in range(0, KD, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        kmask = ks < KD
        moff = ks[:, None] * stride_mk + cols[None, :] * stride_mn
        mmask = kmask[:, None] & cmask[None, :]
        tile, ct = _row_tiles(mbase, cbase, moff, mmask, reg, LOG, FROM_COST, FINAL, ACCURATE)
        if LOG:
            x = tl.load(x_ptr + row * KD + ks, mask=kmask, other=float("-inf"))
            val = tl.where(mmask, x[:, None] + tile, float("-inf"))
            mx, sm, sm2 = lse_update(mx, sm, sm2, val, 1.0, ct, FINAL, ACCURATE)
        else:
            x = tl.load(x_ptr + row * KD + ks, mask=kmask, other=0.0)
            sm += tl.sum(x[:, None] * tile, axis=0)
            if FINAL:
                sm2 += tl.sum(x[:, None] * (tile * ct), axis=0)
    ooff = row * ND + cols
    mass = tl.load(mass_ptr + ooff, mask=cmask, other=0.0)
    den, scal = half_update(sm, mx, mass, cmask, host_scalar(eps_hi, eps_lo, DT), host_scalar(leps_hi, leps_lo, DT),
                            LOG, HAS_EPS, ACCURATE)
    tl.store(scal_ptr + ooff, scal, mask=cmask)
    if STORE_HIST:
        tl.store(hist_ptr + ooff, den, mask=cmask)
    if FINAL:
        y, term = value_terms(scal, sm2, mx, LOG, ACCURATE)
        if STORE_HIST:
            tl.store(y_ptr + ooff, y, mask=cmask)
        part = tl.sum(tl.where(cmask, term, 0.0), axis=0)
        tl.store(part_ptr + row * n_part + pid_n, part)


@triton.jit
def sinkhorn_bwd_rows_kernel(
    c_ptr,  # [B, KD] left buffer: scaling w_t u_t / z_t v_t; log: the coefficient w_t (S side) / z_t (R side)
    lm_ptr, lh_ptr,  # [B, KD] left mass and history slot: a, r_t (S side) or b, s_t (R side)
    mat_ptr, cost_ptr, g_ptr,  # as in sinkhorn_fwd_rows_kernel; g [B]
    den_ptr, mass_ptr, grad_ptr, out_ptr,  # as in sinkhorn_bwd_dot_kernel
    KD, ND, stride_mb, stride_mk, stride_mn, stride_cb, reg_hi, reg_lo,
    SIDE_S: tl.constexpr, FIRST: tl.constexpr, WRITE_OUT: tl.constexpr, LOG: tl.constexpr,
    FROM_COST: tl.constexpr, ACCURATE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One backward product of one row (log domain or per-row cost) with its epilogue fused. Log domain: the left
    log-scaling (log u_t = log a - log r_t, or log v_t = log b - log s_t) is rebuilt from the history on the fly."""
    row = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    DT = c_ptr.dtype.element_ty
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cmask = cols < ND
    mbase = mat_ptr + row * stride_mb
    cbase = cost_ptr + row * stride_cb
    reg = host_scalar(reg_hi, reg_lo, DT)
    mx = tl.full([BLOCK_N], float("-inf"), DT)
    sm = tl.zeros([BLOCK_N], dtype=DT)
    sm2 = tl.zeros([BLOCK_N], dtype=DT)
    for k0 in range(0, KD, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        kmask = ks < KD
        loff = row * KD + ks
        coef = tl.load(c_ptr + loff, mask=kmask, other=0.0)
        moff = ks[:, None] * stride_mk + cols[None, :] * stride_mn
        mmask = kmask[:, None] & cmask[None, :]
        tile, ct = _row_tiles(mbase, cbase, moff, mmask, reg, LOG, FROM_COST, FIRST, ACCURATE)
        if LOG:
            lm = tl.load(lm_ptr + loff, mask=kmask, other=0.0)
            lh = tl.load(lh_ptr + loff, mask=kmask, other=0.0)
            pos = kmask & (lm > 0)
            if ACCURATE:
                llm = libdevice.log(tl.where(pos, lm, 1.0))
            else:
                llm = tl.log(tl.where(pos, lm, 1.0))
            p = tl.where(pos, llm - lh, float("-inf"))  # log u_t (S side) or log v_t (R side)
            val = tl.where(mmask, p[:, None] + tile, float("-inf"))
            mx, sm, sm2 = lse_update(mx, sm, sm2, val, coef[:, None], ct, FIRST, ACCURATE)
        else:
            sm += tl.sum(coef[:, None] * tile, axis=0)
            if FIRST:
                ut = div_rn(tl.load(lm_ptr + loff, mask=kmask, other=0.0),
                            tl.load(lh_ptr + loff, mask=kmask, other=1.0))
                sm2 += tl.sum(ut[:, None] * (tile * ct), axis=0)
    ooff = row * ND + cols
    if LOG:
        den = tl.load(den_ptr + ooff, mask=cmask, other=0.0)
    else:
        den = tl.load(den_ptr + ooff, mask=cmask, other=1.0)
    if FIRST:
        g = tl.load(g_ptr + row)
        grad_old = sm  # unused
    else:
        g = 0.0
        grad_old = tl.load(grad_ptr + ooff, mask=cmask, other=0.0)
    if LOG:
        grad, out = bwd_epilogue_log(mx, sm, sm2, g, den, grad_old, SIDE_S, FIRST, ACCURATE)
    else:
        mass = tl.load(mass_ptr + ooff, mask=cmask, other=0.0)
        grad, out = bwd_epilogue_scaling(sm, sm2, g, den, mass, grad_old, SIDE_S, FIRST)
    tl.store(grad_ptr + ooff, grad, mask=cmask)
    if WRITE_OUT:
        tl.store(out_ptr + ooff, out, mask=cmask)
