"""Float64 pure-PyTorch references of every op (tests and benchmarks compare against them).

They follow the op contracts of docs/design.md literally, loop by loop, and are differentiable by autograd, so
``torch.autograd.grad`` through them gives the exact gradient the kernels must reproduce. They form the
B x n x m kernel matrix when needed: meant for checking, not for speed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _GaugeHooks:
    """Tensor hooks that restore, during autograd's reverse sweep through the scaling-domain loop, the gauge identity
    of the exact adjoint of the value (docs/design.md section 3): with z_t = dvalue/dv_t / s_t and
    w_t = dvalue/du_t / r_t,  sum_j b_j z_t,j = G_t, where G_T = eps sum_i a_i w_T,i / r_T,i and
    G_t = G_{t+1} + eps (sum_i a_i w_t,i / r_t,i - sum_j b_j z_{t+1,j} / s_{t+1,j})  (0 for eps = 0).
    Each z_t is replaced by z_t - b (sum_j b_j z_t,j - G_t) / sum_j b_j^2. Plain autograd leaves a rounding residual
    in this direction that the zero-mass entries of b amplify by up to exp(max cost / reg)."""

    def __init__(self, a: Tensor, b: Tensor, eps: float, num_iters: int):
        self.a, self.b, self.eps, self.T = a.detach(), b.detach(), eps, num_iters
        self.bb = (self.b * self.b).sum(1)
        self.G = torch.zeros_like(self.bb)
        self.zs = torch.zeros_like(self.bb)

    def watch(self, t: int, u: Tensor, v: Tensor, r: Tensor, s: Tensor):
        r, s = r.detach(), s.detach()
        if u.requires_grad:  # fires before the hook of v_t (v_t's adjoint needs u_t's)
            u.register_hook(lambda gu: self._on_u(t, gu, r))
        if v.requires_grad:
            v.register_hook(lambda gv: self._on_v(gv, s))

    def _on_u(self, t: int, gu: Tensor, r: Tensor):
        awr = torch.where(self.a > 0, self.a * gu / (r * r), torch.zeros_like(gu)).sum(1)  # sum a_i w_i / r_i
        self.G = self.eps * awr if t == self.T - 1 else self.G + self.eps * (awr - self.zs)

    def _on_v(self, gv: Tensor, s: Tensor):
        z = gv / s
        z = z - self.b * (((self.b * z).sum(1) - self.G) / self.bb).unsqueeze(1)
        self.zs = torch.where(self.b > 0, self.b * z / s, torch.zeros_like(z)).sum(1)
        return z * s


def sinkhorn_reference(a: Tensor, b: Tensor, cost: Tensor, reg: float, num_iters: int, eps: float = 0.0,
                       log_domain: bool = False, dtype: torch.dtype = torch.float64, gauge_correct: bool = True):
    """Literal fixed-iteration Sinkhorn (the contract of wkd::sinkhorn in csrc/ops.cpp), computed in ``dtype``
    (float64 by default).

    a [B, n], b [B, m], cost [n, m] or [B, n, m]. Returns (value [B], u [B, n], v [B, m]) in the scaling
    domain, or (value, log u, log v) with ``log_domain=True`` (same mathematics, log-sum-exp iterations).

    Gradients: autograd through the scaling-domain loop gives the exact gradient of ``value`` w.r.t. ``a`` and
    ``b`` -- with ``gauge_correct`` (default) tensor hooks restore the gauge identity of the adjoint
    (:class:`_GaugeHooks`), without which the gradient at zero-mass entries of ``b`` (and ``a``) is off by up to
    rounding x exp(max cost / reg) (1e3 relative at reg = 0.02, cost in [0, 1]). The hooks assume that ``value``
    is the only differentiated output; pass ``gauge_correct=False`` to differentiate ``u`` or ``v``. The log-domain
    loop's autograd gives 0 at zero-mass entries (its torch.where masks them): use the scaling domain for gradients.
    """
    a, b, cost = a.to(dtype), b.to(dtype), cost.to(dtype)
    B, n = a.shape
    C = cost if cost.dim() == 3 else cost.unsqueeze(0).expand(B, -1, -1)
    supp = (a > 0).to(dtype)
    cnt = supp.sum(1, keepdim=True)
    if not log_domain:
        K = torch.exp(-C / reg)
        u = supp / cnt
        v = None
        hooks = (_GaugeHooks(a, b, eps, num_iters)
                 if gauge_correct and torch.is_grad_enabled() and (a.requires_grad or b.requires_grad) else None)
        for t in range(num_iters):
            s = torch.einsum("bi,bij->bj", u, K) + eps
            v = b / s
            r = torch.einsum("bij,bj->bi", K, v) + eps
            u = a / r
            if hooks is not None:
                hooks.watch(t, u, v, r, s)
        value = torch.einsum("bi,bij,bj->b", u, K * C, v)
        return value, u, v
    L = -C / reg
    ninf = torch.tensor(float("-inf"), dtype=dtype, device=a.device)
    log_u = torch.where(supp > 0, -torch.log(cnt).expand_as(a), ninf)
    log_a = torch.where(a > 0, torch.log(a.clamp_min(torch.finfo(dtype).tiny)), ninf)
    log_b = torch.where(b > 0, torch.log(b.clamp_min(torch.finfo(dtype).tiny)), ninf)

    def add_eps(x):
        if eps > 0:
            return torch.logaddexp(x, torch.full_like(x, float(torch.log(torch.tensor(eps, dtype=dtype)))))
        return x

    log_v = None
    for _ in range(num_iters):
        log_v = log_b - add_eps(torch.logsumexp(log_u.unsqueeze(2) + L, dim=1))
        log_u = log_a - add_eps(torch.logsumexp(L + log_v.unsqueeze(1), dim=2))
    P = torch.exp(log_u.unsqueeze(2) + L + log_v.unsqueeze(1))
    value = (P * C).sum((1, 2))
    return value, log_u, log_v


# ----------------------------------------------------------------------------------------------------------------
# Gaussian ops for WKD-F (docs/design.md section 4): float64 references
# ----------------------------------------------------------------------------------------------------------------
def cell_bounds_reference(size: int, grid: int):
    """Adaptive-pooling cells along one axis: [(floor(i size / grid), ceil((i + 1) size / grid)) for i < grid]."""
    return [((i * size) // grid, -((-(i + 1) * size) // grid)) for i in range(grid)]


def feature_stats_reference(x: Tensor, grid: int = 1, full: bool = False, unbiased: bool = True,
                            dtype: torch.dtype = torch.float64):
    """Per-sample, per-cell statistics of x [N, C, H, W] by slicing every cell (the published code's loop).

    Returns mean [N, P, C] and var [N, P, C] (full=False) or cov [N, P, C, C] (full=True), P = grid * grid cells in
    row-major order, divided by m - 1 (unbiased) or m, computed in ``dtype``.
    """
    x = x.to(dtype)
    means, second = [], []
    for h0, h1 in cell_bounds_reference(x.shape[2], grid):
        for w0, w1 in cell_bounds_reference(x.shape[3], grid):
            X = x[:, :, h0:h1, w0:w1].flatten(2)  # [N, C, m]
            m = X.shape[-1]
            mu = X.mean(-1)
            Xc = X - mu.unsqueeze(-1)
            den = m - 1 if unbiased else m
            means.append(mu)
            second.append(Xc @ Xc.mT / den if full else Xc.square().sum(-1) / den)
    return torch.stack(means, 1), torch.stack(second, 1)


def sqrtm_reference(S: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Principal square root of symmetric PSD matrices [..., n, n] by eigh (eigenvalues clamped at 0)."""
    S = S.to(dtype)
    L, V = torch.linalg.eigh((S + S.mT) / 2)
    return (V * L.clamp_min(0).sqrt().unsqueeze(-2)) @ V.mT


def bures_wasserstein_reference(mu1: Tensor, S1: Tensor, mu2: Tensor, S2: Tensor,
                                dtype: torch.dtype = torch.float64) -> Tensor:
    """Squared 2-Wasserstein distance between N(mu1, S1) and N(mu2, S2), batched [..., n] / [..., n, n]:
    |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1^1/2 S2 S1^1/2)^1/2 with eigh-based square roots (clamped eigenvalues)."""
    mu1, S1, mu2, S2 = (t.to(dtype) for t in (mu1, S1, mu2, S2))
    R = sqrtm_reference(S1, dtype)
    cross = sqrtm_reference(R @ ((S2 + S2.mT) / 2) @ R, dtype).diagonal(0, -2, -1).sum(-1)
    tr = lambda A: A.diagonal(0, -2, -1).sum(-1)  # noqa: E731
    return (mu1 - mu2).square().sum(-1) + tr(S1) + tr(S2) - 2 * cross


def nuclear_norm_reference(M: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Sum of singular values of M [..., p, q]."""
    return torch.linalg.svdvals(M.to(dtype)).sum(-1)


def published_wkd_feature_diag(f_s: Tensor, f_t: Tensor, grid: int = 1, eps: float = 1e-5) -> Tensor:
    """The published WKD-F diagonal formula, per sample and cell: sum_c (mu_s - mu_t)^2 + (std_s - std_t)^2 with
    std = sqrt(var + eps), var unbiased (torch.var's default), cells by slicing. Returns [N, P] (in the input dtype;
    plain PyTorch, used as a baseline of bench/bench_gaussian_wasserstein.py)."""
    out = []
    for h0, h1 in cell_bounds_reference(f_s.shape[2], grid):
        for w0, w1 in cell_bounds_reference(f_s.shape[3], grid):
            bs, bt = f_s[:, :, h0:h1, w0:w1], f_t[:, :, h0:h1, w0:w1]
            mean_term = (bs.mean(dim=(-1, -2)) - bt.mean(dim=(-1, -2))).square().sum(-1)
            std_s = torch.sqrt(bs.var(dim=(-1, -2)) + eps)
            std_t = torch.sqrt(bt.var(dim=(-1, -2)) + eps)
            out.append(mean_term + (std_s - std_t).square().sum(-1))
    return torch.stack(out, 1)


def gaussian_wasserstein_reference(f_s: Tensor, f_t: Tensor, covariance: str = "full", grid: int = 1,
                                   eps: float = 0.0, unbiased: bool = True,
                                   dtype: torch.dtype = torch.float64) -> Tensor:
    """Squared W2 between the per-sample (per-cell) Gaussians of two feature maps [N, C, H, W], returned [N, P].

    diag: sum_c (mu_s - mu_t)^2 + (sqrt(var_s + eps) - sqrt(var_t + eps))^2.
    full: C x C covariances plus eps I and the eigh-based Bures formula (float64 eigendecomposition, clamped
    eigenvalues) -- no low-rank shortcut.
    """
    mu_s, v_s = feature_stats_reference(f_s, grid, covariance == "full", unbiased, dtype)
    mu_t, v_t = feature_stats_reference(f_t, grid, covariance == "full", unbiased, dtype)
    if covariance == "diag":
        return (mu_s - mu_t).square().sum(-1) + (torch.sqrt(v_s + eps) - torch.sqrt(v_t + eps)).square().sum(-1)
    eye = torch.eye(v_s.shape[-1], dtype=dtype, device=v_s.device)
    return bures_wasserstein_reference(mu_s, v_s + eps * eye, mu_t, v_t + eps * eye, dtype)


def published_wkd_logit_loss(s: Tensor, t: Tensor, y: Tensor, cost: Tensor, temperature: float, weight: float,
                             reg: float = 0.05, num_iters: int = 10, dtype: torch.dtype = torch.float32) -> Tensor:
    """WKD-L as published, line by line: every sample gathers its own (C-1) x (C-1) cost; autograd through the loop.

    s, t: [B, C] student / teacher logits (t is detached); y: [B] int64 targets; cost: [C, C] class cost (unitless).
    Returns the scalar L_t + weight * mean_b WD_b, computed in ``dtype``. Memory: B C^2 floats for the repeated cost
    and B (C-1)^2 for the gathered cost, the kernel and the flow each (about 1 GB each at B=256, C=1000, float32):
    the cost wkd_kernels.WKDLogitLoss removes. The parity tests and bench/train_step_latency.py use it.
    """
    s, t, cost = s.to(dtype), t.to(dtype).detach(), cost.to(dtype)
    N, c = s.shape
    label = y.view(N, 1)
    s_t = torch.gather(F.log_softmax(s, dim=1), 1, label)
    t_t = torch.gather(F.softmax(t, dim=1), 1, label).detach()
    loss_t = -(t_t * s_t).mean()
    mask = torch.ones_like(s).scatter_(1, label, 0).bool()
    s_, t_ = s[mask].reshape(N, -1), t[mask].reshape(N, -1)
    cm = cost.repeat(N, 1, 1)[(mask.unsqueeze(1) * mask.unsqueeze(2))].reshape(N, c - 1, c - 1)
    p = F.softmax(s_ / temperature, dim=-1).to(dtype)
    q = F.softmax(t_ / temperature, dim=-1).to(dtype)
    cm = F.relu(cm) + 1e-8
    w1, w2 = p.unsqueeze(-1), q.unsqueeze(-1)
    u = 1 / (c - 1) * torch.ones_like(w1)
    K = torch.exp(-cm / reg)
    Kt = K.transpose(2, 1)
    for _ in range(num_iters):
        v = w2 / (torch.bmm(Kt, u) + 1e-8)
        u = w1 / (torch.bmm(K, v) + 1e-8)
    flow = u.reshape(N, -1, 1) * K * v.reshape(N, 1, -1)
    wd = (flow * cm).sum(-1).sum(-1).mean()
    return loss_t + weight * wd
