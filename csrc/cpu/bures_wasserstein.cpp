// CPU kernels of wkd::bures_wasserstein and wkd::bures_wasserstein_backward (docs/design.md section 4):
// squared 2-Wasserstein distance between Gaussians N(mu1, S1) and N(mu2, S2), batched:
//   W^2 = |mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (R1 S2 R1)^{1/2},   R_i = S_i^{1/2}
// and tr (R1 S2 R1)^{1/2} = tr ((R2 R1)^T (R2 R1))^{1/2} = |R2 R1|_*: the cross term is the nuclear norm of the
// product of the two roots, whose gradient is the polar factor Q of R2 R1. This avoids the square root of the mid
// matrix R1 S2 R1, whose condition number is the product of both (and which Newton-Schulz cannot iterate stably
// when it is singular).
//   newton_schulz: R1, R2 by coupled Newton-Schulz, (|R2 R1|_*, Q) by the polar Newton-Schulz iteration.
//   eigh: R1, R2 and (R1 S2 R1)^{1/2} by eigendecomposition (exact); Q = R2 R1 (R1 S2 R1)^{+1/2} (pseudo-inverse).
// Outputs: w2 [B], R1, R2, Q (saved for the backward).
// Backward (dW^2 = -2 <Q, d(R2 R1)> + traces):
//   dW^2/dmu1 = 2 (mu1 - mu2) = -dW^2/dmu2
//   dW^2/dS1 = I + X1,  R1 X1 + X1 R1 = -(R2 Q + Q^T R2)      (sym of dW^2/dR1 = -2 R2 Q)
//   dW^2/dS2 = I + X2,  R2 X2 + X2 R2 = -(Q R1 + R1 Q^T)      (sym of dW^2/dR2 = -2 Q R1)
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../gaussian_common.h"
#include "matfun.h"

namespace wkd {
namespace {

constexpr const char* kFwd = "wkd.bures_wasserstein";
constexpr const char* kBwd = "wkd.bures_wasserstein_backward";

at::Tensor btrace(const at::Tensor& S) { return S.diagonal(0, -2, -1).sum(-1); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bures_wasserstein_cpu(
    const at::Tensor& mu1, const at::Tensor& S1_in, const at::Tensor& mu2, const at::Tensor& S2_in,
    c10::string_view method, int64_t num_iters) {
  check_bures_args(mu1, S1_in, mu2, S2_in, kFwd);
  check_method(method, kFwd);
  check_num_iters(num_iters, kFwd);
  check_finite(mu1, "mu1", kFwd);
  check_finite(mu2, "mu2", kFwd);
  check_finite(S1_in, "S1", kFwd);
  check_finite(S2_in, "S2", kFwd);
  check_symmetric(S1_in, "S1", kFwd);
  check_symmetric(S2_in, "S2", kFwd);
  const int64_t B = S1_in.size(0);
  const at::Tensor S1 = cpu::symmetrize(S1_in.contiguous()), S2 = cpu::symmetrize(S2_in.contiguous());
  check_psd(S1, "S1", kFwd);
  check_psd(S2, "S2", kFwd);
  at::Tensor R1, R2, Q, cross;
  if (method == "eigh") {
    R1 = std::get<0>(cpu::sqrtm_eigh(S1, false));
    R2 = std::get<0>(cpu::sqrtm_eigh(S2, false));
    const at::Tensor P = cpu::symmetrize(at::matmul(at::matmul(R1, S2), R1));
    auto [Proot, Pinv] = cpu::sqrtm_eigh(P, true);
    cross = btrace(Proot);
    Q = at::matmul(at::matmul(R2, R1), Pinv);
  } else {
    // one batched iteration for both roots
    const at::Tensor R = cpu::sqrtm_newton_schulz(at::cat({S1, S2}, 0), num_iters);
    R1 = R.narrow(0, 0, B).clone();  // separate storages: op outputs must not alias
    R2 = R.narrow(0, B, B).clone();
    std::tie(cross, Q) = cpu::polar_newton_schulz(at::matmul(R2, R1), num_iters);
  }
  const at::Tensor w2 = (mu1 - mu2).square().sum(-1) + btrace(S1) + btrace(S2) - 2.0 * cross;
  return {w2, R1, R2, Q};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bures_wasserstein_backward_cpu(
    const at::Tensor& grad, const at::Tensor& mu1, const at::Tensor& mu2, const at::Tensor& R1_in,
    const at::Tensor& R2_in, const at::Tensor& Q_in, c10::string_view method, int64_t num_iters) {
  check_square_batch(R1_in, "sqrt_S1", kBwd);
  check_method(method, kBwd);
  check_num_iters(num_iters, kBwd);
  const int64_t B = R1_in.size(0), n = R1_in.size(1);
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&R2_in, "sqrt_S2"}, {&Q_in, "polar"}}) {
    TORCH_CHECK_VALUE(t->sizes() == R1_in.sizes(), kBwd, ": `", name, "` must be [B, n, n] like `sqrt_S1` ",
                      R1_in.sizes(), ", got ", t->sizes());
    check_same(*t, R1_in, name, "sqrt_S1", kBwd);
  }
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&mu1, "mu1"}, {&mu2, "mu2"}}) {
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == B && t->size(1) == n, kBwd, ": `", name, "` must be [B, n] = [",
                      B, ", ", n, "], got ", t->sizes());
    check_same(*t, R1_in, name, "sqrt_S1", kBwd);
  }
  TORCH_CHECK_VALUE(grad.dim() == 1 && grad.size(0) == B, kBwd, ": `grad_w2` must be [B] = [", B, "], got ",
                    grad.sizes());
  check_same(grad, R1_in, "grad_w2", "sqrt_S1", kBwd);
  const at::Tensor R1 = R1_in.contiguous(), R2 = R2_in.contiguous(), Q = Q_in.contiguous();
  const at::Tensor g = grad.contiguous().view({B, 1, 1});
  const at::Tensor I = at::eye(n, R1.options()).expand({B, n, n});
  const at::Tensor d = (mu1 - mu2) * (2.0 * grad.view({B, 1}));
  const at::Tensor A1 = at::matmul(R2, Q);  // dW^2/dR1 = -2 R2 Q
  const at::Tensor A2 = at::matmul(Q, R1);  // dW^2/dR2 = -2 Q R1
  // one batched Lyapunov solve for both roots
  const at::Tensor X = cpu::lyapunov(at::cat({R1, R2}, 0), at::cat({A1, A2}, 0).mul_(-2.0), method == "eigh", num_iters);
  const at::Tensor gS1 = (I + X.narrow(0, 0, B)) * g;
  const at::Tensor gS2 = (I + X.narrow(0, B, B)) * g;
  return {d, gS1, -d, gS2};
}

}  // namespace

TORCH_LIBRARY_IMPL(wkd, CPU, m) {
  m.impl("bures_wasserstein", &bures_wasserstein_cpu);
  m.impl("bures_wasserstein_backward", &bures_wasserstein_backward_cpu);
}

}  // namespace wkd
