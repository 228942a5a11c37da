// The CUDA C++ Sinkhorn kernels (csrc/cuda/sinkhorn.cu, csrc/cuda/sinkhorn/) compiled as host C++ against
// csrc/cuda/cuda_emu.cuh (the cooperative-fiber emulation of the CUDA subset they use), registered as CPU kernels
// of libraries of their own, so that they load in the same process as wkd_kernels._C (which may define wkd_tuning):
//   wkd_cuda_emu::sinkhorn / sinkhorn_backward: the schemas of wkd::sinkhorn / wkd::sinkhorn_backward
//       (csrc/ops.cpp), the automatic launch choices of the product ops;
//   wkd_cuda_emu::configure / resident_ctas_per_sm / launch_count / last_launches: the emulated device's switches,
//       its occupancy model and the launch log;
//   wkd_cuda_emu_tuning::*: the tuning ops (bench/cuda/sinkhorn_tuning_ops.cu) on the emulated kernels.
// Built by emulator.load (python_tests/cuda_emulation/emulator.py).
#define WKD_CUDA_EMULATE 1
#define WKD_TUNING_LIB "wkd_cuda_emu_tuning"
#include "../../csrc/cuda/sinkhorn.cu"
#include "../../bench/cuda/sinkhorn_tuning_ops.cu"

namespace wkd_cuda_emu_ops {

using wkd::cuda_sinkhorn::LaunchChoice;
using wkd::cuda_sinkhorn::SinkhornOutputs;

SinkhornOutputs sinkhorn(const at::Tensor& a, const at::Tensor& b, const at::Tensor& cost, double reg,
                         int64_t num_iters, double eps, bool log_domain, bool keep_history) {
  return wkd::cuda_sinkhorn::sinkhorn_run("wkd_cuda_emu.sinkhorn", a, b, cost, reg, num_iters, eps, log_domain,
                                          keep_history, LaunchChoice{});
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_backward(const at::Tensor& grad_value, const at::Tensor& a,
                                                     const at::Tensor& b, const at::Tensor& cost,
                                                     const at::Tensor& hist_r, const at::Tensor& hist_s,
                                                     const at::Tensor& y, double reg, bool log_domain,
                                                     std::optional<double> eps) {
  return wkd::cuda_sinkhorn::sinkhorn_backward_run("wkd_cuda_emu.sinkhorn_backward", grad_value, a, b, cost, hist_r,
                                                   hist_s, y, reg, log_domain, LaunchChoice{}, eps);
}

// The switches of wkd_emu::Config (csrc/cuda/cuda_emu.cuh).
void configure(int64_t small, int64_t smem_limit, int64_t regs_per_thread) {
  TORCH_CHECK_VALUE(regs_per_thread >= 1 && regs_per_thread <= 255,
                    "wkd_cuda_emu.configure: `regs_per_thread` must be in [1, 255], got ", regs_per_thread);
  ::wkd_emu::config().small = static_cast<int>(small);
  ::wkd_emu::config().smem_limit = static_cast<int>(smem_limit);
  ::wkd_emu::config().regs_per_thread = static_cast<int>(regs_per_thread);
}

// The emulated device's resident CTAs per SM for a launch shape (wkd_emu::resident_ctas_per_sm).
int64_t resident_ctas_per_sm(int64_t threads, int64_t smem) {
  TORCH_CHECK_VALUE(threads >= 1 && threads <= 1024 && smem >= 0, "wkd_cuda_emu.resident_ctas_per_sm: `threads` must "
                    "be in [1, 1024] and `smem` >= 0, got ", threads, ", ", smem);
  return ::wkd_emu::resident_ctas_per_sm(static_cast<int>(threads), static_cast<size_t>(smem));
}

int64_t launch_count() { return ::wkd_emu::launch_count(); }

// The last `count` launches (oldest first), 5 integers each: grid x, y, z, threads per block, dynamic shared memory
// bytes.
std::vector<int64_t> last_launches(int64_t count) {
  const auto& log = ::wkd_emu::launch_log();
  TORCH_CHECK_VALUE(count >= 0 && size_t(count) <= log.size(), "wkd_cuda_emu.last_launches: `count` must be in [0, ",
                    log.size(), "] (the launches logged), got ", count);
  std::vector<int64_t> out;
  for (size_t k = log.size() - size_t(count); k < log.size(); ++k) {
    const auto& r = log[k];
    out.insert(out.end(), {r.grid_x, r.grid_y, r.grid_z, r.threads, static_cast<int64_t>(r.smem_bytes)});
  }
  return out;
}

}  // namespace wkd_cuda_emu_ops

TORCH_LIBRARY(wkd_cuda_emu, m) {
  m.def(
      "sinkhorn(Tensor a, Tensor b, Tensor cost, float reg, int num_iters, float eps=0.0, "
      "bool log_domain=False, bool keep_history=True) -> (Tensor value, Tensor u, Tensor v, Tensor hist_r, "
      "Tensor hist_s, Tensor y)");
  m.def(
      "sinkhorn_backward(Tensor grad_value, Tensor a, Tensor b, Tensor cost, Tensor hist_r, Tensor hist_s, "
      "Tensor y, float reg, bool log_domain=False, float? eps=None) -> (Tensor grad_a, Tensor grad_b)");
  m.def("configure(int small=-1, int smem_limit=232448, int regs_per_thread=64) -> ()",
        &wkd_cuda_emu_ops::configure);
  m.def("resident_ctas_per_sm(int threads, int smem) -> int", &wkd_cuda_emu_ops::resident_ctas_per_sm);
  m.def("launch_count() -> int", &wkd_cuda_emu_ops::launch_count);
  m.def("last_launches(int count) -> int[]", &wkd_cuda_emu_ops::last_launches);
}
TORCH_LIBRARY_IMPL(wkd_cuda_emu, CPU, m) {
  m.impl("sinkhorn", &wkd_cuda_emu_ops::sinkhorn);
  m.impl("sinkhorn_backward", &wkd_cuda_emu_ops::sinkhorn_backward);
}
TORCH_LIBRARY(wkd_cuda_emu_tuning, m) { wkd::cuda_sinkhorn::define_tuning_ops(m); }
TORCH_LIBRARY_IMPL(wkd_cuda_emu_tuning, CPU, m) { wkd::cuda_sinkhorn::impl_tuning_ops(m); }
