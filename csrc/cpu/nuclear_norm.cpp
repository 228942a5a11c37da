// CPU kernel of wkd::nuclear_norm: nuclear norm ||M||_* = sum of singular values of a batch of matrices M [B, p, q]
// by the Newton-Schulz iteration for the orthogonal polar factor (docs/design.md section 4, the low-rank path of the
// Bures-Wasserstein distance: tr (S1^1/2 S2 S1^1/2)^1/2 = ||X1^T X2||_* / m).
//
//   X0 = M / ||M||_F;   num_iters times: X <- X (3I - X^T X) / 2;   polar = X;   value = <polar, M> = tr(polar^T M)
// Every singular value s of M maps to q(s) in [0, 1] (q -> 1 for s > 0; exactly 0 stays 0), so value =
// sum_i q_i s_i <= ||M||_*, the error being sum_i (1 - q_i) s_i over the singular values not yet converged (those
// below ~1.5^-num_iters ||M||_F). The gradient of ||M||_* is the polar factor U V^T: the backward is grad * polar
// (registered in Python), bounded by 1 in spectral norm even where M is rank-deficient (a valid subgradient there).
#include <ATen/ATen.h>
#include <torch/library.h>


#include "../gaussian_common.h"
#include "matfun.h"

namespace wkd {
namespace {

constexpr const char* kOp = "wkd.nuclear_norm";

std::tuple<at::Tensor, at::Tensor> nuclear_norm_cpu(const at::Tensor& M_in, int64_t num_iters) {
  TORCH_CHECK_VALUE(M_in.dim() == 3, kOp, ": `M` must be 3-D [B, p, q], got shape ", M_in.sizes());
  TORCH_CHECK_VALUE(M_in.size(1) >= 1 && M_in.size(2) >= 1, kOp, ": `M` must hold matrices with p, q >= 1, got shape ",
                    M_in.sizes());
  TORCH_CHECK_TYPE(is_float_or_double(M_in), kOp, ": `M` must be float32 or float64, got ", M_in.scalar_type(),
                   " (the Python wrappers compute float16/bfloat16 in float32)");
  check_num_iters(num_iters, kOp);
  check_finite(M_in, "M", kOp);
  return cpu::polar_newton_schulz(M_in.contiguous(), num_iters);
}

}  // namespace

TORCH_LIBRARY_IMPL(wkd, CPU, m) { m.impl("nuclear_norm", &nuclear_norm_cpu); }

}  // namespace wkd
