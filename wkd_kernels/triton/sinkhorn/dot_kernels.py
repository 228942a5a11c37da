"""tl.dot kernels of the per-half-iteration Sinkhorn (shared cost, scaling domain, n or m > ONCHIP_MAX_C).

``sinkhorn_kpad_kernel`` builds K = exp(-cost/reg) and K∘cost once per call into zero-padded [n_pad, m_pad] buffers
(n, m rounded up to 16); each forward half-iteration is one ``sinkhorn_fwd_dot_kernel`` launch (a tiled product of
the scaling work buffer with K or K^T, epilogue fused), each backward product one ``sinkhorn_bwd_dot_kernel``
launch. Why the padding: the package docstring (wkd_kernels/triton/sinkhorn/__init__.py).
"""
import triton
import triton.language as tl

from ._device import bwd_epilogue_scaling, div_rn, exp, host_scalar


@triton.jit
def sinkhorn_kpad_kernel(cost_ptr, k_ptr, kc_ptr, n, m, ld, numel, reg_hi, reg_lo, ACCURATE: tl.constexpr,
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
    reg = host_scalar(reg_hi, reg_lo, c.dtype)
    k = tl.where(valid, exp(-div_rn(c, reg), ACCURATE), 0.0)
    tl.store(k_ptr + offs, k, mask=mask)
    tl.store(kc_ptr + offs, k * c, mask=mask)


@triton.jit
def _output_tile(B, ND, NP, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's BLOCK_B rows and BLOCK_N columns of a product's [B, NP] output (int64) and their masks.
    Returns (rows, cols, rows < B, cols < ND, cols < NP)."""
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    return rows, cols, rows < B, cols < ND, cols < NP


@triton.jit
def _operand_tiles(x_ptr, mat_ptr, rows, rmask, cols, pmask, k0, KP, stride_mk, stride_mn, BLOCK_K: tl.constexpr):
    """The k-chunk [k0, k0 + BLOCK_K) of a product: the left operand x [BLOCK_B, BLOCK_K] from the work buffer (row
    stride KP) and the tile [BLOCK_K, BLOCK_N] of the matrix read through (stride_mk, stride_mn), both 0 outside.
    Returns (ks, x, tile, moff, mmask): the chunk's indices, the operands, and the matrix tile's offsets and mask (for
    K∘cost, same layout)."""
    ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
    kmask = ks < KP
    x = tl.load(x_ptr + rows[:, None] * KP + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
    moff = ks[:, None] * stride_mk + cols[None, :] * stride_mn
    mmask = kmask[:, None] & pmask[None, :]
    tile = tl.load(mat_ptr + moff, mask=mmask, other=0.0)
    return ks, x, tile, moff, mmask


@triton.jit
def sinkhorn_fwd_dot_kernel(
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
    DT = x_ptr.dtype.element_ty
    rows, cols, rmask, cmask, pmask = _output_tile(B, ND, NP, BLOCK_B, BLOCK_N)
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=DT)
    acc_y = tl.zeros([BLOCK_B, BLOCK_N], dtype=DT)
    for k0 in range(0, KP, BLOCK_K):
        _, x, kt, moff, mmask = _operand_tiles(x_ptr, kmat_ptr, rows, rmask, cols, pmask, k0, KP, stride_mk,
                                               stride_mn, BLOCK_K)
        acc = tl.dot(x, kt, acc, input_precision=PREC, out_dtype=DT)
        if FINAL:
            kct = tl.load(kc_ptr + moff, mask=mmask, other=0.0)
            acc_y = tl.dot(x, kct, acc_y, input_precision=PREC, out_dtype=DT)
    omask = rmask[:, None] & cmask[None, :]
    ooff = rows[:, None] * ND + cols[None, :]
    den = tl.where(omask, acc + host_scalar(eps_hi, eps_lo, DT), 1.0)  # masked lanes: no 0/0
    mass = tl.load(mass_ptr + ooff, mask=omask, other=0.0)
    scal = div_rn(mass, den)  # 0 in the padding columns (mass 0)
    tl.store(scal_ptr + rows[:, None] * NP + cols[None, :], scal, mask=rmask[:, None] & pmask[None, :])
    if STORE_OUT:
        tl.store(out_ptr + ooff, scal, mask=omask)
    if STORE_HIST:
        tl.store(hist_ptr + ooff, den, mask=omask)
    if FINAL:
        if STORE_HIST:
            tl.store(y_ptr + ooff, acc_y, mask=omask)
        part = tl.sum(tl.where(omask, scal * acc_y, 0.0), axis=1)
        tl.store(part_ptr + rows * n_part + tl.program_id(1), part, mask=rmask)


@triton.jit
def sinkhorn_bwd_dot_kernel(
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
    and output sizes; KP, NP: rounded up to 16 (padded leading dimensions, as in sinkhorn_fwd_dot_kernel)."""
    DT = x_ptr.dtype.element_ty
    rows, cols, rmask, cmask, pmask = _output_tile(B, ND, NP, BLOCK_B, BLOCK_N)
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=DT)
    acc2 = tl.zeros([BLOCK_B, BLOCK_N], dtype=DT)
    for k0 in range(0, KP, BLOCK_K):
        ks, x, kt, moff, mmask = _operand_tiles(x_ptr, kmat_ptr, rows, rmask, cols, pmask, k0, KP, stride_mk,
                                                stride_mn, BLOCK_K)
        acc = tl.dot(x, kt, acc, input_precision=PREC, out_dtype=DT)
        if FIRST:
            loff = rows[:, None] * KD + ks[None, :]
            lmask = rmask[:, None] & (ks < KD)[None, :]
            ut = div_rn(tl.load(a_ptr + loff, mask=lmask, other=0.0), tl.load(rT_ptr + loff, mask=lmask, other=1.0))
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
    grad, out = bwd_epilogue_scaling(acc, acc2, g, den, mass, grad_old, SIDE_S, FIRST)
    tl.store(grad_ptr + ooff, grad, mask=omask)
    if WRITE_OUT:  # 0 in the padding columns (mass 0)
        tl.store(out_ptr + rows[:, None] * NP + cols[None, :], out, mask=rmask[:, None] & pmask[None, :])
