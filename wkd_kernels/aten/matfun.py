"""Batched matrix functions in ATen ops only, shared by the ``torch`` backend of ``wkd::sqrtm``,
``wkd::nuclear_norm`` and ``wkd::bures_wasserstein`` (wkd_kernels/aten/sqrtm.py, nuclear_norm.py,
bures_wasserstein.py): the algorithms of the CPU kernels (csrc/cpu/matfun.h, csrc/cpu/sqrtm.cpp), with the
per-matrix stopping of the Newton-Schulz iterations as masks (a matrix that has stopped keeps its value while the
batch runs the remaining steps) -- no ``.item()``, no host synchronisation, no data-dependent Python control flow.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor


def dtype_eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def dtype_tiny(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny


def min_polar_steps(dtype: torch.dtype) -> int:
    """Fewest polar Newton-Schulz steps before the convergence test may stop a matrix: log(1/eps) / log(1.5)
    (float32 40, float64 89; see csrc/cpu/sqrtm.cpp)."""
    return int(math.ceil(math.log(1.0 / dtype_eps(dtype)) / math.log(1.5)))


def symmetrize(S: Tensor) -> Tensor:
    return (S + S.transpose(-2, -1)) * 0.5


def batch_trace(S: Tensor) -> Tensor:
    """[B, 1, 1] traces."""
    return S.diagonal(0, -2, -1).sum(-1).view(S.shape[0], 1, 1)


def sqnorm(X: Tensor) -> Tensor:
    """[B, 1, 1] squared Frobenius norms."""
    return X.square().sum((1, 2), keepdim=True)


def sqrtm_newton_schulz(S: Tensor, num_iters: int) -> Tensor:
    """Coupled Newton-Schulz square root with trace pre-normalisation of symmetric PSD S [B, n, n], with the
    safeguards and the convergence test of csrc/cpu/matfun.h (as masks)."""
    B, n = S.shape[0], S.shape[1]
    dt = S.dtype
    eye = torch.eye(n, dtype=dt, device=S.device)
    c = batch_trace(S).clamp_min(dtype_tiny(dt))
    limit = 1.0 / dtype_eps(dt)
    dev_max = n / 16.0 + n * math.sqrt(dtype_eps(dt))
    res_tol = n * dtype_eps(dt)
    Y = S / c
    Z = eye.expand(B, n, n).clone()
    active = torch.ones(B, 1, 1, dtype=torch.bool, device=S.device)
    for _ in range(num_iters):
        T = torch.baddbmm(eye.expand(B, n, n) * 1.5, Z, Y, beta=1, alpha=-0.5)  # (3I - Z Y) / 2
        D = T - 1.25 * eye  # eigenvalues of T in [1, 1.5] while healthy: stop before a step that leaves that range
        active = active & (sqnorm(D) <= dev_max)
        conv = sqnorm(D + 0.25 * eye) * 4.0 <= res_tol  # |I - Z Y|_F^2 <= n eps: this last step squares it
        Y2 = torch.bmm(Y, T)
        Z2 = torch.bmm(T, Z)
        zz = sqnorm(Z2)
        Y = torch.where(active, Y2, Y)
        Z = torch.where(active, Z2, Z)
        active = active & (zz <= limit) & ~conv
    return Y * c.sqrt()


def sqrtm_eigh(S: Tensor, want_pinv: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """Root (and pseudo-inverse root, eigenvalues above 10 n eps(dtype) max eigenvalue) by eigendecomposition,
    negative eigenvalues clamped to 0; in float64 where the device has it (as the CPU kernel), else in the dtype."""
    n, dt = S.shape[-1], S.dtype
    wide = torch.float64 if _has_float64(S.device) else dt
    # a matrix with a NaN / inf entry gives NaN (eigh itself would fail on it), the others their roots
    bad = ~torch.isfinite(S).all(-1).all(-1)
    nan = torch.full_like(S, float("nan"))
    S = torch.where(bad[..., None, None], torch.zeros_like(S), S)
    L, V = torch.linalg.eigh(S.to(wide))
    Lc = L.clamp_min(0)
    sq = Lc.sqrt()
    Vt = V.transpose(-2, -1)
    Y = torch.where(bad[..., None, None], nan, torch.matmul(V * sq.unsqueeze(-2), Vt).to(dt))
    if not want_pinv:
        return Y, None
    thr = Lc.amax(-1, keepdim=True) * (10.0 * n * dtype_eps(dt))
    isq = torch.where(Lc > thr, sq.clamp_min(dtype_tiny(wide)).reciprocal(), torch.zeros_like(sq))
    return Y, torch.where(bad[..., None, None], nan, torch.matmul(V * isq.unsqueeze(-2), Vt).to(dt))


def lyapunov(Y: Tensor, G: Tensor, eigh: bool, num_iters: int) -> Tensor:
    """Symmetric X with Y X + X Y = (G + G^T) / 2 for symmetric PSD Y [B, n, n] (csrc/cpu/matfun.h: eigenbasis,
    or Newton-Schulz on sign([[Y, G], [0, -Y]]) with the |C| safeguard and the |B^2 - I| convergence test as masks)."""
    B, n, dt = Y.shape[0], Y.shape[1], Y.dtype
    Gs = symmetrize(G)
    if eigh:
        wide = torch.float64 if _has_float64(Y.device) else dt
        mu, V = torch.linalg.eigh(Y.to(wide))
        mu = mu.clamp_min(0)
        Vt = V.transpose(-2, -1)
        H = torch.matmul(torch.matmul(Vt, Gs.to(wide)), V)
        den = mu.unsqueeze(-1) + mu.unsqueeze(-2)
        thr = mu.amax(-1, keepdim=True).unsqueeze(-1) * math.sqrt(10.0 * n * dtype_eps(dt))
        Kd = torch.where(den > thr, den.clamp_min(dtype_tiny(wide)).reciprocal(), torch.zeros_like(den))
        return torch.matmul(torch.matmul(V, H * Kd), Vt).to(dt)
    tiny = dtype_tiny(dt)
    a = batch_trace(Y).clamp_min(tiny)
    res_tol = n * dtype_eps(dt)
    eye = torch.eye(n, dtype=dt, device=Y.device)
    Bm = Y / a
    Cm = torch.where(a > tiny, Gs / a, torch.zeros_like(Gs))
    limit = sqnorm(Cm) / dtype_eps(dt)
    active = torch.ones(B, 1, 1, dtype=torch.bool, device=Y.device)
    for _ in range(num_iters):
        P = torch.bmm(Bm, Bm)
        PC = torch.bmm(P, Cm)
        BCB = torch.bmm(torch.bmm(Bm, Cm), Bm)
        Cn = (Cm * 3.0 - PC - PC.transpose(-2, -1) + BCB) * 0.5
        Bn = Bm * 1.5 - torch.bmm(Bm, P) * 0.5
        cc = sqnorm(Cn)
        conv = sqnorm(P - eye) <= res_tol
        Cm = torch.where(active, Cn, Cm)
        Bm = torch.where(active, Bn, Bm)
        active = active & (cc <= limit) & ~conv
    return torch.where(a > tiny, symmetrize(Cm) * 0.5, torch.zeros_like(Cm))


def polar_newton_schulz(M: Tensor, num_iters: int) -> Tuple[Tensor, Tensor]:
    """(<X, M> [B], X [B, p, q]): the Newton-Schulz polar iteration X0 = M / |M|_F, X <- X (3I - X^T X) / 2, each
    matrix stopping (after :func:`min_polar_steps`) once a step raises <X, M> by at most min(p, q) eps of it."""
    B, p, q, dt = M.shape[0], M.shape[1], M.shape[2], M.dtype
    # |M|_F of M / max|M_ij| (as the CPU kernel): |M|_F^2 itself under/overflows float32 beyond ~1e+-19
    Ms = M / M.abs().amax((1, 2), keepdim=True).clamp_min(dtype_tiny(dt))
    f = Ms.flatten(1).norm(2, 1).clamp_min(dtype_tiny(dt)).view(B, 1, 1)
    X = Ms / f
    I15 = torch.eye(q, dtype=dt, device=M.device).mul(1.5).expand(B, q, q)
    tol = min(p, q) * dtype_eps(dt)
    kmin = min_polar_steps(dt)
    val = (X * M).sum((1, 2))
    active = torch.ones(B, dtype=torch.bool, device=M.device)
    for k in range(num_iters):
        T = torch.baddbmm(I15, X.transpose(-2, -1), X, beta=1, alpha=-0.5)
        X2 = torch.bmm(X, T)
        val2 = (X2 * M).sum((1, 2))
        X = torch.where(active.view(B, 1, 1), X2, X)
        if k + 1 >= kmin:
            active = active & (val2 - val > val2.abs() * tol)
        val = torch.where(active, val2, val)
    return (X * M).sum((1, 2)), X


def _has_float64(device: torch.device) -> bool:
    return device.type != "mps"
