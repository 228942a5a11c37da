// The host interface of the CUDA C++ Sinkhorn kernels (csrc/cuda/sinkhorn.cu) that other translation units call:
// the forward / backward with explicit launch choices, and what the tuning ops (bench/cuda/sinkhorn_tuning_ops.cu,
// built only with WKD_BUILD_TUNING_OPS=1) and the host emulation (python_tests/cuda_emulation/) report about the
// launch configurations. Host code only.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace wkd {
namespace cuda_sinkhorn {

constexpr int kTileAuto = -1;      // launch_gemm's rule picks the tile table entry per product
constexpr int kRowsAuto = -1;      // small_plan picks the rows per CTA of the single-launch kernels (one wave)
constexpr int kSmallMaxC = 256;    // the single-launch kernels take a shared cost with n, m <= kSmallMaxC
constexpr int kSmallMaxRows = 16;  // at most this many batch rows per CTA of the single-launch kernels

// The launch choices a call runs with: the product ops pass LaunchChoice{} (both automatic); the tuning ops pass
// their arguments `tile` / `rows_per_block` (checked by their tuning_choice).
//   tile: index into the tile table (gemm_kernels.cuh) for every product of the per-half-iteration kernels, or
//         kTileAuto (launch_gemm's rule per product). Ignored where those kernels do not run (single-launch,
//         per-row kernels).
//   rows_per_block: the single-launch kernels' target rows per CTA in [1, kSmallMaxRows] (small_plan may lower it
//         to fit shared memory), or kRowsAuto. Ignored where the single-launch kernels do not run.
struct LaunchChoice {
  int tile = kTileAuto;
  int rows_per_block = kRowsAuto;
};

using SinkhornOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// wkd::sinkhorn / wkd::sinkhorn_backward (schemas: csrc/ops.cpp) on the CUDA kernels with the given launch choices;
// op: the op's name in error messages.
SinkhornOutputs sinkhorn_run(const char* op, const at::Tensor& a, const at::Tensor& b, const at::Tensor& cost,
                             double reg, int64_t num_iters, double eps, bool log_domain, bool keep_history,
                             LaunchChoice choice);
std::tuple<at::Tensor, at::Tensor> sinkhorn_backward_run(const char* op, const at::Tensor& grad_value,
                                                         const at::Tensor& a, const at::Tensor& b,
                                                         const at::Tensor& cost, const at::Tensor& hist_r,
                                                         const at::Tensor& hist_s, const at::Tensor& y, double reg,
                                                         bool log_domain, LaunchChoice choice,
                                                         std::optional<double> eps);

// The entries of the tile table of the per-half-iteration kernels.
int64_t num_tiles();
// 5 integers per tile table entry, (BM, BN, TM, TN, min CTAs per SM).
std::vector<int64_t> tile_table_entries();
// The single-launch kernels' launch plan for these sizes on the current device (small_plan): (rows per CTA R,
// CTAs, threads per CTA, M in shared memory 0/1, dynamic shared memory bytes). Arguments already checked:
// 1 <= n, m <= kSmallMaxC, dtype float32 / float64, rows_per_block kRowsAuto or in [1, kSmallMaxRows].
std::vector<int64_t> small_plan_summary(int64_t B, int64_t n, int64_t m, at::ScalarType dtype, bool log_domain,
                                        bool backward, int rows_per_block);

}  // namespace cuda_sinkhorn
}  // namespace wkd
