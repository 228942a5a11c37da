// Host side of the CUDA C++ Sinkhorn kernels: the CUDA runtime or its host emulation, the launch macros, the
// current stream and the device attributes the launch plans read (multiprocessor count, opt-in shared memory).
//
// WKD_CUDA_EMULATE (verification only, never set by the build): the sources compile as host C++ against
// csrc/cuda/cuda_emu.cuh, a cooperative-fiber emulator of the CUDA subset they use (python_tests/cuda_emulation/).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#ifdef WKD_CUDA_EMULATE
#include "../cuda_emu.cuh"
#define WKD_LAUNCH(kern, grid, block, stream, ...) ::wkd_emu::launch(grid, block, [=] { kern(__VA_ARGS__); })
#define WKD_LAUNCH_SMEM(kern, grid, block, smem, stream, ...) \
  ::wkd_emu::launch(grid, block, [=] { kern(__VA_ARGS__); }, smem)
#define WKD_LAUNCH_CHECK()
#define WKD_CHECK_ALIGNED16(p) ::wkd_emu::check_aligned16(p)
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#define WKD_LAUNCH(kern, grid, block, stream, ...) kern<<<grid, block, 0, stream>>>(__VA_ARGS__)
#define WKD_LAUNCH_SMEM(kern, grid, block, smem, stream, ...) kern<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define WKD_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define WKD_CHECK_ALIGNED16(p) ((void)0)
#endif

#include "launch.h"

namespace wkd {
namespace cuda_sinkhorn {
namespace {

inline int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

inline cudaStream_t current_stream() {
#ifdef WKD_CUDA_EMULATE
  return nullptr;
#else
  return c10::cuda::getCurrentCUDAStream();
#endif
}

// Multiprocessor count of the current device (a host-side attribute query, cached; no device synchronisation).
int sm_count() {
#ifdef WKD_CUDA_EMULATE
  return ::wkd_emu::sm_count();
#else
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];
  const int dev = c10::cuda::current_device();
  if (dev >= 0 && dev < kMaxDevices) {
    const int hit = cache[dev].load(std::memory_order_relaxed);
    if (hit > 0) return hit;
  }
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  if (sms <= 0) sms = 1;
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(sms, std::memory_order_relaxed);
  return sms;
#endif
}

// Opt-in shared memory per block of the current device (cached, like sm_count).
int smem_optin_bytes() {
#ifdef WKD_CUDA_EMULATE
  return ::wkd_emu::config().smem_limit;
#else
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices];
  const int dev = c10::cuda::current_device();
  if (dev >= 0 && dev < kMaxDevices) {
    const int hit = cache[dev].load(std::memory_order_relaxed);
    if (hit > 0) return hit;
  }
  int bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (bytes <= 0) bytes = 48 * 1024;
  if (dev >= 0 && dev < kMaxDevices) cache[dev].store(bytes, std::memory_order_relaxed);
  return bytes;
#endif
}

// Lets `kern` take `bytes` of dynamic shared memory (the opt-in beyond 48 KiB).
template <class Kern>
void allow_dynamic_smem(Kern* kern, size_t bytes) {
#ifndef WKD_CUDA_EMULATE
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
#else
  (void)kern;
  (void)bytes;
#endif
}

// How many CTAs of `kern` one SM holds at once with `threads` threads and `smem` bytes of dynamic shared memory
// (cudaOccupancyMaxActiveBlocksPerMultiprocessor: registers, shared memory, threads; a host-side computation, no
// device synchronisation), at least 1.
template <class Kern>
int resident_ctas_per_sm(Kern* kern, int threads, size_t smem) {
#ifdef WKD_CUDA_EMULATE
  (void)kern;
  return ::wkd_emu::resident_ctas_per_sm(threads, smem);
#else
  allow_dynamic_smem(kern, smem);
  int ctas = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kern, threads, smem));
  return std::max(ctas, 1);
#endif
}

}  // namespace
}  // namespace cuda_sinkhorn
}  // namespace wkd
