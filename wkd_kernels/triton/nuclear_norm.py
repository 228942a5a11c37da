"""Triton kernel of ``wkd::nuclear_norm`` (docs/design.md section 4, the low-rank Bures-Wasserstein path), one program
per matrix M [p, q] (p, q <= MAX_N, zero-padded to a register tile).

  _nuclear_norm_fwd   Newton-Schulz for the orthogonal polar factor: X0 = M / ||M||_F (M scaled by its largest
                      |entry| first: no under/overflow of ||M||_F^2), at most num_iters times
                      X <- X (3I - X^T X) / 2, after log(1/eps)/log(1.5) steps (float32 40,
                      float64 89) stopping once a step raises <X, M> by at most min(p, q) eps of it
                      (two ``tl.dot`` per step, float32 precision from the ``precision`` argument); polar = X,
                      value = <polar, M> = sum_i q(s_i) s_i (q -> 1 on every nonzero singular value s_i).
The backward of the nuclear norm is grad * polar (no kernel). Larger matrices use the same iteration as batched
torch products.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._support import acc_dtype, dot_precision, explain_compile_errors

# ------------------------------------------------------------------------------------------------------------------
# Constants
# ------------------------------------------------------------------------------------------------------------------
MAX_N = 64


# ------------------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _nuclear_norm_fwd(M_ptr, Q_ptr, val_ptr, p, q, num_iters, TINY, TOL, KMIN, ACC: tl.constexpr, BLOCK_P: tl.constexpr,
                      BLOCK_Q: tl.constexpr, PREC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = b * p * q
    rp = tl.arange(0, BLOCK_P)
    rq = tl.arange(0, BLOCK_Q)
    msk = (rp[:, None] < p) & (rq[None, :] < q)
    offs = rp[:, None] * q + rq[None, :]
    M = tl.load(M_ptr + base + offs, mask=msk, other=0.0).to(ACC)
    # X0 = M / |M|_F with M first divided by its largest |entry| a (|M|_F^2 under/overflows in float32 for |M| below
    # ~1e-19 / above ~1e19, although the norm is representable); a = 0 (M = 0) leaves M as it is
    a = tl.max(tl.max(tl.abs(M), axis=1), axis=0)
    Ms = M / tl.where(a > 0, a, 1.0)
    f = tl.maximum(tl.sqrt(tl.sum(tl.sum(Ms * Ms, axis=1), axis=0)), TINY)
    X = Ms / f
    eye = tl.where(rq[:, None] == rq[None, :], 1.5, 0.0).to(ACC)
    val = tl.sum(tl.sum(X * M, axis=1), axis=0)
    k = 0
    go = k < num_iters
    # after KMIN steps, stops once a step raises the value by at most TOL * value (the value only grows)
    while go:
        T = eye - 0.5 * tl.dot(tl.trans(X), X, input_precision=PREC)
        X = tl.dot(X, T, input_precision=PREC)
        val2 = tl.sum(tl.sum(X * M, axis=1), axis=0)
        k += 1
        go = ((val2 - val > TOL * tl.abs(val2)) | (k < KMIN)) & (k < num_iters)
        val = val2
    tl.store(Q_ptr + base + offs, X, mask=msk)
    tl.store(val_ptr + b, val)


# ------------------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------------------
def _nuclear_norm_torch(M: torch.Tensor, num_iters: int):
    B, _, q = M.shape
    a = M.abs().amax((1, 2), keepdim=True)  # scaled first: |M|_F^2 under/overflows in float32 (see the kernel)
    Ms = M / torch.where(a > 0, a, torch.ones_like(a))
    f = Ms.flatten(1).norm(dim=1).clamp_min(torch.finfo(M.dtype).tiny)[:, None, None]
    X = Ms / f
    eye15 = 1.5 * torch.eye(q, dtype=M.dtype, device=M.device)
    val = (X * M).sum((1, 2))
    active = torch.ones_like(val, dtype=torch.bool)
    tol = _tol(M)
    kmin = _min_steps(M.dtype)
    for k in range(num_iters):  # per-matrix stop as in the kernel, by a mask (no host synchronisation)
        Xn = X @ torch.baddbmm(eye15, X.mT, X, beta=1.0, alpha=-0.5)
        X = torch.where(active[:, None, None], Xn, X)
        val2 = (X * M).sum((1, 2))
        if k + 1 >= kmin:
            active = active & (val2 - val > tol * val2.abs())
        val = val2
    return val, X


def _min_steps(dtype: torch.dtype) -> int:
    """Steps before the stop test (every singular value >= eps |M|_F has grown): log(1/eps)/log(1.5), 40 / 89."""
    return math.ceil(math.log(1.0 / torch.finfo(dtype).eps) / math.log(1.5))


def _tol(M: torch.Tensor) -> float:
    """Relative tolerance of the stop: min(p, q) eps (see csrc/cpu/sqrtm.cpp, polar_newton_schulz)."""
    return float(min(M.shape[-2], M.shape[-1]) * torch.finfo(M.dtype).eps)


@explain_compile_errors("wkd.nuclear_norm (Triton nuclear_norm_forward)")
def nuclear_norm_forward(M: torch.Tensor, num_iters: int, precision: str = "ieee"):
    """(value [B], polar [B, p, q]) for M [B, p, q] (arguments checked by the caller)."""
    M = M.contiguous()
    B, p, q = M.shape
    if p > MAX_N or q > MAX_N:
        return _nuclear_norm_torch(M, num_iters)
    Q = torch.empty_like(M)
    val = torch.empty((B,), dtype=M.dtype, device=M.device)
    if B == 0:
        return val, Q
    bp = max(16, triton.next_power_of_2(p))
    bq = max(16, triton.next_power_of_2(q))
    _nuclear_norm_fwd[(B,)](M, Q, val, p, q, int(num_iters), float(torch.finfo(M.dtype).tiny), _tol(M),
                            _min_steps(M.dtype), ACC=acc_dtype(M.dtype),
                            BLOCK_P=bp, BLOCK_Q=bq, PREC=dot_precision(precision, M.dtype),
                            num_warps=8 if max(bp, bq) >= 64 else 4)
    return val, Q
