"""The small kernels that both per-half-iteration families (tl.dot and row-wise) launch: the forward's initial
scaling u0, the backward's initialisation from the last history slot, and the backward's gauge correction between
its S-side and R-side products.
"""
import triton
import triton.language as tl

from ._device import div_rn, exp, gauge_correct, host_scalar, safe_log


@triton.jit
def sinkhorn_fwd_init_kernel(a_ptr, u_ptr, n, ld_u, LOG: tl.constexpr, ACCURATE: tl.constexpr,
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
        val = -safe_log(total, ACCURATE)
        zero = float("-inf")
    else:
        val = div_rn(tl.full([], 1.0, DT), total)
        zero = 0.0
    for k0 in range(0, ld_u, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mask = offs < n
        a = tl.load(a_ptr + base + offs, mask=mask, other=0.0)
        u0 = tl.where(a > 0, val, zero)
        tl.store(u_ptr + row * ld_u + offs, tl.where(mask, u0, 0.0).to(DT), mask=offs < ld_u)


@triton.jit
def sinkhorn_bwd_init_kernel(g_ptr, a_ptr, rT_ptr, y_ptr, ga_ptr, x_ptr, numel, n, ld_x, LOG: tl.constexpr,
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
        w = tl.where(y == float("-inf"), 0.0, g * exp(y - r, ACCURATE))
        x = w
    else:
        a = tl.load(a_ptr + src, mask=mask, other=0.0)
        w = div_rn(g * y, r)
        x = w * div_rn(a, r)
    tl.store(ga_ptr + src, w, mask=mask)
    tl.store(x_ptr + offs, tl.where(mask, x, 0.0), mask=inb)


@triton.jit
def sinkhorn_bwd_gauge_kernel(state_ptr, x_ptr, ld_x, a_ptr, r_ptr, z_ptr, ld_z, b_ptr, s_ptr, gb_ptr, B, n, m,
                               eps_hi, eps_lo, leps_hi, leps_lo, FIRST: tl.constexpr, LOG: tl.constexpr,
                               HAS_EPS: tl.constexpr, ACCURATE: tl.constexpr, BLOCK_B: tl.constexpr,
                               BLOCK_N: tl.constexpr):
    """gauge_correct between the S-side and R-side products of the per-half-iteration backward; state [2, B]
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
    G, zsum = gauge_correct(rows, rmask, G, zsum, FIRST, x_ptr, ld_x, a_ptr, r_ptr, z_ptr, ld_z, b_ptr, s_ptr,
                            gb_ptr, n, m, host_scalar(eps_hi, eps_lo, DT), host_scalar(leps_hi, leps_lo, DT), LOG,
                            HAS_EPS, ACCURATE, BLOCK_N)
    tl.store(state_ptr + rows, G, mask=rmask)
    tl.store(state_ptr + B + rows, zsum, mask=rmask)
