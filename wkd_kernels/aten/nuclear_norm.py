"""nuclear_norm in ATen ops only: the ``torch`` backend of ``wkd::nuclear_norm`` (contract: the schema comment in
csrc/ops.cpp), the polar Newton-Schulz iteration of csrc/cpu/sqrtm.cpp for any device."""
from __future__ import annotations

from typing import Tuple

from torch import Tensor

from .matfun import polar_newton_schulz

__all__ = ["nuclear_norm_forward"]


def nuclear_norm_forward(M: Tensor, num_iters: int = 20) -> Tuple[Tensor, Tensor]:
    """(value [B], polar [B, p, q]) of M [B, p, q] (arguments already checked)."""
    return polar_newton_schulz(M.contiguous(), num_iters)
