// Host-side argument checks of the C++ kernels (CPU and CUDA) of wkd::sinkhorn and wkd::sinkhorn_backward; the
// Python validator (wkd_kernels/ops/checks.py) gives the same messages before the Triton kernels, which do not check.
// They read only shapes, dtypes, devices and scalars: free, and never synchronise a device.
#pragma once
#include <ATen/ATen.h>

namespace wkd {

struct SinkhornDims {
  int64_t B, n, m;
  bool shared_cost;  // cost is [n, m] (true) or [B, n, m] (false)
};

// The forward's arguments (contract: the schema comment in csrc/ops.cpp). The backward passes num_iters = 1, eps = 0
// (it has neither).
inline SinkhornDims check_sinkhorn_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& cost,
                                        double reg, int64_t num_iters, double eps, const char* op) {
  TORCH_CHECK_VALUE(a.dim() == 2, op, ": `a` must be 2-D [B, n], got shape ", a.sizes());
  TORCH_CHECK_VALUE(b.dim() == 2, op, ": `b` must be 2-D [B, m], got shape ", b.sizes());
  TORCH_CHECK_VALUE(cost.dim() == 2 || cost.dim() == 3, op,
                    ": `cost` must be [n, m] (shared by the batch) or [B, n, m], got shape ", cost.sizes());
  const int64_t B = a.size(0), n = a.size(1), m = b.size(1);
  TORCH_CHECK_VALUE(b.size(0) == B, op, ": batch mismatch: `a` has ", B, " rows but `b` has ", b.size(0));
  TORCH_CHECK_VALUE(n > 0 && m > 0, op, ": `a` and `b` need at least one column, got n=", n, ", m=", m);
  const bool shared = cost.dim() == 2;
  if (shared) {
    TORCH_CHECK_VALUE(cost.size(0) == n && cost.size(1) == m, op, ": `cost` must be [n, m] = [", n, ", ", m,
                      "] to match `a` [B, n] and `b` [B, m], got ", cost.sizes());
  } else {
    TORCH_CHECK_VALUE(cost.size(0) == B && cost.size(1) == n && cost.size(2) == m, op,
                      ": `cost` must be [B, n, m] = [", B, ", ", n, ", ", m, "] to match `a` and `b`, got ",
                      cost.sizes());
  }
  TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble, op,
                   ": `a` must be float32 or float64, got ", a.scalar_type(),
                   " (the Python wrapper wkd_kernels.sinkhorn computes float16/bfloat16 in float32)");
  TORCH_CHECK_TYPE(b.scalar_type() == a.scalar_type(), op, ": `b` has dtype ", b.scalar_type(),
                   " but `a` has ", a.scalar_type(), "; all inputs must share one dtype");
  TORCH_CHECK_TYPE(cost.scalar_type() == a.scalar_type(), op, ": `cost` has dtype ", cost.scalar_type(),
                   " but `a` has ", a.scalar_type(), "; all inputs must share one dtype");
  TORCH_CHECK_VALUE(b.device() == a.device(), op, ": `b` is on ", b.device(), " but `a` is on ", a.device());
  TORCH_CHECK_VALUE(cost.device() == a.device(), op, ": `cost` is on ", cost.device(), " but `a` is on ",
                    a.device());
  TORCH_CHECK_VALUE(reg > 0 && std::isfinite(reg), op, ": `reg` must be a finite number > 0, got ", reg);
  TORCH_CHECK_VALUE(num_iters >= 1, op, ": `num_iters` must be >= 1, got ", num_iters);
  TORCH_CHECK_VALUE(eps >= 0 && std::isfinite(eps), op, ": `eps` must be a finite number >= 0, got ", eps);
  return {B, n, m, shared};
}

// Value checks: they read the data, so on a GPU they synchronise. Always run on CPU; on CUDA only on request.
inline void check_sinkhorn_values(const at::Tensor& a, const at::Tensor& b, const at::Tensor& cost, const char* op) {
  TORCH_CHECK_VALUE(at::isfinite(a).all().item<bool>(), op, ": `a` contains non-finite values (inf or nan)");
  TORCH_CHECK_VALUE(at::isfinite(b).all().item<bool>(), op, ": `b` contains non-finite values (inf or nan)");
  TORCH_CHECK_VALUE(at::isfinite(cost).all().item<bool>(), op, ": `cost` contains non-finite values (inf or nan)");
  TORCH_CHECK_VALUE(!(a < 0).any().item<bool>(), op, ": `a` must be non-negative (a probability vector per row)");
  TORCH_CHECK_VALUE(!(b < 0).any().item<bool>(), op, ": `b` must be non-negative (a probability vector per row)");
  TORCH_CHECK_VALUE(!(cost < 0).any().item<bool>(), op, ": `cost` must be non-negative");
  TORCH_CHECK_VALUE(!(a.sum(1) <= 0).any().item<bool>(), op, ": every row of `a` needs positive mass (a row sums to 0)");
  TORCH_CHECK_VALUE(!(b.sum(1) <= 0).any().item<bool>(), op, ": every row of `b` needs positive mass (a row sums to 0)");
}

// The backward's tensors beyond (a, b, cost): grad_value [B] and the forward's history hist_r [T, B, n],
// hist_s [T, B, m], y [B, n] with T >= 1, in the dtype and on the device of `a`.
inline void check_sinkhorn_backward_args(const at::Tensor& grad_value, const at::Tensor& a, const at::Tensor& b,
                                         const at::Tensor& hist_r, const at::Tensor& hist_s, const at::Tensor& y,
                                         const char* op) {
  const int64_t B = a.size(0), n = a.size(1), m = b.size(1);
  TORCH_CHECK_VALUE(grad_value.dim() == 1 && grad_value.size(0) == B, op, ": `grad_value` must be [B] = [", B,
                    "], got ", grad_value.sizes());
  TORCH_CHECK_VALUE(hist_r.dim() == 3 && hist_r.size(0) >= 1 && hist_r.size(1) == B && hist_r.size(2) == n, op,
                    ": `hist_r` must be [num_iters, B, n] with num_iters >= 1 (run the forward with "
                    "keep_history=True), got ", hist_r.sizes());
  TORCH_CHECK_VALUE(hist_s.dim() == 3 && hist_s.size(0) == hist_r.size(0) && hist_s.size(1) == B &&
                        hist_s.size(2) == m,
                    op, ": `hist_s` must be [num_iters, B, m] = [", hist_r.size(0), ", ", B, ", ", m, "], got ",
                    hist_s.sizes());
  TORCH_CHECK_VALUE(y.dim() == 2 && y.size(0) == B && y.size(1) == n, op, ": `y` must be [B, n] = [", B, ", ", n,
                    "] (run the forward with keep_history=True), got ", y.sizes());
  for (const at::Tensor* t : {&grad_value, &hist_r, &hist_s, &y}) {
    TORCH_CHECK_TYPE(t->scalar_type() == a.scalar_type(), op, ": all tensors must share the dtype of `a` (",
                     a.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == a.device(), op, ": all tensors must be on the device of `a` (", a.device(),
                      "), got ", t->device());
  }
}

}  // namespace wkd
