"""sqrtm in ATen ops only: the ``torch`` backend of ``wkd::sqrtm`` and ``wkd::sqrtm_backward`` (contract: the
schema comment in csrc/ops.cpp, docs/design.md section 4), the algorithms of csrc/cpu/sqrtm.cpp for any device."""
from __future__ import annotations

from torch import Tensor

from .matfun import lyapunov, sqrtm_eigh, sqrtm_newton_schulz, symmetrize

__all__ = ["sqrtm_forward", "sqrtm_backward"]


def sqrtm_forward(S: Tensor, method: str = "newton_schulz", num_iters: int = 20) -> Tensor:
    """S^1/2 of S [B, n, n] (read as (S + S^T) / 2; arguments already checked)."""
    S = symmetrize(S.contiguous())
    if method == "eigh":
        return sqrtm_eigh(S, want_pinv=False)[0]
    return sqrtm_newton_schulz(S, num_iters)


def sqrtm_backward(grad_Y: Tensor, Y: Tensor, method: str = "newton_schulz", num_iters: int = 20) -> Tensor:
    """The symmetric X with Y X + X Y = (grad_Y + grad_Y^T) / 2."""
    return lyapunov(Y.contiguous(), grad_Y.contiguous(), method == "eigh", num_iters)
