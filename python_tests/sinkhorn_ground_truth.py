"""Extended-precision ground truth of wkd::sinkhorn's value and exact gradient (mpmath).

The fixed-iteration Sinkhorn of the op contract (csrc/ops.cpp) and its plain reverse sweep, evaluated in mpmath at a
working precision chosen from the problem: the sweep's rounding residual is amplified at zero-mass entries by up to
exp(max cost / reg) (docs/design.md section 3), so the precision starts at that factor's digits plus 30 and grows
until two precisions agree to 1e-20. The sweep here is
deliberately the plain one (no gauge correction), so it checks the kernels' correction instead of sharing it;
:func:`sinkhorn_mp_finite_differences` checks the sweep itself against converged finite differences.
Meant for small problems (n, m of a few tens): every number is an mpmath float.
"""
from __future__ import annotations

import math

import mpmath
import numpy as np
import torch


def working_digits(cost: np.ndarray, reg: float) -> int:
    """Decimal digits that leave >= 30 after the worst-case amplification exp((max - min cost) / reg)."""
    spread = float(np.max(cost) - np.min(cost)) if cost.size else 0.0
    return 30 + math.ceil(spread / reg / math.log(10))


def _forward(a, b, K, KC, eps, T):
    n, m = len(a), len(b)
    cnt = sum(1 for x in a if x > 0)
    u = [mpmath.mpf(1) / cnt if x > 0 else mpmath.mpf(0) for x in a]
    Kt = [[K[i][j] for i in range(n)] for j in range(m)]
    us, vs, rs, ss = [u], [], [], []
    for _ in range(T):
        s = [mpmath.fdot(Kt[j], u) + eps for j in range(m)]
        v = [b[j] / s[j] for j in range(m)]
        r = [mpmath.fdot(K[i], v) + eps for i in range(n)]
        u = [a[i] / r[i] for i in range(n)]
        us.append(u), vs.append(v), rs.append(r), ss.append(s)
    y = [mpmath.fdot(KC[i], v) for i in range(n)]
    return mpmath.fdot(u, y), us, vs, rs, ss, y, Kt


def _row(a, b, C, reg, T, eps, g, want_grad):
    n, m = C.shape
    a = [mpmath.mpf(float(x)) for x in a]
    b = [mpmath.mpf(float(x)) for x in b]
    eps, g = mpmath.mpf(float(eps)), mpmath.mpf(float(g))
    Cm = [[mpmath.mpf(float(C[i, j])) for j in range(m)] for i in range(n)]
    K = [[mpmath.exp(-Cm[i][j] / mpmath.mpf(float(reg))) for j in range(m)] for i in range(n)]
    KC = [[K[i][j] * Cm[i][j] for j in range(m)] for i in range(n)]
    value, us, vs, rs, ss, y, Kt = _forward(a, b, K, KC, eps, T)
    if not want_grad:
        return value, None, None
    # plain reverse sweep: w_t = dL/du_t / r_t, z_t = dL/dv_t / s_t
    KCt = [[KC[i][j] for i in range(n)] for j in range(m)]
    direct = [g * mpmath.fdot(KCt[j], us[T]) for j in range(m)]
    ga, gb = [mpmath.mpf(0)] * n, [mpmath.mpf(0)] * m
    w = [g * y[i] / rs[T - 1][i] for i in range(n)]
    for t in range(T - 1, -1, -1):
        ga = [ga[i] + w[i] for i in range(n)]
        wu = [w[i] * us[t + 1][i] for i in range(n)]
        z = [((direct[j] if t == T - 1 else 0) - mpmath.fdot(Kt[j], wu)) / ss[t][j] for j in range(m)]
        gb = [gb[j] + z[j] for j in range(m)]
        if t > 0:
            zv = [z[j] * vs[t][j] for j in range(m)]
            w = [-mpmath.fdot(K[i], zv) / rs[t - 1][i] for i in range(n)]
    return value, ga, gb


def _converged_row(a, b, C, reg, T, eps, g, want_grad, rounds=4):
    """_row at working_digits, then at 30 more digits at a time until two precisions agree on every output to
    1e-20 relative (or 1e-40 of the largest, for exact zeros; the sweep also cancels where a gradient is far below
    the terms it is computed from, e.g. the
    eps-sized gradients of a problem that eps alone makes depend on b); floats of the last one."""
    digits, prev = working_digits(C, reg), None
    for _ in range(rounds):
        with mpmath.workdps(digits):
            value, ga, gb = _row(a, b, C, reg, T, eps, g, want_grad)
            out = [value] + (list(ga) + list(gb) if want_grad else [])
            floor = mpmath.mpf(10) ** -40 * max(abs(x) for x in out)  # entries that are exactly 0
            if prev is not None and all(abs(x - y) <= mpmath.mpf(10) ** -20 * abs(x) + floor
                                        for x, y in zip(out, prev, strict=False)):
                return float(value), [float(x) for x in ga or []], [float(x) for x in gb or []]
            prev = out
        digits += 30
    raise RuntimeError(f"the extended-precision Sinkhorn did not converge up to {digits - 30} digits")


def _per_row_cost(cost, B):
    c = cost.detach().double().cpu().numpy()
    return [c] * B if c.ndim == 2 else [c[k] for k in range(B)]


def sinkhorn_mp(a, b, cost, reg, num_iters, eps=0.0, grad_value=None, want_grad=True):
    """Value [B] and, with ``want_grad``, the exact gradients of sum_k grad_value_k value_k w.r.t. a [B, n] and
    b [B, m] (grad_value defaults to ones), each rounded to float64 from extended precision."""
    B = a.shape[0]
    A, Bm = a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy()
    gv = np.ones(B) if grad_value is None else grad_value.detach().double().cpu().numpy()
    vals, gas, gbs = [], [], []
    for k, C in enumerate(_per_row_cost(cost, B)):
        value, ga, gb = _converged_row(A[k], Bm[k], C, reg, num_iters, eps, gv[k], want_grad)
        vals.append(value)
        if want_grad:
            gas.append(ga), gbs.append(gb)
    f64 = {"dtype": torch.float64}
    if not want_grad:
        return torch.tensor(vals, **f64), None, None
    return (torch.tensor(vals, **f64), torch.tensor(gas, **f64).reshape(B, -1),
            torch.tensor(gbs, **f64).reshape(B, -1))


def sinkhorn_mp_finite_differences(a, b, cost, reg, num_iters, eps=0.0, h=1e-25):
    """The gradients of sum_k value_k by central differences of the extended-precision forward (step h in every
    entry of a and b, zero-mass ones included: with u_0 fixed by the support of the unperturbed a, the iteration is
    a rational function of a and b, smooth there). Slow: 2 (n + m) forwards per row."""
    B = a.shape[0]
    A, Bm = a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy()
    ga, gb = np.zeros_like(A), np.zeros_like(Bm)
    for k, C in enumerate(_per_row_cost(cost, B)):
        n, m = C.shape
        with mpmath.workdps(working_digits(C, reg) + 40):
            hh = mpmath.mpf(h)
            Cm = [[mpmath.mpf(float(C[i, j])) for j in range(m)] for i in range(n)]
            K = [[mpmath.exp(-Cm[i][j] / mpmath.mpf(float(reg))) for j in range(m)] for i in range(n)]
            KC = [[K[i][j] * Cm[i][j] for j in range(m)] for i in range(n)]
            base_a = [mpmath.mpf(float(x)) for x in A[k]]
            base_b = [mpmath.mpf(float(x)) for x in Bm[k]]
            e = mpmath.mpf(float(eps))

            def val(aa, bb, base_a=base_a, K=K, KC=KC, e=e):  # u_0 from the support of the unperturbed a
                return _value_fixed_u0(aa, base_a, bb, K, KC, e, num_iters)

            for i in range(n):
                ap, am = list(base_a), list(base_a)
                ap[i] += hh
                am[i] -= hh
                ga[k, i] = float((val(ap, base_b) - val(am, base_b)) / (2 * hh))
            for j in range(m):
                bp, bm = list(base_b), list(base_b)
                bp[j] += hh
                bm[j] -= hh
                gb[k, j] = float((val(base_a, bp) - val(base_a, bm)) / (2 * hh))
    return torch.from_numpy(ga), torch.from_numpy(gb)


def _value_fixed_u0(a_pert, a_supp, b, K, KC, eps, T):
    """The forward with u_0 taken from the support of a_supp (the unperturbed a) and masses a_pert."""
    n, m = len(a_pert), len(b)
    cnt = sum(1 for x in a_supp if x > 0)
    u = [mpmath.mpf(1) / cnt if x > 0 else mpmath.mpf(0) for x in a_supp]
    Kt = [[K[i][j] for i in range(n)] for j in range(m)]
    for _ in range(T):
        s = [mpmath.fdot(Kt[j], u) + eps for j in range(m)]
        v = [b[j] / s[j] for j in range(m)]
        r = [mpmath.fdot(K[i], v) + eps for i in range(n)]
        u = [a_pert[i] / r[i] for i in range(n)]
    return mpmath.fdot(u, [mpmath.fdot(KC[i], v) for i in range(n)])
