// The benchmarking ops of the CUDA C++ Sinkhorn kernels: the product ops (csrc/cuda/sinkhorn.cu) with the launch
// choices as explicit per-call arguments, so that one build can time every tile table entry and several rows per
// CTA (bench/tune_sinkhorn.py --sweep-cuda-tiles / --sweep-cuda-rows). The product ops always use the automatic
// choices. Not part of the product build: setup.py compiles this file into wkd_kernels._C, next to
// csrc/cuda/sinkhorn.cu whose entry points it calls (csrc/cuda/sinkhorn/launch.h), only with WKD_BUILD_TUNING_OPS=1
// (bench/gpu_suite.sh --tuning-ops sets it); the CMake build never does.
// Library wkd_tuning (CUDA key) in that build; under WKD_CUDA_EMULATE nothing is registered here:
// python_tests/cuda_emulation/emu_sinkhorn_cuda.cpp includes this file with WKD_TUNING_LIB "wkd_cuda_emu_tuning" and
// registers the same schemas on the CPU key (the emulated kernels). Schemas:
//   sinkhorn(<wkd::sinkhorn's arguments>, *, int tile=-1, int rows_per_block=-1) -> <wkd::sinkhorn's outputs>
//   sinkhorn_backward(<wkd::sinkhorn_backward's arguments>, *, int tile=-1, int rows_per_block=-1) -> (grad_a, grad_b)
//       tile: -1 (launch_gemm's rule) or an index in [0, num_tiles()); rows_per_block: -1 (the automatic target) or
//       [1, 16]; anything else raises a ValueError naming the argument and the range. What the choices change and
//       what they cannot (bitwise equal products, the value to rounding; R lowered to fit shared memory): the
//       comments of the tile table and of small_plan.
//   num_tiles() -> int: the entries of the tile table.
//   tile_table() -> int[]: 5 integers per entry, (BM, BN, TM, TN, min CTAs per SM): BM x BN outputs per CTA,
//       TM x TN per thread, so (BM / TM) (BN / TN) threads per CTA.
//   small_plan(int B, int n, int m, ScalarType dtype, bool log_domain, bool backward, int rows_per_block=-1)
//       -> int[]: the single-launch kernels' launch plan for those sizes on the current device: (rows per CTA R,
//       CTAs, threads per CTA, M in shared memory 0/1, dynamic shared memory bytes). R is what runs: the requested
//       rows_per_block or the automatic target, lowered by the shared-memory plan.
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../../csrc/cuda/sinkhorn/launch.h"

#ifndef WKD_TUNING_LIB
#define WKD_TUNING_LIB "wkd_tuning"  // the library's name (a string literal: op names are formed by concatenation)
#endif

namespace wkd {
namespace cuda_sinkhorn {
namespace {

const char* const kTuneFwd = WKD_TUNING_LIB ".sinkhorn";
const char* const kTuneBwd = WKD_TUNING_LIB ".sinkhorn_backward";

LaunchChoice tuning_choice(const char* op, int64_t tile, int64_t rows_per_block) {
  TORCH_CHECK_VALUE(tile == kTileAuto || (tile >= 0 && tile < num_tiles()), op, ": `tile` must be -1 (automatic) or "
                    "an index of the tile table in [0, ", num_tiles() - 1, "], got ", tile);
  TORCH_CHECK_VALUE(rows_per_block == kRowsAuto || (rows_per_block >= 1 && rows_per_block <= kSmallMaxRows), op,
                    ": `rows_per_block` must be -1 (automatic) or in [1, ", kSmallMaxRows, "], got ",
                    rows_per_block);
  return LaunchChoice{static_cast<int>(tile), static_cast<int>(rows_per_block)};
}

SinkhornOutputs tuning_sinkhorn(const at::Tensor& a, const at::Tensor& b, const at::Tensor& cost, double reg,
                                int64_t num_iters, double eps, bool log_domain, bool keep_history, int64_t tile,
                                int64_t rows_per_block) {
  return sinkhorn_run(kTuneFwd, a, b, cost, reg, num_iters, eps, log_domain, keep_history,
                      tuning_choice(kTuneFwd, tile, rows_per_block));
}

std::tuple<at::Tensor, at::Tensor> tuning_sinkhorn_backward(const at::Tensor& grad_value, const at::Tensor& a,
                                                            const at::Tensor& b, const at::Tensor& cost,
                                                            const at::Tensor& hist_r, const at::Tensor& hist_s,
                                                            const at::Tensor& y, double reg, bool log_domain,
                                                            std::optional<double> eps, int64_t tile,
                                                            int64_t rows_per_block) {
  return sinkhorn_backward_run(kTuneBwd, grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain,
                               tuning_choice(kTuneBwd, tile, rows_per_block), eps);
}

int64_t tuning_num_tiles() { return num_tiles(); }

std::vector<int64_t> tuning_tile_table() { return tile_table_entries(); }

std::vector<int64_t> tuning_small_plan(int64_t B, int64_t n, int64_t m, at::ScalarType dtype, bool log_domain,
                                       bool backward, int64_t rows_per_block) {
  const char* op = WKD_TUNING_LIB ".small_plan";
  TORCH_CHECK_VALUE(B >= 1 && n >= 1 && m >= 1, op, ": B, n, m must be >= 1, got ", B, ", ", n, ", ", m);
  TORCH_CHECK_VALUE(n <= kSmallMaxC && m <= kSmallMaxC, op, ": the single-launch kernels take n, m <= ", kSmallMaxC,
                    ", got n=", n, ", m=", m);
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble, op, ": `dtype` must be float32 or float64, got ",
                    dtype);
  const LaunchChoice choice = tuning_choice(op, kTileAuto, rows_per_block);
  return small_plan_summary(B, n, m, dtype, log_domain, backward, choice.rows_per_block);
}

void define_tuning_ops(torch::Library& m) {
  m.def(
      "sinkhorn(Tensor a, Tensor b, Tensor cost, float reg, int num_iters, float eps=0.0, "
      "bool log_domain=False, bool keep_history=True, *, int tile=-1, int rows_per_block=-1) -> (Tensor value, "
      "Tensor u, Tensor v, Tensor hist_r, Tensor hist_s, Tensor y)");
  m.def(
      "sinkhorn_backward(Tensor grad_value, Tensor a, Tensor b, Tensor cost, Tensor hist_r, Tensor hist_s, "
      "Tensor y, float reg, bool log_domain=False, float? eps=None, *, int tile=-1, int rows_per_block=-1) -> "
      "(Tensor grad_a, Tensor grad_b)");
  m.def("num_tiles() -> int", &tuning_num_tiles);
  m.def("tile_table() -> int[]", &tuning_tile_table);
  m.def(
      "small_plan(int B, int n, int m, ScalarType dtype, bool log_domain=False, bool backward=False, "
      "int rows_per_block=-1) -> int[]",
      &tuning_small_plan);
}

void impl_tuning_ops(torch::Library& m) {
  m.impl("sinkhorn", &tuning_sinkhorn);
  m.impl("sinkhorn_backward", &tuning_sinkhorn_backward);
}

}  // namespace

#ifndef WKD_CUDA_EMULATE
TORCH_LIBRARY(wkd_tuning, m) { define_tuning_ops(m); }
TORCH_LIBRARY_IMPL(wkd_tuning, CUDA, m) { impl_tuning_ops(m); }
#endif

}  // namespace cuda_sinkhorn
}  // namespace wkd
