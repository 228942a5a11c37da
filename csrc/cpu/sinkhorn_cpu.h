// Shared by the CPU Sinkhorn kernels: csrc/cpu/sinkhorn.cpp (wkd::sinkhorn, wkd::sinkhorn_backward: the per-row
// and log-domain paths, and the entry points) and csrc/cpu/sinkhorn_gibbs.cpp (the BLAS path of a shared cost in the
// scaling domain, which wkd::sinkhorn runs on the K it builds and wkd::sinkhorn_gibbs on the K it is given).
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace wkd {
namespace sinkhorn_cpu {

constexpr const char* kFwd = "wkd.sinkhorn";
constexpr const char* kBwd = "wkd.sinkhorn_backward";

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

inline const char* dtype_name(at::ScalarType st) { return st == at::kFloat ? "float32" : "float64"; }

[[noreturn]] inline void kernel_range_error(const char* op, at::ScalarType st, double reg, bool log_domain) {
  if (!log_domain) {
    TORCH_CHECK_VALUE(false, op, ": K = exp(-cost / reg) underflows to 0 in ", dtype_name(st),
                      " on a whole row or column of `cost` with `reg` = ", reg,
                      " (it underflows where cost / reg > ", st == at::kFloat ? 103 : 745,
                      "): the scaling iterations would divide by 0. Use log_domain=True, or a larger `reg`");
  }
  TORCH_CHECK_VALUE(false, op, ": -cost / reg overflows to -inf in ", dtype_name(st),
                    " on a whole row or column of `cost` with `reg` = ", reg,
                    " (even with log_domain=True): use a larger `reg` or rescale `cost`");
}

// Value checks of a and b (finite, >= 0, every row with mass) and, when defined, of cost (finite, >= 0): one
// branch-free read of each; only when that fails does the exact check_sinkhorn_values run, to name the problem.
void check_values_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& cost, const char* op);

// Every entry of t finite (a plain loop: no ATen reductions, no host read).
bool all_finite(const at::Tensor& t);

// A non-finite scaling-domain value or gradient: K underflowed where it matters or the scalings overflowed.
// reg > 0 names it; reg <= 0 (the Gibbs op, which has no reg) names K.
void check_result_finite(const at::Tensor& t, double reg, const char* op, bool gradient);

// The BLAS path (contiguous inputs of one dtype; a, b checked): K [n, m] = exp(-cost / reg), KC = K∘cost.
// forward_gibbs checks K in the pass that sums its columns: with reg > 0 a dead row or column of K is
// kernel_range_error(op, ..., reg), with reg <= 0 an error naming `K`.
Outputs forward_gibbs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& K, const at::Tensor& KC,
                      int64_t num_iters, double eps, bool keep_history, const char* op, double reg);
std::tuple<at::Tensor, at::Tensor> backward_gibbs(const at::Tensor& grad_value, const at::Tensor& a,
                                                  const at::Tensor& b, const at::Tensor& K, const at::Tensor& KC,
                                                  const at::Tensor& hist_r, const at::Tensor& hist_s,
                                                  const at::Tensor& y, double eps, bool correct);

}  // namespace sinkhorn_cpu
}  // namespace wkd
