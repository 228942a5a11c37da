"""Sparse CSR costs for :func:`wkd_kernels.sparse_sinkhorn`: :func:`csr_from_dense` (a dense cost with the couplings
to keep) and :func:`knn_kernel`, the symmetric k-nearest-neighbour cost of token or class embeddings (the sparse
kernel of WASD, github.com/aailab-kaist/WASD), built block by block, never C x C."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..aten.sparse_sinkhorn import pair_cost
from .checks import as_int

__all__ = ["csr_from_dense", "knn_kernel"]


def csr_from_dense(cost: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """A dense [C, C] cost as the sparse CSR cost of :func:`sparse_sinkhorn`, storing every entry where ``mask``
    (bool [C, C]; None: all) is True, zero costs included (``cost.to_sparse_csr()`` would drop them, excluding
    e.g. the diagonal couplings)."""
    op = "wkd.csr_from_dense"
    if not isinstance(cost, Tensor) or cost.layout != torch.strided or cost.dim() != 2 \
            or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"{op}: `cost` must be a dense square [C, C] tensor")
    if mask is None:
        mask = torch.ones_like(cost, dtype=torch.bool)
    elif not isinstance(mask, Tensor) or mask.shape != cost.shape or mask.dtype != torch.bool:
        raise ValueError(f"{op}: `mask` must be a bool tensor of the shape of `cost` {list(cost.shape)}")
    C = cost.shape[0]
    mask = mask.to(cost.device)
    crow = torch.zeros(C + 1, dtype=torch.int64, device=cost.device)
    crow[1:] = torch.cumsum(mask.sum(1), 0)
    col = mask.nonzero()[:, 1]
    return torch.sparse_csr_tensor(crow, col, cost.detach()[mask], (C, C))


# ----------------------------------------------------------------------------------------------------------
# The k-nearest-neighbour cost
# ----------------------------------------------------------------------------------------------------------
def knn_kernel(embeddings: Tensor, k: int, cost: str = "cosine", *, block_rows: int = 1024) -> Tensor:
    """The symmetric k-nearest-neighbour cost of C embeddings as a sparse CSR [C, C] tensor for
    :func:`sparse_sinkhorn`: entry (i, j) is stored when j is among the k nearest neighbours of i or i among those
    of j, plus the diagonal (cost 0), with value the cost between the two embeddings.

    Args:
        embeddings: [C, d] float32/float64 (e.g. the teacher's token embedding matrix; detached).
        k: neighbours per row besides the row itself, 1 <= k < C.
        cost: ``"cosine"``: 1 - cos(e_i, e_j) in [0, 2]; ``"sqeuclidean"``: |e_i - e_j|^2.
        block_rows: rows per block of the neighbour search: memory O(block_rows C), never C x C.

    Returns:
        sparse CSR [C, C] with at most C (2k + 1) stored entries, in the dtype and on the device of ``embeddings``.
    """
    op = "wkd.knn_kernel"
    k = as_int(k, "k", op)
    block_rows = as_int(block_rows, "block_rows", op)
    if not isinstance(embeddings, Tensor) or embeddings.dim() != 2:
        raise ValueError(f"{op}: `embeddings` must be [C, d], got "
                         f"{list(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__}")
    if embeddings.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: `embeddings` must be float32 or float64, got {embeddings.dtype}")
    C = embeddings.shape[0]
    if not 1 <= k < C:
        raise ValueError(f"{op}: `k` must be in [1, C - 1] = [1, {C - 1}], got {k}")
    if cost not in ("cosine", "sqeuclidean"):
        raise ValueError(f"{op}: `cost` must be 'cosine' or 'sqeuclidean', got {cost!r}")
    if block_rows < 1:
        raise ValueError(f"{op}: `block_rows` must be >= 1, got {block_rows}")
    with torch.no_grad():
        e = embeddings.detach()
        if not bool(torch.isfinite(e).all()):
            raise ValueError(f"{op}: `embeddings` contains non-finite values (inf or nan)")
        if cost == "cosine":
            norms = e.norm(dim=1, keepdim=True)
            if bool((norms == 0).any()):
                raise ValueError(f"{op}: `embeddings` has zero rows, whose cosine distance is undefined")
            e = e / norms
        e_sq = (e * e).sum(1) if cost == "sqeuclidean" else None
        rows, cols, vals = [], [], []
        for i0 in range(0, C, block_rows):
            i1 = min(C, i0 + block_rows)
            d = pair_cost(e[i0:i1], e, cost, e_sq)  # [R, C]
            idx = torch.arange(i0, i1, device=e.device)
            d[idx - i0, idx] = -1.0  # the row itself first, then k others
            dist, nb = torch.topk(d, k + 1, dim=1, largest=False)
            rows.append(idx.repeat_interleave(k + 1))
            cols.append(nb.reshape(-1))
            vals.append(dist.clamp_min(0.0).reshape(-1))
        r, c, v = torch.cat(rows), torch.cat(cols), torch.cat(vals)
        # symmetrise: both orientations, duplicates merged (equal costs up to rounding: keep the larger)
        r, c, v = torch.cat([r, c]), torch.cat([c, r]), torch.cat([v, v])
        keys, inverse = torch.unique(r * C + c, return_inverse=True)
        merged = torch.full((keys.numel(),), -1.0, dtype=v.dtype, device=v.device).scatter_reduce_(
            0, inverse, v, "amax")
        rr, cc = keys // C, keys % C
        merged = torch.where(rr == cc, torch.zeros_like(merged), merged)
        counts = torch.bincount(rr, minlength=C)
        crow = torch.zeros(C + 1, dtype=torch.int64, device=e.device)
        crow[1:] = torch.cumsum(counts, 0)
        return torch.sparse_csr_tensor(crow, cc, merged, (C, C))
