"""Triton kernels of ``wkd::sparse_sinkhorn_triton``: Sinkhorn over one shared sparse CSR cost, scaling domain only
(the log domain runs on ATen ops, backend ``"torch"``).

One kernel, :func:`csr_product_kernel`: the CSR x dense product out[i, j] = sum_{e in row i} w_e x[col_e, j] over
[C, B] operands (one column per row of masses, any strides), one program per (block of ``BLOCK_R`` rows, block of
``BLOCK_B`` columns), each row a loop over its stored entries with vector loads along B; and its Sinkhorn epilogue:
``out = mass / (product + eps)``, the denominator ``product + eps`` optionally written to a history slot. The
weights w are K = exp(-cost / reg) (or K∘cost for the value), computed once per call by ATen ops, O(nnz).

The forward is a Python loop of ``num_iters`` iterations launching the kernel twice each (K^T u on the transposed
CSR arrays, then K v), the same recurrences, outputs and history layout as the ATen kernel
(wkd_kernels/aten/sparse_sinkhorn.py); the exact backward is the shared reverse sweep
:func:`wkd_kernels.aten.sinkhorn.exact_backward_sweep` with this kernel as its products. No host synchronisation.

Not validated on GPU hardware: the block sizes below are untuned (nothing was measured), and ``backend="auto"`` never
selects this kernel.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..aten.sinkhorn import exact_backward_sweep
from ..aten.sparse_sinkhorn import uniform_on_support, value_over_column_blocks
from ._support import explain_compile_errors
from .sinkhorn._device import div_rn, host_scalar
from .sinkhorn.launch import split_float

__all__ = ["csr_product_kernel", "SparseGibbs", "sparse_sinkhorn_forward", "sparse_sinkhorn_backward",
           "BLOCK_ROWS", "BLOCK_COLUMNS", "NUM_WARPS"]

# Rows per program, the largest column block (a power of two; smaller B uses the next power of two >= B, at least
# 16) and the warps per program. Untuned: no GPU has run this kernel.
BLOCK_ROWS = 4
BLOCK_COLUMNS = 128
NUM_WARPS = 4


@triton.jit
def csr_product_kernel(crow_ptr, col_ptr, w_ptr, x_ptr, out_ptr, mass_ptr, den_ptr, C, B,
                       sx0, sx1, so0, so1, sm0, sm1, sd0, sd1, eps_hi, eps_lo,
                       SCALING: tl.constexpr, STORE_DEN: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_B: tl.constexpr):
    """prod[i, j] = sum_{crow[i] <= e < crow[i + 1]} w[e] x[col[e], j] for the rows i of this program's row block and
    the columns j of its column block. SCALING=False: out = prod. SCALING=True: den = prod + eps, out = mass / den
    (correctly rounded in float32), and den written to ``den_ptr`` when STORE_DEN. Every [C, B] operand is addressed
    by its two strides (s*0 along C, s*1 along B). The accumulator has the dtype of ``out``."""
    pid_r = tl.program_id(0).to(tl.int64)
    pid_b = tl.program_id(1).to(tl.int64)
    cols = pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    cmask = cols < B
    x_cols = x_ptr + cols * sx1
    for r in range(BLOCK_R):
        row = pid_r * BLOCK_R + r
        valid = row < C
        # a row past C reads an empty entry range and stores nothing
        start = tl.load(crow_ptr + row, mask=valid, other=0).to(tl.int64)
        end = tl.load(crow_ptr + row + 1, mask=valid, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_B], dtype=out_ptr.dtype.element_ty)
        for e in range(start, end):
            w = tl.load(w_ptr + e)
            j = tl.load(col_ptr + e).to(tl.int64)
            acc += w * tl.load(x_cols + j * sx0, mask=cmask, other=0.0)
        smask = cmask & valid
        if SCALING:
            den = acc + host_scalar(eps_hi, eps_lo, acc.dtype)
            if STORE_DEN:
                tl.store(den_ptr + row * sd0 + cols * sd1, den, mask=smask)
            mass = tl.load(mass_ptr + row * sm0 + cols * sm1, mask=smask, other=0.0)
            safe_den = tl.where(smask, den, 1.0)  # masked-off lanes divide 0 by 1, not 0 by 0
            tl.store(out_ptr + row * so0 + cols * so1, div_rn(mass, safe_den), mask=smask)
        else:
            tl.store(out_ptr + row * so0 + cols * so1, acc, mask=smask)


def _column_block(B: int) -> int:
    return max(16, min(BLOCK_COLUMNS, triton.next_power_of_2(max(1, B))))


def csr_product(crow: Tensor, col: Tensor, w: Tensor, x: Tensor, out: Tensor, mass: Optional[Tensor] = None,
                den: Optional[Tensor] = None, eps: float = 0.0) -> Tensor:
    """One launch of :func:`csr_product_kernel`: out = W x ([C, J] operands of any strides, W the CSR matrix of
    (crow, col, w)); with ``mass``: out = mass / (W x + eps), and W x + eps written into ``den`` when given."""
    C, J = out.shape
    if C == 0 or J == 0:
        return out
    block_b = _column_block(J)
    grid = (triton.cdiv(C, BLOCK_ROWS), triton.cdiv(J, block_b))
    eps_hi, eps_lo = split_float(float(eps))
    scaling = mass is not None
    m = mass if scaling else out  # unused operands: any pointer of the right dtype
    d = den if den is not None else out
    csr_product_kernel[grid](crow, col, w, x, out, m, d, C, J, x.stride(0), x.stride(1), out.stride(0),
                             out.stride(1), m.stride(0), m.stride(1), d.stride(0), d.stride(1), eps_hi, eps_lo,
                             SCALING=scaling, STORE_DEN=den is not None, BLOCK_R=BLOCK_ROWS, BLOCK_B=block_b,
                             num_warps=NUM_WARPS)
    return out


class SparseGibbs:
    """The Gibbs weights of both CSR orientations, computed once per call as the ATen kernel computes them:
    K = exp(cost / -reg), K∘c = K * cost (on the rows' arrays and on the transposed arrays)."""

    def __init__(self, crow, col, cost, crow_t, col_t, cost_t, reg: float):
        self.crow, self.col, self.crow_t, self.col_t = crow, col, crow_t, col_t
        self.cost, self.cost_t = cost, cost_t
        self.K = torch.exp(cost / -reg)
        self.K_t = torch.exp(cost_t / -reg)
        self._KC = self._KC_t = None

    def KC(self) -> Tensor:
        if self._KC is None:
            self._KC = self.K * self.cost
        return self._KC

    def KC_t(self) -> Tensor:
        if self._KC_t is None:
            self._KC_t = self.K_t * self.cost_t
        return self._KC_t

    def mul(self, x: Tensor, weighted: bool = False, out: Optional[Tensor] = None) -> Tensor:
        """K x (K∘c x when weighted): [C, J] -> [C, J] (into ``out``, any strides, when given)."""
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
        return csr_product(self.crow, self.col, self.KC() if weighted else self.K, x, out)

    def t_mul(self, x: Tensor, weighted: bool = False, out: Optional[Tensor] = None) -> Tensor:
        """K^T x ((K∘c)^T x when weighted): [C, J] -> [C, J]."""
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
        return csr_product(self.crow_t, self.col_t, self.KC_t() if weighted else self.K_t, x, out)


@explain_compile_errors("wkd.sparse_sinkhorn_triton (Triton sparse_sinkhorn_forward)")
def sparse_sinkhorn_forward(a: Tensor, b: Tensor, crow: Tensor, col: Tensor, cost: Tensor, crow_t: Tensor,
                            col_t: Tensor, cost_t: Tensor, reg: float, num_iters: int, eps: float = 0.0,
                            keep_history: bool = True) -> Tuple[Tensor, ...]:
    """The scaling-domain forward of ``wkd::sparse_sinkhorn_triton`` (arguments already checked): masses a, b [C, B]
    of any strides. Returns ``(value [B], log_u [C, B], log_v [C, B], hist_r [T, C, B], hist_s [T, C, B], y [C, B])``
    as ``wkd::sparse_sinkhorn`` (hist_r, hist_s [0, C, B] and y [0, B] without ``keep_history``): per iteration
    v = b / (K^T u + eps) (s = K^T u + eps into hist_s[t]), u = a / (K v + eps) (r into hist_r[t]), one launch each.
    """
    C, B = a.shape
    T = num_iters if keep_history else 0
    gibbs = SparseGibbs(crow, col, cost, crow_t, col_t, cost_t, reg)
    hist_r, hist_s = a.new_empty(T, C, B), a.new_empty(T, C, B)
    u = uniform_on_support(a)
    v = torch.empty_like(u)
    for t in range(num_iters):
        csr_product(crow_t, col_t, gibbs.K_t, u, v, mass=b, den=hist_s[t] if keep_history else None, eps=eps)
        csr_product(crow, col, gibbs.K, v, u, mass=a, den=hist_r[t] if keep_history else None, eps=eps)
    if keep_history:
        y = gibbs.mul(v, weighted=True)
        value = (y * u).sum(0)
    else:
        y = a.new_empty(0, B)
        value = value_over_column_blocks(lambda x: gibbs.mul(x, weighted=True), u, v)
    return value, u.log_(), v.log_(), hist_r, hist_s, y


@explain_compile_errors("wkd.sparse_sinkhorn_triton_backward (Triton sparse_sinkhorn_backward)")
def sparse_sinkhorn_backward(grad_value: Tensor, a: Tensor, b: Tensor, crow: Tensor, col: Tensor, cost: Tensor,
                             crow_t: Tensor, col_t: Tensor, cost_t: Tensor, hist_r: Tensor, hist_s: Tensor,
                             y: Tensor, reg: float, eps: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """(grad_a, grad_b), both [C, B], of sum_b grad_value_b value_b through the scaling-domain loop (arguments
    already checked): :func:`wkd_kernels.aten.sinkhorn.exact_backward_sweep` on [B, C] views of the [C, B] buffers,
    its products launched on the [C, B] memory behind those views (no copy)."""
    gibbs = SparseGibbs(crow, col, cost, crow_t, col_t, cost_t, reg)

    def t_mul(x, weighted=False, out=None):  # x, out: [B, C] views; the product runs on their [C, B] transposes
        return gibbs.t_mul(x.t(), weighted, None if out is None else out.t()).t()

    def mul(x, weighted=False, out=None):
        return gibbs.mul(x.t(), weighted, None if out is None else out.t()).t()

    ga, gb = exact_backward_sweep(grad_value, a.t(), b.t(), hist_r.transpose(1, 2), hist_s.transpose(1, 2), y.t(),
                                  False, t_mul, mul, eps)
    return ga.t(), gb.t()
