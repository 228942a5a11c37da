// Batched matrix functions shared by the CPU kernels of wkd::sqrtm, wkd::sqrtm_backward, wkd::nuclear_norm,
// wkd::bures_wasserstein and wkd::bures_wasserstein_backward (implemented in sqrtm.cpp).
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace wkd {
namespace cpu {

// (S + S^T) / 2 over the last two dims.
at::Tensor symmetrize(const at::Tensor& S);

// Square root of symmetric PSD matrices S [B, n, n] (symmetric, contiguous) by the coupled Newton-Schulz iteration
// with trace pre-normalisation:  Y0 = S / tr S, Z0 = I;  T = (3I - Z Y) / 2;  Y <- Y T;  Z <- T Z;  S^1/2 = sqrt(tr S) Y.
// Safeguards (per matrix; num_iters is then an upper bound): it stops once |Z|_F^2 > 1 / eps(dtype) -- Z ~
// (S / tr S)^-1/2 only gets that large when S has eigenvalues below eps tr S (numerically zero), where Z grows by 1.5
// per step and multiplies the rounding errors of Y until the coupled iteration diverges (after ~20 steps in float32,
// ~45 in float64); and it stops before a step whose T leaves the healthy range (|T - 1.25 I|_F^2 > n/16 + n sqrt(eps):
// the eigenvalues of T stay in [1, 1.5] for PSD S), which catches rounding-level negative eigenvalues, on which the
// iteration would diverge super-exponentially.
at::Tensor sqrtm_newton_schulz(const at::Tensor& S, int64_t num_iters);

// Square root by LAPACK eigendecomposition in float64 (eigenvalues clamped at 0), and when `want_pinv` the
// pseudo-inverse square root (eigenvalues above 10 n eps(dtype) max eigenvalue kept: below that they are rounding); otherwise an undefined tensor.
std::tuple<at::Tensor, at::Tensor> sqrtm_eigh(const at::Tensor& S, bool want_pinv);

// Solution X (symmetric) of the Lyapunov equation Y X + X Y = (G + G^T)/2 for symmetric PSD Y [B, n, n]: the
// adjoint of the matrix square root (dL/dS = X when Y = S^{1/2} and G = dL/dY).
//   newton_schulz: Newton-Schulz on the matrix sign of [[Y, G], [0, -Y]] / tr Y (`num_iters` steps; the same
//       safeguard: a matrix stops once |C|_F^2 > |C_0|_F^2 / eps, which only happens when Y is numerically singular)
//   eigh: X = V ((V^T G V) / (mu_i + mu_j)) V^T from Y = V diag(mu) V^T, pairs with mu_i + mu_j below
//       sqrt(10 n eps(dtype)) max mu set to 0.
at::Tensor lyapunov(const at::Tensor& Y, const at::Tensor& G, bool eigh, int64_t num_iters);

// Newton-Schulz iteration for the orthogonal polar factor of M [B, p, q]: X0 = M / |M|_F, X <- X (3I - X^T X) / 2.
// Returns (<X, M> [B] (the nuclear norm, converged singular values), X [B, p, q]).
std::tuple<at::Tensor, at::Tensor> polar_newton_schulz(const at::Tensor& M, int64_t num_iters);

}  // namespace cpu
}  // namespace wkd
