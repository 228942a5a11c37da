"""Sinkhorn in ATen ops only: the ``torch`` backend of ``wkd::sinkhorn`` (contract: the schema comment of
``wkd::sinkhorn`` in csrc/ops.cpp, docs/design.md section 3), for tensors of any device type.

The same recurrences, outputs and history layout as the C++ kernel (csrc/cpu/sinkhorn.cpp), without ``.item()``,
host synchronisation or data-dependent Python control flow, so that it can be captured in a CUDA graph and traced by
``torch.compile(fullgraph=True)``.

Memory: O(B (n + m) T) for the history and O(n m) for the shared kernel matrix; never a B x n x m tensor beyond
the chunk cap. A shared cost in the scaling domain is two GEMMs per iteration ([B, n] x [n, m]). The log domain
(log-sum-exp over a [B, n, J] block) and a per-row cost [B, n, m] (whose kernel exp(-cost / reg) is recomputed per
product, never stored whole) run over column chunks of J columns with B n J <= ``chunk_elements`` (default
:data:`CHUNK_ELEMENTS`).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["CHUNK_ELEMENTS", "sinkhorn_forward", "sinkhorn_backward", "sinkhorn_gibbs_forward",
           "sinkhorn_gibbs_backward", "exact_backward_sweep"]

# Elements of the largest [B, n, J] temporary of the chunked paths (2^22: 16 MiB in float32).
CHUNK_ELEMENTS = 1 << 22


def _chunks(B: int, n: int, m: int, chunk_elements: Optional[int]):
    """Column ranges [j0, j1) with B n (j1 - j0) <= cap (at least one column each). Static: shapes only."""
    cap = CHUNK_ELEMENTS if chunk_elements is None else int(chunk_elements)
    width = max(1, min(m, cap // max(1, B * n)))
    return [(j0, min(m, j0 + width)) for j0 in range(0, m, width)]


# ----------------------------------------------------------------------------------------------------------
# The kernel products. Scaling domain: K = exp(-cost / reg), W = cost where a product is weighted by it.
# ----------------------------------------------------------------------------------------------------------
class _ScalingProducts:
    """K^T x ([B, n] -> [B, m]) and K y ([B, m] -> [B, n]), optionally with K∘cost: GEMMs with a shared cost, column
    chunks of exp(-cost / reg) with a per-row cost."""

    def __init__(self, cost: Optional[Tensor], reg: float, chunk_elements: Optional[int],
                 gibbs: Optional[Tuple[Tensor, Tensor]] = None):
        self.cost, self.reg = cost, reg
        self.shared = gibbs is not None or cost.dim() == 2
        if gibbs is not None:  # K and K∘cost of a shared cost, precomputed (wkd::sinkhorn_gibbs)
            self.K, self._KC = gibbs
        elif self.shared:
            self.K = torch.exp(cost / -reg)
            self._KC = None
        else:
            B, n, m = cost.shape
            self.ranges = _chunks(B, n, m, chunk_elements)

    def KC(self) -> Tensor:
        if self._KC is None:
            self._KC = self.K * self.cost
        return self._KC

    def _block(self, j0: int, j1: int, weighted: bool) -> Tensor:
        c = self.cost[:, :, j0:j1]
        K = torch.exp(c / -self.reg)
        return K * c if weighted else K

    def t_mul(self, x: Tensor, weighted: bool = False, out: Optional[Tensor] = None) -> Tensor:
        """out_j = sum_i x_i K_ij (cost_ij), [B, m] (written into ``out`` when given: no new allocation)."""
        if self.shared:
            return torch.mm(x, self.KC() if weighted else self.K, out=out)
        if out is None:
            out = x.new_empty(x.shape[0], self.cost.shape[2])
        for j0, j1 in self.ranges:
            torch.bmm(x.unsqueeze(1), self._block(j0, j1, weighted), out=out[:, None, j0:j1])
        return out

    def mul(self, y: Tensor, weighted: bool = False, out: Optional[Tensor] = None) -> Tensor:
        """out_i = sum_j K_ij (cost_ij) y_j, [B, n] (written into ``out`` when given)."""
        if self.shared:
            return torch.mm(y, (self.KC() if weighted else self.K).t(), out=out)
        acc = None
        for j0, j1 in self.ranges:
            part = torch.bmm(self._block(j0, j1, weighted), y[:, j0:j1].unsqueeze(2)).squeeze(2)
            acc = part if acc is None else acc.add_(part)
        return acc if out is None else out.copy_(acc)


# ----------------------------------------------------------------------------------------------------------
# Log domain: L = -cost / reg; the reductions of csrc/cpu/sinkhorn.cpp (col_reduce, row_reduce) over column chunks
# ----------------------------------------------------------------------------------------------------------
_NINF = float("-inf")


def _finite_or_zero(mx: Tensor) -> Tensor:
    """The shift of a log-sum-exp: mx where finite, 0 where every term is -inf (their sum is then 0, not NaN)."""
    return torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))


class _LogReductions:
    def __init__(self, cost: Tensor, reg: float, B: int, chunk_elements: Optional[int]):
        self.cost, self.reg = cost, reg
        self.shared = cost.dim() == 2
        n, m = cost.shape[-2], cost.shape[-1]
        self.ranges = _chunks(B, n, m, chunk_elements)
        self.L = cost / -reg if self.shared else None

    def _block(self, j0: int, j1: int) -> Tuple[Tensor, Tensor]:
        """(L, cost) of columns j0..j1, broadcastable to [B, n, J]."""
        if self.shared:
            return self.L[None, :, j0:j1], self.cost[None, :, j0:j1]
        c = self.cost[:, :, j0:j1]
        return c / -self.reg, c

    def col(self, p: Tensor, c: Optional[Tensor] = None, weighted: bool = False) -> Tuple[Tensor, Tensor]:
        """Per column j: mx_j = max_i (p_i + L_ij), sm_j = sum_i c_i W_ij exp(p_i + L_ij - mx_j)   -> [B, m] each."""
        mxs, sms = [], []
        for j0, j1 in self.ranges:
            L, C = self._block(j0, j1)
            e = p.unsqueeze(2) + L  # [B, n, J]
            mx = e.amax(1)
            t = torch.exp(e - _finite_or_zero(mx).unsqueeze(1))
            if weighted:
                t = t * C
            sm = (t * c.unsqueeze(2)).sum(1) if c is not None else t.sum(1)
            mxs.append(mx)
            sms.append(sm)
        if len(mxs) == 1:
            return mxs[0], sms[0]
        return torch.cat(mxs, 1), torch.cat(sms, 1)

    def row(self, q: Tensor, c: Optional[Tensor] = None, weighted: bool = False) -> Tuple[Tensor, Tensor]:
        """Per row i: mx_i = max_j (L_ij + q_j), sm_i = sum_j c_j W_ij exp(L_ij + q_j - mx_i)   -> [B, n] each
        (chunks combined by rescaling the running sum to the running maximum)."""
        mx_run = sm_run = None
        for j0, j1 in self.ranges:
            L, C = self._block(j0, j1)
            e = L + q[:, None, j0:j1]  # [B, n, J]
            mx = e.amax(2)
            t = torch.exp(e - _finite_or_zero(mx).unsqueeze(2))
            if weighted:
                t = t * C
            sm = (t * c[:, None, j0:j1]).sum(2) if c is not None else t.sum(2)
            if mx_run is None:
                mx_run, sm_run = mx, sm
                continue
            new = torch.maximum(mx_run, mx)
            shift = _finite_or_zero(new)
            sm_run = sm_run * torch.exp(mx_run - shift) + sm * torch.exp(mx - shift)
            mx_run = new
        return mx_run, sm_run


def _log_add_eps(x: Tensor, eps: float) -> Tensor:
    """log(exp(x) + eps)."""
    return torch.logaddexp(x, torch.full_like(x, math.log(eps))) if eps > 0 else x


def _exp_times(mx: Tensor, shift: Tensor, sm: Tensor) -> Tensor:
    """exp(mx - shift) * sm, 0 where sm == 0 (also where mx is -inf)."""
    return torch.where(sm == 0, torch.zeros_like(sm), torch.exp(mx - shift) * sm)


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------
def sinkhorn_forward(a: Tensor, b: Tensor, cost: Tensor, reg: float, num_iters: int, eps: float = 0.0,
                     log_domain: bool = False, keep_history: bool = True,
                     chunk_elements: Optional[int] = None) -> Tuple[Tensor, ...]:
    """(value [B], u [B, n], v [B, m], hist_r [T, B, n], hist_s [T, B, m], y [B, n]) of ``wkd::sinkhorn``
    (arguments already checked; the outputs as the schema comment in csrc/ops.cpp states them)."""
    a, b, cost = a.contiguous(), b.contiguous(), cost.contiguous()
    if not log_domain:
        return _scaling_forward(a, b, _ScalingProducts(cost, reg, chunk_elements), num_iters, eps, keep_history)
    B, n, m = a.shape[0], a.shape[1], b.shape[1]
    supp = a > 0
    cnt = supp.sum(1, keepdim=True).to(a.dtype)
    T = num_iters if keep_history else 0
    hist_r, hist_s = a.new_empty(T, B, n), a.new_empty(T, B, m)
    R = _LogReductions(cost, reg, B, chunk_elements)
    log_a, log_b = torch.log(a), torch.log(b)
    u = torch.where(supp, -torch.log(cnt), torch.full_like(a, _NINF))
    v = b
    for t in range(num_iters):
        mx, sm = R.col(u)
        s = _log_add_eps(mx + torch.log(sm), eps)
        v = log_b - s
        mx, sm = R.row(v)
        r = _log_add_eps(mx + torch.log(sm), eps)
        u = log_a - r
        if keep_history:
            hist_r[t].copy_(r)
            hist_s[t].copy_(s)
    mx, sm = R.row(v, weighted=True)  # log y = log (K∘cost) v_T
    y = mx + torch.log(sm)
    value = torch.where(torch.isfinite(u) & (sm != 0), torch.exp(u + _finite_or_zero(mx)) * sm,
                        torch.zeros_like(sm)).sum(1)
    return value, u, v, hist_r, hist_s, (y if keep_history else a.new_empty(0, n))


def _scaling_forward(a: Tensor, b: Tensor, P: _ScalingProducts, num_iters: int, eps: float,
                     keep_history: bool) -> Tuple[Tensor, ...]:
    """The scaling-domain loop on the products P (contiguous a, b), written in place into preallocated buffers (the
    history's slots, u, v): no allocation per iteration."""
    B, n, m = a.shape[0], a.shape[1], b.shape[1]
    supp = a > 0
    cnt = supp.sum(1, keepdim=True).to(a.dtype)
    T = num_iters if keep_history else 0
    hist_r, hist_s = a.new_empty(T, B, n), a.new_empty(T, B, m)
    u = torch.where(supp, 1.0 / cnt, torch.zeros_like(a))
    v = torch.empty_like(b)
    # the slots the products are written into: the history's (views made once), else one buffer each
    hs = hist_s.unbind(0) if keep_history else (torch.empty_like(b),) * num_iters
    hr = hist_r.unbind(0) if keep_history else (torch.empty_like(a),) * num_iters
    if P.shared:  # the GEMMs written out: at C = 100 a Python call per product is a few percent of the loop
        K, Kt = P.K, P.K.t()
        for t in range(num_iters):
            s = torch.mm(u, K, out=hs[t])
            if eps > 0:
                s.add_(eps)
            torch.div(b, s, out=v)
            r = torch.mm(v, Kt, out=hr[t])
            if eps > 0:
                r.add_(eps)
            torch.div(a, r, out=u)
    else:
        for t in range(num_iters):
            s = P.t_mul(u, out=hs[t])
            if eps > 0:
                s.add_(eps)
            torch.div(b, s, out=v)
            r = P.mul(v, out=hr[t])
            if eps > 0:
                r.add_(eps)
            torch.div(a, r, out=u)
    y = P.mul(v, weighted=True)  # (K∘cost) v_T
    value = (u * y).sum(1)
    return value, u, v, hist_r, hist_s, (y if keep_history else a.new_empty(0, n))


def sinkhorn_gibbs_forward(a: Tensor, b: Tensor, K: Tensor, KC: Tensor, num_iters: int, eps: float = 0.0,
                           keep_history: bool = True) -> Tuple[Tensor, ...]:
    """The outputs of ``wkd::sinkhorn_gibbs``: the scaling domain of :func:`sinkhorn_forward` for a shared cost, on
    its precomputed K = exp(-cost / reg) and KC = K∘cost (arguments already checked)."""
    P = _ScalingProducts(None, 0.0, None, gibbs=(K.contiguous(), KC.contiguous()))
    return _scaling_forward(a.contiguous(), b.contiguous(), P, num_iters, eps, keep_history)


def sinkhorn_gibbs_backward(grad_value: Tensor, a: Tensor, b: Tensor, K: Tensor, KC: Tensor, hist_r: Tensor,
                            hist_s: Tensor, y: Tensor, eps: Optional[float] = None,
                            need_b: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """(grad_a, grad_b) of ``wkd::sinkhorn_gibbs_backward`` (arguments already checked); ``need_b=False``: grad_b is
    None (the autograd formula's call when b needs no gradient)."""
    P = _ScalingProducts(None, 0.0, None, gibbs=(K.contiguous(), KC.contiguous()))
    return exact_backward_sweep(grad_value.contiguous(), a.contiguous(), b.contiguous(), hist_r, hist_s, y, False,
                                P.t_mul, P.mul, eps, need_b)


# ----------------------------------------------------------------------------------------------------------
# Exact backward: the reverse sweep of csrc/cpu/sinkhorn.cpp (backward_row / backward_shared_blas)
# ----------------------------------------------------------------------------------------------------------
def _acc(t: Tensor) -> Tensor:
    """``t`` in the accumulation dtype of the log domain's gauge sums: float64 where the device has it (as the C++
    kernel's double accumulators; the scaling domain's sweep sums in the compute dtype, see :func:`_scaling_sweep`)."""
    return t.to(torch.float32 if t.device.type == "mps" else torch.float64)


class _GaugeShift:
    """c [B, 1] such that z - c b restores sum_j b_j z_j = G (0 for rows without mass); b in the accumulation dtype
    and sum_j b_j^2 (the same at every step of a sweep) computed once."""

    def __init__(self, b: Tensor):
        self.bb = _acc(b)
        sbb = (self.bb * self.bb).sum(1)
        # a row without mass gets c = sbz / inf = 0
        self.sbb = torch.where(sbb > 0, sbb, torch.full_like(sbb, float("inf")))

    def __call__(self, z: Tensor, G: Optional[Tensor]) -> Tensor:
        """c [B, 1] in the dtype of z; G None: every G_t is 0 (eps = 0)."""
        sbz = torch.linalg.vecdot(self.bb, _acc(z))  # sum_j b_j z_j in the accumulation dtype
        return torch.div(sbz if G is None else sbz - G, self.sbb).to(z.dtype).unsqueeze(1)


def _log_eps_mass_sum(mass: Tensor, x: Tensor, log_den: Tensor, eps: float) -> Tensor:
    """eps sum_i mass_i x_i / den_i per row over the support of ``mass``, with den as its log (the log domain's
    terms of G_t; eps > 0)."""
    terms = torch.where(mass > 0, mass * x * torch.exp(math.log(eps) - log_den), torch.zeros_like(x))
    return _acc(terms).sum(1)


def _scaling_sweep(g: Tensor, a: Tensor, b: Tensor, hist_r: Tensor, hist_s: Tensor, y: Tensor, t_mul: Callable,
                   mul: Callable, eps: Optional[float], need_b: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """The scaling-domain reverse sweep of :func:`exact_backward_sweep`, in place in a few preallocated [B, n] / [B, m]
    buffers (no allocation per step). The gauge sums run in the compute dtype: a float64 copy of z per step cost
    more than the two products of the step on CPU at C = 100, and bought nothing in float32, where the correction's
    own rounding (z - c b in float32) is of the same order as a float32 sum's. ``need_b=False``: grad_b is None, and
    the first iteration's step (one product, whose z only grad_b reads) is skipped."""
    T = hist_r.shape[0]
    last = T - 1
    gc = g.unsqueeze(1)
    r_last = hist_r[last]
    ut = a / r_last
    w = torch.mul(y, gc).div_(r_last)  # w_T = g y / r_T
    direct = t_mul(ut, True).mul_(gc)
    ga = w.clone()
    x = w.mul_(ut)  # w's buffer holds x = w_T u_T, then -x = -w_t u_t for t < T (its sign folded into z's)
    KTx, Kzv, z, zv = torch.empty_like(b), torch.empty_like(a), torch.empty_like(b), torch.empty_like(b)
    gb = torch.zeros_like(b) if need_b else None
    if eps is not None:  # 1 / sum_j b_j^2 per row (0 for a row without mass: no correction there)
        sbb = torch.linalg.vecdot(b, b)
        inv_sbb = torch.where(sbb > 0, 1.0 / sbb, torch.zeros_like(sbb))
    G = zs = None  # G_t; sum_j b_j z_{t+1,j} / s_{t+1,j} (eps > 0 only)
    hs, hr = hist_s.unbind(0), hist_r.unbind(0)  # the history's steps as views, made once
    for t in range(last, -1 if need_b else 0, -1):
        s = hs[t]
        if eps:  # G_t from sum_i a_i w_t,i / r_t,i = sum_i x_i (x holds -x below T)
            G = x.sum(1).mul_(eps) if t == last else G.sub_(x.sum(1), alpha=eps).sub_(zs, alpha=eps)
        t_mul(x, False, out=KTx)  # K^T x_T, then K^T (-x_t) = -K^T x_t exactly
        if t == last:
            torch.sub(direct, KTx, out=z).div_(s)
        else:
            torch.div(KTx, s, out=z)
        if eps is not None:  # z - c b with c = (sum_j b_j z_j - G_t) / sum_j b_j^2
            c = torch.linalg.vecdot(b, z)
            if eps:
                c.sub_(G)
            z.addcmul_(c.mul_(inv_sbb).unsqueeze(1), b, value=-1)
        if need_b:
            gb.add_(z)
        torch.div(b, s, out=zv).mul_(z)  # z v = z b / s
        if eps:  # sum_j b_j z_j / s_j = sum_j (z v)_j (G subtracts it times eps)
            zs = zv.sum(1)
        if t == 0:
            break
        r = hr[t - 1]
        w = mul(zv, False, out=Kzv).div_(r)  # -w_{t-1} = K (z_t v_t) / r_{t-1}
        ga.sub_(w)
        torch.div(a, r, out=x).mul_(w)  # -x_{t-1} = -w_{t-1} u_{t-1}
    return ga, gb


def exact_backward_sweep(g: Tensor, a: Tensor, b: Tensor, hist_r: Tensor, hist_s: Tensor, y: Tensor,
                         log_domain: bool, t_mul: Callable, mul: Callable,
                         eps: Optional[float] = None, need_b: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """(grad_a, grad_b) of sum_b g_b value_b through the fixed-iteration loop, from the history.

    Scaling form, with w_t = dL/du_t / r_t and z_t = dL/dv_t / s_t (u_t = a / r_t, v_t = b / s_t):
        w_T = g y / r_T,  direct = g (K∘C)^T u_T
        for t = T..1:  ga += w_t;  z_t = (direct if t = T) - K^T (w_t u_t) / s_t;  gb += z_t
                       w_{t-1} = -K (z_t v_t) / r_{t-1}     (t > 1; u_0 is a constant)
    The log domain runs the same recurrences with the products as signed log-sum-exp reductions.

    With ``eps`` (the forward's) each z_t gets the gauge correction of the C++ kernel (docs/design.md section 3):
    z_t -= b (sum_j b_j z_t,j - G_t) / sum_j b_j^2 with G_T = eps sum_i a_i w_T,i / r_T,i and
    G_t = G_{t+1} + eps (sum_i a_i w_t,i / r_t,i - sum_j b_j z_{t+1,j} / s_{t+1,j}); without it (None) the
    rounding residual of z_t on the support of b, amplified up to exp(max cost / reg) at zero-mass entries, is
    left in the gradient w.r.t. b.

    ``t_mul(x, weighted)`` / ``mul(y, weighted)``: scaling domain, K^T x [B, m] and K y [B, n] (weighted: K∘cost);
    log domain, the column / row reductions (p, c, weighted) -> (mx, sm) of :class:`_LogReductions`.
    Memory: a few [B, n] / [B, m] vectors besides the history (the products chunk their own temporaries); in the
    scaling domain they are allocated once and updated in place. ``need_b=False`` (scaling domain): grad_b is None and
    its work is skipped (the log domain computes it anyway).
    """
    if not log_domain:
        return _scaling_sweep(g, a, b, hist_r, hist_s, y, t_mul, mul, eps, need_b)
    T = hist_r.shape[0]
    last = T - 1
    gc = g.unsqueeze(1)
    gauge_shift = None if eps is None else _GaugeShift(b)
    G = None if eps is None else _acc(g.new_zeros(g.shape[0]))
    zs = None  # eps sum_j b_j z_{t+1,j} / s_{t+1,j}, set by the step before the one that reads it (eps > 0)
    log_a, log_b = torch.log(a), torch.log(b)
    ut = log_a - hist_r[last]
    w = torch.where(y == _NINF, torch.zeros_like(y), gc * torch.exp(y - hist_r[last]))
    mx, sm = t_mul(ut, None, True)
    direct = gc * _exp_times(mx, hist_s[last], sm)
    ga, gb = w, None
    for t in range(last, -1, -1):
        if t != last:
            ut = log_a - hist_r[t]
        if t != last:
            ga = ga + w
        if eps:  # eps sum_i a_i w_t,i / r_t,i
            awr = _log_eps_mass_sum(a, w, hist_r[t], eps)
            G = awr if t == last else G + awr - zs
        mx, sm = t_mul(ut, w, False)
        prod = _exp_times(mx, hist_s[t], sm)
        z = (direct - prod) if t == last else -prod
        if eps is not None:
            z = z - gauge_shift(z, G) * b
        if eps:
            zs = _log_eps_mass_sum(b, z, hist_s[t], eps)
        gb = z if gb is None else gb + z
        if t == 0:
            break
        vt = log_b - hist_s[t]
        mx, sm = mul(vt, z, False)
        w = -_exp_times(mx, hist_r[t - 1], sm)
    return ga, gb


def sinkhorn_backward(grad_value: Tensor, a: Tensor, b: Tensor, cost: Tensor, hist_r: Tensor, hist_s: Tensor,
                      y: Tensor, reg: float, log_domain: bool = False, eps: Optional[float] = None,
                      chunk_elements: Optional[int] = None, need_b: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """(grad_a, grad_b) of ``wkd::sinkhorn_backward`` (arguments already checked); ``need_b=False``: grad_b may be
    None (the autograd formula's call when b needs no gradient)."""
    a, b, cost, g = a.contiguous(), b.contiguous(), cost.contiguous(), grad_value.contiguous()
    if not log_domain:
        P = _ScalingProducts(cost, reg, chunk_elements)
        return exact_backward_sweep(g, a, b, hist_r, hist_s, y, False, P.t_mul, P.mul, eps, need_b)
    R = _LogReductions(cost, reg, a.shape[0], chunk_elements)
    return exact_backward_sweep(g, a, b, hist_r, hist_s, y, True,
                                lambda p, c, weighted: R.col(p, c, weighted),
                                lambda q, c, weighted: R.row(q, c, weighted), eps)
