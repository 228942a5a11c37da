"""GPU implementation of ``wkd::bures_wasserstein`` and its backward (docs/design.md section 4): the square roots, the
polar iteration and the Lyapunov solves are the one-program-per-matrix Triton kernels of ``sqrtm.py`` and
``nuclear_norm.py`` (each launched once for S1 and S2 together); the n x n products between them are batched torch
(cuBLAS) products.

  W^2 = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 |R2 R1|_*,   R_i = S_i^1/2   (|R2 R1|_* = tr (R1 S2 R1)^1/2)
  newton_schulz: R1, R2 by coupled Newton-Schulz; (|R2 R1|_*, polar factor Q) by the polar Newton-Schulz iteration.
  eigh:          R1, R2, (R1 S2 R1)^1/2 and its pseudo-inverse by the Jacobi kernel; Q = R2 R1 (R1 S2 R1)^+1/2.
  backward:      dW^2/dS1 = I + X1, R1 X1 + X1 R1 = -(R2 Q + Q^T R2);  dW^2/dS2 = I + X2, R2 X2 + X2 R2 = -(Q R1 + R1 Q^T)
"""
from __future__ import annotations

import torch

from . import nuclear_norm as _nn
from . import sqrtm as _sq


def _sym(S: torch.Tensor) -> torch.Tensor:
    return (S + S.transpose(-1, -2)) * 0.5


def _tr(A: torch.Tensor) -> torch.Tensor:
    return A.diagonal(0, -2, -1).sum(-1)


def bures_wasserstein_forward(mu1, S1, mu2, S2, method: str, num_iters: int):
    """(w2 [B], sqrt_S1, sqrt_S2, polar [B, n, n]) (arguments checked by the caller)."""
    B = S1.shape[0]
    S1, S2 = _sym(S1), _sym(S2)
    R, _ = _sq.sqrtm_forward(torch.cat([S1, S2], 0), method, num_iters)
    R1, R2 = R[:B].clone(), R[B:].clone()  # op outputs must not alias
    if method == "eigh":
        Proot, Pinv = _sq.sqrtm_forward(_sym(R1 @ S2 @ R1), "eigh", num_iters, want_inverse=True)
        cross = _tr(Proot)
        Q = R2 @ R1 @ Pinv
    else:
        cross, Q = _nn.nuclear_norm_forward(R2 @ R1, num_iters)
    w2 = (mu1 - mu2).square().sum(-1) + _tr(S1) + _tr(S2) - 2.0 * cross
    return w2, R1, R2, Q


def bures_wasserstein_backward(grad, mu1, mu2, R1, R2, Q, method: str, num_iters: int):
    """(grad_mu1, grad_S1, grad_mu2, grad_S2) of W^2 (arguments checked by the caller)."""
    B, n, _ = R1.shape
    g = grad.view(B, 1, 1)
    eye = torch.eye(n, dtype=R1.dtype, device=R1.device)
    d = (mu1 - mu2) * (2.0 * grad.view(B, 1))
    X = _sq.lyapunov(torch.cat([R1, R2], 0), -2.0 * torch.cat([R2 @ Q, Q @ R1], 0), method, num_iters)
    return d, (eye + X[:B]) * g, -d, (eye + X[B:]) * g
