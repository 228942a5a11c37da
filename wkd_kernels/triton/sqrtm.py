"""Triton kernels of ``wkd::sqrtm`` and ``wkd::sqrtm_backward`` (docs/design.md section 4), one program per matrix.

Every matrix (n <= MAX_N) lives in registers as one zero-padded BLOCK x BLOCK tile (BLOCK = next power of two >= 16);
products are ``tl.dot`` in full fp32 (``precision="ieee"``: TF32 would cost three digits; "tf32x3" selectable by the
launchers' ``precision`` argument) or fp64.

  _sqrtm_ns_fwd    coupled Newton-Schulz with trace pre-normalisation: Y0 = S / tr S, Z0 = I, num_iters times
                   T = (3I - Z Y) / 2, Y <- Y T, Z <- T Z;  S^1/2 = sqrt(tr S) Y. Safeguards: the matrix stops once
                   |Z|_F^2 > 1/eps (only when S has eigenvalues below eps tr S: there Z grows by 1.5 per step and the
                   coupled iteration would amplify rounding until it diverges, after ~20 steps in fp32), and before a
                   step whose T has left [1, 1.5] (|T - 1.25 I|_F^2 > n/16 + n sqrt(eps): a negative eigenvalue).
  _lyap_ns_bwd     the adjoint: X with Y X + X Y = sym(G) from Newton-Schulz on the matrix sign of
                   [[Y, G], [0, -Y]] / tr Y (block form: B <- B (3I - B^2)/2, C <- (3C - B^2 C - C B^2 + B C B)/2,
                   X = C / 2; same safeguard on |C|_F).
  _sqrtm_eigh_fwd  the exact method: parallel cyclic Jacobi (round-robin ordering: each round rotates BLOCK/2
                   disjoint pairs at once, rows and columns updated with ``tl.gather``; on the matrix divided by its
                   largest |entry|, so that no square under- or overflows; NaN out for a non-finite entry), then
                   V diag(sqrt(max(l, 0))) V^T and optionally the pseudo-inverse square root (eigenvalues below
                   10 n eps(dtype) max l dropped).
  _lyap_eigh_bwd   Jacobi on Y, X = V ((V^T G V) / (mu_i + mu_j)) V^T (pairs with mu_i + mu_j below
                   sqrt(10 n eps) max mu set to 0).

Matrices larger than MAX_N run the same mathematics as batched ``torch`` products (Newton-Schulz) or
``torch.linalg.eigh`` (eigh): a register tile of 128 x 128 would spill.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._support import acc_dtype, dot_precision, explain_compile_errors

# ------------------------------------------------------------------------------------------------------------------
# Constants
# ------------------------------------------------------------------------------------------------------------------
MAX_N = 64                 # largest matrix handled by the one-program kernels
_MAX_SWEEPS_F32 = 12       # Jacobi sweeps (a sweep = BLOCK - 1 rounds); converged earlier when off(A) <= tol ||A||
_MAX_SWEEPS_F64 = 16


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def _tiny(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).tiny)


def _pinv_rel(n: int, dtype: torch.dtype) -> float:
    """Eigenvalues below this fraction of the largest are rounding noise: dropped from pseudo-inverses."""
    return 10.0 * n * _eps(dtype)


def _tol(n: int, dtype: torch.dtype) -> float:
    """Squared Frobenius residual (|I - Z Y|^2, |B^2 - I|^2) at which a Newton-Schulz iteration has converged: n eps
    (as csrc/cpu/sqrtm.cpp); the step taken then squares it."""
    return n * _eps(dtype)


def _dev_max(n: int, dtype: torch.dtype) -> float:
    return n / 16.0 + n * _eps(dtype) ** 0.5


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _warps(block: int) -> int:
    return 8 if block >= 64 else 4


# ------------------------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_sym(ptr, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    msk = (r[:, None] < n) & (r[None, :] < n)
    a = tl.load(ptr + r[:, None] * n + r[None, :], mask=msk, other=0.0).to(ACC)
    at = tl.load(ptr + r[None, :] * n + r[:, None], mask=msk, other=0.0).to(ACC)
    return (a + at) * 0.5


@triton.jit
def _store_mat(ptr, A, n, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    msk = (r[:, None] < n) & (r[None, :] < n)
    tl.store(ptr + r[:, None] * n + r[None, :], A, mask=msk)


@triton.jit
def _eye(n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    return tl.where((r[:, None] == r[None, :]) & (r[:, None] < n), 1.0, 0.0).to(ACC)


@triton.jit
def _trace(A, BLOCK: tl.constexpr):
    r = tl.arange(0, BLOCK)
    return tl.sum(tl.sum(tl.where(r[:, None] == r[None, :], A, 0.0), axis=1), axis=0)


@triton.jit
def _jacobi_eigh(A, TOL, TINY, MAX_SWEEPS: tl.constexpr, BLOCK: tl.constexpr):
    """Eigen-decomposition of the symmetric zero-padded tile A: returns (eigenvalues [BLOCK], V [BLOCK, BLOCK]) with
    A = V diag(l) V^T; padded indices get eigenvalue 0 and a unit eigenvector (they are never rotated).
    A is divided by its largest |entry| first (the sweeps square its entries: in float32 |A|_F^2 overflows above
    ~1e19 and underflows below ~1e-19) and the eigenvalues multiplied back. A non-finite entry makes every output
    NaN (the sweeps would otherwise stop at once and return the diagonal)."""
    r = tl.arange(0, BLOCK)
    cols = r[None, :]
    eye = r[:, None] == cols
    poison = tl.sum(tl.sum(A - A, axis=1), axis=0)  # 0, or NaN when A has a NaN or inf (inf - inf)
    amax = tl.max(tl.max(tl.abs(A), axis=1), axis=0)
    scale = tl.where(amax > 0, amax, 1.0)
    A = A / scale
    V = tl.where(eye, 1.0, 0.0).to(A.dtype)
    nrm = tl.sum(tl.sum(A * A, axis=1), axis=0)
    off = tl.sum(tl.sum(tl.where(eye, 0.0, A * A), axis=1), axis=0)
    sweep = 0
    while (sweep < MAX_SWEEPS) & (off > TOL * TOL * nrm):
        for rnd in range(BLOCK - 1):
            # round-robin pairing: BLOCK - 1 is fixed, the others rotate; partner(partner(i)) = i
            partner = tl.where(r == BLOCK - 1, rnd,
                               tl.where(r == rnd, BLOCK - 1, (2 * rnd - r + 2 * (BLOCK - 1)) % (BLOCK - 1)))
            d = tl.sum(tl.where(eye, A, 0.0), axis=1)
            d_part = tl.gather(d, partner, 0)
            a_ij = tl.sum(tl.where(cols == partner[:, None], A, 0.0), axis=1)
            is_p = r < partner
            app = tl.where(is_p, d, d_part)
            aqq = tl.where(is_p, d_part, d)
            nz = tl.abs(a_ij) > TINY
            theta = (aqq - app) / (2.0 * tl.where(nz, a_ij, 1.0))
            t = tl.where(theta >= 0, 1.0, -1.0) / (tl.abs(theta) + tl.sqrt(theta * theta + 1.0))
            c = 1.0 / tl.sqrt(t * t + 1.0)
            s = t * c
            c = tl.where(nz, c, 1.0)
            s = tl.where(nz, s, 0.0)
            coef = tl.where(is_p, -s, s)
            # rows: A[p] <- c A[p] - s A[q],  A[q] <- s A[p] + c A[q]
            rows_idx = tl.broadcast_to(partner[:, None], (BLOCK, BLOCK))
            A = c[:, None] * A + coef[:, None] * tl.gather(A, rows_idx, 0)
            # columns (and V): the same rotation on the right
            cols_idx = tl.broadcast_to(partner[None, :], (BLOCK, BLOCK))
            A = A * c[None, :] + tl.gather(A, cols_idx, 1) * coef[None, :]
            V = V * c[None, :] + tl.gather(V, cols_idx, 1) * coef[None, :]
            A = tl.where(cols == partner[:, None], 0.0, A)
        sweep += 1
        off = tl.sum(tl.sum(tl.where(eye, 0.0, A * A), axis=1), axis=0)
    evals = tl.sum(tl.where(eye, A, 0.0), axis=1) * scale + poison
    return evals, V + poison


@triton.jit
def _sqrtm_ns_fwd(S_ptr, Y_ptr, n, num_iters, TINY, LIMIT, DEV_MAX, RES_TOL, ACC: tl.constexpr, BLOCK: tl.constexpr,
        PREC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = b * n * n
    S = _load_sym(S_ptr + base, n, ACC, BLOCK)
    eye = _eye(n, ACC, BLOCK)
    c = tl.maximum(_trace(S, BLOCK), TINY)
    Y = S / c
    Z = eye
    k = 0
    go = k < num_iters
    # safeguards: (1) |Z|_F^2 > 1/eps means an eigenvalue below eps tr S (numerically 0), where Z grows by 1.5 per
    # step and the coupled iteration would amplify rounding until it diverges: the matrix stops there. (2) T's
    # eigenvalues stay in [1, 1.5] for PSD S; |T - 1.25 I|_F^2 > n/16 (+ rounding) means a negative eigenvalue about
    # to blow up: the matrix stops before that step.
    # (3) converged: |I - Z Y|_F^2 = 4 |T - I|_F^2 <= RES_TOL (n eps; every eigenvalue, small ones included, as the
    # CPU kernel); this last step squares the residual.
    while go:
        T = 1.5 * eye - 0.5 * tl.dot(Z, Y, input_precision=PREC)
        D = T - 1.25 * eye
        ok = tl.sum(tl.sum(D * D, axis=1), axis=0) <= DEV_MAX
        E = T - eye
        moving = 4.0 * tl.sum(tl.sum(E * E, axis=1), axis=0) > RES_TOL
        Y = tl.where(ok, tl.dot(Y, T, input_precision=PREC), Y)
        Z = tl.where(ok, tl.dot(T, Z, input_precision=PREC), Z)
        zz = tl.sum(tl.sum(Z * Z, axis=1), axis=0)
        k += 1
        go = ok & moving & (zz <= LIMIT) & (k < num_iters)
    _store_mat(Y_ptr + base, Y * tl.sqrt(c), n, BLOCK)


@triton.jit
def _lyap_ns_bwd(G_ptr, Y_ptr, X_ptr, n, num_iters, TINY, INV_EPS, RES_TOL, ACC: tl.constexpr, BLOCK: tl.constexpr,
        PREC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = b * n * n
    Y = _load_sym(Y_ptr + base, n, ACC, BLOCK)
    G = _load_sym(G_ptr + base, n, ACC, BLOCK)
    tr = _trace(Y, BLOCK)
    a = tl.maximum(tr, TINY)
    Bm = Y / a
    Cm = tl.where(tr > TINY, G / a, 0.0)  # Y = 0 (S = 0): X = 0, as with eigh (G / tiny would overflow)
    cc = tl.sum(tl.sum(Cm * Cm, axis=1), axis=0)
    limit = cc * INV_EPS
    k = 0
    moved = k < num_iters
    # same safeguard as the forward: |C|_F grows past |C_0|_F / sqrt(eps) only when Y is numerically singular;
    # converged once |B^2 - I|_F^2 <= RES_TOL (n eps; this last step squares it; C converges with B)
    eye = _eye(n, ACC, BLOCK)
    while (k < num_iters) & (cc <= limit) & moved:
        # ordered to keep at most four tiles live (register pressure at BLOCK = 64)
        P = tl.dot(Bm, Bm, input_precision=PREC)
        E = P - eye
        moved = tl.sum(tl.sum(E * E, axis=1), axis=0) > RES_TOL
        Cn = 3.0 * Cm + tl.dot(tl.dot(Bm, Cm, input_precision=PREC), Bm, input_precision=PREC)
        PC = tl.dot(P, Cm, input_precision=PREC)
        Cm = 0.5 * (Cn - PC - tl.trans(PC))
        Bm = 1.5 * Bm - 0.5 * tl.dot(Bm, P, input_precision=PREC)
        cc = tl.sum(tl.sum(Cm * Cm, axis=1), axis=0)
        k += 1
    X = 0.25 * (Cm + tl.trans(Cm))
    _store_mat(X_ptr + base, X, n, BLOCK)


@triton.jit
def _sqrtm_eigh_fwd(S_ptr, Y_ptr, Z_ptr, n, TOL, TINY, PINV_REL, WRITE_Z: tl.constexpr, ACC: tl.constexpr,
                    MAX_SWEEPS: tl.constexpr, BLOCK: tl.constexpr,
        PREC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = b * n * n
    S = _load_sym(S_ptr + base, n, ACC, BLOCK)
    lam, V = _jacobi_eigh(S, TOL, TINY, MAX_SWEEPS, BLOCK)
    lam_c = tl.maximum(lam, 0.0)
    sq = tl.sqrt(lam_c)
    Vt = tl.trans(V)
    Y = tl.dot(V * sq[None, :], Vt, input_precision=PREC)
    _store_mat(Y_ptr + base, Y, n, BLOCK)
    if WRITE_Z:
        thr = tl.max(lam_c, axis=0) * PINV_REL
        isq = tl.where(lam_c > thr, 1.0 / tl.maximum(sq, TINY), 0.0)
        Z = tl.dot(V * isq[None, :], Vt, input_precision=PREC)
        _store_mat(Z_ptr + base, Z, n, BLOCK)


@triton.jit
def _lyap_eigh_bwd(G_ptr, Y_ptr, X_ptr, n, TOL, TINY, KEEP_REL, ACC: tl.constexpr, MAX_SWEEPS: tl.constexpr,
                   BLOCK: tl.constexpr,
        PREC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = b * n * n
    Y = _load_sym(Y_ptr + base, n, ACC, BLOCK)
    G = _load_sym(G_ptr + base, n, ACC, BLOCK)
    mu, V = _jacobi_eigh(Y, TOL, TINY, MAX_SWEEPS, BLOCK)
    mu = tl.maximum(mu, 0.0)
    Vt = tl.trans(V)
    H = tl.dot(tl.dot(Vt, G, input_precision=PREC), V, input_precision=PREC)
    den = mu[:, None] + mu[None, :]
    thr = tl.max(mu, axis=0) * KEEP_REL
    K = tl.where(den > thr, 1.0 / tl.maximum(den, TINY), 0.0)
    X = tl.dot(tl.dot(V, H * K, input_precision=PREC), Vt, input_precision=PREC)
    X = 0.5 * (X + tl.trans(X))
    _store_mat(X_ptr + base, X, n, BLOCK)


# ------------------------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------------------------
def _sym(S: torch.Tensor) -> torch.Tensor:
    return (S + S.transpose(-1, -2)) * 0.5


def _sqrtm_torch(S: torch.Tensor, eigh: bool, num_iters: int, want_inverse: bool):
    """Same mathematics as batched torch products (matrices larger than MAX_N)."""
    n = S.shape[-1]
    S = _sym(S)
    if eigh:
        L, V = torch.linalg.eigh(S)
        Lc = L.clamp_min(0)
        sq = Lc.sqrt()
        Y = (V * sq.unsqueeze(-2)) @ V.mT
        Z = None
        if want_inverse:
            thr = Lc.amax(-1, keepdim=True) * _pinv_rel(n, S.dtype)
            isq = torch.where(Lc > thr, 1.0 / sq.clamp_min(_tiny(S.dtype)), torch.zeros_like(sq))
            Z = (V * isq.unsqueeze(-2)) @ V.mT
        return Y, Z
    eye = torch.eye(n, dtype=S.dtype, device=S.device)
    c = S.diagonal(0, -2, -1).sum(-1).clamp_min(_tiny(S.dtype))[:, None, None]
    Y = S / c
    Z = eye.expand_as(S).clone()
    active = torch.ones((S.shape[0], 1, 1), dtype=torch.bool, device=S.device)
    res_tol = _tol(n, S.dtype)
    for _ in range(num_iters):
        T = torch.baddbmm(1.5 * eye, Z, Y, beta=1.0, alpha=-0.5)
        active = active & ((T - 1.25 * eye).square().sum((1, 2), keepdim=True) <= _dev_max(n, S.dtype))
        Yn, Zn = Y @ T, T @ Z
        moving = 4.0 * (T - eye).square().sum((1, 2), keepdim=True) > res_tol
        Y, Z = torch.where(active, Yn, Y), torch.where(active, Zn, Z)
        active = active & moving & (Zn.square().sum((1, 2), keepdim=True) <= 1.0 / _eps(S.dtype))
    return Y * c.sqrt(), None


def _lyapunov_torch(Y: torch.Tensor, G: torch.Tensor, eigh: bool, num_iters: int) -> torch.Tensor:
    n = Y.shape[-1]
    Y, G = _sym(Y), _sym(G)
    if eigh:
        mu, V = torch.linalg.eigh(Y)
        mu = mu.clamp_min(0)
        H = V.mT @ G @ V
        den = mu.unsqueeze(-1) + mu.unsqueeze(-2)
        thr = mu.amax(-1, keepdim=True).unsqueeze(-1) * _pinv_rel(n, Y.dtype) ** 0.5
        K = torch.where(den > thr, 1.0 / den.clamp_min(_tiny(Y.dtype)), torch.zeros_like(den))
        return _sym(V @ (H * K) @ V.mT)
    tr = Y.diagonal(0, -2, -1).sum(-1)[:, None, None]
    a = tr.clamp_min(_tiny(Y.dtype))
    Bm, Cm = Y / a, torch.where(tr > _tiny(Y.dtype), G / a, torch.zeros_like(G))  # Y = 0: X = 0
    limit = Cm.square().sum((1, 2), keepdim=True) / _eps(Y.dtype)
    active = torch.ones((Y.shape[0], 1, 1), dtype=torch.bool, device=Y.device)
    res_tol = _tol(n, Y.dtype)
    eye = torch.eye(n, dtype=Y.dtype, device=Y.device)
    for _ in range(num_iters):
        P = Bm @ Bm
        PC = P @ Cm
        Cn = 0.5 * (3.0 * Cm - PC - PC.mT + (Bm @ Cm) @ Bm)
        Bn = 1.5 * Bm - 0.5 * (Bm @ P)
        cc = Cn.square().sum((1, 2), keepdim=True)
        moving = (P - eye).square().sum((1, 2), keepdim=True) > res_tol
        Cm, Bm = torch.where(active, Cn, Cm), torch.where(active, Bn, Bm)
        active = active & moving & (cc <= limit)
    return _sym(Cm) * 0.5


@explain_compile_errors("wkd.sqrtm (Triton sqrtm_forward)")
def sqrtm_forward(S: torch.Tensor, method: str, num_iters: int, precision: str = "ieee", want_inverse: bool = False):
    """(S^1/2, pseudo-inverse of S^1/2 or None) of symmetric PSD S [B, n, n] (read as (S + S^T)/2; arguments checked
    by the caller). The inverse is available with method "eigh" only. ``precision``: tl.dot input precision for float32
    ("ieee" or "tf32x3"; float64 always ieee)."""
    S = S.contiguous()
    B, n, _ = S.shape
    eigh = method == "eigh"
    if want_inverse and not eigh:
        raise ValueError("sqrtm_forward: the pseudo-inverse square root is computed by method 'eigh' only")
    if n > MAX_N:
        return _sqrtm_torch(S, eigh, num_iters, want_inverse)
    Y = torch.empty_like(S)
    Z = torch.empty_like(S) if want_inverse else Y  # Z_ptr unused when not written
    if B == 0:
        return Y, (Z if want_inverse else None)
    block = _block(n)
    acc = acc_dtype(S.dtype)
    if eigh:
        sweeps = _MAX_SWEEPS_F64 if S.dtype == torch.float64 else _MAX_SWEEPS_F32
        _sqrtm_eigh_fwd[(B,)](S, Y, Z, n, n * _eps(S.dtype), _tiny(S.dtype), _pinv_rel(n, S.dtype),
                              WRITE_Z=want_inverse, ACC=acc, MAX_SWEEPS=sweeps, BLOCK=block,
                              PREC=dot_precision(precision, S.dtype), num_warps=_warps(block))
    else:
        _sqrtm_ns_fwd[(B,)](S, Y, n, int(num_iters), _tiny(S.dtype), 1.0 / _eps(S.dtype), _dev_max(n, S.dtype),
                            _tol(n, S.dtype), ACC=acc, BLOCK=block, PREC=dot_precision(precision, S.dtype),
                            num_warps=_warps(block))
    return Y, (Z if want_inverse else None)


@explain_compile_errors("wkd.sqrtm (Triton lyapunov)")
def lyapunov(Y: torch.Tensor, G: torch.Tensor, method: str, num_iters: int, precision: str = "ieee") -> torch.Tensor:
    """Symmetric X with Y X + X Y = (G + G^T)/2 for symmetric PSD Y [B, n, n] (the sqrtm backward)."""
    Y = Y.contiguous()
    G = G.contiguous()
    B, n, _ = Y.shape
    eigh = method == "eigh"
    if n > MAX_N:
        return _lyapunov_torch(Y, G, eigh, num_iters)
    X = torch.empty_like(Y)
    if B == 0:
        return X
    block = _block(n)
    acc = acc_dtype(Y.dtype)
    if eigh:
        sweeps = _MAX_SWEEPS_F64 if Y.dtype == torch.float64 else _MAX_SWEEPS_F32
        _lyap_eigh_bwd[(B,)](G, Y, X, n, n * _eps(Y.dtype), _tiny(Y.dtype), _pinv_rel(n, Y.dtype) ** 0.5, ACC=acc,
                             MAX_SWEEPS=sweeps, BLOCK=block, PREC=dot_precision(precision, Y.dtype),
                             num_warps=_warps(block))
    else:
        _lyap_ns_bwd[(B,)](G, Y, X, n, int(num_iters), _tiny(Y.dtype), 1.0 / _eps(Y.dtype), _tol(n, Y.dtype),
                           ACC=acc, BLOCK=block, PREC=dot_precision(precision, Y.dtype), num_warps=_warps(block))
    return X


def sqrtm_backward(grad_Y: torch.Tensor, Y: torch.Tensor, method: str, num_iters: int,
                   precision: str = "ieee") -> torch.Tensor:
    """dL/dS = X with Y X + X Y = sym(grad_Y)."""
    return lyapunov(Y, grad_Y, method, num_iters, precision)
