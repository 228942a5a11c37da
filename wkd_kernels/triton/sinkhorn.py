"""Triton kernels of ``torch.ops.wkd.sinkhorn_triton`` and ``torch.ops.wkd.sinkhorn_triton_backward``.

Contract: the schema comment of wkd::sinkhorn in csrc/ops.cpp; same recurrences and output layout as the CPU
kernels (csrc/cpu/sinkhorn.cpp): value [B], u [B, n], v [B, m], hist_r [T, B, n], hist_s [T, B, m], y [B, n]
(logs in the log domain; [0, B, *] and [0, n] without history). The backward is the exact gradient of value w.r.t.
a and b through the fixed loop, a reverse sweep over the stored r_t, s_t and y (never B x n x m).

The launchers do not validate their arguments (wkd_kernels/ops/checks.py does, before any kernel); they only make the
inputs contiguous.

Kernel structure (one launch per half-iteration, epilogues fused):

* shared cost [n, m], scaling domain (the WKD-L case), n or m > ONCHIP_MAX_C: K = exp(-cost/reg) and K∘cost are
  built once per call (``_sinkhorn_kpad_kernel``) into zero-padded [n_pad, m_pad] buffers, n_pad and m_pad = n, m
  rounded up to 16; each half-iteration is ``_sinkhorn_fwd_dot_kernel``: a tiled product of the [B, n_pad] (or
  [B, m_pad]) scaling work buffer with K (or K^T, by strides) over BLOCK_B x BLOCK_K by BLOCK_K x BLOCK_N
  ``tl.dot`` tiles, with +eps, the division b/s (a/r), the stores of v (u) and of the history slot fused into the
  epilogue. The last r-half also accumulates y = (K∘cost) v_T in the same k-loop and writes per-tile partial sums
  of u_T * y. The backward uses ``_sinkhorn_bwd_dot_kernel`` the same way (the first step also computes
  (K∘C)^T u_T). Padding: with every leading dimension and mask bound a multiple of 16, Triton proves 16-byte
  alignment, so the k-loop copies its operands with 16-byte cp.async instead of 4-byte ones at C = 1000
  (python_tests/triton_compile_matrix.py --check-load-widths, for sm_90); the padding is zero and adds nothing.
  The work buffers are the u / v outputs themselves when n, m are multiples of 16; otherwise the last iteration
  also writes the outputs.
* log domain (shared cost: L = -cost/reg built once; per-row cost: computed on the fly) and per-row cost
  [B, n, m] in the scaling domain (K computed on the fly from the user's cost): ``_sinkhorn_fwd_rows_kernel`` /
  ``_sinkhorn_bwd_rows_kernel``, one program per (row, BLOCK_N outputs), looping over the reduced dimension
  with an online max-shifted log-sum-exp (log domain) or a plain sum (scaling domain), same epilogues.

float32 inputs compute and accumulate in float32, float64 in float64. ``tl.dot`` on float32 uses
``input_precision=precision`` (the launchers' argument: "ieee", float32 FMA accuracy; "tf32x3": tensor cores, 3 TF32
products, near float32 accuracy; "tf32": one TF32 product, relative error ~1e-3); float64 always "ieee". Launches never read device data on the host (no ``.item()``, no
data-dependent Python branching): the ops are CUDA-graph capturable. Under ``TRITON_INTERPRET=1`` the kernels run
on CPU tensors (the tests do that).
"""
from __future__ import annotations

import contextlib
import math
import struct

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..settings import TRITON_INTERPRET
from ._support import dot_precision, explain_compile_errors

__all__ = ["sinkhorn_forward", "sinkhorn_backward", "FP32_PRECISIONS", "DOT_CONFIG", "DOT_CONFIG_CANDIDATES",
           "ROWS_CONFIG"]

# ----------------------------------------------------------------------------------------------------------
# Constants and settings
# ----------------------------------------------------------------------------------------------------------
_INTERPRET = TRITON_INTERPRET
# libdevice exp/log/log1p (accurate float32) are used outside the hot inner loops; the interpreter has no libdevice.
_ACCURATE = not _INTERPRET

# The tl.dot input precisions the launchers accept for float32 (`precision`).
FP32_PRECISIONS = ("ieee", "tf32x3", "tf32")

# tl.dot kernels (shared cost, scaling domain, n or m > ONCHIP_MAX_C): (BLOCK_B, BLOCK_N, BLOCK_K, num_warps) per
# (dtype, precision). B=256, n=m=1000 float32 gives 8 x 16 = 128 programs per half-iteration (one wave on an
# H100/H200). Chosen from ptxas register reports for sm_90 (no spills, except 8 bytes in the tf32x3 first backward
# step), NOT from timings: no GPU has run them. bench/gpu_quick.py --sweep-tiles times the candidates below
# (64 x 32 x 32 / 4 warps lowers to wgmma for tf32 / tf32x3 on sm_90); the first GPU run picks the defaults here.
# Every block must be a power of two >= 16 (tl.dot).
DOT_CONFIG = {
    (torch.float32, "ieee"): (32, 64, 16, 8),
    (torch.float32, "tf32x3"): (32, 64, 16, 8),
    (torch.float32, "tf32"): (32, 64, 16, 8),
    (torch.float64, "ieee"): (16, 64, 16, 4),
}
DOT_CONFIG_CANDIDATES = ((32, 64, 16, 8), (64, 32, 32, 4), (32, 32, 32, 4), (16, 64, 32, 4))
# Row-wise kernels (log domain, per-row cost): (BLOCK_N, BLOCK_K, num_warps) per dtype (no spills on sm_90).
ROWS_CONFIG = {torch.float32: (64, 32, 4), torch.float64: (64, 32, 4)}
# Element-wise kernels (kernel matrix, backward initialisation): elements per program.
ELEM_BLOCK = 1024
# Rows per program and column tile of the backward's gauge-correction kernel (an O(B (n + m)) pass per iteration).
GAUGE_BLOCK_B, GAUGE_BLOCK_N = 4, 128
INIT_BLOCK = 256


# ----------------------------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _scalar(hi, lo, DT: tl.constexpr):
    """A host float passed as hi + lo (hi exact in float32), in the data type DT (float64 keeps ~48 bits)."""
    return tl.cast(hi, DT) + tl.cast(lo, DT)


@triton.jit
def _div(x, y):
    """Correctly rounded division (Triton's float32 `/` is the approximate div.full)."""
    if x.dtype == tl.float32:
        q = tl.math.div_rn(x, y)
    else:
        q = x / y
    return q


@triton.jit
def _exp(x, ACCURATE: tl.constexpr):
    if ACCURATE:
        y = libdevice.exp(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def _safe_log(x, ACCURATE: tl.constexpr):
    """log(x) for x > 0, -inf otherwise."""
    pos = x > 0
    xs = tl.where(pos, x, 1.0)
    if ACCURATE:
        lx = libdevice.log(xs)
    else:
        lx = tl.log(xs)
    return tl.where(pos, lx, float("-inf"))


@triton.jit
def _log_add_eps(x, log_eps, HAS_EPS: tl.constexpr, ACCURATE: tl.constexpr):
    """log(exp(x) + eps) computed as hi + log1p(exp(lo - hi)) (the CPU kernels' log_add_eps)."""
    if HAS_EPS:
        hi = tl.maximum(x, log_eps)
        lo = tl.minimum(x, log_eps)
        e = _exp(lo - hi, ACCURATE)
        if ACCURATE:
            l1p = libdevice.log1p(e)
        else:
            l1p = tl.log(1.0 + e)
        y = hi + l1p
    else:
        y = x
    return y


@triton.jit
def _kernel_tile(mat_ptr, off, mask, reg, LOG: tl.constexpr, FROM_COST: tl.constexpr, ACCURATE: tl.constexpr):
    """A tile of K (scaling) or L = -cost/reg (log): from the prebuilt buffer, or computed from the cost tile.

    Returns (tile, cost tile when FROM_COST else the raw tile). (Inner-loop helpers call no other helper: each
    helper call costs a lot under the interpreter.)"""
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
    return tile, raw


@triton.jit
def _lse_update(mx, sm, sm2, val, coef, coef2, TWO: tl.constexpr, ACCURATE: tl.constexpr):
    """One step of the online max-shifted column sums over axis 0 of val [BLOCK_K, BLOCK_N]:
    mx = running max of val (over finite entries), sm = sum coef * exp(val - mx), sm2 = sum coef2 * exp(val - mx)."""
    new_mx = tl.maximum(mx, tl.max(val, axis=0))
    ref = tl.where(new_mx == float("-inf"), 0.0, new_mx)
    if ACCURATE:  # 0 while nothing finite was seen
        alpha = libdevice.exp(mx - ref)
    else:
        alpha = tl.exp(mx - ref)
    e = tl.exp(val - ref[None, :])  # arguments <= 0: the fast exp is accurate where it matters
    sm = sm * alpha + tl.sum(coef * e, axis=0)
    if TWO:
        sm2 = sm2 * alpha + tl.sum(coef2 * e, axis=0)
    return new_mx, sm, sm2


# ----------------------------------------------------------------------------------------------------------
# Forward kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _half_update(acc, mx, mass, mask, eps, log_eps, LOG: tl.constexpr, HAS_EPS: tl.constexpr,
                 ACCURATE: tl.constexpr):
    """The epilogue of one half-iteration from its product acc (log domain: the sum of exp(. - mx), max-shifted by mx):
    den = acc + eps, scal = mass / den (log: den = log(exp(mx) acc + eps), scal = log mass - den); masked lanes get
    den 1 (log: 0), so no 0/0 or -inf - -inf. Returns (den, scal): the history entry and the new scaling."""
    if LOG:
        den = _log_add_eps(mx + _safe_log(acc, ACCURATE), log_eps, HAS_EPS, ACCURATE)
        den = tl.where(mask, den, 0.0)
        scal = _safe_log(mass, ACCURATE) - den
    else:
        den = tl.where(mask, acc + eps, 1.0)
        scal = _div(mass, den)
    return den, scal


@triton.jit
def _value_terms(scal, acc_y, mx, LOG: tl.constexpr, ACCURATE: tl.constexpr):
    """The last r-half's y = (K∘C) v_T from its product acc_y (log: log y, acc_y max-shifted by mx) and the value's
    terms u_T,i y_i (scal = u_T, log u_T when LOG). Returns (y, terms)."""
    if LOG:
        y = mx + _safe_log(acc_y, ACCURATE)
        term = tl.where((scal != float("-inf")) & (acc_y != 0), _exp(scal + mx, ACCURATE) * acc_y, 0.0)
    else:
        y = acc_y
        term = scal * acc_y
    return y, term


@triton.jit
def _sinkhorn_kmat_kernel(cost_ptr, out_ptr, numel, reg_hi, reg_lo, LOG: tl.constexpr, ACCURATE: tl.constexpr,
                          BLOCK: tl.constexpr):
    """out = exp(-cost / reg) (scaling domain) or -cost / reg (log domain), element-wise over a shared [n, m] cost."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    c = tl.load(cost_ptr + offs, mask=mask, other=0.0)
    reg = _scalar(reg_hi, reg_lo, c.dtype)
    neg = -_div(c, reg)
    if LOG:
        out = neg
    else:
        out = _exp(neg, ACCURATE)
    tl.store(out_ptr + offs, out, mask=mask)


@triton.jit
def _sinkhorn_kpad_kernel(cost_ptr, k_ptr, kc_ptr, n, m, ld, numel, reg_hi, reg_lo, ACCURATE: tl.constexpr,
                          BLOCK: tl.constexpr):
    """K = exp(-cost / reg) and K∘cost of a shared [n, m] cost into two zero-padded [n_pad, ld] buffers (numel =
    n_pad * ld; n_pad, ld: n, m rounded up to 16): the rows and columns past n, m hold 0."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    i = offs // ld
    j = offs % ld
    valid = mask & (i < n) & (j < m)
    c = tl.load(cost_ptr + i * m + j, mask=valid, other=0.0)
    reg = _scalar(reg_hi, reg_lo, c.dtype)
    k = tl.where(valid, _exp(-_div(c, reg), ACCURATE), 0.0)
    tl.store(k_ptr + offs, k, mask=mask)
    tl.store(kc_ptr + offs, k * c, mask=mask)


@triton.jit
def _sinkhorn_fwd_init_kernel(a_ptr, u_ptr, n, ld_u, LOG: tl.constexpr, ACCURATE: tl.constexpr,
                              BLOCK: tl.constexpr):
    """u0 = 1/|supp a| on supp(a), 0 elsewhere (log: -log|supp a|, -inf), one program per row; u has row stride
    ld_u >= n (a padded work buffer: its columns n..ld_u-1 are set to 0)."""
    row = tl.program_id(0).to(tl.int64)
    base = row * n
    cnt = tl.zeros([BLOCK], dtype=tl.int32)
    for k0 in range(0, n, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        a = tl.load(a_ptr + base + offs, mask=offs < n, other=0.0)
        cnt += (a > 0).to(tl.int32)
    DT = u_ptr.dtype.element_ty
    total = tl.sum(cnt, axis=0).to(DT)
    if LOG:
        val = -_safe_log(total, ACCURATE)
        zero = float("-inf")
    else:
        val = _div(tl.full([], 1.0, DT), total)
        zero = 0.0
    for k0 in range(0, ld_u, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mask = offs < n
        a = tl.load(a_ptr + base + offs, mask=mask, other=0.0)
        u0 = tl.where(a > 0, val, zero)
        tl.store(u_ptr + row * ld_u + offs, tl.where(mask, u0, 0.0).to(DT), mask=offs < ld_u)


@triton.jit
def _sinkhorn_fwd_dot_kernel(
    x_ptr,  # [B, KP] work buffer multiplied by K: u (s-half) or v (r-half); columns >= the true size hold 0
    kmat_ptr,  # K, zero-padded [n_pad, m_pad], read as [KP, NP] through (stride_mk, stride_mn)
    kc_ptr,  # K∘cost, same layout (FINAL)
    mass_ptr,  # [B, ND] b (s-half) or a (r-half)
    scal_ptr,  # [B, NP] out: work buffer v (s-half) or u (r-half); columns ND..NP-1 written as 0
    out_ptr,  # [B, ND] out: the v / u output (STORE_OUT: the last iteration, when the work buffer is padded)
    hist_ptr,  # [B, ND] out: history slot s_t or r_t (STORE_HIST)
    y_ptr,  # [B, ND] out: y = (K∘C) v_T (FINAL and STORE_HIST)
    part_ptr,  # [B, n_part] out: sum over this tile's columns of u_T * y (FINAL)
    B, KP, ND, NP, stride_mk, stride_mn, n_part, eps_hi, eps_lo,
    FINAL: tl.constexpr, STORE_HIST: tl.constexpr, STORE_OUT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One half-iteration for a shared cost: den = X @ M + eps; scal = mass / den (M = K or K^T).

    KP, NP: the reduced and output sizes rounded up to 16 (the padded leading dimensions of the work buffers and of
    K): with KP, NP and the strides multiples of 16, Triton can prove 16-byte alignment and 16-element constancy of
    the masks, so the k-loop's loads are 16-byte vectors whatever n and m (the zero padding adds nothing to the
    products). ND: the true output size (stores, epilogue loads)."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    DT = x_ptr.dtype.element_ty
    rows = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rmask = rows < B
    cmask = cols < ND
    pmask = cols < NP
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=DT)
    acc_y = tl.zeros([BLOCK_B, BLOCK_N], dtype=DT)
    for k0 in range(0, KP, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        kmask = ks < KP
        x = tl.load(x_ptr + rows[:, None] * KP + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        moff = ks[:, None] * stride_mk + cols[None, :] * stride_mn
        mmask = kmask[:, None] & pmask[None, :]
        kt = tl.load(kmat_ptr + moff, mask=mmask, other=0.0)
        acc = tl.dot(x, kt, acc, input_precision=PREC, out_dtype=DT)
        if FINAL:
            kct = tl.load(kc_ptr + moff, mask=mmask, other=0.0)
            acc_y = tl.dot(x, kct, acc_y, input_precision=PREC, out_dtype=DT)
    omask = rmask[:, None] & cmask[None, :]
    ooff = rows[:, None] * ND + cols[None, :]
    den = tl.where(omask, acc + _scalar(eps_hi, eps_lo, DT), 1.0)  # masked lanes: no 0/0
    mass = tl.load(mass_ptr + ooff, mask=omask, other=0.0)
    scal = _div(mass, den)  # 0 in the padding columns (mass 0)
    tl.store(scal_ptr + rows[:, None] * NP + cols[None, :], scal, mask=rmask[:, None] & pmask[None, :])
    if STORE_OUT:
        tl.store(out_ptr + ooff, scal, mask=omask)
    if STORE_HIST:
        tl.store(hist_ptr + ooff, den, mask=omask)
    if FINAL:
        if STORE_HIST:
            tl.store(y_ptr + ooff, acc_y, mask=omask)
        part = tl.sum(tl.where(omask, scal * acc_y, 0.0), axis=1)
        tl.store(part_ptr + rows * n_part + pid_n, part, mask=rmask)


@triton.jit
def _sinkhorn_fwd_rows_kernel(
    x_ptr,  # [B, KD] u or v (log u or log v in the log domain)
    mat_ptr,  # K or L [n, m] (prebuilt, stride_mb = 0) or the cost [B, n, m] (FROM_COST)
    cost_ptr,  # cost, [n, m] (stride_cb = 0) or [B, n, m] (FINAL)
    mass_ptr, scal_ptr, hist_ptr, y_ptr, part_ptr,  # as in _sinkhorn_fwd_dot_kernel
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
    reg = _scalar(reg_hi, reg_lo, DT)
    mx = tl.full([BLOCK_N], float("-inf"), DT)
    sm = tl.zeros([BLOCK_N], dtype=DT)  # scaling domain: the plain sums
    sm2 = tl.zeros([BLOCK_N], dtype=DT)
    for k0 in range(0, KD, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        kmask = ks < KD
        moff = ks[:, None] * stride_mk + cols[None, :] * stride_mn
        mmask = kmask[:, None] & cmask[None, :]
        tile, raw = _kernel_tile(mbase, moff, mmask, reg, LOG, FROM_COST, ACCURATE)
        if FINAL:
            if FROM_COST:
                ct = raw
            else:
                ct = tl.load(cbase + moff, mask=mmask, other=0.0)
        else:
            ct = raw
        if LOG:
            x = tl.load(x_ptr + row * KD + ks, mask=kmask, other=float("-inf"))
            val = tl.where(mmask, x[:, None] + tile, float("-inf"))
            mx, sm, sm2 = _lse_update(mx, sm, sm2, val, 1.0, ct, FINAL, ACCURATE)
        else:
            x = tl.load(x_ptr + row * KD + ks, mask=kmask, other=0.0)
            sm += tl.sum(x[:, None] * tile, axis=0)
            if FINAL:
                sm2 += tl.sum(x[:, None] * (tile * ct), axis=0)
    ooff = row * ND + cols
    mass = tl.load(mass_ptr + ooff, mask=cmask, other=0.0)
    den, scal = _half_update(sm, mx, mass, cmask, _scalar(eps_hi, eps_lo, DT), _scalar(leps_hi, leps_lo, DT), LOG,
                             HAS_EPS, ACCURATE)
    tl.store(scal_ptr + ooff, scal, mask=cmask)
    if STORE_HIST:
        tl.store(hist_ptr + ooff, den, mask=cmask)
    if FINAL:
        y, term = _value_terms(scal, sm2, mx, LOG, ACCURATE)
        if STORE_HIST:
            tl.store(y_ptr + ooff, y, mask=cmask)
        part = tl.sum(tl.where(cmask, term, 0.0), axis=0)
        tl.store(part_ptr + row * n_part + pid_n, part)


# ----------------------------------------------------------------------------------------------------------
# Backward kernels
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _sinkhorn_bwd_init_kernel(g_ptr, a_ptr, rT_ptr, y_ptr, ga_ptr, x_ptr, numel, n, ld_x, LOG: tl.constexpr,
                              ACCURATE: tl.constexpr, BLOCK: tl.constexpr):
    """w_T = g y / r_T (log: g exp(log y - log r_T), 0 where y = 0); ga = w_T; x = w_T u_T (log: x = w_T).
    Element-wise over numel = B * ld_x: x has row stride ld_x >= n (a padded work buffer, columns n..ld_x-1 set
    to 0); a, r_T, y and ga are [B, n]."""
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < numel
    row = offs // ld_x
    col = offs % ld_x
    mask = inb & (col < n)
    src = row * n + col
    g = tl.load(g_ptr + row, mask=mask, other=0.0)
    r = tl.load(rT_ptr + src, mask=mask, other=1.0)
    y = tl.load(y_ptr + src, mask=mask, other=0.0)
    if LOG:
        w = tl.where(y == float("-inf"), 0.0, g * _exp(y - r, ACCURATE))
        x = w
    else:
        a = tl.load(a_ptr + src, mask=mask, other=0.0)
        w = _div(g * y, r)
        x = w * _div(a, r)
    tl.store(ga_ptr + src, w, mask=mask)
    tl.store(x_ptr + offs, tl.where(mask, x, 0.0), mask=inb)


@triton.jit
def _bwd_epilogue_scaling(acc, acc2, g, den, mass, grad_old, SIDE_S: tl.constexpr, FIRST: tl.constexpr):
    """Scaling-domain epilogue of one backward product. S side (den = s_t, mass = b):
    z = ((g (K∘C)^T u_T if FIRST) - K^T(w u)) / s_t, gb (+)= z, next operand z v_t.
    R side (den = r_{t-1}, mass = a): w = -K(z v) / r_{t-1}, ga += w, next operand w u_{t-1}."""
    if SIDE_S:
        if FIRST:
            z = _div(g * acc2 - acc, den)
            grad = z
        else:
            z = _div(-acc, den)
            grad = grad_old + z
        out = z * _div(mass, den)
    else:
        w = -_div(acc, den)
        grad = grad_old + w
        out = w * _div(mass, den)
    return grad, out


@triton.jit
def _bwd_epilogue_log(mx, sm, sm2, g, den, grad_old, SIDE_S: tl.constexpr, FIRST: tl.constexpr,
                      ACCURATE: tl.constexpr):
    """Log-domain epilogue (den = log s_t or log r_{t-1}); the sums are max-shifted by mx. The next operand is the
    coefficient itself (z on the S side, w on the R side)."""
    if SIDE_S:
        prod = tl.where(sm == 0, 0.0, _exp(mx - den, ACCURATE) * sm)
        if FIRST:
            direct = tl.where(sm2 == 0, 0.0, g * _exp(mx - den, ACCURATE) * sm2)
            z = direct - prod
            grad = z
        else:
            z = -prod
            grad = grad_old + z
        out = z
    else:
        w = tl.where(sm == 0, 0.0, -_exp(mx - den, ACCURATE) * sm)
        grad = grad_old + w
        out = w
    return grad, out


@triton.jit
def _sinkhorn_bwd_dot_kernel(
    x_ptr,  # [B, KP] work buffer, the left operand: w_t u_t (S side) or z_t v_t (R side); 0 past the true size
    kmat_ptr, kc_ptr,  # K and K∘cost, zero-padded [n_pad, m_pad], read as [KP, NP] through (stride_mk, stride_mn)
    a_ptr, rT_ptr, g_ptr,  # FIRST (S side): u_T = a / r_T on the fly ([B, KD]), g [B]
    den_ptr,  # [B, ND] s_t (S side) or r_{t-1} (R side)
    mass_ptr,  # [B, ND] b (S side) or a (R side)
    grad_ptr,  # [B, ND] gb (S side, written when FIRST) or ga (R side), accumulated
    out_ptr,  # [B, NP] work buffer, the next left operand: z_t v_t (S side, WRITE_OUT) or w_{t-1} u_{t-1} (R side)
    B, KD, KP, ND, NP, stride_mk, stride_mn,
    SIDE_S: tl.constexpr, FIRST: tl.constexpr, WRITE_OUT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One backward product for a shared cost (scaling domain) with its epilogue fused. KD, ND: the true reduced
    and output sizes; KP, NP: rounded up to 16 (padded leading dimensions, as in _sinkhorn_fwd_dot_kernel)."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    DT = x_ptr.dtype.element_ty
    rows = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rmask = rows < B
    cmask = cols < ND
    pmask = cols < NP
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=DT)
    acc2 = tl.zeros([BLOCK_B, BLOCK_N], dtype=DT)
    for k0 in range(0, KP, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        kmask = ks < KP
        x = tl.load(x_ptr + rows[:, None] * KP + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        moff = ks[:, None] * stride_mk + cols[None, :] * stride_mn
        mmask = kmask[:, None] & pmask[None, :]
        kt = tl.load(kmat_ptr + moff, mask=mmask, other=0.0)
        acc = tl.dot(x, kt, acc, input_precision=PREC, out_dtype=DT)
        if FIRST:
            loff = rows[:, None] * KD + ks[None, :]
            lmask = rmask[:, None] & (ks < KD)[None, :]
            ut = _div(tl.load(a_ptr + loff, mask=lmask, other=0.0), tl.load(rT_ptr + loff, mask=lmask, other=1.0))
            kct = tl.load(kc_ptr + moff, mask=mmask, other=0.0)
            acc2 = tl.dot(ut, kct, acc2, input_precision=PREC, out_dtype=DT)
    omask = rmask[:, None] & cmask[None, :]
    ooff = rows[:, None] * ND + cols[None, :]
    den = tl.load(den_ptr + ooff, mask=omask, other=1.0)
    mass = tl.load(mass_ptr + ooff, mask=omask, other=0.0)
    if FIRST:
        g = tl.load(g_ptr + rows, mask=rmask, other=0.0)[:, None]
        grad_old = acc  # unused
    else:
        g = 0.0
        grad_old = tl.load(grad_ptr + ooff, mask=omask, other=0.0)
    grad, out = _bwd_epilogue_scaling(acc, acc2, g, den, mass, grad_old, SIDE_S, FIRST)
    tl.store(grad_ptr + ooff, grad, mask=omask)
    if WRITE_OUT:  # 0 in the padding columns (mass 0)
        tl.store(out_ptr + rows[:, None] * NP + cols[None, :], out, mask=rmask[:, None] & pmask[None, :])


@triton.jit
def _sinkhorn_bwd_rows_kernel(
    c_ptr,  # [B, KD] left buffer: scaling w_t u_t / z_t v_t; log: the coefficient w_t (S side) / z_t (R side)
    lm_ptr, lh_ptr,  # [B, KD] left mass and history slot: a, r_t (S side) or b, s_t (R side)
    mat_ptr, cost_ptr, g_ptr,  # as in _sinkhorn_fwd_rows_kernel; g [B]
    den_ptr, mass_ptr, grad_ptr, out_ptr,  # as in _sinkhorn_bwd_dot_kernel
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
    reg = _scalar(reg_hi, reg_lo, DT)
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
        tile, raw = _kernel_tile(mbase, moff, mmask, reg, LOG, FROM_COST, ACCURATE)
        if FIRST:
            if FROM_COST:
                ct = raw
            else:
                ct = tl.load(cbase + moff, mask=mmask, other=0.0)
        else:
            ct = raw
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
            mx, sm, sm2 = _lse_update(mx, sm, sm2, val, coef[:, None], ct, FIRST, ACCURATE)
        else:
            sm += tl.sum(coef[:, None] * tile, axis=0)
            if FIRST:
                ut = _div(tl.load(lm_ptr + loff, mask=kmask, other=0.0), tl.load(lh_ptr + loff, mask=kmask, other=1.0))
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
        grad, out = _bwd_epilogue_log(mx, sm, sm2, g, den, grad_old, SIDE_S, FIRST, ACCURATE)
    else:
        mass = tl.load(mass_ptr + ooff, mask=cmask, other=0.0)
        grad, out = _bwd_epilogue_scaling(sm, sm2, g, den, mass, grad_old, SIDE_S, FIRST)
    tl.store(grad_ptr + ooff, grad, mask=cmask)
    if WRITE_OUT:
        tl.store(out_ptr + ooff, out, mask=cmask)


@triton.jit
def _gauge_correct(rows, rmask, G, zsum, first, x_ptr, ld_x, a_ptr, r_ptr, z_ptr, ld_z, b_ptr, s_ptr, gb_ptr, n, m,
                   eps, log_eps, LOG: tl.constexpr, HAS_EPS: tl.constexpr, ACCURATE: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    """The gauge correction of step t (csrc/cpu/sinkhorn.cpp, backward_row; docs/design.md section 3) for the rows
    `rows`, after the S-side product of step t wrote z_t (z_ptr: z_t v_t in the scaling domain, z_t in the log
    domain; gb already holds the uncorrected sum). x_ptr: w_t u_t (log: w_t), r_ptr: r_t (log r_t), s_ptr: s_t (log).
    G / zsum [BLOCK_B]: G_{t+1} and eps sum_j b_j z_{t+1,j} / s_{t+1,j} of the previous step (ignored when `first`).
    Restores sum_j b_j z_t,j = G_t by z_t -= c b, gb -= c b; returns (G_t, eps sum_j b_j z_t,j / s_t,j)."""
    if HAS_EPS:  # G_t = G_{t+1} + eps (sum_i a_i w_t,i / r_t,i - sum_j b_j z_{t+1,j} / s_{t+1,j})
        awr = tl.zeros_like(G)
        for i0 in range(0, n, BLOCK_N):
            ci = (i0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            msk = rmask[:, None] & (ci < n)[None, :]
            x = tl.load(x_ptr + rows[:, None] * ld_x + ci[None, :], mask=msk, other=0.0)
            if LOG:
                aa = tl.load(a_ptr + rows[:, None] * n + ci[None, :], mask=msk, other=0.0)
                rr = tl.load(r_ptr + rows[:, None] * n + ci[None, :], mask=msk, other=0.0)
                awr += tl.sum(tl.where(aa > 0, aa * x * _exp(log_eps - rr, ACCURATE), 0.0), axis=1)
            else:
                awr += tl.sum(x, axis=1)  # x = w a / r
        if LOG:
            G = tl.where(first, awr, G - zsum + awr)
        else:
            G = tl.where(first, eps * awr, G + eps * (awr - zsum))
    sbz = tl.zeros_like(G)
    sbb = tl.zeros_like(G)
    for j0 in range(0, m, BLOCK_N):
        cj = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        msk = rmask[:, None] & (cj < m)[None, :]
        zo = tl.load(z_ptr + rows[:, None] * ld_z + cj[None, :], mask=msk, other=0.0)
        bm = tl.load(b_ptr + rows[:, None] * m + cj[None, :], mask=msk, other=0.0)
        if LOG:
            sbz += tl.sum(bm * zo, axis=1)
        else:
            sv = tl.load(s_ptr + rows[:, None] * m + cj[None, :], mask=msk, other=1.0)
            sbz += tl.sum(zo * sv, axis=1)  # b z = (z b / s) s
        sbb += tl.sum(bm * bm, axis=1)
    c = tl.where(sbb > 0, _div(sbz - G, tl.where(sbb > 0, sbb, 1.0)), 0.0)
    zsum = tl.zeros_like(G)
    for j0 in range(0, m, BLOCK_N):
        cj = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        msk = rmask[:, None] & (cj < m)[None, :]
        zoff = rows[:, None] * ld_z + cj[None, :]
        ooff = rows[:, None] * m + cj[None, :]
        zo = tl.load(z_ptr + zoff, mask=msk, other=0.0)
        bm = tl.load(b_ptr + ooff, mask=msk, other=0.0)
        if LOG:
            sv = tl.load(s_ptr + ooff, mask=msk, other=0.0)
            zn = zo - c[:, None] * bm
            if HAS_EPS:
                zsum += tl.sum(tl.where(bm > 0, bm * zn * _exp(log_eps - sv, ACCURATE), 0.0), axis=1)
        else:
            sv = tl.load(s_ptr + ooff, mask=msk, other=1.0)
            zn = zo - c[:, None] * bm * _div(bm, sv)
            if HAS_EPS:
                zsum += tl.sum(zn, axis=1)  # b z / s = z v
        tl.store(z_ptr + zoff, zn, mask=msk)
        tl.store(gb_ptr + ooff, tl.load(gb_ptr + ooff, mask=msk, other=0.0) - c[:, None] * bm, mask=msk)
    return G, zsum


@triton.jit
def _sinkhorn_bwd_gauge_kernel(state_ptr, x_ptr, ld_x, a_ptr, r_ptr, z_ptr, ld_z, b_ptr, s_ptr, gb_ptr, B, n, m,
                               eps_hi, eps_lo, leps_hi, leps_lo, FIRST: tl.constexpr, LOG: tl.constexpr,
                               HAS_EPS: tl.constexpr, ACCURATE: tl.constexpr, BLOCK_B: tl.constexpr,
                               BLOCK_N: tl.constexpr):
    """_gauge_correct between the S-side and R-side products of the per-half-iteration backward; state [2, B]
    carries (G, zsum) from step to step."""
    pid = tl.program_id(0)
    DT = z_ptr.dtype.element_ty
    rows = (pid * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    rmask = rows < B
    if FIRST:
        G = tl.zeros([BLOCK_B], dtype=DT)
        zsum = tl.zeros([BLOCK_B], dtype=DT)
    else:
        G = tl.load(state_ptr + rows, mask=rmask, other=0.0)
        zsum = tl.load(state_ptr + B + rows, mask=rmask, other=0.0)
    G, zsum = _gauge_correct(rows, rmask, G, zsum, FIRST, x_ptr, ld_x, a_ptr, r_ptr, z_ptr, ld_z, b_ptr, s_ptr,
                             gb_ptr, n, m, _scalar(eps_hi, eps_lo, DT), _scalar(leps_hi, leps_lo, DT), LOG, HAS_EPS,
                             ACCURATE, BLOCK_N)
    tl.store(state_ptr + rows, G, mask=rmask)
    tl.store(state_ptr + B + rows, zsum, mask=rmask)


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------
def _split(x: float) -> tuple[float, float]:
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


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _dot_precision(dtype: torch.dtype, precision: str) -> str:
    assert precision in FP32_PRECISIONS, precision
    return dot_precision(precision, dtype)


def _pad16(size: int) -> int:
    """size rounded up to a multiple of 16 elements: the leading dimension of the padded buffers of the tl.dot
    kernels (16-byte rows in float32 and float64, and a multiple Triton specialises on: divisibility by 16)."""
    return (int(size) + 15) // 16 * 16


def _padded_kernel_matrices(cost, n_pad, m_pad, reg_hi, reg_lo):
    """K = exp(-cost/reg) and K∘cost of a shared [n, m] cost as two zero-padded [n_pad, m_pad] buffers (one
    launch): the tl.dot kernels read them with leading dimension m_pad."""
    n, m = cost.shape
    buf = torch.empty(2, n_pad, m_pad, dtype=cost.dtype, device=cost.device)
    _sinkhorn_kpad_kernel[(triton.cdiv(n_pad * m_pad, ELEM_BLOCK),)](cost, buf[0], buf[1], n, m, m_pad, n_pad * m_pad,
                                                                     reg_hi, reg_lo, ACCURATE=_ACCURATE,
                                                                     BLOCK=ELEM_BLOCK)
    return buf[0], buf[1]


def _launch_forward(a, b, cost, reg, num_iters, eps, log_domain, keep_history, precision):
    assert a.dim() == 2 and b.dim() == 2 and cost.dim() in (2, 3) and num_iters >= 1, "validated by the caller"
    shared = cost.dim() == 2
    a, b, cost = a.contiguous(), b.contiguous(), cost.contiguous()
    B, n, m = a.shape[0], a.shape[1], b.shape[1]
    T = int(num_iters)
    dt, dev = a.dtype, a.device
    u = torch.empty(B, n, dtype=dt, device=dev)
    v = torch.empty(B, m, dtype=dt, device=dev)
    hist_r = torch.empty(T if keep_history else 0, B, n, dtype=dt, device=dev)
    hist_s = torch.empty(T if keep_history else 0, B, m, dtype=dt, device=dev)
    y = torch.empty(B if keep_history else 0, n, dtype=dt, device=dev)
    if B == 0:
        return torch.empty(0, dtype=dt, device=dev), u, v, hist_r, hist_s, y
    reg_hi, reg_lo = _split(reg)
    eps_hi, eps_lo = _split(eps)
    leps_hi, leps_lo = _split(math.log(eps)) if eps > 0 else (0.0, 0.0)
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
    _sinkhorn_fwd_init_kernel[(B,)](a, u_w, n, n_pad, LOG=log_domain, ACCURATE=_ACCURATE, BLOCK=INIT_BLOCK)

    if dot:
        prec = _dot_precision(dt, precision)
        BB, BN, BK, warps = DOT_CONFIG[(dt, prec)]
        kmat, kc = _padded_kernel_matrices(cost, n_pad, m_pad, reg_hi, reg_lo)
        n_part = triton.cdiv(n, BN)
        part = torch.empty(B, n_part, dtype=dt, device=dev)
        for t in range(T):
            final = t == T - 1
            _sinkhorn_fwd_dot_kernel[(triton.cdiv(B, BB), triton.cdiv(m, BN))](
                u_w, kmat, kc, b, v_w, v, slot(hist_s, t), dummy, dummy, B, n_pad, m, m_pad, m_pad, 1, 1,
                eps_hi, eps_lo, FINAL=False, STORE_HIST=keep_history, STORE_OUT=final and m_pad != m, PREC=prec,
                BLOCK_B=BB, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps)
            _sinkhorn_fwd_dot_kernel[(triton.cdiv(B, BB), n_part)](
                v_w, kmat, kc, a, u_w, u, slot(hist_r, t), y_out if final else dummy, part if final else dummy,
                B, m_pad, n, n_pad, 1, m_pad, n_part, eps_hi, eps_lo,
                FINAL=final, STORE_HIST=keep_history, STORE_OUT=final and n_pad != n, PREC=prec, BLOCK_B=BB,
                BLOCK_N=BN, BLOCK_K=BK, num_warps=warps)
    else:
        BN, BK, warps = ROWS_CONFIG[dt]
        if shared:  # log domain: L = -cost/reg built once
            mat = torch.empty(n, m, dtype=dt, device=dev)
            _sinkhorn_kmat_kernel[(triton.cdiv(n * m, ELEM_BLOCK),)](cost, mat, n * m, reg_hi, reg_lo,
                                                                     LOG=log_domain, ACCURATE=_ACCURATE,
                                                                     BLOCK=ELEM_BLOCK)
            stride_b = 0
        else:
            mat = cost
            stride_b = n * m
        n_part = triton.cdiv(n, BN)
        part = torch.empty(B, n_part, dtype=dt, device=dev)
        common = dict(LOG=log_domain, FROM_COST=not shared, HAS_EPS=eps > 0, ACCURATE=_ACCURATE, BLOCK_N=BN,
                      BLOCK_K=BK, num_warps=warps)
        for t in range(T):
            final = t == T - 1
            _sinkhorn_fwd_rows_kernel[(B, triton.cdiv(m, BN))](
                u, mat, cost, b, v, slot(hist_s, t), dummy, dummy,
                n, m, stride_b, m, 1, stride_b, 1, reg_hi, reg_lo, eps_hi, eps_lo, leps_hi, leps_lo,
                FINAL=False, STORE_HIST=keep_history, **common)
            _sinkhorn_fwd_rows_kernel[(B, n_part)](
                v, mat, cost, a, u, slot(hist_r, t), y_out if final else dummy, part if final else dummy,
                m, n, stride_b, 1, m, stride_b, n_part, reg_hi, reg_lo, eps_hi, eps_lo, leps_hi, leps_lo,
                FINAL=final, STORE_HIST=keep_history, **common)
    value = part.sum(1)
    return value, u, v, hist_r, hist_s, y


def _gauge_args(eps):
    """(correct, has_eps, eps_hi, eps_lo, log_eps_hi, log_eps_lo) for the gauge correction; eps None: none."""
    if eps is None:
        return False, False, 0.0, 0.0, 0.0, 0.0
    eps = float(eps)
    return (True, eps > 0) + _split(eps) + (_split(math.log(eps)) if eps > 0 else (0.0, 0.0))


def _launch_backward(grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain, precision, eps=None):
    assert hist_r.dim() == 3 and hist_r.shape[0] >= 1 and hist_s.shape[0] == hist_r.shape[0], "validated by the caller"
    shared = cost.dim() == 2
    a, b, cost = a.contiguous(), b.contiguous(), cost.contiguous()
    g, hist_r, hist_s, y = grad_value.contiguous(), hist_r.contiguous(), hist_s.contiguous(), y.contiguous()
    B, n, m = a.shape[0], a.shape[1], b.shape[1]
    T = hist_s.shape[0]
    dt, dev = a.dtype, a.device
    ga = torch.empty(B, n, dtype=dt, device=dev)
    gb = torch.empty(B, m, dtype=dt, device=dev)
    if B == 0:
        return ga, gb
    reg_hi, reg_lo = _split(reg)

    dot = shared and not log_domain
    n_pad, m_pad = (_pad16(n), _pad16(m)) if dot else (n, m)  # rows of the work buffers (padded for tl.dot)
    x = torch.empty(B, n_pad, dtype=dt, device=dev)  # work buffer: left operand of the S-side products
    zv = torch.empty(B, m_pad, dtype=dt, device=dev)  # work buffer: left operand of the R-side products
    _sinkhorn_bwd_init_kernel[(triton.cdiv(B * n_pad, ELEM_BLOCK),)](
        g, a, hist_r[T - 1], y, ga, x, B * n_pad, n, n_pad, LOG=log_domain, ACCURATE=_ACCURATE, BLOCK=ELEM_BLOCK)
    correct, has_eps, eps_hi, eps_lo, leps_hi, leps_lo = _gauge_args(eps)
    state = torch.empty(2, B, dtype=dt, device=dev) if correct else None

    def gauge(t):  # after the S-side product of step t (z_t in zv, gb), before the R-side one (which reads zv)
        if correct:
            _sinkhorn_bwd_gauge_kernel[(triton.cdiv(B, GAUGE_BLOCK_B),)](
                state, x, n_pad, a, hist_r[t], zv, m_pad, b, hist_s[t], gb, B, n, m, eps_hi, eps_lo, leps_hi,
                leps_lo, FIRST=t == T - 1, LOG=log_domain, HAS_EPS=has_eps, ACCURATE=_ACCURATE,
                BLOCK_B=GAUGE_BLOCK_B, BLOCK_N=GAUGE_BLOCK_N)

    if dot:
        prec = _dot_precision(dt, precision)
        BB, BN, BK, warps = DOT_CONFIG[(dt, prec)]
        kmat, kc = _padded_kernel_matrices(cost, n_pad, m_pad, reg_hi, reg_lo)
        for t in range(T - 1, -1, -1):
            _sinkhorn_bwd_dot_kernel[(triton.cdiv(B, BB), triton.cdiv(m, BN))](
                x, kmat, kc, a, hist_r[T - 1], g, hist_s[t], b, gb, zv, B, n, n_pad, m, m_pad, m_pad, 1,
                SIDE_S=True, FIRST=t == T - 1, WRITE_OUT=t > 0 or correct, PREC=prec, BLOCK_B=BB, BLOCK_N=BN,
                BLOCK_K=BK, num_warps=warps)
            gauge(t)
            if t > 0:
                _sinkhorn_bwd_dot_kernel[(triton.cdiv(B, BB), triton.cdiv(n, BN))](
                    zv, kmat, kc, a, hist_r[T - 1], g, hist_r[t - 1], a, ga, x, B, m, m_pad, n, n_pad, 1, m_pad,
                    SIDE_S=False, FIRST=False, WRITE_OUT=True, PREC=prec, BLOCK_B=BB, BLOCK_N=BN, BLOCK_K=BK,
                    num_warps=warps)
    else:
        BN, BK, warps = ROWS_CONFIG[dt]
        if shared:
            mat = torch.empty(n, m, dtype=dt, device=dev)
            _sinkhorn_kmat_kernel[(triton.cdiv(n * m, ELEM_BLOCK),)](cost, mat, n * m, reg_hi, reg_lo,
                                                                     LOG=log_domain, ACCURATE=_ACCURATE,
                                                                     BLOCK=ELEM_BLOCK)
            stride_b = 0
        else:
            mat = cost
            stride_b = n * m
        common = dict(LOG=log_domain, FROM_COST=not shared, ACCURATE=_ACCURATE, BLOCK_N=BN, BLOCK_K=BK,
                      num_warps=warps)
        for t in range(T - 1, -1, -1):
            _sinkhorn_bwd_rows_kernel[(B, triton.cdiv(m, BN))](
                x, a, hist_r[t], mat, cost, g, hist_s[t], b, gb, zv,
                n, m, stride_b, m, 1, stride_b, reg_hi, reg_lo,
                SIDE_S=True, FIRST=t == T - 1, WRITE_OUT=t > 0 or correct, **common)
            gauge(t)
            if t > 0:
                _sinkhorn_bwd_rows_kernel[(B, triton.cdiv(n, BN))](
                    zv, b, hist_s[t], mat, cost, g, hist_r[t - 1], a, ga, x,
                    m, n, stride_b, 1, m, stride_b, reg_hi, reg_lo,
                    SIDE_S=False, FIRST=False, WRITE_OUT=True, **common)
    return ga, gb


# ----------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------
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
    with _device_guard(a):
        if cost.dim() == 2 and onchip_fits(a.shape[1], b.shape[1], a.dtype):
            return _onchip_forward(a, b, cost, reg, num_iters, eps, log_domain, keep_history, precision)
        return _launch_forward(a, b, cost, reg, num_iters, eps, log_domain, keep_history, precision)


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
    with _device_guard(a):
        if cost.dim() == 2 and onchip_fits(a.shape[1], b.shape[1], a.dtype):  # the same rule as the forward's
            return _onchip_backward(grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain, precision, eps)
        return _launch_backward(grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain, precision, eps)


# ==========================================================================================================
# Single-launch ("on-chip") kernels for small C (docs/design.md section 3): n, m <= ONCHIP_MAX_C, shared cost
# ==========================================================================================================
# Output layout (the schema comment of wkd::sinkhorn in csrc/ops.cpp): hist_r [T, B, n] = r_1..r_T, hist_s [T, B, m] =
# s_1..s_T, y [B, n] = (K∘cost) v_T separately (logs in the log domain); without history [0, B, n], [0, B, m] and
# y [0, n]. Same recurrences, eps and log-domain handling as the per-half-iteration kernels above.
#
# Structure: one program owns BLOCK_B rows (grid = cdiv(B, BLOCK_B)) and runs every half-iteration of them in one
# launch; programs never communicate. Each half-iteration is the per-half-iteration kernels' product, looped over
# all output tiles [BLOCK_B, BLOCK_N] of the program's rows, the reduced dimension in BLOCK_K chunks (tl.dot in the
# scaling domain, an online max-shifted log-sum-exp over a [BLOCK_B, BLOCK_K, BLOCK_N] tile in the log domain),
# epilogues fused (eps, the division, history, y and the value in the last r-half). The scalings of the program's
# rows live in its own rows of the u / v outputs (backward: of two [B, n], [B, m] scratch buffers) -- written by one
# half-iteration, read chunk by chunk by the next after a CTA barrier (tl.debug_barrier: bar.sync orders the global
# accesses of the block); at C <= 256 they are a few KB per program and stay in L1/L2, as do the K (or cost) tiles,
# re-read by every half-iteration. Why not whole-row scalings in registers: Triton cannot slice a register tensor, so
# a product over the whole reduced dimension would be one tl.dot with K = n, which the FMA lowering ("ieee")
# materialises per thread (K x (rows + columns) per thread): 255 registers and ~1 KB of spills on sm_90 in a first
# version of these kernels; the tiled form keeps the per-thread operands at BLOCK_K x (rows + columns).
# K = exp(-cost/reg) (L = -cost/reg) is computed per tile from `cost`, or read (scaling domain with
# ONCHIP_K_BUFFER[dtype]) from a K buffer built by _sinkhorn_kmat_kernel (one extra launch per direction).
# Launches: forward 1 (2 with the K buffer), backward 1 (2): at most 4 for forward + backward. No host
# synchronisation, no data-dependent host branching (graph-capturable).
# Size rule of the dispatch in sinkhorn_forward / sinkhorn_backward: a shared cost with n, m <= ONCHIP_MAX_C runs the
# single-launch kernels (the tests and the compile matrix set it to 0 to drive the per-half-iteration kernels).
ONCHIP_MAX_C = 256

# Launch configuration per dtype and domain: (BLOCK_B, BLOCK_N, BLOCK_K, num_warps). UNTUNED: sized from the sm_90
# ptxas register / spill reports only (measured when these kernels were written; with
# these values, sm_90: forward 96-230 registers, backward 128-234, spills 0-32 bytes, over all 36 variants); no GPU
# has timed these kernels yet -- tune here. Scaling domain: BLOCK_B >= 16 multiplies with tl.dot (powers of two
# >= 16), BLOCK_B < 16 with a broadcast multiply-sum over a [BLOCK_B, BLOCK_K, BLOCK_N] register tile (_onchip_mac;
# float32 FMA accuracy, the precision argument then has no effect); log domain: powers of two (register tile
# BLOCK_B x BLOCK_K x BLOCK_N). Occupancy: a grid of B / BLOCK_B programs, so BLOCK_B = 16 gives 16 programs at
# B = 256, a fraction of an H100/H200's 132 SMs; BLOCK_B = 2 gives 128. Which wins (fewer, denser programs or more,
# sparser ones) is for the GPU run to measure: bench/gpu_quick.py --sweep-onchip times ONCHIP_CONFIG_CANDIDATES.
ONCHIP_CONFIG = {
    torch.float32: {"scaling": (16, 32, 16, 4), "log": (4, 32, 16, 4)},
    torch.float64: {"scaling": (16, 32, 16, 4), "log": (4, 32, 16, 4)},
}
# The scaling-domain configurations the sweep times (tl.dot for BLOCK_B >= 16, broadcast products below); every one
# compiles for sm_80 / sm_90 (the compile matrix drives each) and is tested against the reference (test_sinkhorn.py).
ONCHIP_CONFIG_CANDIDATES = ((16, 32, 16, 4), (16, 64, 16, 4), (32, 32, 16, 4), (8, 32, 16, 4), (4, 32, 16, 4),
                            (2, 64, 16, 4), (1, 128, 16, 4))
# Scaling domain: read K from a buffer built once per call (True, one extra launch per direction) instead of
# exp(-cost/reg) per tile (False). Untuned as well.
ONCHIP_K_BUFFER = {torch.float32: False, torch.float64: False}


@triton.jit
def _onchip_tile(cost_ptr, kmat_ptr, moff, mmask, reg, LOG: tl.constexpr, FROM_COST: tl.constexpr,
                 WANT_COST: tl.constexpr, ACCURATE: tl.constexpr):
    """A [BLOCK_K, BLOCK_N] tile of L = -cost/reg (LOG; -inf outside the mask) or K (0 outside), and the cost tile
    (when WANT_COST or computed from it; else the K tile again, unused)."""
    if LOG or FROM_COST or WANT_COST:
        c = tl.load(cost_ptr + moff, mask=mmask, other=0.0)
    if LOG or FROM_COST:
        if c.dtype == tl.float32:
            neg = -tl.math.div_rn(c, reg)
        else:
            neg = -(c / reg)
        if LOG:
            tile = tl.where(mmask, neg, float("-inf"))
        else:
            if ACCURATE:
                tile = libdevice.exp(neg)
            else:
                tile = tl.exp(neg)
            tile = tl.where(mmask, tile, 0.0)
    else:
        tile = tl.load(kmat_ptr + moff, mask=mmask, other=0.0)
    if not (LOG or FROM_COST or WANT_COST):
        c = tile
    return tile, c


@triton.jit
def _onchip_mac(x, tile, acc, PREC: tl.constexpr, DOT: tl.constexpr):
    """acc + x @ tile for x [BLOCK_B, BLOCK_K], tile [BLOCK_K, BLOCK_N]: tl.dot (DOT: BLOCK_B >= 16, tl.dot's minimum)
    or a broadcast multiply and sum over a [BLOCK_B, BLOCK_K, BLOCK_N] register tile (any BLOCK_B; float32 FMA
    accuracy whatever PREC): fewer rows per program, so more programs for a given B."""
    if DOT:
        out = tl.dot(x, tile, acc, input_precision=PREC, out_dtype=acc.dtype)
    else:
        out = acc + tl.sum(x[:, :, None] * tile[None, :, :], axis=1)
    return out


@triton.jit
def _sinkhorn_fwd_onchip_kernel(
    a_ptr, b_ptr, cost_ptr, kmat_ptr,  # a [B, n], b [B, m], cost [n, m], K [n, m] (scaling, not FROM_COST)
    value_ptr, u_ptr, v_ptr,  # out: value [B], u [B, n], v [B, m] (log u, log v when LOG); u, v: the live scalings
    hr_ptr, hs_ptr, y_ptr,  # out (STORE_HIST): hist_r [T, B, n], hist_s [T, B, m], y [B, n]
    B, n, m, T, reg_hi, reg_lo, eps_hi, eps_lo, leps_hi, leps_lo,
    LOG: tl.constexpr, FROM_COST: tl.constexpr, HAS_EPS: tl.constexpr, STORE_HIST: tl.constexpr,
    ACCURATE: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """All num_iters Sinkhorn iterations and the value for BLOCK_B rows (shared cost), see the section comment."""
    pid = tl.program_id(0)
    DT = a_ptr.dtype.element_ty
    rows = (pid * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    rmask = rows < B
    reg = _scalar(reg_hi, reg_lo, DT)
    eps = _scalar(eps_hi, eps_lo, DT)
    log_eps = _scalar(leps_hi, leps_lo, DT)
    # u0 = 1/|supp a| on supp(a), 0 elsewhere (log: -log|supp a|, -inf)
    cnt = tl.zeros([BLOCK_B], dtype=tl.int32)
    for k0 in range(0, n, BLOCK_N):
        ci = (k0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        omask = rmask[:, None] & (ci < n)[None, :]
        a = tl.load(a_ptr + rows[:, None] * n + ci[None, :], mask=omask, other=0.0)
        cnt += tl.sum((a > 0).to(tl.int32), axis=1)
    total = cnt.to(DT)
    if LOG:
        val0 = -_safe_log(total, ACCURATE)
        zero = float("-inf")
    else:
        val0 = _div(tl.full([BLOCK_B], 1.0, DT), tl.where(total > 0, total, 1.0))
        zero = 0.0
    for k0 in range(0, n, BLOCK_N):
        ci = (k0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        omask = rmask[:, None] & (ci < n)[None, :]
        aoff = rows[:, None] * n + ci[None, :]
        a = tl.load(a_ptr + aoff, mask=omask, other=0.0)
        tl.store(u_ptr + aoff, tl.where(a > 0, val0[:, None], zero).to(DT), mask=omask)
    tl.debug_barrier()
    value = tl.zeros([BLOCK_B], dtype=DT)
    hs_t = hs_ptr  # history slot t, advanced by B * m (B * n) per iteration
    hr_t = hr_ptr
    for t in range(0, T):
        # ---- s-half: s = K^T u + eps, v = b / s; log: log s = LSE_i(log u_i + L_ij) (+) log eps, log v = log b - log s
        for j0 in range(0, m, BLOCK_N):
            cj = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            jmask = cj < m
            acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=DT)
            mx = tl.full([BLOCK_B, BLOCK_N], float("-inf"), DT)
            for k0 in range(0, n, BLOCK_K):
                ck = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
                kmask = ck < n
                lmask = rmask[:, None] & kmask[None, :]
                mmask = kmask[:, None] & jmask[None, :]
                tile, c = _onchip_tile(cost_ptr, kmat_ptr, ck[:, None] * m + cj[None, :], mmask, reg, LOG, FROM_COST,
                                       False, ACCURATE)
                if LOG:
                    x = tl.load(u_ptr + rows[:, None] * n + ck[None, :], mask=lmask, other=float("-inf"))
                    val = x[:, :, None] + tile[None, :, :]  # [BLOCK_B, BLOCK_K, BLOCK_N]
                    new_mx = tl.maximum(mx, tl.max(val, axis=1))
                    ref = tl.where(new_mx == float("-inf"), 0.0, new_mx)
                    alpha = _exp(mx - ref, ACCURATE)  # 0 while nothing finite was seen
                    acc = acc * alpha + tl.sum(tl.exp(val - ref[:, None, :]), axis=1)
                    mx = new_mx
                else:
                    x = tl.load(u_ptr + rows[:, None] * n + ck[None, :], mask=lmask, other=0.0)
                    acc = _onchip_mac(x, tile, acc, PREC, DOT)
            omask = rmask[:, None] & jmask[None, :]
            ooff = rows[:, None] * m + cj[None, :]
            mass = tl.load(b_ptr + ooff, mask=omask, other=0.0)
            den, scal = _half_update(acc, mx, mass, omask, eps, log_eps, LOG, HAS_EPS, ACCURATE)
            tl.store(v_ptr + ooff, scal, mask=omask)
            if STORE_HIST:
                tl.store(hs_t + ooff, den, mask=omask)
        tl.debug_barrier()
        # ---- r-half: r = K v + eps, u = a / r; in the last iteration also y = (K∘C) v and the value sum u y
        last = t == T - 1
        for i0 in range(0, n, BLOCK_N):
            ci = (i0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            imask = ci < n
            acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=DT)
            acc_y = tl.zeros([BLOCK_B, BLOCK_N], dtype=DT)
            mx = tl.full([BLOCK_B, BLOCK_N], float("-inf"), DT)
            for k0 in range(0, m, BLOCK_K):
                ck = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
                kmask = ck < m
                lmask = rmask[:, None] & kmask[None, :]
                mmask = kmask[:, None] & imask[None, :]
                moff = ci[None, :] * m + ck[:, None]  # K^T tile: [BLOCK_K (j), BLOCK_N (i)]
                if last:
                    tile, c = _onchip_tile(cost_ptr, kmat_ptr, moff, mmask, reg, LOG, FROM_COST, True, ACCURATE)
                else:
                    tile, c = _onchip_tile(cost_ptr, kmat_ptr, moff, mmask, reg, LOG, FROM_COST, False, ACCURATE)
                if LOG:
                    x = tl.load(v_ptr + rows[:, None] * m + ck[None, :], mask=lmask, other=float("-inf"))
                    val = x[:, :, None] + tile[None, :, :]
                    new_mx = tl.maximum(mx, tl.max(val, axis=1))
                    ref = tl.where(new_mx == float("-inf"), 0.0, new_mx)
                    alpha = _exp(mx - ref, ACCURATE)
                    e = tl.exp(val - ref[:, None, :])
                    acc = acc * alpha + tl.sum(e, axis=1)
                    if last:
                        acc_y = acc_y * alpha + tl.sum(c[None, :, :] * e, axis=1)
                    mx = new_mx
                else:
                    x = tl.load(v_ptr + rows[:, None] * m + ck[None, :], mask=lmask, other=0.0)
                    acc = _onchip_mac(x, tile, acc, PREC, DOT)
                    if last:
                        acc_y = _onchip_mac(x, tile * c, acc_y, PREC, DOT)
            omask = rmask[:, None] & imask[None, :]
            ooff = rows[:, None] * n + ci[None, :]
            mass = tl.load(a_ptr + ooff, mask=omask, other=0.0)
            den, scal = _half_update(acc, mx, mass, omask, eps, log_eps, LOG, HAS_EPS, ACCURATE)
            tl.store(u_ptr + ooff, scal, mask=omask)
            if STORE_HIST:
                tl.store(hr_t + ooff, den, mask=omask)
            if last:
                yv, term = _value_terms(scal, acc_y, mx, LOG, ACCURATE)
                if STORE_HIST:
                    tl.store(y_ptr + ooff, yv, mask=omask)
                value += tl.sum(tl.where(omask, term, 0.0), axis=1)
        tl.debug_barrier()
        hs_t += B * m
        hr_t += B * n
    tl.store(value_ptr + rows, value, mask=rmask)


@triton.jit
def _sinkhorn_bwd_onchip_kernel(
    g_ptr, a_ptr, b_ptr, cost_ptr, kmat_ptr,  # grad_value [B], a [B, n], b [B, m], cost [n, m], K (not FROM_COST)
    hr_ptr, hs_ptr, y_ptr,  # the forward's hist_r [T, B, n], hist_s [T, B, m], y [B, n] (logs when LOG)
    ga_ptr, gb_ptr,  # out: grad_a [B, n], grad_b [B, m] (accumulated in place)
    xs_ptr, zs_ptr,  # scratch [B, n], [B, m]: the left operands w_t u_t and z_t v_t (log: w_t and z_t)
    B, n, m, T, last_r, last_s, reg_hi, reg_lo,  # last_r = (T - 1) B n, last_s = (T - 1) B m (host ints, int64 if big)
    eps_hi, eps_lo, leps_hi, leps_lo,  # the forward's eps and log eps (gauge correction)
    LOG: tl.constexpr, FROM_COST: tl.constexpr, ACCURATE: tl.constexpr, PREC: tl.constexpr, DOT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GAUGE: tl.constexpr,
    HAS_EPS: tl.constexpr,
):
    """The whole reverse sweep of _launch_backward (same recurrences, epilogues and gauge correction) for BLOCK_B
    rows."""
    pid = tl.program_id(0)
    DT = a_ptr.dtype.element_ty
    rows = (pid * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    rmask = rows < B
    reg = _scalar(reg_hi, reg_lo, DT)
    eps = _scalar(eps_hi, eps_lo, DT)
    log_eps = _scalar(leps_hi, leps_lo, DT)
    G = tl.zeros([BLOCK_B], dtype=DT)
    zsum = tl.zeros([BLOCK_B], dtype=DT)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)[:, None]
    hr_t = hr_ptr + last_r  # r_{t+1} = slot t, from t = T - 1 down
    hs_t = hs_ptr + last_s
    # w_T = g y / r_T; ga = w_T; x = w_T u_T (log: w_T = g exp(log y - log r_T), 0 where y = 0; x = w_T)
    for i0 in range(0, n, BLOCK_N):
        ci = (i0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        omask = rmask[:, None] & (ci < n)[None, :]
        ooff = rows[:, None] * n + ci[None, :]
        if LOG:
            r = tl.load(hr_t + ooff, mask=omask, other=0.0)
            yv = tl.load(y_ptr + ooff, mask=omask, other=float("-inf"))
            w = tl.where(yv == float("-inf"), 0.0, g * _exp(yv - r, ACCURATE))
            x = w
        else:
            r = tl.load(hr_t + ooff, mask=omask, other=1.0)
            yv = tl.load(y_ptr + ooff, mask=omask, other=0.0)
            a = tl.load(a_ptr + ooff, mask=omask, other=0.0)
            w = _div(g * yv, r)
            x = w * _div(a, r)
        tl.store(ga_ptr + ooff, w, mask=omask)
        tl.store(xs_ptr + ooff, x, mask=omask)
    tl.debug_barrier()
    for step in range(0, T):  # t = T - 1 - step: S side (s_{t+1}, left u_{t+1}), then if t > 0 R side (r_t)
        first = step == 0
        more = step < T - 1
        # ---- S side: z = ((g (K∘C)^T u_T if first) - K^T x) / s, gb (+)= z, zs = z v (log: coefficient z)
        for j0 in range(0, m, BLOCK_N):
            cj = (j0 + tl.arange(0, BLOCK_N)).to(tl.int64)
            jmask = cj < m
            acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=DT)
            acc2 = tl.zeros([BLOCK_B, BLOCK_N], dtype=DT)
            mx = tl.full([BLOCK_B, BLOCK_N], float("-inf"), DT)
            for k0 in range(0, n, BLOCK_K):
                ck = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
                kmask = ck < n
                lmask = rmask[:, None] & kmask[None, :]
                loff = rows[:, None] * n + ck[None, :]
                mmask = kmask[:, None] & jmask[None, :]
                moff = ck[:, None] * m + cj[None, :]
                if first:
                    tile, c = _onchip_tile(cost_ptr, kmat_ptr, moff, mmask, reg, LOG, FROM_COST, True, ACCURATE)
                else:
                    tile, c = _onchip_tile(cost_ptr, kmat_ptr, moff, mmask, reg, LOG, FROM_COST, False, ACCURATE)
                coef = tl.load(xs_ptr + loff, mask=lmask, other=0.0)
                lm = tl.load(a_ptr + loff, mask=lmask, other=0.0)
                if LOG:
                    lh = tl.load(hr_t + loff, mask=lmask, other=0.0)
                    pos = lmask & (lm > 0)
                    p = tl.where(pos, _safe_log(lm, ACCURATE) - lh, float("-inf"))  # log u_{t+1}
                    val = p[:, :, None] + tile[None, :, :]
                    new_mx = tl.maximum(mx, tl.max(val, axis=1))
                    ref = tl.where(new_mx == float("-inf"), 0.0, new_mx)
                    alpha = _exp(mx - ref, ACCURATE)
                    e = tl.exp(val - ref[:, None, :])
                    acc = acc * alpha + tl.sum(coef[:, :, None] * e, axis=1)
                    if first:
                        acc2 = acc2 * alpha + tl.sum(c[None, :, :] * e, axis=1)
                    mx = new_mx
                else:
                    acc = _onchip_mac(coef, tile, acc, PREC, DOT)
                    if first:
                        ut = _div(lm, tl.load(hr_t + loff, mask=lmask, other=1.0))  # u_T
                        acc2 = _onchip_mac(ut, tile * c, acc2, PREC, DOT)
            omask = rmask[:, None] & jmask[None, :]
            ooff = rows[:, None] * m + cj[None, :]
            if LOG:
                den = tl.load(hs_t + ooff, mask=omask, other=0.0)
                f = _exp(mx - den, ACCURATE)
                prod = tl.where(acc == 0, 0.0, f * acc)
                if first:
                    z = tl.where(acc2 == 0, 0.0, g * f * acc2) - prod
                else:
                    z = -prod
                out = z
            else:
                den = tl.load(hs_t + ooff, mask=omask, other=1.0)
                mass = tl.load(b_ptr + ooff, mask=omask, other=0.0)
                if first:
                    z = _div(g * acc2 - acc, den)
                else:
                    z = _div(-acc, den)
                out = z * _div(mass, den)
            if first:
                grad = z
            else:
                grad = tl.load(gb_ptr + ooff, mask=omask, other=0.0) + z
            tl.store(gb_ptr + ooff, grad, mask=omask)
            if more or GAUGE:
                tl.store(zs_ptr + ooff, out, mask=omask)
        tl.debug_barrier()
        if GAUGE:
            G, zsum = _gauge_correct(rows, rmask, G, zsum, first, xs_ptr, n, a_ptr, hr_t, zs_ptr, m, b_ptr, hs_t,
                                     gb_ptr, n, m, eps, log_eps, LOG, HAS_EPS, ACCURATE, BLOCK_N)
            tl.debug_barrier()
        # ---- R side (t > 0): w = -K(z v) / r_t, ga += w, xs = w u_t (log: coefficient w)
        if more:
            hr_p = hr_t - B * n  # r_t
            for i0 in range(0, n, BLOCK_N):
                ci = (i0 + tl.arange(0, BLOCK_N)).to(tl.int64)
                imask = ci < n
                acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=DT)
                mx = tl.full([BLOCK_B, BLOCK_N], float("-inf"), DT)
                for k0 in range(0, m, BLOCK_K):
                    ck = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
                    kmask = ck < m
                    lmask = rmask[:, None] & kmask[None, :]
                    loff = rows[:, None] * m + ck[None, :]
                    mmask = kmask[:, None] & imask[None, :]
                    tile, c = _onchip_tile(cost_ptr, kmat_ptr, ci[None, :] * m + ck[:, None], mmask, reg, LOG,
                                           FROM_COST, False, ACCURATE)
                    coef = tl.load(zs_ptr + loff, mask=lmask, other=0.0)
                    if LOG:
                        lm = tl.load(b_ptr + loff, mask=lmask, other=0.0)
                        lh = tl.load(hs_t + loff, mask=lmask, other=0.0)
                        pos = lmask & (lm > 0)
                        p = tl.where(pos, _safe_log(lm, ACCURATE) - lh, float("-inf"))  # log v_{t+1}
                        val = p[:, :, None] + tile[None, :, :]
                        new_mx = tl.maximum(mx, tl.max(val, axis=1))
                        ref = tl.where(new_mx == float("-inf"), 0.0, new_mx)
                        alpha = _exp(mx - ref, ACCURATE)
                        acc = acc * alpha + tl.sum(coef[:, :, None] * tl.exp(val - ref[:, None, :]), axis=1)
                        mx = new_mx
                    else:
                        acc = _onchip_mac(coef, tile, acc, PREC, DOT)
                omask = rmask[:, None] & imask[None, :]
                ooff = rows[:, None] * n + ci[None, :]
                if LOG:
                    den = tl.load(hr_p + ooff, mask=omask, other=0.0)
                    w = tl.where(acc == 0, 0.0, -_exp(mx - den, ACCURATE) * acc)
                    x = w
                else:
                    den = tl.load(hr_p + ooff, mask=omask, other=1.0)
                    mass = tl.load(a_ptr + ooff, mask=omask, other=0.0)
                    w = -_div(acc, den)
                    x = w * _div(mass, den)
                tl.store(ga_ptr + ooff, tl.load(ga_ptr + ooff, mask=omask, other=0.0) + w, mask=omask)
                tl.store(xs_ptr + ooff, x, mask=omask)
            tl.debug_barrier()
        hr_t -= B * n
        hs_t -= B * m


def onchip_fits(n: int, m: int, dtype: torch.dtype) -> bool:
    """Size rule of the single-launch kernels (shared cost only; the caller checks that): 1 <= n, m <= 256 and a
    float32 / float64 dtype. Larger C uses the per-half-iteration kernels."""
    return dtype in ONCHIP_CONFIG and 1 <= int(n) <= ONCHIP_MAX_C and 1 <= int(m) <= ONCHIP_MAX_C


def _onchip_config(dtype: torch.dtype, log_domain: bool):
    """(BLOCK_B, BLOCK_N, BLOCK_K, num_warps) from ONCHIP_CONFIG."""
    return ONCHIP_CONFIG[dtype]["log" if log_domain else "scaling"]


def _onchip_dot(log_domain: bool, block_b: int) -> bool:
    """The scaling domain's products: tl.dot for BLOCK_B >= 16, else the broadcast multiply-sum (_onchip_mac)."""
    return not log_domain and int(block_b) >= 16


def _onchip_prec(precision: str, dtype: torch.dtype, log_domain: bool, block_b: int) -> str:
    """tl.dot input precision: the requested one for float32 in the scaling domain with tl.dot, else "ieee" (float64;
    the log domain and the broadcast products have no tl.dot: one compiled variant instead of three)."""
    return str(precision) if dtype == torch.float32 and _onchip_dot(log_domain, block_b) else "ieee"


def _onchip_kmat(cost, reg_hi, reg_lo, log_domain, dtype):
    """The K buffer (scaling domain with ONCHIP_K_BUFFER) built by one launch, or None (K computed per tile)."""
    if log_domain or not ONCHIP_K_BUFFER[dtype]:
        return None
    n, m = cost.shape
    kmat = torch.empty(n, m, dtype=cost.dtype, device=cost.device)
    _sinkhorn_kmat_kernel[(triton.cdiv(n * m, ELEM_BLOCK),)](cost, kmat, n * m, reg_hi, reg_lo, LOG=False,
                                                             ACCURATE=_ACCURATE, BLOCK=ELEM_BLOCK)
    return kmat


def _onchip_forward(a, b, cost, reg, num_iters, eps, log_domain, keep_history, precision):
    a, b, cost = a.contiguous(), b.contiguous(), cost.contiguous()
    B, n, m = a.shape[0], a.shape[1], b.shape[1]
    T = int(num_iters)
    dt, dev = a.dtype, a.device
    value = torch.empty(B, dtype=dt, device=dev)
    u = torch.empty(B, n, dtype=dt, device=dev)
    v = torch.empty(B, m, dtype=dt, device=dev)
    hist_r = torch.empty(T if keep_history else 0, B, n, dtype=dt, device=dev)
    hist_s = torch.empty(T if keep_history else 0, B, m, dtype=dt, device=dev)
    y = torch.empty(B if keep_history else 0, n, dtype=dt, device=dev)
    if B == 0:
        return value, u, v, hist_r, hist_s, y
    bb, bn, bk, warps = _onchip_config(dt, log_domain)
    reg_hi, reg_lo = _split(reg)
    eps_hi, eps_lo = _split(eps)
    leps_hi, leps_lo = _split(math.log(eps)) if eps > 0 else (0.0, 0.0)
    kmat = _onchip_kmat(cost, reg_hi, reg_lo, log_domain, dt)
    dummy = torch.empty(1, dtype=dt, device=dev)  # never-written placeholder for disabled outputs
    _sinkhorn_fwd_onchip_kernel[(triton.cdiv(B, bb),)](
        a, b, cost, cost if kmat is None else kmat, value, u, v,
        hist_r if keep_history else dummy, hist_s if keep_history else dummy, y if keep_history else dummy,
        B, n, m, T, reg_hi, reg_lo, eps_hi, eps_lo, leps_hi, leps_lo,
        LOG=bool(log_domain), FROM_COST=kmat is None, HAS_EPS=bool(log_domain) and eps > 0,
        STORE_HIST=bool(keep_history), ACCURATE=_ACCURATE, PREC=_onchip_prec(precision, dt, log_domain, bb),
        DOT=_onchip_dot(log_domain, bb), BLOCK_B=bb, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return value, u, v, hist_r, hist_s, y


def _onchip_backward(grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain, precision, eps=None):
    a, b, cost = a.contiguous(), b.contiguous(), cost.contiguous()
    g, hist_r, hist_s, y = grad_value.contiguous(), hist_r.contiguous(), hist_s.contiguous(), y.contiguous()
    B, n, m = a.shape[0], a.shape[1], b.shape[1]
    T = hist_s.shape[0]
    dt, dev = a.dtype, a.device
    ga = torch.empty(B, n, dtype=dt, device=dev)
    gb = torch.empty(B, m, dtype=dt, device=dev)
    if B == 0:
        return ga, gb
    bb, bn, bk, warps = _onchip_config(dt, log_domain)
    reg_hi, reg_lo = _split(reg)
    correct, has_eps, eps_hi, eps_lo, leps_hi, leps_lo = _gauge_args(eps)
    kmat = _onchip_kmat(cost, reg_hi, reg_lo, log_domain, dt)
    xs = torch.empty(B, n, dtype=dt, device=dev)  # scratch: the left operands of the S-side / R-side products
    zs = torch.empty(B, m, dtype=dt, device=dev)
    _sinkhorn_bwd_onchip_kernel[(triton.cdiv(B, bb),)](
        g, a, b, cost, cost if kmat is None else kmat, hist_r, hist_s, y, ga, gb, xs, zs, B, n, m, T, (T - 1) * B * n,
        (T - 1) * B * m, reg_hi, reg_lo, eps_hi, eps_lo, leps_hi, leps_lo,
        LOG=bool(log_domain), FROM_COST=kmat is None, ACCURATE=_ACCURATE,
        PREC=_onchip_prec(precision, dt, log_domain, bb), DOT=_onchip_dot(log_domain, bb), BLOCK_B=bb, BLOCK_N=bn,
        BLOCK_K=bk, GAUGE=correct, HAS_EPS=has_eps, num_warps=warps)
    return ga, gb


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
        return _onchip_forward(a, b, cost, reg, num_iters, eps, log_domain, keep_history, precision)


@explain_compile_errors("wkd.sinkhorn (Triton sinkhorn_backward_onchip)")
def sinkhorn_backward_onchip(grad_value: torch.Tensor, a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor,
                             hist_r: torch.Tensor, hist_s: torch.Tensor, y: torch.Tensor, reg: float,
                             log_domain: bool = False, precision: str = "ieee", eps: float | None = None):
    """Single-launch Triton backward (exact gradient of value w.r.t. a and b through the fixed loop) from the
    history of :func:`sinkhorn_forward_onchip` (new layout, keep_history=True), with the gauge correction when
    ``eps`` (the forward's) is given (see :func:`sinkhorn_backward`). Returns ``(grad_a, grad_b)``.
    One launch (two with ONCHIP_K_BUFFER), no host synchronisation, extra memory two [B, n], [B, m] scratch buffers."""
    with _device_guard(a):
        return _onchip_backward(grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain, precision, eps)


__all__ += ["sinkhorn_forward_onchip", "sinkhorn_backward_onchip", "onchip_fits", "ONCHIP_CONFIG",
            "ONCHIP_CONFIG_CANDIDATES", "ONCHIP_K_BUFFER", "ONCHIP_MAX_C"]
