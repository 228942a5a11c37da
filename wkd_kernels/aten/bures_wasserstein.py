"""bures_wasserstein in ATen ops only: the ``torch`` backend of ``wkd::bures_wasserstein`` and its backward
(contract: the schema comment in csrc/ops.cpp, docs/design.md section 4), the composition of
csrc/cpu/bures_wasserstein.cpp for any device:
  W^2 = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 |R2 R1|_*,   R_i = S_i^1/2
  backward: dW^2/dS1 = I + X1, R1 X1 + X1 R1 = -(R2 Q + Q^T R2);  dW^2/dS2 = I + X2, R2 X2 + X2 R2 = -(Q R1 + R1 Q^T)
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .matfun import lyapunov, polar_newton_schulz, sqrtm_eigh, sqrtm_newton_schulz, symmetrize

__all__ = ["bures_wasserstein_forward", "bures_wasserstein_backward"]


def _tr(A: Tensor) -> Tensor:
    return A.diagonal(0, -2, -1).sum(-1)


def bures_wasserstein_forward(mu1: Tensor, S1: Tensor, mu2: Tensor, S2: Tensor, method: str = "newton_schulz",
                              num_iters: int = 20) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(w2 [B], sqrt_S1, sqrt_S2, polar [B, n, n]) (arguments already checked)."""
    B = S1.shape[0]
    S1, S2 = symmetrize(S1.contiguous()), symmetrize(S2.contiguous())
    if method == "eigh":
        R1 = sqrtm_eigh(S1, False)[0]
        R2 = sqrtm_eigh(S2, False)[0]
        Proot, Pinv = sqrtm_eigh(symmetrize(R1 @ S2 @ R1), True)
        cross = _tr(Proot)
        Q = R2 @ R1 @ Pinv
    else:
        R = sqrtm_newton_schulz(torch.cat([S1, S2], 0), num_iters)
        R1, R2 = R[:B].clone(), R[B:].clone()  # op outputs must not alias
        cross, Q = polar_newton_schulz(R2 @ R1, num_iters)
    w2 = (mu1 - mu2).square().sum(-1) + _tr(S1) + _tr(S2) - 2.0 * cross
    return w2, R1, R2, Q


def bures_wasserstein_backward(grad: Tensor, mu1: Tensor, mu2: Tensor, R1: Tensor, R2: Tensor, Q: Tensor,
                               method: str = "newton_schulz",
                               num_iters: int = 20) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_mu1, grad_S1, grad_mu2, grad_S2) of sum_b grad_b W^2_b (arguments already checked)."""
    B, n = R1.shape[0], R1.shape[1]
    g = grad.view(B, 1, 1)
    eye = torch.eye(n, dtype=R1.dtype, device=R1.device)
    d = (mu1 - mu2) * (2.0 * grad.view(B, 1))
    X = lyapunov(torch.cat([R1, R2], 0), -2.0 * torch.cat([R2 @ Q, Q @ R1], 0), method == "eigh", num_iters)
    return d, (eye + X[:B]) * g, -d, (eye + X[B:]) * g
