// CPU kernels of wkd::sqrtm and wkd::sqrtm_backward, and the batched matrix functions (matfun.h) that
// wkd::bures_wasserstein builds on (docs/design.md section 4).
//
// Newton-Schulz runs as batched BLAS products over the whole batch (3 per step forward, 5 per step backward);
// "eigh" uses LAPACK (ATen's linalg_eigh) in float64 whatever the input dtype (the exact method; on CPU the
// tridiagonal LAPACK solver beats a Jacobi sweep per matrix, the GPU uses a one-program Jacobi kernel instead).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "../gaussian_common.h"
#include "interrupt.h"
#include "matfun.h"

namespace wkd {
namespace cpu {

namespace {
double dtype_eps(at::ScalarType st) {
  return st == at::kDouble ? std::numeric_limits<double>::epsilon() : double(std::numeric_limits<float>::epsilon());
}
double dtype_tiny(at::ScalarType st) {
  return st == at::kDouble ? std::numeric_limits<double>::min() : double(std::numeric_limits<float>::min());
}
// Fewest polar Newton-Schulz steps before the convergence test may stop a matrix: singular values grow by 1.5 per
// step while small, so a small but non-zero one looks converged (its contribution to a step is below rounding, and
// no residual tells it from an exact 0) until it has grown; after `min_steps` every s >= eps |M|_F has:
// log(1 / eps) / log 1.5 steps (float32 40, float64 89).
// (The roots need no such floor: their residual I - Z Y, resp. B^2 - I, sees every eigenvalue.)
int64_t min_steps(at::ScalarType st) {
  return int64_t(std::ceil(std::log(1.0 / dtype_eps(st)) / std::log(1.5)));
}
// Squared Frobenius norm per matrix [B, 1, 1], by a reduction (no squared copy of the batch).
at::Tensor sqnorm(const at::Tensor& X) { return at::linalg_vector_norm(X, 2, {1, 2}, /*keepdim=*/true).square_(); }
at::Tensor batch_trace(const at::Tensor& S) { return S.diagonal(0, -2, -1).sum(-1).view({S.size(0), 1, 1}); }
}  // namespace

at::Tensor symmetrize(const at::Tensor& S) { return (S + S.transpose(-2, -1)).mul_(0.5); }

at::Tensor sqrtm_newton_schulz(const at::Tensor& S, int64_t num_iters) {
  const int64_t B = S.size(0), n = S.size(1);
  const auto st = S.scalar_type();
  if (B == 0) return at::empty_like(S);
  const auto opts = S.options();
  const at::Tensor I15 = at::eye(n, opts).mul_(1.5).expand({B, n, n});
  const at::Tensor c = batch_trace(S).clamp_min(dtype_tiny(st));
  const double limit = 1.0 / dtype_eps(st);
  at::Tensor Y = S / c;
  at::Tensor Z = at::eye(n, opts).repeat({B, 1, 1});
  at::Tensor T = at::empty_like(Y), Y2 = at::empty_like(Y), Z2 = at::empty_like(Y);
  at::Tensor active = at::ones({B, 1, 1}, opts.dtype(at::kBool));
  const at::Tensor I125 = at::eye(n, opts).mul_(1.25);
  const double dev_max = double(n) / 16.0 + double(n) * std::sqrt(dtype_eps(st));
  const double res_tol = double(n) * dtype_eps(st);
  for (int64_t k = 0; k < num_iters; ++k) {
    check_interrupt();  // Ctrl-C between steps (large batches take minutes)
    at::baddbmm_out(T, I15, Z, Y, /*beta=*/1, /*alpha=*/-0.5);  // T = (3I - Z Y) / 2
    // T's eigenvalues lie in [1, 1.5] while the iteration is healthy (|T - 1.25 I|_F^2 <= n/16); larger means a
    // negative eigenvalue (S indefinite at rounding level) about to blow up: this matrix stops before the step.
    at::Tensor D = T - I125;
    active = active.logical_and((D * D).sum({1, 2}, /*keepdim=*/true) <= dev_max);
    // Converged: the residual I - Z Y = 2 (T - I) is below sqrt(n eps) (|.|_F^2 <= n eps) -- every eigenvalue,
    // small ones included (their z y is far from 1 until they have converged); this last step squares it.
    // Rank-deficient S never gets there: the |Z| limit stops it (see matfun.h).
    D.diagonal(0, -2, -1).add_(0.25);  // D = T - I
    const at::Tensor conv = sqnorm(D).mul_(4.0) <= res_tol;
    at::bmm_out(Y2, Y, T);
    at::bmm_out(Z2, T, Z);
    const at::Tensor zz = (Z2 * Z2).sum({1, 2}, /*keepdim=*/true);
    if (active.all().item<bool>()) {  // the common case: no copy
      std::swap(Y, Y2);
      std::swap(Z, Z2);
    } else {
      Y = at::where(active, Y2, Y);
      Z = at::where(active, Z2, Z);
      Y2 = at::empty_like(Y);
      Z2 = at::empty_like(Z);
    }
    active = active.logical_and(zz <= limit).logical_and(conv.logical_not());
    if (!active.any().item<bool>()) break;
  }
  return Y.mul_(c.sqrt());
}

std::tuple<at::Tensor, at::Tensor> sqrtm_eigh(const at::Tensor& S, bool want_pinv) {
  const int64_t B = S.size(0), n = S.size(1);
  const auto st = S.scalar_type();
  if (B == 0) return {at::empty_like(S), want_pinv ? at::empty_like(S) : at::Tensor()};
  auto [L, V] = at::linalg_eigh(S.to(at::kDouble));
  const at::Tensor Lc = L.clamp_min(0);
  const at::Tensor sq = Lc.sqrt();
  const at::Tensor Vt = V.transpose(-2, -1);
  at::Tensor Y = at::matmul(V * sq.unsqueeze(-2), Vt).to(st);
  at::Tensor Zi;
  if (want_pinv) {
    const at::Tensor thr = Lc.amax(-1, true) * (10.0 * double(n) * dtype_eps(st));
    const at::Tensor isq = at::where(Lc > thr, sq.clamp_min(dtype_tiny(at::kDouble)).reciprocal(), at::zeros_like(sq));
    Zi = at::matmul(V * isq.unsqueeze(-2), Vt).to(st);
  }
  return {Y, Zi};
}

at::Tensor lyapunov(const at::Tensor& Y, const at::Tensor& G, bool eigh, int64_t num_iters) {
  const int64_t B = Y.size(0), n = Y.size(1);
  const auto st = Y.scalar_type();
  if (B == 0) return at::empty_like(Y);
  const at::Tensor Gs = symmetrize(G);
  if (eigh) {
    auto [mu, V] = at::linalg_eigh(Y.to(at::kDouble));
    mu = mu.clamp_min(0);
    const at::Tensor Vt = V.transpose(-2, -1);
    const at::Tensor H = at::matmul(at::matmul(Vt, Gs.to(at::kDouble)), V);
    const at::Tensor den = mu.unsqueeze(-1) + mu.unsqueeze(-2);
    const at::Tensor thr = mu.amax(-1, true).unsqueeze(-1) * std::sqrt(10.0 * double(n) * dtype_eps(st));
    const at::Tensor Kd = at::where(den > thr, den.clamp_min(dtype_tiny(at::kDouble)).reciprocal(), at::zeros_like(den));
    return at::matmul(at::matmul(V, H * Kd), Vt).to(st);
  }
  // sign([[A, C], [0, -A]]) = [[I, 2X], [0, -I]] with A X + X A = C. Newton-Schulz on the block matrix, started
  // at (Y, G) / tr Y, keeps the block form: B <- B (3I - B^2) / 2,  C <- (3C - B^2 C - C B^2 + B C B) / 2.
  const at::Tensor a = batch_trace(Y).clamp_min(dtype_tiny(st));
  const double res_tol = double(n) * dtype_eps(st);
  const at::Tensor I = at::eye(n, Y.options());
  at::Tensor Bm = Y / a;
  at::Tensor Cm = at::where(a > dtype_tiny(st), Gs / a, at::zeros_like(Gs));
  const at::Tensor limit = Cm.square().sum({1, 2}, /*keepdim=*/true) / dtype_eps(st);
  at::Tensor P = at::empty_like(Bm), PC = at::empty_like(Bm), BC = at::empty_like(Bm), BCB = at::empty_like(Bm);
  at::Tensor B2 = at::empty_like(Bm);
  at::Tensor active = at::ones({B, 1, 1}, Y.options().dtype(at::kBool));
  for (int64_t k = 0; k < num_iters; ++k) {
    check_interrupt();  // Ctrl-C between steps (large batches take minutes)
    at::bmm_out(P, Bm, Bm);
    at::bmm_out(PC, P, Cm);
    at::bmm_out(BC, Bm, Cm);
    at::bmm_out(BCB, BC, Bm);
    at::bmm_out(B2, Bm, P);
    const at::Tensor Cn = (Cm * 3.0 - PC - PC.transpose(-2, -1) + BCB).mul_(0.5);
    const at::Tensor Bn = Bm * 1.5 - B2 * 0.5;
    const at::Tensor cc = sqnorm(Cn);
    // converged: B^2 = I to sqrt(n eps) (|B^2 - I|_F^2 <= n eps; this step squares it; C converges with B, its
    // fixed point once B^2 = I). Singular Y never gets there: the |C| limit stops it.
    const at::Tensor conv = sqnorm(at::sub_out(PC, P, I)) <= res_tol;  // PC is free: no extra [B, n, n]
    if (active.all().item<bool>()) {
      Cm = Cn;
      Bm = Bn;
    } else {
      Cm = at::where(active, Cn, Cm);
      Bm = at::where(active, Bn, Bm);
    }
    active = active.logical_and(cc <= limit).logical_and(conv.logical_not());
    if (!active.any().item<bool>()) break;
  }
  // Y = 0 (S = 0): the pseudo-inverse solution is X = 0, as with eigh (G / tiny would overflow to inf and nan)
  return at::where(a > dtype_tiny(st), symmetrize(Cm).mul_(0.5), at::zeros_like(Cm));
}

std::tuple<at::Tensor, at::Tensor> polar_newton_schulz(const at::Tensor& M, int64_t num_iters) {
  const int64_t B = M.size(0), q = M.size(2);
  if (B == 0) return {at::empty({0}, M.options()), at::empty_like(M)};
  // X0 = M / |M|_F, with M first divided by its largest |entry| a: |M|_F^2 itself under- or overflows in float32
  // for |M| below ~1e-19 or above ~1e19 (and the start would be inf, resp. 0), although the norm is representable.
  const at::Tensor a = at::linalg_vector_norm(M, std::numeric_limits<double>::infinity(), {1, 2}, /*keepdim=*/true);
  at::Tensor X = M / at::where(a > 0, a, at::ones_like(a));
  X.div_(X.flatten(1).norm(2, {1}).clamp_min(dtype_tiny(M.scalar_type())).view({B, 1, 1}));
  const at::Tensor I15 = at::eye(q, M.options()).mul_(1.5).expand({B, q, q});
  at::Tensor T = at::empty({B, q, q}, M.options()), X2 = at::empty_like(X);
  // Per matrix, after min_steps (float32 40, float64 89: every singular value s >= eps |M|_F has grown to q ~ 1) the
  // iteration stops once a step raises the value <X, M> by at most tol <X, M> (tol = min(p, q) eps; the value only
  // grows, each singular value's q_i rising monotonically to 1). num_iters bounds it.
  const double tol = double(std::min(M.size(1), q)) * dtype_eps(M.scalar_type());
  const int64_t kmin = min_steps(M.scalar_type());
  const at::Tensor Mflat = M.reshape({B, -1, 1});
  at::Tensor val = (X * M).sum({1, 2});
  at::Tensor active = at::ones({B}, M.options().dtype(at::kBool));
  for (int64_t k = 0; k < num_iters; ++k) {
    check_interrupt();  // Ctrl-C between steps (large batches take minutes)
    at::baddbmm_out(T, I15, X.transpose(-2, -1), X, /*beta=*/1, /*alpha=*/-0.5);  // (3I - X^T X) / 2
    at::bmm_out(X2, X, T);
    const at::Tensor val2 = at::bmm(X2.reshape({B, 1, -1}), Mflat).view({B});  // <X2, M> without a [B, p, q] copy
    if (active.all().item<bool>()) {
      std::swap(X, X2);
    } else {
      X = at::where(active.view({B, 1, 1}), X2, X);
      X2 = at::empty_like(X);
    }
    if (k + 1 >= kmin) active = active.logical_and(val2 - val > val2.abs() * tol);
    val = at::where(active, val2, val);
    if (!active.any().item<bool>()) break;
  }
  return {(X * M).sum({1, 2}), X};
}

}  // namespace cpu

namespace {

constexpr const char* kFwd = "wkd.sqrtm";
constexpr const char* kBwd = "wkd.sqrtm_backward";

at::Tensor sqrtm_cpu(const at::Tensor& S_in, c10::string_view method, int64_t num_iters) {
  check_square_batch(S_in, "S", kFwd);
  check_method(method, kFwd);
  check_num_iters(num_iters, kFwd);
  check_finite(S_in, "S", kFwd);
  check_symmetric(S_in, "S", kFwd);
  const at::Tensor S = cpu::symmetrize(S_in.contiguous());
  check_psd(S, "S", kFwd);
  if (method == "eigh") return std::get<0>(cpu::sqrtm_eigh(S, /*want_pinv=*/false));
  return cpu::sqrtm_newton_schulz(S, num_iters);
}

at::Tensor sqrtm_backward_cpu(const at::Tensor& grad_Y, const at::Tensor& Y, c10::string_view method,
                              int64_t num_iters) {
  check_square_batch(Y, "Y", kBwd);
  check_method(method, kBwd);
  check_num_iters(num_iters, kBwd);
  TORCH_CHECK_VALUE(grad_Y.sizes() == Y.sizes(), kBwd, ": `grad_Y` must have the shape of `Y` ", Y.sizes(), ", got ",
                    grad_Y.sizes());
  check_same(grad_Y, Y, "grad_Y", "Y", kBwd);
  return cpu::lyapunov(Y.contiguous(), grad_Y.contiguous(), method == "eigh", num_iters);
}

}  // namespace

TORCH_LIBRARY_IMPL(wkd, CPU, m) {
  m.impl("sqrtm", &sqrtm_cpu);
  m.impl("sqrtm_backward", &sqrtm_backward_cpu);
}

}  // namespace wkd
