"""Sinkhorn over one shared sparse kernel, in ATen ops only (any device type): the kernel of
:func:`wkd_kernels.ops.sparse_sinkhorn.sparse_sinkhorn` (contract and API: docs/vocabulary_ot.md).

The cost is a sparse CSR [C, C] tensor: a stored entry (i, j) is an allowed coupling with cost c_ij, an absent one is
excluded (K_ij = 0). The same recurrences as the dense ``wkd::sinkhorn`` (docs/design.md section 3): per row,
u0 = 1/|supp a| on supp a, then ``num_iters`` times ``v = b / (K^T u + eps); u = a / (K v + eps)``, value
``sum_ij u_i K_ij c_ij v_j``.

Layout: the B rows of masses are held as the columns of [C, B] tensors, so that every product is one CSR x dense
product (measured on CPU with C = 50,257, B = 512, k = 8: 1.4x faster than CSR x a transposed view of [B, C]
memory, 2.9x faster than dense [B, C] x CSR). K and K^T are both kept as CSR (K^T built once by a sort of the
nnz). The log domain runs the same iterations with sparse log-sum-exp reductions: per stored entry e_ij = p_i -
c_ij / reg, a segment max over the CSR rows (``torch.segment_reduce``) and a shifted exp-sum (``index_add_``),
over column blocks of at most ``chunk_elements`` nnz x block temporaries. :class:`EmbeddingCost` is the
every-coupling alternative: the cost from embeddings, K stored whole or recomputed per row tile.

The exact reverse sweep is :func:`wkd_kernels.aten.sinkhorn.exact_backward_sweep` itself (the same gauge correction
as the dense kernels), given these products on transposed views of the [C, B] buffers.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .sinkhorn import exact_backward_sweep

__all__ = ["SparseCost", "sparse_sinkhorn_forward", "sparse_sinkhorn_backward", "CHUNK_ELEMENTS"]

# Elements of the largest [nnz, J] temporary of the log domain (2^24: 64 MiB in float32).
CHUNK_ELEMENTS = 1 << 24
_NINF = float("-inf")


class _Pattern:
    """One CSR orientation: row pointers, column indices, per-nnz row index and cost, and the scaling-domain
    matrices K = exp(-c / reg) and K∘c as sparse CSR tensors (built on first use)."""

    def __init__(self, crow: Tensor, col: Tensor, cost: Tensor, size: int, reg: float):
        self.crow, self.col, self.cost, self.size, self.reg = crow, col, cost, size, reg
        self.lengths = crow[1:] - crow[:-1]
        self._row = None
        self.L = cost / -reg
        self._K = self._KC = None
        # int32 indices where they fit: the CPU sparse x dense product converts int64 indices on every call
        small = col.numel() < 2 ** 31 and size < 2 ** 31
        self._crow_mm = crow.to(torch.int32) if small else crow
        self._col_mm = col.to(torch.int32) if small else col

    @property
    def row(self) -> Tensor:
        """The row index of every stored entry ([nnz] int64; built on first use: the scaling domain never reads
        it)."""
        if self._row is None:
            self._row = torch.repeat_interleave(torch.arange(self.size, device=self.crow.device), self.lengths,
                                                output_size=self.col.numel())
        return self._row

    def _csr(self, values: Tensor) -> Tensor:
        return torch.sparse_csr_tensor(self._crow_mm, self._col_mm, values, (self.size, self.size))

    def K(self) -> Tensor:
        if self._K is None:
            self._K = self._csr(torch.exp(self.L))
        return self._K

    def KC(self) -> Tensor:
        if self._KC is None:
            self._KC = self._csr(torch.exp(self.L) * self.cost)
        return self._KC

    def mm(self, x: Tensor, weighted: bool = False, out: Optional[Tensor] = None) -> Tensor:
        """[C, J] -> [C, J]: K x (K∘c x when weighted), written into ``out`` (contiguous [C, J]) when given. One
        ``addmm`` with beta = 0 into a preallocated output: ``torch.sparse.mm`` would also zero-fill and copy it
        (measured 1.6-2x slower on CPU)."""
        x = x.contiguous()
        if out is None:
            out = x.new_empty(self.size, x.shape[1])
        return torch.addmm(out, self.KC() if weighted else self.K(), x, beta=0, out=out)

    def lse(self, p: Tensor, c: Optional[Tensor] = None, weighted: bool = False,
            chunk_elements: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """Per row i and column t of p [C, J]: mx_it = max_j (L_ij + p_jt) over the stored j of row i, and
        sm_it = sum_j c_jt W_ij exp(L_ij + p_jt - mx_it) (c: signed weights [C, J] or None; W = cost if weighted).
        Rows whose terms are all -inf get mx = -inf, sm = 0."""
        nnz, J = self.col.numel(), p.shape[1]
        cap = CHUNK_ELEMENTS if chunk_elements is None else int(chunk_elements)
        width = max(1, min(J, cap // max(1, nnz)))
        mxs, sms = [], []
        for t0 in range(0, J, width):
            t1 = min(J, t0 + width)
            e = p[:, t0:t1].index_select(0, self.col).add_(self.L.unsqueeze(1))  # [nnz, J']
            mx = torch.segment_reduce(e, "max", lengths=self.lengths, axis=0)
            shift = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
            e.sub_(shift.index_select(0, self.row)).exp_()
            if weighted:
                e.mul_(self.cost.unsqueeze(1))
            if c is not None:
                e.mul_(c[:, t0:t1].index_select(0, self.col))
            sm = torch.zeros_like(mx).index_add_(0, self.row, e)
            mxs.append(mx)
            sms.append(sm)
        if len(mxs) == 1:
            return mxs[0], sms[0]
        if not mxs:  # no column
            return p.new_empty(self.size, 0), p.new_empty(self.size, 0)
        return torch.cat(mxs, 1), torch.cat(sms, 1)


class SparseCost:
    """The shared sparse cost of :func:`sparse_sinkhorn_forward`: ``cost`` a sparse CSR [C, C] tensor (values =
    cost of the stored couplings) and ``reg``; holds K and K^T (as CSR) and their log-domain structure."""

    def __init__(self, cost: Optional[Tensor], reg: float, arrays: Optional[Tuple[Tensor, ...]] = None):
        if arrays is None:  # from the CSR tensor: K^T = the same entries sorted by (column, row)
            # own copies (O(nnz)), not views of the sparse tensor's members: torch.compile traces the arrays as graph
            # inputs, and a view of a sparse tensor is not one it can trace
            crow, col, val = cost.crow_indices().clone(), cost.col_indices().clone(), cost.values().detach().clone()
            C = cost.shape[0]
            rows = _Pattern(crow, col, val, C, reg)
            order = torch.argsort(col * C + rows.row, stable=True)
            counts = torch.bincount(col, minlength=C)
            crow_t = torch.zeros(C + 1, dtype=crow.dtype, device=crow.device)
            crow_t[1:] = torch.cumsum(counts, 0)
            arrays = (crow, col, val, crow_t, rows.row[order].to(col.dtype), val[order])
        else:  # the six CSR arrays of both orientations (the op's arguments)
            C = arrays[0].numel() - 1
            rows = _Pattern(*arrays[:3], C, reg)
        val = arrays[2]
        self.size, self.reg, self.dtype, self.device = C, float(reg), val.dtype, val.device
        self.nnz = val.numel()
        self.arrays = arrays  # (crow, col, cost, crow_t, col_t, cost_t): the arguments of wkd::sparse_sinkhorn
        self.rows = rows
        self.cols = _Pattern(*arrays[3:], C, reg)
        self.max_cost = val.max() if self.nnz else val.new_zeros(())

    @classmethod
    def from_arrays(cls, crow: Tensor, col: Tensor, cost: Tensor, crow_t: Tensor, col_t: Tensor, cost_t: Tensor,
                    reg: float) -> "SparseCost":
        """From the CSR arrays of the cost and of its transpose (the arguments of ``wkd::sparse_sinkhorn``)."""
        return cls(None, reg, (crow, col, cost, crow_t, col_t, cost_t))

    # products on [C, J] tensors
    def mul(self, y: Tensor, weighted: bool = False, out: Optional[Tensor] = None) -> Tensor:
        """K y (K∘c y when weighted): [C, J] -> [C, J] (into ``out`` when given)."""
        return self.rows.mm(y, weighted, out)

    def t_mul(self, x: Tensor, weighted: bool = False, out: Optional[Tensor] = None) -> Tensor:
        """K^T x ((K∘c)^T x when weighted): [C, J] -> [C, J] (into ``out`` when given)."""
        return self.cols.mm(x, weighted, out)


def _log_add_eps(x: Tensor, eps: float) -> Tensor:
    return torch.logaddexp(x, torch.full_like(x, math.log(eps))) if eps > 0 else x


def _log_of(mx: Tensor, sm: Tensor) -> Tensor:
    """log(exp(mx) sm) with -inf where sm == 0."""
    return torch.where(sm > 0, mx + torch.log(sm), torch.full_like(sm, _NINF))


# Columns of the [C, J] block of (K∘c) v from which the value is summed without a history: C J <= this (2^18: 1 MiB
# in float32).
VALUE_BLOCK_ELEMENTS = 1 << 18


def uniform_on_support(a: Tensor) -> Tensor:
    """u0 [C, B]: 1/|supp a| on the support of each column of ``a``, 0 elsewhere, in a fresh contiguous buffer; the
    count is a sum of ones in that buffer (exact; a boolean sum would make an int64 [C, B] copy)."""
    u = torch.empty(a.shape, dtype=a.dtype, device=a.device).copy_(a > 0)
    return u.div_(u.sum(0, keepdim=True))


def value_over_column_blocks(weighted_mul, u: Tensor, v: Tensor) -> Tensor:
    """value [B] = sum_i u_i ((K∘c) v)_i per column, summed over column blocks of at most VALUE_BLOCK_ELEMENTS
    numbers (one [C, J] temporary instead of a [C, B] one); ``weighted_mul(x)`` = (K∘c) x for [C, J] x."""
    C, B = u.shape
    width = max(1, min(B, VALUE_BLOCK_ELEMENTS // max(1, C)))
    return torch.cat([weighted_mul(v[:, j0:j0 + width]).mul_(u[:, j0:j0 + width]).sum(0)
                      for j0 in range(0, B, width)]) if B > 0 else u.new_zeros(0)


def sparse_sinkhorn_forward(a: Tensor, b: Tensor, K: SparseCost, num_iters: int, eps: float = 0.0,
                            log_domain: bool = False, keep_history: bool = True,
                            chunk_elements: Optional[int] = None) -> Tuple[Tensor, ...]:
    """(value [B], u [C, B], v [C, B], hist_r [T, C, B], hist_s [T, C, B], y [C, B]) for masses ``a``, ``b``
    given as [C, B] (one column per row of masses; arguments already checked). u, v are scalings (log-scalings in
    the log domain), contiguous [C, B] whatever the layout of ``a`` and ``b`` (which the scaling domain reads
    elementwise only: transposed views are fine); hist_r / hist_s the denominators K v + eps and K^T u + eps
    (their logs in the log domain), kept for the exact backward when ``keep_history`` (else T = 0);
    y = (K∘c) v_T (its log in the log domain). ``K``: a :class:`SparseCost` or an :class:`EmbeddingCost`."""
    C, B = a.shape
    T = num_iters if keep_history else 0
    hist_r, hist_s = a.new_empty(T, C, B), a.new_empty(T, C, B)
    if not log_domain:
        # preallocated buffers: no allocation per iteration. With the history each denominator goes to its slot;
        # without it, into the buffer of the scaling it replaces (K^T u into v, K v into u): u and v are the only
        # [C, B] buffers, and the value is summed over column blocks of (K∘c) v.
        u = uniform_on_support(a)
        v = torch.empty_like(u)
        for t in range(num_iters):
            s = K.t_mul(u, out=hist_s[t] if keep_history else v)
            if eps > 0:
                s.add_(eps)
            torch.div(b, s, out=v)
            r = K.mul(v, out=hist_r[t] if keep_history else u)
            if eps > 0:
                r.add_(eps)
            torch.div(a, r, out=u)
        if keep_history:
            y = K.mul(v, weighted=True)
            return (y * u).sum(0), u, v, hist_r, hist_s, y
        value = value_over_column_blocks(lambda x: K.mul(x, weighted=True), u, v)
        return value, u, v, hist_r, hist_s, a.new_empty(0, B)
    supp = a > 0
    cnt = supp.sum(0, keepdim=True).to(a.dtype)
    log_a, log_b = torch.log(a), torch.log(b)
    u = torch.where(supp, -torch.log(cnt), torch.full_like(a, _NINF))
    v = log_b
    for t in range(num_iters):
        s = _log_add_eps(_log_of(*K.cols.lse(u, chunk_elements=chunk_elements)), eps)
        v = log_b - s
        r = _log_add_eps(_log_of(*K.rows.lse(v, chunk_elements=chunk_elements)), eps)
        u = log_a - r
        if keep_history:
            hist_r[t].copy_(r)
            hist_s[t].copy_(s)
    mx, sm = K.rows.lse(v, weighted=True, chunk_elements=chunk_elements)
    y = _log_of(mx, sm)
    fin = torch.isfinite(u) & (sm > 0)
    value = torch.where(fin, torch.exp(torch.where(fin, u + mx, torch.zeros_like(u))) * sm,
                        torch.zeros_like(sm)).sum(0)
    return value, u, v, hist_r, hist_s, (y if keep_history else a.new_empty(0, B))


def sparse_sinkhorn_backward(grad_value: Tensor, a: Tensor, b: Tensor, K: SparseCost, hist_r: Tensor,
                             hist_s: Tensor, y: Tensor, log_domain: bool = False, eps: Optional[float] = None,
                             chunk_elements: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """(grad_a, grad_b), both [C, B], of sum_t grad_value_t value_t through the fixed-iteration loop (the exact
    reverse sweep of :func:`wkd_kernels.aten.sinkhorn.exact_backward_sweep`, run on [B, C] views)."""
    aT, bT, yT = a.t(), b.t(), y.t()
    hrT, hsT = hist_r.transpose(1, 2), hist_s.transpose(1, 2)

    if not log_domain:
        def product(fn, x, weighted, out):  # x, out: [B, C] views; the [C, B] product written in place
            if out is not None and out.t().is_contiguous():
                fn(x.t(), weighted, out=out.t())
                return out
            res = fn(x.t(), weighted).t()
            return res if out is None else out.copy_(res)

        def t_mul(x, weighted=False, out=None):
            return product(K.t_mul, x, weighted, out)

        def mul(yv, weighted=False, out=None):
            return product(K.mul, yv, weighted, out)

        ga, gb = exact_backward_sweep(grad_value, aT, bT, hrT, hsT, yT, False, t_mul, mul, eps)
        return ga.t(), gb.t()

    def col_red(p, c, weighted):  # per column j of K: over the stored i of column j
        mx, sm = K.cols.lse(p.t(), None if c is None else c.t(), weighted, chunk_elements)
        return mx.t(), sm.t()

    def row_red(q, c, weighted):
        mx, sm = K.rows.lse(q.t(), None if c is None else c.t(), weighted, chunk_elements)
        return mx.t(), sm.t()

    ga, gb = exact_backward_sweep(grad_value, aT, bT, hrT, hsT, yT, True, col_red, row_red, eps)
    return ga.t(), gb.t()


# ----------------------------------------------------------------------------------------------------------
# Every coupling allowed, the cost computed from embeddings: K stored whole ("dense"), stored whole in bfloat16
# ("dense_bf16") or recomputed per row tile ("implicit", never C x C in memory)
# ----------------------------------------------------------------------------------------------------------
def pair_cost(x: Tensor, y: Tensor, kind: str, y_sq: Optional[Tensor] = None) -> Tensor:
    """[R, C] cost between rows of x and of y: "cosine" (rows already unit-norm): 1 - x y^T, "sqeuclidean":
    |x|^2 + |y|^2 - 2 x y^T; clamped at 0 (rounding)."""
    if kind == "cosine":
        return (1.0 - x @ y.t()).clamp_min_(0.0)
    if y_sq is None:
        y_sq = (y * y).sum(1)
    return ((x * x).sum(1, keepdim=True) + y_sq.unsqueeze(0) - 2.0 * (x @ y.t())).clamp_min_(0.0)


EMBEDDING_PATHS = ("dense", "dense_bf16", "implicit")


def embedding_path(size: int, element_size: int, max_kernel_bytes: int, path: Optional[str], op: str) -> str:
    """The path of :class:`EmbeddingCost` for C = ``size`` classes: ``path`` itself when given (honoured even where
    its matrices exceed ``max_kernel_bytes``), else by size: "dense" when the cost, K and K∘c in the compute dtype
    (3 C^2 ``element_size`` bytes) fit in ``max_kernel_bytes``, else "dense_bf16" when K and K∘c in bfloat16
    (2 C^2 2 bytes) fit, else "implicit"."""
    if path is not None:
        if path not in EMBEDDING_PATHS:
            raise ValueError(f"{op}: `path` must be None, 'dense', 'dense_bf16' or 'implicit', got {path!r}")
        return path
    if 3 * size * size * element_size <= max_kernel_bytes:
        return "dense"
    return "dense_bf16" if 2 * size * size * 2 <= max_kernel_bytes else "implicit"


class EmbeddingCost:
    """The full C x C cost between embeddings (cosine or squared Euclidean), for :func:`sparse_sinkhorn_forward`
    in place of a :class:`SparseCost`. Three paths:

    - ``"dense"``: stores the cost, K and K∘c ([C, C] each, in the compute dtype).
    - ``"dense_bf16"``: stores K and K∘c as bfloat16 [C, C] (2 bytes an entry; no stored cost: the max cost is
      taken tile by tile at construction). The scaling domain multiplies by them per tile of ``tile_rows`` rows
      upcast to the compute dtype (extra memory O(tile_rows C), no exp or cost recomputation); the scalings stay
      in the compute dtype. The log domain recomputes the cost per tile as "implicit" does: log K of a bfloat16 K
      would be -inf wherever K underflows (c / reg beyond ~92, as float32) and off by up to 2^-9 in absolute terms
      everywhere, while the log domain is meant for exactly the c / reg that underflow. Each stored entry is
      rounded by a relative 2^-9 at most, so the value is not float32-exact. Measured against the float64 dense
      path (cosine cost, random embeddings, B = 8, 50 scaling-domain iterations, C = 300..2000, d = 32..64,
      reg = 0.05..0.2, 42 cases over 3 seeds; float64 compute gave the same errors): value relative error at most
      1.4e-3; gradients' norm-relative error at most 6e-3 (exact) and 2.8e-4 (envelope).
    - ``"implicit"``: recomputes the cost and K per tile of ``tile_rows`` rows at every product (memory
      O(tile_rows C), compute d/B times a stored product).

    The cost is symmetric: K^T = K."""

    def __init__(self, embeddings: Tensor, reg: float, kind: str, path: str, tile_rows: int):
        e = embeddings.detach()
        if kind == "cosine":
            e = e / e.norm(dim=1, keepdim=True)
        self.e, self.kind, self.path, self.reg = e, kind, path, float(reg)
        self.size, self.dtype, self.device = e.shape[0], e.dtype, e.device
        self.e_sq = (e * e).sum(1) if kind == "sqeuclidean" else None
        self.tile_rows = max(1, int(tile_rows))
        self.rows = self.cols = self  # symmetric: the same reductions both ways
        self._tiles = [(i0, min(self.size, i0 + self.tile_rows)) for i0 in range(0, self.size, self.tile_rows)]
        if path == "dense":
            self._C = pair_cost(e, e, kind, self.e_sq)
            self._K = torch.exp(self._C / -self.reg)
            self._KC = self._K * self._C
            self.max_cost = self._C.max()
        elif path == "dense_bf16":  # K and K∘c rounded from the compute dtype, one tile of rows at a time
            C = self.size
            self._K = torch.empty(C, C, dtype=torch.bfloat16, device=self.device)
            self._KC = torch.empty(C, C, dtype=torch.bfloat16, device=self.device)
            maxima = []
            for i0, i1 in self._tiles:
                c = self._cost(i0, i1)
                maxima.append(c.max())
                k = torch.exp(c / -self.reg)
                self._K[i0:i1].copy_(k)
                self._KC[i0:i1].copy_(k.mul_(c))
            self.max_cost = torch.stack(maxima).max()
        else:
            self.max_cost = max((self._cost(i0, i1).max() for i0, i1 in self._tiles), key=float)

    @property
    def stored_bytes(self) -> int:
        """Bytes of the stored [C, C] matrices: 3 C^2 element_size ("dense"), 4 C^2 ("dense_bf16"), 0 ("implicit")."""
        return sum(m.nbytes for m in (getattr(self, "_C", None), getattr(self, "_K", None),
                                      getattr(self, "_KC", None)) if m is not None)

    def _cost(self, i0: int, i1: int) -> Tensor:
        if self.path == "dense":
            return self._C[i0:i1]
        return pair_cost(self.e[i0:i1], self.e, self.kind, self.e_sq)

    def mul(self, y: Tensor, weighted: bool = False, out: Optional[Tensor] = None) -> Tensor:
        """K y (K∘c y when weighted): [C, J] -> [C, J] (into ``out`` when given)."""
        if out is None:
            out = y.new_empty(self.size, y.shape[1])
        if self.path == "dense":
            return torch.mm(self._KC if weighted else self._K, y, out=out)
        if self.path == "dense_bf16":  # the stored bfloat16 rows upcast one tile at a time
            stored = self._KC if weighted else self._K
            for i0, i1 in self._tiles:
                torch.mm(stored[i0:i1].to(y.dtype), y, out=out[i0:i1])
            return out
        for i0, i1 in self._tiles:
            c = self._cost(i0, i1)
            k = torch.exp(c / -self.reg)
            torch.mm(k.mul_(c) if weighted else k, y, out=out[i0:i1])
        return out

    t_mul = mul

    def lse(self, p: Tensor, c: Optional[Tensor] = None, weighted: bool = False,
            chunk_elements: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """The reductions of :meth:`_Pattern.lse` over all j: per row i and column t of p [C, J],
        mx_it = max_j (L_ij + p_jt), sm_it = sum_j c_jt W_ij exp(L_ij + p_jt - mx_it)."""
        C, J = p.shape
        cap = CHUNK_ELEMENTS if chunk_elements is None else int(chunk_elements)
        mx, sm = p.new_empty(C, J), p.new_empty(C, J)
        for i0, i1 in self._tiles:
            cost = self._cost(i0, i1)
            L = cost / -self.reg  # [R, C]
            width = max(1, min(J, cap // max(1, (i1 - i0) * C)))
            for t0 in range(0, J, width):
                t1 = min(J, t0 + width)
                e = L.unsqueeze(2) + p[:, t0:t1].unsqueeze(0)  # [R, C, J']
                m = e.amax(1)
                shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
                e.sub_(shift.unsqueeze(1)).exp_()
                if weighted:
                    e.mul_(cost.unsqueeze(2))
                if c is not None:
                    e.mul_(c[:, t0:t1].unsqueeze(0))
                mx[i0:i1, t0:t1] = m
                sm[i0:i1, t0:t1] = e.sum(1)
        return mx, sm
