"""Single-launch ("on-chip") Sinkhorn kernels for small C (docs/design.md section 3): n, m <= ONCHIP_MAX_C, shared
cost. Their configuration (ONCHIP_CONFIG, ONCHIP_K_BUFFER) and its rationale: config.py.

Output layout (the schema comment of wkd::sinkhorn in csrc/ops.cpp): hist_r [T, B, n] = r_1..r_T, hist_s [T, B, m] =
s_1..s_T, y [B, n] = (K∘cost) v_T separately (logs in the log domain); without history [0, B, n], [0, B, m] and
y [0, n]. Same recurrences, eps and log-domain handling as the per-half-iteration kernels (dot_kernels.py,
row_kernels.py).

Structure: one program owns BLOCK_B rows (grid = cdiv(B, BLOCK_B)) and runs every half-iteration of them in one
launch; programs never communicate. Each half-iteration is the per-half-iteration kernels' product, looped over
all output tiles [BLOCK_B, BLOCK_N] of the program's rows, the reduced dimension in BLOCK_K chunks (tl.dot in the
scaling domain, an online max-shifted log-sum-exp over a [BLOCK_B, BLOCK_K, BLOCK_N] tile in the log domain),
epilogues fused (eps, the division, history, y and the value in the last r-half). The scalings of the program's
rows live in its own rows of the u / v outputs (backward: of two [B, n], [B, m] scratch buffers) -- written by one
half-iteration, read chunk by chunk by the next after a CTA barrier (tl.debug_barrier: bar.sync orders the global
accesses of the block); at C <= 256 they are a few KB per program and stay in L1/L2, as do the K (or cost) tiles,
re-read by every half-iteration. Why not whole-row scalings in registers: Triton cannot slice a register tensor, so
a product over the whole reduced dimension would be one tl.dot with K = n, which the FMA lowering ("ieee")
materialises per thread (K x (rows + columns) per thread): 255 registers and ~1 KB of spills on sm_90 in a first
version of these kernels; the tiled form keeps the per-thread operands at BLOCK_K x (rows + columns).
K = exp(-cost/reg) (L = -cost/reg) is computed per tile from `cost`, or read (scaling domain with
ONCHIP_K_BUFFER[dtype]) from a K buffer built by sinkhorn_kmat_kernel (row_kernels.py; one extra launch per
direction).
Launches: forward 1 (2 with the K buffer), backward 1 (2): at most 4 for forward + backward. No host
synchronisation, no data-dependent host branching (graph-capturable).
Size rule of the dispatch in sinkhorn_forward / sinkhorn_backward: a shared cost with n, m <= ONCHIP_MAX_C runs the
single-launch kernels (the tests and the compile matrix set it to 0 to drive the per-half-iteration kernels).
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ._device import div_rn, exp, gauge_correct, half_update, host_scalar, safe_log, value_terms


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
def sinkhorn_fwd_onchip_kernel(
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
    reg = host_scalar(reg_hi, reg_lo, DT)
    eps = host_scalar(eps_hi, eps_lo, DT)
    log_eps = host_scalar(leps_hi, leps_lo, DT)
    # u0 = 1/|supp a| on supp(a), 0 elsewhere (log: -log|supp a|, -inf)
    cnt = tl.zeros([BLOCK_B], dtype=tl.int32)
    for k0 in range(0, n, BLOCK_N):
        ci = (k0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        omask = rmask[:, None] & (ci < n)[None, :]
        a = tl.load(a_ptr + rows[:, None] * n + ci[None, :], mask=omask, other=0.0)
        cnt += tl.sum((a > 0).to(tl.int32), axis=1)
    total = cnt.to(DT)
    if LOG:
        val0 = -safe_log(total, ACCURATE)
        zero = float("-inf")
    else:
        val0 = div_rn(tl.full([BLOCK_B], 1.0, DT), tl.where(total > 0, total, 1.0))
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
                    alpha = exp(mx - ref, ACCURATE)  # 0 while nothing finite was seen
                    acc = acc * alpha + tl.sum(tl.exp(val - ref[:, None, :]), axis=1)
                    mx = new_mx
                else:
                    x = tl.load(u_ptr + rows[:, None] * n + ck[None, :], mask=lmask, other=0.0)
                    acc = _onchip_mac(x, tile, acc, PREC, DOT)
            omask = rmask[:, None] & jmask[None, :]
            ooff = rows[:, None] * m + cj[None, :]
            mass = tl.load(b_ptr + ooff, mask=omask, other=0.0)
            den, scal = half_update(acc, mx, mass, omask, eps, log_eps, LOG, HAS_EPS, ACCURATE)
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
                    alpha = exp(mx - ref, ACCURATE)
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
            den, scal = half_update(acc, mx, mass, omask, eps, log_eps, LOG, HAS_EPS, ACCURATE)
            tl.store(u_ptr + ooff, scal, mask=omask)
            if STORE_HIST:
                tl.store(hr_t + ooff, den, mask=omask)
            if last:
                yv, term = value_terms(scal, acc_y, mx, LOG, ACCURATE)
                if STORE_HIST:
                    tl.store(y_ptr + ooff, yv, mask=omask)
                value += tl.sum(tl.where(omask, term, 0.0), axis=1)
        tl.debug_barrier()
        hs_t += B * m
        hr_t += B * n
    tl.store(value_ptr + rows, value, mask=rmask)


@triton.jit
def sinkhorn_bwd_onchip_kernel(
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
    """The whole reverse sweep of launch.launch_backward (same recurrences, epilogues and gauge correction) for BLOCK_B
    rows."""
    pid = tl.program_id(0)
    DT = a_ptr.dtype.element_ty
    rows = (pid * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    rmask = rows < B
    reg = host_scalar(reg_hi, reg_lo, DT)
    eps = host_scalar(eps_hi, eps_lo, DT)
    log_eps = host_scalar(leps_hi, leps_lo, DT)
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
            w = tl.where(yv == float("-inf"), 0.0, g * exp(yv - r, ACCURATE))
            x = w
        else:
            r = tl.load(hr_t + ooff, mask=omask, other=1.0)
            yv = tl.load(y_ptr + ooff, mask=omask, other=0.0)
            a = tl.load(a_ptr + ooff, mask=omask, other=0.0)
            w = div_rn(g * yv, r)
            x = w * div_rn(a, r)
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
                    p = tl.where(pos, safe_log(lm, ACCURATE) - lh, float("-inf"))  # log u_{t+1}
                    val = p[:, :, None] + tile[None, :, :]
                    new_mx = tl.maximum(mx, tl.max(val, axis=1))
                    ref = tl.where(new_mx == float("-inf"), 0.0, new_mx)
                    alpha = exp(mx - ref, ACCURATE)
                    e = tl.exp(val - ref[:, None, :])
                    acc = acc * alpha + tl.sum(coef[:, :, None] * e, axis=1)
                    if first:
                        acc2 = acc2 * alpha + tl.sum(c[None, :, :] * e, axis=1)
                    mx = new_mx
                else:
                    acc = _onchip_mac(coef, tile, acc, PREC, DOT)
                    if first:
                        ut = div_rn(lm, tl.load(hr_t + loff, mask=lmask, other=1.0))  # u_T
                        acc2 = _onchip_mac(ut, tile * c, acc2, PREC, DOT)
            omask = rmask[:, None] & jmask[None, :]
            ooff = rows[:, None] * m + cj[None, :]
            if LOG:
                den = tl.load(hs_t + ooff, mask=omask, other=0.0)
                f = exp(mx - den, ACCURATE)
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
                    z = div_rn(g * acc2 - acc, den)
                else:
                    z = div_rn(-acc, den)
                out = z * div_rn(mass, den)
            if first:
                grad = z
            else:
                grad = tl.load(gb_ptr + ooff, mask=omask, other=0.0) + z
            tl.store(gb_ptr + ooff, grad, mask=omask)
            if more or GAUGE:
                tl.store(zs_ptr + ooff, out, mask=omask)
        tl.debug_barrier()
        if GAUGE:
            G, zsum = gauge_correct(rows, rmask, G, zsum, first, xs_ptr, n, a_ptr, hr_t, zs_ptr, m, b_ptr, hs_t,
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
                        p = tl.where(pos, safe_log(lm, ACCURATE) - lh, float("-inf"))  # log v_{t+1}
                        val = p[:, :, None] + tile[None, :, :]
                        new_mx = tl.maximum(mx, tl.max(val, axis=1))
                        ref = tl.where(new_mx == float("-inf"), 0.0, new_mx)
                        alpha = exp(mx - ref, ACCURATE)
                        acc = acc * alpha + tl.sum(coef[:, :, None] * tl.exp(val - ref[:, None, :]), axis=1)
                        mx = new_mx
                    else:
                        acc = _onchip_mac(coef, tile, acc, PREC, DOT)
                omask = rmask[:, None] & imask[None, :]
                ooff = rows[:, None] * n + ci[None, :]
                if LOG:
                    den = tl.load(hr_p + ooff, mask=omask, other=0.0)
                    w = tl.where(acc == 0, 0.0, -exp(mx - den, ACCURATE) * acc)
                    x = w
                else:
                    den = tl.load(hr_p + ooff, mask=omask, other=1.0)
                    mass = tl.load(a_ptr + ooff, mask=omask, other=0.0)
                    w = -div_rn(acc, den)
                    x = w * div_rn(mass, den)
                tl.store(ga_ptr + ooff, tl.load(ga_ptr + ooff, mask=omask, other=0.0) + w, mask=omask)
                tl.store(xs_ptr + ooff, x, mask=omask)
            tl.debug_barrier()
        hr_t -= B * n
        hs_t -= B * m
