"""Float64 pure-PyTorch references of every op (tests and benchmarks compare against them).

They follow the op contracts of design.md literally, loop by loop, and are differentiable by autograd, so
``torch.autograd.grad`` through them gives the exact gradient the kernels must reproduce. They form the
B x n x m kernel matrix when needed: meant for checking, not for speed.
"""
from __future__ import annotations

import torch
from torch import Tensor


def sinkhorn_reference(a: Tensor, b: Tensor, cost: Tensor, reg: float, num_iters: int, eps: float = 0.0,
                       log_domain: bool = False, dtype: torch.dtype = torch.float64):
    """Literal fixed-iteration Sinkhorn (design.md section 3), computed in ``dtype`` (float64 by default).

    a [B, n], b [B, m], cost [n, m] or [B, n, m]. Returns (value [B], u [B, n], v [B, m]) in the scaling
    domain, or (value, log u, log v) with ``log_domain=True`` (same mathematics, log-sum-exp iterations).
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
        for _ in range(num_iters):
            v = b / (torch.einsum("bi,bij->bj", u, K) + eps)
            u = a / (torch.einsum("bij,bj->bi", K, v) + eps)
        value = torch.einsum("bi,bij,bj->b", u, K * C, v)
        return value, u, v
    L = -C / reg
    ninf = torch.tensor(float("-inf"), dtype=dtype, device=a.device)
    log_u = torch.where(supp > 0, -torch.log(cnt).expand_as(a), ninf)
    log_a = torch.where(a > 0, torch.log(a.clamp_min(torch.finfo(dtype).tiny)), ninf)
    log_b = torch.where(b > 0, torch.log(b.clamp_min(torch.finfo(dtype).tiny)), ninf)

    def add_eps(x):
        return torch.logaddexp(x, torch.full_like(x, float(torch.log(torch.tensor(eps, dtype=dtype))))) if eps > 0 else x

    log_v = None
    for _ in range(num_iters):
        log_v = log_b - add_eps(torch.logsumexp(log_u.unsqueeze(2) + L, dim=1))
        log_u = log_a - add_eps(torch.logsumexp(L + log_v.unsqueeze(1), dim=2))
    P = torch.exp(log_u.unsqueeze(2) + L + log_v.unsqueeze(1))
    value = (P * C).sum((1, 2))
    return value, log_u, log_v
