"""Device helpers shared by every Sinkhorn kernel family (tl.dot, row-wise and single-launch kernels): host scalars
rebuilt in the data type, correctly rounded division, exp / log with the accurate-libdevice switch, the log-domain
eps addition, the online log-sum-exp step, and the fused epilogues of the forward
half-iterations, the backward products and the backward's gauge correction.

``ACCURATE`` (a constexpr of every kernel): libdevice exp / log / log1p, accurate in float32, instead of the fast
``tl.exp`` / ``tl.log``; the launchers pass ``config.ACCURATE`` (False under TRITON_INTERPRET=1, which has no
libdevice).
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def host_scalar(hi, lo, DT: tl.constexpr):
    """A host float passed as hi + lo (hi exact in float32), in the data type DT (float64 keeps ~48 bits)."""
    return tl.cast(hi, DT) + tl.cast(lo, DT)


@triton.jit
def div_rn(x, y):
    """Correctly rounded division (Triton's float32 `/` is the approximate div.full)."""
    if x.dtype == tl.float32:
        q = tl.math.div_rn(x, y)
    else:
        q = x / y
    return q


@triton.jit
def exp(x, ACCURATE: tl.constexpr):
    if ACCURATE:
        y = libdevice.exp(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def safe_log(x, ACCURATE: tl.constexpr):
    """log(x) for x > 0, -inf otherwise."""
    pos = x > 0
    xs = tl.where(pos, x, 1.0)
    if ACCURATE:
        lx = libdevice.log(xs)
    else:
        lx = tl.log(xs)
    return tl.where(pos, lx, float("-inf"))


@triton.jit
def log_add_eps(x, log_eps, HAS_EPS: tl.constexpr, ACCURATE: tl.constexpr):
    """log(exp(x) + eps) computed as hi + log1p(exp(lo - hi)) (the CPU kernels' log_add_eps)."""
    if HAS_EPS:
        hi = tl.maximum(x, log_eps)
        lo = tl.minimum(x, log_eps)
        e = exp(lo - hi, ACCURATE)
        if ACCURATE:
            l1p = libdevice.log1p(e)
        else:
            l1p = tl.log(1.0 + e)
        y = hi + l1p
    else:
        y = x
    return y


@triton.jit
def lse_update(mx, sm, sm2, val, coef, coef2, TWO: tl.constexpr, ACCURATE: tl.constexpr):
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


@triton.jit
def half_update(acc, mx, mass, mask, eps, log_eps, LOG: tl.constexpr, HAS_EPS: tl.constexpr,
                 ACCURATE: tl.constexpr):
    """The epilogue of one half-iteration from its product acc (log domain: the sum of exp(. - mx), max-shifted by mx):
    den = acc + eps, scal = mass / den (log: den = log(exp(mx) acc + eps), scal = log mass - den); masked lanes get
    den 1 (log: 0), so no 0/0 or -inf - -inf. Returns (den, scal): the history entry and the new scaling."""
    if LOG:
        den = log_add_eps(mx + safe_log(acc, ACCURATE), log_eps, HAS_EPS, ACCURATE)
        den = tl.where(mask, den, 0.0)
        scal = safe_log(mass, ACCURATE) - den
    else:
        den = tl.where(mask, acc + eps, 1.0)
        scal = div_rn(mass, den)
    return den, scal


@triton.jit
def value_terms(scal, acc_y, mx, LOG: tl.constexpr, ACCURATE: tl.constexpr):
    """The last r-half's y = (K∘C) v_T from its product acc_y (log: log y, acc_y max-shifted by mx) and the value's
    terms u_T,i y_i (scal = u_T, log u_T when LOG). Returns (y, terms)."""
    if LOG:
        y = mx + safe_log(acc_y, ACCURATE)
        term = tl.where((scal != float("-inf")) & (acc_y != 0), exp(scal + mx, ACCURATE) * acc_y, 0.0)
    else:
        y = acc_y
        term = scal * acc_y
    return y, term


@triton.jit
def bwd_epilogue_scaling(acc, acc2, g, den, mass, grad_old, SIDE_S: tl.constexpr, FIRST: tl.constexpr):
    """Scaling-domain epilogue of one backward product. S side (den = s_t, mass = b):
    z = ((g (K∘C)^T u_T if FIRST) - K^T(w u)) / s_t, gb (+)= z, next operand z v_t.
    R side (den = r_{t-1}, mass = a): w = -K(z v) / r_{t-1}, ga += w, next operand w u_{t-1}."""
    if SIDE_S:
        if FIRST:
            z = div_rn(g * acc2 - acc, den)
            grad = z
        else:
            z = div_rn(-acc, den)
            grad = grad_old + z
        out = z * div_rn(mass, den)
    else:
        w = -div_rn(acc, den)
        grad = grad_old + w
        out = w * div_rn(mass, den)
    return grad, out


@triton.jit
def bwd_epilogue_log(mx, sm, sm2, g, den, grad_old, SIDE_S: tl.constexpr, FIRST: tl.constexpr,
                      ACCURATE: tl.constexpr):
    """Log-domain epilogue (den = log s_t or log r_{t-1}); the sums are max-shifted by mx. The next operand is the
    coefficient itself (z on the S side, w on the R side)."""
    if SIDE_S:
        prod = tl.where(sm == 0, 0.0, exp(mx - den, ACCURATE) * sm)
        if FIRST:
            direct = tl.where(sm2 == 0, 0.0, g * exp(mx - den, ACCURATE) * sm2)
            z = direct - prod
            grad = z
        else:
            z = -prod
            grad = grad_old + z
        out = z
    else:
        w = tl.where(sm == 0, 0.0, -exp(mx - den, ACCURATE) * sm)
        grad = grad_old + w
        out = w
    return grad, out


@triton.jit
def gauge_correct(rows, rmask, G, zsum, first, x_ptr, ld_x, a_ptr, r_ptr, z_ptr, ld_z, b_ptr, s_ptr, gb_ptr, n, m,
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
                awr += tl.sum(tl.where(aa > 0, aa * x * exp(log_eps - rr, ACCURATE), 0.0), axis=1)
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
    c = tl.where(sbb > 0, div_rn(sbz - G, tl.where(sbb > 0, sbb, 1.0)), 0.0)
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
                zsum += tl.sum(tl.where(bm > 0, bm * zn * exp(log_eps - sv, ACCURATE), 0.0), axis=1)
        else:
            sv = tl.load(s_ptr + ooff, mask=msk, other=1.0)
            zn = zo - c[:, None] * bm * div_rn(bm, sv)
            if HAS_EPS:
                zsum += tl.sum(zn, axis=1)  # b z / s = z v
        tl.store(z_ptr + zoff, zn, mask=msk)
        tl.store(gb_ptr + ooff, tl.load(gb_ptr + ooff, mask=msk, other=0.0) - c[:, None] * bm, mask=msk)
    return G, zsum
