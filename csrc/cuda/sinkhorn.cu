// Hand-written CUDA C++ kernels of wkd::sinkhorn and wkd::sinkhorn_backward, registered on their CUDA dispatch key
// (contract: the schema comment in csrc/ops.cpp; the recurrences mirror csrc/cpu/sinkhorn.cpp line by line).
//
// Size rule: a shared cost with n, m <= 256 (CIFAR-100, COCO's 81 / 91 classes, ...), either domain, runs the
// single-launch kernels (section "Single-launch kernels for small C" below): the whole forward in one launch and
// the whole exact backward in one launch (+ one build launch each where the kernel matrix does not fit in shared
// memory). Everything else runs the per-half-iteration kernels described here:
//
// Shared cost [n, m] (n or m > 256), scaling domain: every half-iteration of the whole batch is one
// [B, k] x [k, N] product done by gemm_epi_kernel, a tiled shared-memory SIMT GEMM whose epilogue fuses
// what follows the product (+eps, the division, the history write, the backward's accumulations):
//   * tiles: BM x BN outputs per block, from a small table (see "tile table"; by default 32 x 64, 128 threads,
//     4 x 4 outputs per thread; or 16 x 32, 64 threads, 2 x 4 when the big tiles would not fill half the SMs;
//     a 64 x 64 / 256-thread entry with two CTAs per SM is selectable per call through the tuning ops), k-slabs of
//     128 bytes (32 floats / 16 doubles), double-buffered in shared memory with a register-staged prefetch of the
//     next slab, 16-byte global loads when rows are 16-byte aligned (scalar fallback with bounds checks otherwise; the
//     kernel matrices' leading dimensions are padded to 16 elements, so their loads always are),
//     16-byte shared-memory reads (one A read serves 4 k-steps).
//   * the kernel matrices are formed once per call by a prep kernel (exp and a tiled transpose): K [n, m]
//     for u -> s, K^T [m, n] for v -> r, and for the last forward half-iteration W2 [m, 2n] with the columns of
//     K^T and (K∘C)^T interleaved, so one product gives r_T and y = (K∘C) v_T side by side in the same thread:
//     the epilogue writes u, r_T, y and the per-row value sum_i u_i y_i (per-block partials, then the last
//     block of each row-block sums them in a fixed order: deterministic, no float atomics).
//     The backward forms M2 [2n, m] = [K∘C ; K] and K^T: its first product is [g u_T | -w_T u_T] @ M2, i.e.
//     g (K∘C)^T u_T - K^T(w_T u_T) in one k-loop of length 2n.
//   * the same prep launch also runs the per-row prologue (u0 = 1/|supp a| on supp a in the forward; w_T, the
//     first A operand and grad_a = w_T in the backward) in extra blocks: no separate launch.
//   Forward: 1 + 2T launches; backward: 2T launches. Extra memory: 3-4 n x m matrices + O(B (n + m)).
// Per-row cost [B, n, m] and the log domain (per-row cost, or shared with n or m > 256): one block per row,
// loops; the kernel entries exp(-C/reg) (or -C/reg) are recomputed from the cost on the fly, never stored (no
// B x n x m tensor); for a shared cost in the log domain, L = -C/reg [n, m] is formed once (the same division as
// the CPU op).
//
// Everything runs on the current stream, allocates through the caching allocator (at::empty), never
// synchronises with the host (only the shape/dtype/device checks of sinkhorn_common.h run): CUDA-graph capturable.
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers that a
// bare CUDA toolkit may lack); the SM count comes from cudaDeviceGetAttribute, cached per device.
//
// WKD_CUDA_EMULATE (verification only, never set by the build): compile this same file as host C++ against
// cuda_emu.cuh, a cooperative-fiber emulator of the CUDA subset used here. That build defines its own library,
// wkd_cuda_emu::sinkhorn / wkd_cuda_emu::sinkhorn_backward (the schemas of wkd::sinkhorn / wkd::sinkhorn_backward)
// with the emulated kernels as CPU kernels, so it loads next to wkd_kernels._C and the kernels and their launch
// code can be checked against the CPU op without a GPU (python_tests/cuda_emulation/,
// python_tests/test_sinkhorn.py::test_kernels_under_host_emulation), and the tuning ops as wkd_cuda_emu_tuning::*.
//
// Tuning ops (benchmarking only; section "tuning ops" at the end): wkd_tuning::sinkhorn / sinkhorn_backward take
// the tile table entry of the per-half-iteration kernels and the rows per CTA of the single-launch kernels as
// explicit per-call arguments (the product ops above always use the automatic choices).
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
#include "cuda_emu.cuh"
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

#include "../sinkhorn_common.h"

namespace wkd {
namespace {

#ifndef WKD_CUDA_EMULATE
constexpr const char* kFwd = "wkd.sinkhorn";
constexpr const char* kBwd = "wkd.sinkhorn_backward";
#define WKD_TUNING_LIB "wkd_tuning"  // the tuning ops' library (string literal: op names are formed by concatenation)
#else
constexpr const char* kFwd = "wkd_cuda_emu.sinkhorn";
constexpr const char* kBwd = "wkd_cuda_emu.sinkhorn_backward";
#define WKD_TUNING_LIB "wkd_cuda_emu_tuning"
#endif

constexpr unsigned kFullMask = 0xffffffffu;

inline int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

inline cudaStream_t current_stream() {
#ifdef WKD_CUDA_EMULATE
  return nullptr;
#else
  return c10::cuda::getCurrentCUDAStream();
#endif
}

#ifdef WKD_CUDA_EMULATE
// Verification-only switches, set through wkd_cuda_emu::configure (python_tests/cuda_emulation/): small < 0 applies
// the size rule of the single-launch kernels, 0 / 1 forces them off / on (where they apply: shared cost, C <= 256);
// smem_limit: the emulated opt-in shared memory per block (sm_90: 227 KiB). (The tile of the per-half-iteration
// kernels and the rows per CTA of the single-launch kernels are per-call arguments of the tuning ops instead.)
struct EmuConfig {
  int small = -1;
  int smem_limit = 227 * 1024;
};
EmuConfig& emu_config() {
  static EmuConfig c;
  return c;
}
#endif

// Multiprocessor count of the current device (a host-side attribute query, cached; no device synchronisation).
int sm_count() {
#ifdef WKD_CUDA_EMULATE
  const char* env = std::getenv("WKD_EMU_SMS");
  return env ? std::max(1, std::atoi(env)) : 8;
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

// ------------------------------------------------------------------------------------------ device math
__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }
__device__ __forceinline__ float dlog1p(float x) { return log1pf(x); }
__device__ __forceinline__ double dlog1p(double x) { return log1p(x); }

template <typename T>
__device__ __forceinline__ T ninf() {
  return static_cast<T>(-INFINITY);
}

// std::max / std::min semantics of the CPU code: max(a, b) = a < b ? b : a.
template <typename T>
__device__ __forceinline__ T smax(T a, T b) {
  return a < b ? b : a;
}

template <typename T>
__device__ __forceinline__ T safe_log(T x) {
  return x > T(0) ? dlog(x) : ninf<T>();
}

// log(exp(x) + eps)
template <typename T>
__device__ __forceinline__ T log_add_eps(T x, T log_eps, bool has_eps) {
  if (!has_eps) return x;
  const T hi = x < log_eps ? log_eps : x;
  const T lo = log_eps < x ? log_eps : x;
  return hi + dlog1p(dexp(lo - hi));
}

// Butterfly reductions: every lane ends with the same, bitwise identical result (a + b == b + a).
template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

template <typename T>
__device__ __forceinline__ T warp_max(T x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = smax(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

// Gauge correction of step t of the backward for one batch row, by one whole warp (the CPU op's backward_row;
// docs/design.md section 3): restores sum_j b_j z_t,j = G_t by z_t -= c b, grad_b -= c b.
//   x: w_t u_t times x_sign (scaling) or w_t (log); r: r_t (log r_t); zb: z_t v_t (scaling) or z_t (log), corrected
//   in place; s: s_t (log s_t); gb: the grad_b accumulator. G, zs: G_{t+1} and eps sum_j b_j z_{t+1,j} / s_{t+1,j}
//   on entry (ignored when first), G_t and the same sum of step t on exit, equal in the warp's lanes. The caller
//   keeps the row on the same warp from step to step and synchronises before the next pass reads zb / gb.
template <typename T, bool LOG>
__device__ void gauge_row(const T* x, T x_sign, const T* a, const T* r, T* zb, const T* b, const T* s, T* gb,
                          int64_t n, int64_t m, T eps, T log_eps, bool has_eps, bool first, T& G, T& zs) {
  const int lane = threadIdx.x & 31;
  if (first) G = zs = T(0);
  if (has_eps) {  // G_t = G_{t+1} + eps (sum_i a_i w_t,i / r_t,i - zs)
    T awr = T(0);
    for (int64_t i = lane; i < n; i += 32) {
      if (LOG) {
        if (a[i] > T(0)) awr += a[i] * x[i] * dexp(log_eps - r[i]);
      } else {
        awr += x[i];  // w a / r
      }
    }
    awr = warp_sum(awr);
    G = LOG ? G - zs + awr : G + eps * (x_sign * awr - zs);
  }
  T sbz = T(0), sbb = T(0);
  for (int64_t j = lane; j < m; j += 32) {
    sbz += LOG ? b[j] * zb[j] : zb[j] * s[j];
    sbb += b[j] * b[j];
  }
  sbz = warp_sum(sbz);
  sbb = warp_sum(sbb);
  const T c = sbb > T(0) ? (sbz - G) / sbb : T(0);
  T zsum = T(0);
  for (int64_t j = lane; j < m; j += 32) {
    T zn;
    if (LOG) {
      zn = zb[j] - c * b[j];
      if (has_eps && b[j] > T(0)) zsum += b[j] * zn * dexp(log_eps - s[j]);
    } else {
      zn = zb[j] - c * b[j] * (b[j] / s[j]);
      zsum += zn;  // b z / s = z v
    }
    zb[j] = zn;
    gb[j] -= c * b[j];
  }
  zs = warp_sum(zsum);
}

// The gauge correction between the products of backward_shared: one warp per row (8 rows per block);
// state [2, B] = (G, zs).
template <typename T>
__global__ void __launch_bounds__(256)
    gauge_kernel(const T* x, int64_t ldx, T x_sign, const T* a, const T* r, T* zv, const T* b, const T* s, T* gb,
                 T* state, int64_t B, int64_t n, int64_t m, T eps, bool has_eps, bool first) {
  const int64_t bi = int64_t(blockIdx.x) * 8 + (threadIdx.x >> 5);
  if (bi >= B) return;
  T G = first ? T(0) : state[bi], zs = first ? T(0) : state[B + bi];
  gauge_row<T, false>(x + bi * ldx, x_sign, a + bi * n, r + bi * n, zv + bi * m, b + bi * m, s + bi * m,
                      gb + bi * m, n, m, eps, T(0), has_eps, first, G, zs);
  if ((threadIdx.x & 31) == 0) {
    state[bi] = G;
    state[B + bi] = zs;
  }
}

// ------------------------------------------------------------------------------------------ vector access
template <typename T>
struct Vec16;  // the 16-byte vector type of T
template <>
struct Vec16<float> {
  using type = float4;
  static constexpr int n = 4;
};
template <>
struct Vec16<double> {
  using type = double2;
  static constexpr int n = 2;
};

__device__ __forceinline__ void ld16(const float* p, float (&o)[4]) {
  WKD_CHECK_ALIGNED16(p);
  const float4 x = *reinterpret_cast<const float4*>(p);
  o[0] = x.x;
  o[1] = x.y;
  o[2] = x.z;
  o[3] = x.w;
}
__device__ __forceinline__ void ld16(const double* p, double (&o)[2]) {
  WKD_CHECK_ALIGNED16(p);
  const double2 x = *reinterpret_cast<const double2*>(p);
  o[0] = x.x;
  o[1] = x.y;
}
__device__ __forceinline__ void st16(float* p, const float (&v)[4]) {
  WKD_CHECK_ALIGNED16(p);
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void st16(double* p, const double (&v)[2]) {
  WKD_CHECK_ALIGNED16(p);
  *reinterpret_cast<double2*>(p) = make_double2(v[0], v[1]);
}
// Four consecutive elements (16-byte aligned) from shared memory: one float4, or two double2.
__device__ __forceinline__ void lds4(const float* p, float (&o)[4]) {
  WKD_CHECK_ALIGNED16(p);
  const float4 x = *reinterpret_cast<const float4*>(p);
  o[0] = x.x;
  o[1] = x.y;
  o[2] = x.z;
  o[3] = x.w;
}
__device__ __forceinline__ void lds4(const double* p, double (&o)[4]) {
  WKD_CHECK_ALIGNED16(p);
  const double2 x = *reinterpret_cast<const double2*>(p);
  const double2 y = *reinterpret_cast<const double2*>(p + 2);
  o[0] = x.x;
  o[1] = x.y;
  o[2] = y.x;
  o[3] = y.y;
}

template <typename T>
bool vec_ok(const T* p, int64_t ld, int64_t len) {
  constexpr int V = Vec16<T>::n;
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld % V == 0 && len % V == 0;
}

// ======================================================================================================
// Tiled GEMM with fused epilogue:  acc[r, c] = sum_k A[r, k] W[k, c]   (A [rows, Kd] row stride lda,
// W [Kd, N] row stride ldw), then epi.apply(acc of the thread's TM x TN outputs).
// ======================================================================================================
template <typename T>
struct GemmTraits {
  static constexpr int VEC = Vec16<T>::n;  // elements per 16-byte vector
  static constexpr int BK = 128 / int(sizeof(T));  // k-slab: 32 floats, 16 doubles
};

template <typename T, int BM, int BN, int TM, int TN, int MINB, class Epi>
__global__ void __launch_bounds__((BM / TM) * (BN / TN), MINB)
    gemm_epi_kernel(const T* __restrict__ A, int64_t lda, const T* __restrict__ W, int64_t ldw, int64_t rows,
                    int64_t Kd, int64_t N, bool vecA, bool vecW, Epi epi) {
  constexpr int TPR = BN / TN;         // threads per output row of the tile
  constexpr int NT = (BM / TM) * TPR;  // threads per block
  constexpr int VEC = GemmTraits<T>::VEC;
  constexpr int BK = GemmTraits<T>::BK;
  constexpr int AST = BK + VEC;   // padded row stride of the A tile in shared memory (16-byte multiple)
  constexpr int A_VPR = BK / VEC;  // 16-byte vectors per A-tile row
  constexpr int W_VPR = BN / VEC;  // 16-byte vectors per W-tile row
  constexpr int A_LD = BM * A_VPR / NT;  // vectors each thread loads per slab
  constexpr int W_LD = BK * W_VPR / NT;
  static_assert(TN == 4, "the thread tile is 4 columns wide (one 16-byte shared read per k)");
  static_assert(BK % 4 == 0 && BM % TM == 0 && BN % TN == 0, "tile shape");
  static_assert(A_LD * NT == BM * A_VPR && W_LD * NT == BK * W_VPR, "tile loads must split evenly over threads");
  static_assert(32 % TPR == 0, "a tile row's threads must sit in one warp (value reduction)");

  __shared__ __align__(16) T As[2][BM * AST];
  __shared__ __align__(16) T Ws[2][BK * BN];

  const int tid = threadIdx.x;
  const int tx = tid % TPR, ty = tid / TPR;
  const int64_t r0 = int64_t(blockIdx.y) * BM, c0 = int64_t(blockIdx.x) * BN;

  T ra[A_LD][VEC];
  T rw[W_LD][VEC];

  // Global -> registers (zero outside the matrices).
  auto load = [&](int64_t k0) {
#pragma unroll
    for (int q = 0; q < A_LD; ++q) {
      const int e = tid + q * NT;
      const int row = e / A_VPR, kk = (e % A_VPR) * VEC;
      const int64_t gr = r0 + row, gk = k0 + kk;
      const bool in_row = gr < rows;
      if (vecA) {
        if (in_row && gk < Kd) {
          ld16(A + gr * lda + gk, ra[q]);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) ra[q][v] = T(0);
        }
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) ra[q][v] = (in_row && gk + v < Kd) ? A[gr * lda + gk + v] : T(0);
      }
    }
#pragma unroll
    for (int q = 0; q < W_LD; ++q) {
      const int e = tid + q * NT;
      const int kr = e / W_VPR, cc = (e % W_VPR) * VEC;
      const int64_t gk = k0 + kr, gc = c0 + cc;
      const bool in_k = gk < Kd;
      if (vecW) {
        if (in_k && gc < N) {
          ld16(W + gk * ldw + gc, rw[q]);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) rw[q][v] = T(0);
        }
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) rw[q][v] = (in_k && gc + v < N) ? W[gk * ldw + gc + v] : T(0);
      }
    }
  };
  // Registers -> shared buffer `buf`.
  auto store = [&](int buf) {
#pragma unroll
    for (int q = 0; q < A_LD; ++q) {
      const int e = tid + q * NT;
      st16(&As[buf][(e / A_VPR) * AST + (e % A_VPR) * VEC], ra[q]);
    }
#pragma unroll
    for (int q = 0; q < W_LD; ++q) {
      const int e = tid + q * NT;
      st16(&Ws[buf][(e / W_VPR) * BN + (e % W_VPR) * VEC], rw[q]);
    }
  };

  T acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = T(0);

  const int64_t nk = (Kd + BK - 1) / BK;
  load(0);
  store(0);
  __syncthreads();
  for (int64_t kt = 0; kt < nk; ++kt) {
    const int buf = int(kt & 1);
    if (kt + 1 < nk) load((kt + 1) * BK);  // in flight while this slab is multiplied
    const T* as = &As[buf][ty * TM * AST];
    const T* ws = &Ws[buf][tx * TN];
#pragma unroll
    for (int kk = 0; kk < BK; kk += 4) {
      T af[TM][4];
#pragma unroll
      for (int i = 0; i < TM; ++i) lds4(as + i * AST + kk, af[i]);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        T wf[4];
        lds4(ws + (kk + q) * BN, wf);
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] = fma(af[i][q], wf[j], acc[i][j]);
      }
    }
    // The other buffer was last read in iteration kt - 1, which every thread finished (barrier below).
    if (kt + 1 < nk) store(buf ^ 1);
    __syncthreads();
  }
  epi.template apply<BM, BN, TM, TN>(acc, r0 + ty * TM, c0 + tx * TN, rows, N);
}

// ------------------------------------------------------------------------------------------ epilogues
// Outputs and element-wise operands are contiguous [rows, N] unless said otherwise.

// Forward half-iteration: s = acc + eps; dst = num / s; hist = s (if kept).
//   u -> s (num = b, dst = v, hist = hist_s[t]);   v -> r (num = a, dst = u, hist = hist_r[t]).
template <typename T>
struct EpiScale {
  const T* num;
  T* dst;
  T* hist;  // nullable
  T eps;
  template <int BM, int BN, int TM, int TN>
  __device__ __forceinline__ void apply(const T (&acc)[TM][TN], int64_t row0, int64_t col0, int64_t rows,
                                        int64_t N) const {
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int64_t row = row0 + i;
      if (row >= rows) continue;
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int64_t col = col0 + j;
        if (col >= N) continue;
        const int64_t idx = row * N + col;
        const T s = acc[i][j] + eps;
        dst[idx] = num[idx] / s;
        if (hist) hist[idx] = s;
      }
    }
  }
};

// Last forward half-iteration with W2 = [K^T, (K∘C)^T] interleaved by column (N = 2n): output columns 2i and
// 2i + 1 hold r_T,i - eps and y_i. Writes u = a / r_T, hist_r[T-1] = r_T and y (if kept), and
// value[row] = sum_i u_i y_i: per-block partials reduced over the tile row's threads by shuffles, stored in
// part[blockIdx.x, row]; the last block of each row-block (atomic ticket) sums them in column-block order.
template <typename T>
struct EpiLast {
  const T* a;
  T* u;
  T* hist_r;  // nullable: hist_r[T-1]
  T* hist_y;  // nullable: y
  T eps;
  int64_t n;
  T* part;                // [gridDim.x, rows]
  unsigned int* tickets;  // [>= gridDim.y], zeroed by the prep kernel
  T* value;               // [rows]
  template <int BM, int BN, int TM, int TN>
  __device__ __forceinline__ void apply(const T (&acc)[TM][TN], int64_t row0, int64_t col0, int64_t rows,
                                        int64_t N) const {
    constexpr int TPR = BN / TN;
    constexpr int NT = (BM / TM) * TPR;
    static_assert(TN % 2 == 0, "column pairs (r, y) must stay in one thread");
    T p[TM];
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      p[i] = T(0);
      const int64_t row = row0 + i;
      if (row >= rows) continue;
#pragma unroll
      for (int j = 0; j < TN; j += 2) {
        const int64_t col = col0 + j;  // even: N = 2n is even, so col + 1 < N too
        if (col >= N) continue;
        const int64_t idx = row * n + col / 2;
        const T r = acc[i][j] + eps;
        const T y = acc[i][j + 1];
        const T ui = a[idx] / r;
        u[idx] = ui;
        if (hist_r) {
          hist_r[idx] = r;
          hist_y[idx] = y;
        }
        p[i] += ui * y;
      }
    }
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int o = TPR / 2; o > 0; o >>= 1) p[i] += __shfl_xor_sync(kFullMask, p[i], o);
    if (threadIdx.x % TPR == 0) {
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const int64_t row = row0 + i;
        if (row < rows) part[int64_t(blockIdx.x) * rows + row] = p[i];
      }
    }
    __threadfence();
    __syncthreads();
    __shared__ bool s_last;
    if (threadIdx.x == 0) s_last = atomicAdd(&tickets[blockIdx.y], 1u) == gridDim.x - 1;
    __syncthreads();
    if (s_last) {
      __threadfence();
      for (int r = threadIdx.x; r < BM; r += NT) {
        const int64_t row = int64_t(blockIdx.y) * BM + r;
        if (row >= rows) continue;
        T s = T(0);
        for (unsigned cb = 0; cb < gridDim.x; ++cb) s += __ldcg(part + int64_t(cb) * rows + row);
        value[row] = s;
      }
    }
  }
};

// Backward, dL/dv side at iteration t: z = (first ? acc : -acc) / s_t; grad_b (= or +=) z; zv = z * b / s_t.
// first: acc = g (K∘C)^T u_T - K^T (w_T u_T) (from [g u_T | -w_T u_T] @ [K∘C ; K]); else acc = K^T (w_t u_t).
template <typename T>
struct EpiZ {
  const T* s;  // hist_s[t]
  const T* b;
  T* gb;
  T* zv;  // nullable (not needed at t = 0)
  bool first;
  template <int BM, int BN, int TM, int TN>
  __device__ __forceinline__ void apply(const T (&acc)[TM][TN], int64_t row0, int64_t col0, int64_t rows,
                                        int64_t N) const {
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int64_t row = row0 + i;
      if (row >= rows) continue;
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int64_t col = col0 + j;
        if (col >= N) continue;
        const int64_t idx = row * N + col;
        const T sv = s[idx];
        const T z = (first ? acc[i][j] : -acc[i][j]) / sv;
        gb[idx] = first ? z : gb[idx] + z;
        if (zv) zv[idx] = z * (b[idx] / sv);
      }
    }
  }
};

// Backward, dL/du side producing w_{t-1}: w = -acc / r_{t-1} (acc = K (z_t v_t)); grad_a += w; x = w * a / r_{t-1}.
template <typename T>
struct EpiW {
  const T* r;  // hist_r[t-1]
  const T* a;
  T* ga;
  T* x;
  template <int BM, int BN, int TM, int TN>
  __device__ __forceinline__ void apply(const T (&acc)[TM][TN], int64_t row0, int64_t col0, int64_t rows,
                                        int64_t N) const {
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int64_t row = row0 + i;
      if (row >= rows) continue;
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int64_t col = col0 + j;
        if (col >= N) continue;
        const int64_t idx = row * N + col;
        const T rv = r[idx];
        const T w = -acc[i][j] / rv;
        ga[idx] += w;
        x[idx] = w * (a[idx] / rv);
      }
    }
  }
};

// ------------------------------------------------------------------------------------------ tile table
// The tile configurations of gemm_epi_kernel (docs/design.md section 3, tile table). The dtype enters through the k-slab (BK = 128
// bytes: 32 floats, 16 doubles); the same table serves both dtypes. Every entry gives bitwise the same products
// (each output is one thread's k-loop in increasing k): only the speed changes (and the value's partial-sum
// order, to rounding).
//   0  32 x 64, 4 x 4 per thread, 128 threads   today's big tiles
//   1  16 x 32, 2 x 4 per thread,  64 threads   today's small tiles
//   2  64 x 64, 4 x 4 per thread, 256 threads   __launch_bounds__(256, 2): at most 128 registers per thread, so
//                                               two CTAs per SM (smem 34 KiB float32 / 35 KiB float64 each)
// Choice: the host argument `tile` of forward_shared / backward_shared (launch_gemm): kTileAuto is today's rule
// (0 when it gives at least half a wave of blocks, else 1); 0..kNumTiles-1 forces an entry. The product ops
// (wkd::sinkhorn, wkd::sinkhorn_backward) always pass kTileAuto. A forced entry comes only from the explicit
// argument `tile` of the benchmarking ops wkd_tuning::sinkhorn / wkd_tuning::sinkhorn_backward (section "Tuning
// ops" at the end of this file; wkd_cuda_emu_tuning::* under emulation), per call: no build-time switch, no
// global state, no environment. Their sweep: bench/gpu_quick.py --sweep-cuda-tiles. The defaults (this rule, and
// the entries themselves) are not measured yet: no GPU has run the sweep.
struct TileCfg {
  int bm, bn, tm, tn, min_blocks;
};
constexpr TileCfg kTileTable[] = {{32, 64, 4, 4, 1}, {16, 32, 2, 4, 1}, {64, 64, 4, 4, 2}};
constexpr int kNumTiles = int(sizeof(kTileTable) / sizeof(kTileTable[0]));
constexpr int kTileAuto = -1;

// Leading dimension of the kernel matrices formed by the prep kernels (W operands): a multiple of 16 elements, so
// that their rows are 16-byte aligned and the W-tile loads are 16-byte vectors whatever n and m (the padding
// columns are never written and only feed output columns >= N, which the epilogues drop).
__host__ __device__ __forceinline__ int64_t padded_ld(int64_t cols) { return (cols + 15) / 16 * 16; }

template <typename T, int I, class Epi>
void launch_tile(const T* A, int64_t lda, const T* W, int64_t ldw, int64_t rows, int64_t Kd, int64_t N, bool vA,
                 bool vW, const Epi& epi, cudaStream_t stream) {
  constexpr TileCfg c = kTileTable[I];
  static_assert(c.bm >= 16 && c.bn >= 32, "EpiLast's ticket / partial buffers assume BM >= 16, BN >= 32");
  const dim3 grid(static_cast<unsigned>(ceil_div(N, c.bn)), static_cast<unsigned>(ceil_div(rows, c.bm)));
  auto* kern = &gemm_epi_kernel<T, c.bm, c.bn, c.tm, c.tn, c.min_blocks, Epi>;
  WKD_LAUNCH(kern, grid, (c.bm / c.tm) * (c.bn / c.tn), stream, A, lda, W, ldw, rows, Kd, N, vA, vW, epi);
}

// W_padded: W's rows may be read up to ldw (a padded_ld buffer): 16-byte loads even when N is not a multiple.
template <typename T, class Epi>
void launch_gemm(const T* A, int64_t lda, const T* W, int64_t ldw, bool W_padded, int64_t rows, int64_t Kd,
                 int64_t N, const Epi& epi, int sms, int tile, cudaStream_t stream) {
  const bool vA = vec_ok(A, lda, Kd), vW = vec_ok(W, ldw, W_padded ? ldw : N);
  if (tile == kTileAuto) {
    const int64_t big_blocks = ceil_div(rows, 32) * ceil_div(N, 64);
    tile = 2 * big_blocks >= sms ? 0 : 1;
  }
  switch (tile) {
    case 0:
      launch_tile<T, 0>(A, lda, W, ldw, rows, Kd, N, vA, vW, epi, stream);
      break;
    case 1:
      launch_tile<T, 1>(A, lda, W, ldw, rows, Kd, N, vA, vW, epi, stream);
      break;
    case 2:
      launch_tile<T, 2>(A, lda, W, ldw, rows, Kd, N, vA, vW, epi, stream);
      break;
    default:
      TORCH_CHECK(false, "launch_gemm: tile index ", tile, " outside the tile table [0, ", kNumTiles, ")");
  }
  static_assert(kNumTiles == 3, "launch_gemm: one case per tile table entry");
  WKD_LAUNCH_CHECK();
}

// ======================================================================================================
// Prep kernels: kernel matrices (32 x 32 tiles, 256 threads, transposed through shared memory) in blocks
// [0, ntiles), per-row prologue in blocks [ntiles, ntiles + B).
// ======================================================================================================
constexpr int kPrepThreads = 256;

// FWD: Kout = K [n, m], KT = K^T [m, n], W2 [m, 2n] with W2[j, 2i] = K_ij, W2[j, 2i+1] = K_ij C_ij.
// BWD: Kout = M2 [2n, m] = [K∘C ; K], KT = K^T [m, n].
// Row strides: ldk (Kout), ldt (KT), ldw2 (W2): padded_ld of the column counts.
template <typename T, bool FWD>
__device__ __forceinline__ void prep_tile(const T* __restrict__ cost, int64_t n, int64_t m, T nreg, int64_t tile,
                                          int64_t tiles_m, T* __restrict__ Kout, T* __restrict__ KT,
                                          T* __restrict__ W2, int64_t ldk, int64_t ldt, int64_t ldw2) {
  __shared__ T sk[32][33];
  __shared__ T skc[32][33];
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;  // 32 x 8
  const int64_t i0 = (tile / tiles_m) * 32, j0 = (tile % tiles_m) * 32;
#pragma unroll
  for (int rr = 0; rr < 32; rr += 8) {
    const int64_t i = i0 + ty + rr, j = j0 + tx;
    if (i < n && j < m) {
      const T c = cost[i * m + j];
      const T k = dexp(c / nreg);  // exp(cost / (-reg)), as the CPU op's exp(cost.div(-reg))
      const T kc = k * c;
      if (FWD) {
        Kout[i * ldk + j] = k;
      } else {
        Kout[i * ldk + j] = kc;
        Kout[(n + i) * ldk + j] = k;
      }
      sk[ty + rr][tx] = k;
      skc[ty + rr][tx] = kc;
    }
  }
  __syncthreads();
#pragma unroll
  for (int rr = 0; rr < 32; rr += 8) {
    const int64_t j = j0 + ty + rr, i = i0 + tx;
    if (i < n && j < m) {
      const T k = sk[tx][ty + rr];
      KT[j * ldt + i] = k;
      if (FWD) {
        W2[j * ldw2 + 2 * i] = k;
        W2[j * ldw2 + 2 * i + 1] = skc[tx][ty + rr];
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kPrepThreads)
    prep_forward_kernel(const T* __restrict__ cost, int64_t n, int64_t m, T nreg, int64_t tiles_m, int64_t ntiles,
                        T* __restrict__ K, T* __restrict__ KT, T* __restrict__ W2, const T* __restrict__ a,
                        T* __restrict__ u, unsigned int* __restrict__ tickets, int64_t ntickets) {
  if (int64_t(blockIdx.x) < ntiles) {
    prep_tile<T, true>(cost, n, m, nreg, blockIdx.x, tiles_m, K, KT, W2, padded_ld(m), padded_ld(n),
                       padded_ld(2 * n));
    return;
  }
  // u0 = 1/|supp a| on supp a, 0 elsewhere.
  const int64_t row = int64_t(blockIdx.x) - ntiles;
  const T* ar = a + row * n;
  T* ur = u + row * n;
  __shared__ int scnt[kPrepThreads / 32];
  int c = 0;
  for (int64_t i = threadIdx.x; i < n; i += kPrepThreads) c += ar[i] > T(0);
  c = warp_sum(c);
  if ((threadIdx.x & 31) == 0) scnt[threadIdx.x >> 5] = c;
  __syncthreads();
  int cnt = 0;
#pragma unroll
  for (int w = 0; w < kPrepThreads / 32; ++w) cnt += scnt[w];
  const T u0 = T(1) / T(cnt);
  for (int64_t i = threadIdx.x; i < n; i += kPrepThreads) ur[i] = ar[i] > T(0) ? u0 : T(0);
  if (threadIdx.x == 0 && row < ntickets) tickets[row] = 0u;
}

// Backward prologue per row: u_T = a / r_T; w_T = g y / r_T; grad_a = w_T; A1 [B, 2n] = [g u_T | -w_T u_T].
template <typename T>
__global__ void __launch_bounds__(kPrepThreads)
    prep_backward_kernel(const T* __restrict__ cost, int64_t n, int64_t m, T nreg, int64_t tiles_m, int64_t ntiles,
                         T* __restrict__ M2, T* __restrict__ KT, const T* __restrict__ a, const T* __restrict__ g,
                         const T* __restrict__ r_last, const T* __restrict__ y, T* __restrict__ ga,
                         T* __restrict__ A1) {
  if (int64_t(blockIdx.x) < ntiles) {
    prep_tile<T, false>(cost, n, m, nreg, blockIdx.x, tiles_m, M2, KT, nullptr, padded_ld(m), padded_ld(n), 0);
    return;
  }
  const int64_t row = int64_t(blockIdx.x) - ntiles;
  const T gv = g[row];
  for (int64_t i = threadIdx.x; i < n; i += kPrepThreads) {
    const int64_t idx = row * n + i;
    const T r = r_last[idx];
    const T ut = a[idx] / r;
    const T w = gv * y[idx] / r;
    ga[idx] = w;
    A1[row * 2 * n + i] = gv * ut;
    A1[row * 2 * n + n + i] = -(w * ut);
  }
}

// ------------------------------------------------------------------------------------------ shared-cost hosts
template <typename T>
void forward_shared(const at::Tensor& a, const at::Tensor& b, const at::Tensor& cost, double reg, int64_t T_iters,
                    double eps, bool keep, at::Tensor& value, at::Tensor& u, at::Tensor& v, at::Tensor& hist_r,
                    at::Tensor& hist_s, at::Tensor& y, int tile) {
  const int64_t B = a.size(0), n = a.size(1), m = b.size(1);
  const cudaStream_t stream = current_stream();
  const int sms = sm_count();
  const auto opts = a.options();
  const int64_t ldk = padded_ld(m), ldt = padded_ld(n), ldw2 = padded_ld(2 * n);
  const at::Tensor K = at::empty({n, ldk}, opts), KT = at::empty({m, ldt}, opts), W2 = at::empty({m, ldw2}, opts);
  const int64_t ntickets = ceil_div(B, 16);  // >= gridDim.y of every tile of the table (BM >= 16)
  const at::Tensor tickets = at::empty({ntickets}, opts.dtype(at::kInt));
  const at::Tensor part = at::empty({ceil_div(2 * n, 32) * B}, opts);  // >= gridDim.x * B (BN >= 32)
  const int64_t tiles_m = ceil_div(m, 32), ntiles = ceil_div(n, 32) * tiles_m;
  const T e = static_cast<T>(eps);

  const T* a_p = a.data_ptr<T>();
  const T* b_p = b.data_ptr<T>();
  T* u_p = u.data_ptr<T>();
  T* v_p = v.data_ptr<T>();
  T* K_p = K.data_ptr<T>();
  T* KT_p = KT.data_ptr<T>();
  T* W2_p = W2.data_ptr<T>();
  unsigned int* tk_p = reinterpret_cast<unsigned int*>(tickets.data_ptr<int>());
  T* hr = keep ? hist_r.data_ptr<T>() : nullptr;
  T* hs = keep ? hist_s.data_ptr<T>() : nullptr;
  T* yp = keep ? y.data_ptr<T>() : nullptr;

  auto* prep = &prep_forward_kernel<T>;
  WKD_LAUNCH(prep, static_cast<unsigned>(ntiles + B), kPrepThreads, stream, cost.data_ptr<T>(), n, m,
             static_cast<T>(-reg), tiles_m, ntiles, K_p, KT_p, W2_p, a_p, u_p, tk_p, ntickets);
  WKD_LAUNCH_CHECK();

  for (int64_t t = 0; t < T_iters; ++t) {
    // s_t = K^T u + eps, v = b / s_t
    launch_gemm<T>(u_p, n, K_p, ldk, true, B, n, m, EpiScale<T>{b_p, v_p, keep ? hs + t * B * m : nullptr, e}, sms,
                   tile, stream);
    if (t + 1 < T_iters) {
      // r_t = K v + eps, u = a / r_t
      launch_gemm<T>(v_p, m, KT_p, ldt, true, B, m, n, EpiScale<T>{a_p, u_p, keep ? hr + t * B * n : nullptr, e},
                     sms, tile, stream);
    } else {
      // r_T and y = (K∘C) v_T in one product; u, history, value
      EpiLast<T> epi{a_p, u_p, keep ? hr + t * B * n : nullptr, yp, e, n,
                     part.data_ptr<T>(), tk_p, value.data_ptr<T>()};
      launch_gemm<T>(v_p, m, W2_p, ldw2, true, B, m, 2 * n, epi, sms, tile, stream);
    }
  }
}

template <typename T>
void backward_shared(const at::Tensor& g, const at::Tensor& a, const at::Tensor& b, const at::Tensor& cost,
                     const at::Tensor& hist_r, const at::Tensor& hist_s, const at::Tensor& y, double reg,
                     at::Tensor& ga, at::Tensor& gb, int tile, std::optional<double> eps) {
  const int64_t B = a.size(0), n = a.size(1), m = b.size(1);
  const int64_t T_iters = hist_s.size(0), last = T_iters - 1;
  const cudaStream_t stream = current_stream();
  const int sms = sm_count();
  const auto opts = a.options();
  const int64_t ldk = padded_ld(m), ldt = padded_ld(n);
  const at::Tensor M2 = at::empty({2 * n, ldk}, opts), KT = at::empty({m, ldt}, opts);
  const at::Tensor A1 = at::empty({B, 2 * n}, opts), x = at::empty({B, n}, opts), zv = at::empty({B, m}, opts);
  const int64_t tiles_m = ceil_div(m, 32), ntiles = ceil_div(n, 32) * tiles_m;

  const T* a_p = a.data_ptr<T>();
  const T* b_p = b.data_ptr<T>();
  const T* hr = hist_r.data_ptr<T>();
  const T* hs = hist_s.data_ptr<T>();
  T* ga_p = ga.data_ptr<T>();
  T* gb_p = gb.data_ptr<T>();
  T* M2_p = M2.data_ptr<T>();
  T* KT_p = KT.data_ptr<T>();
  T* A1_p = A1.data_ptr<T>();
  T* x_p = x.data_ptr<T>();
  T* zv_p = zv.data_ptr<T>();
  const T* K_p = M2_p + n * ldk;  // the lower half of M2 is K

  auto* prep = &prep_backward_kernel<T>;
  WKD_LAUNCH(prep, static_cast<unsigned>(ntiles + B), kPrepThreads, stream, cost.data_ptr<T>(), n, m,
             static_cast<T>(-reg), tiles_m, ntiles, M2_p, KT_p, a_p, g.data_ptr<T>(), hr + last * B * n,
             y.data_ptr<T>(), ga_p, A1_p);
  WKD_LAUNCH_CHECK();

  // gauge correction after each z step (eps given): x = w_t u_t (A1's second half holds -w_T u_T)
  const bool correct = eps.has_value();
  const at::Tensor state = correct ? at::empty({2, B}, opts) : at::Tensor();
  auto gauge = [&](int64_t t, const T* xt, int64_t ldx, T sign) {
    if (!correct) return;
    auto* gk = &gauge_kernel<T>;
    WKD_LAUNCH(gk, static_cast<unsigned>(ceil_div(B, 8)), 256, stream, xt, ldx, sign, a_p, hr + t * B * n, zv_p, b_p,
               hs + t * B * m, gb_p, state.data_ptr<T>(), B, n, m, static_cast<T>(*eps), *eps > 0, t == last);
    WKD_LAUNCH_CHECK();
  };
  // t = T: z_T = (g (K∘C)^T u_T - K^T (w_T u_T)) / s_T
  launch_gemm<T>(A1_p, 2 * n, M2_p, ldk, true, B, 2 * n, m,
                 EpiZ<T>{hs + last * B * m, b_p, gb_p, last > 0 || correct ? zv_p : nullptr, true}, sms, tile,
                 stream);
  gauge(last, A1_p + n, 2 * n, T(-1));
  for (int64_t t = last; t >= 1; --t) {
    // w_{t-1} = -K (z_t v_t) / r_{t-1}; grad_a += w; x = w u_{t-1}
    launch_gemm<T>(zv_p, m, KT_p, ldt, true, B, m, n, EpiW<T>{hr + (t - 1) * B * n, a_p, ga_p, x_p}, sms, tile,
                   stream);
    // z_{t-1} = -K^T x / s_{t-1}; grad_b += z; zv = z v_{t-1}
    launch_gemm<T>(x_p, n, K_p, ldk, true, B, n, m,
                   EpiZ<T>{hs + (t - 1) * B * m, b_p, gb_p, t - 1 > 0 || correct ? zv_p : nullptr, false}, sms, tile,
                   stream);
    gauge(t - 1, x_p, n, T(1));
  }
}

// ======================================================================================================
// Per-row kernels (cost [B, n, m], or the log domain with either layout): one block per row.
// Column passes: one thread per column j, loop over i (coalesced cost reads); row passes: one warp per row i.
// ======================================================================================================
constexpr int kRowThreads = 256;
constexpr int kRowWarps = kRowThreads / 32;

// L = cost / (-reg) for a shared cost in the log domain (the CPU op's cost.div(-reg)), read by every row.
template <typename T>
__global__ void __launch_bounds__(256) neg_cost_over_reg_kernel(const T* __restrict__ cost, int64_t numel, T nreg,
                                                                T* __restrict__ L) {
  for (int64_t k = int64_t(blockIdx.x) * 256 + threadIdx.x; k < numel; k += int64_t(gridDim.x) * 256)
    L[k] = cost[k] / nreg;
}

// The shared log-domain L (or an undefined tensor when the kernels compute -C/reg themselves).
template <typename T>
at::Tensor shared_log_kernel(const at::Tensor& cost, bool shared, bool log_domain, double reg, cudaStream_t stream) {
  if (!(shared && log_domain)) return at::Tensor();
  at::Tensor L = at::empty_like(cost, at::MemoryFormat::Contiguous);
  const int64_t numel = cost.numel();
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(numel, 256), 4096));
  auto* kern = &neg_cost_over_reg_kernel<T>;
  WKD_LAUNCH(kern, blocks, 256, stream, cost.data_ptr<T>(), numel, static_cast<T>(-reg), L.data_ptr<T>());
  WKD_LAUNCH_CHECK();
  return L;
}

template <typename T, bool LOG>
__global__ void __launch_bounds__(kRowThreads)
    rows_forward_kernel(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ cost,
                        int64_t cost_bstride, const T* __restrict__ Lmat, int64_t B, int64_t n, int64_t m,
                        int T_iters, T nreg, T eps, T log_eps, bool has_eps, T* __restrict__ value, T* u, T* v,
                        T* __restrict__ hr, T* __restrict__ hs, T* __restrict__ yout) {
  const int64_t bi = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const T* C = cost + bi * cost_bstride;
  // L_ij = -C_ij / reg: precomputed once (shared cost, log domain: the same division as the CPU op) or computed.
  auto Lv = [&](int64_t k) { return Lmat ? Lmat[k] : C[k] / nreg; };
  const T* ar = a + bi * n;
  const T* br = b + bi * m;
  T* ur = u + bi * n;  // read and written by different threads of this block: plain accesses
  T* vr = v + bi * m;
  const int64_t Bn = B * n, Bm = B * m;
  const T NINF = ninf<T>();
  __shared__ int scnt[kRowWarps];
  __shared__ T sred[kRowWarps];

  int c = 0;
  for (int64_t i = tid; i < n; i += kRowThreads) c += ar[i] > T(0);
  c = warp_sum(c);
  if (lane == 0) scnt[warp] = c;
  __syncthreads();
  int cnt = 0;
#pragma unroll
  for (int w = 0; w < kRowWarps; ++w) cnt += scnt[w];
  const T u0 = LOG ? -dlog(T(cnt)) : T(1) / T(cnt);
  for (int64_t i = tid; i < n; i += kRowThreads) ur[i] = ar[i] > T(0) ? u0 : (LOG ? NINF : T(0));
  __syncthreads();

  for (int t = 0; t < T_iters; ++t) {
    // s = K^T u + eps (log: log-sum-exp), v = b / s
    for (int64_t j = tid; j < m; j += kRowThreads) {
      T s;
      if (!LOG) {
        T acc = T(0);
        for (int64_t i = 0; i < n; ++i) {
          const T ui = ur[i];
          if (ui == T(0)) continue;
          acc += ui * dexp(C[i * m + j] / nreg);
        }
        s = acc + eps;
        vr[j] = br[j] / s;
      } else {
        T mx = NINF;
        for (int64_t i = 0; i < n; ++i) {
          const T ui = ur[i];
          if (ui == NINF) continue;
          mx = smax(mx, ui + Lv(i * m + j));
        }
        T sm = T(0);
        for (int64_t i = 0; i < n; ++i) {
          const T ui = ur[i];
          if (ui == NINF) continue;
          sm += dexp(ui + Lv(i * m + j) - mx);
        }
        s = log_add_eps(mx + safe_log(sm), log_eps, has_eps);
        vr[j] = safe_log(br[j]) - s;
      }
      if (hs) hs[t * Bm + bi * m + j] = s;
    }
    __syncthreads();
    // r = K v + eps (log: log-sum-exp), u = a / r
    for (int64_t i = warp; i < n; i += kRowWarps) {
      const T* Ci = C + i * m;
      T r;
      if (!LOG) {
        T acc = T(0);
        for (int64_t j = lane; j < m; j += 32) acc += dexp(Ci[j] / nreg) * vr[j];
        r = warp_sum(acc) + eps;
      } else {
        T mi = NINF;
        for (int64_t j = lane; j < m; j += 32) mi = smax(mi, Lv(i * m + j) + vr[j]);
        mi = warp_max(mi);
        T acc = T(0);
        if (mi != NINF) {
          for (int64_t j = lane; j < m; j += 32) {
            const T vj = vr[j];
            if (vj == NINF) continue;
            acc += dexp(Lv(i * m + j) + vj - mi);
          }
        }
        acc = warp_sum(acc);
        r = log_add_eps(mi + safe_log(acc), log_eps, has_eps);
      }
      if (lane == 0) {
        ur[i] = LOG ? safe_log(ar[i]) - r : ar[i] / r;
        if (hr) hr[t * Bn + bi * n + i] = r;
      }
    }
    __syncthreads();
  }

  // y = (K∘C) v_T (log: log y), value = sum_i u_i y_i
  T part = T(0);
  for (int64_t i = warp; i < n; i += kRowWarps) {
    const T* Ci = C + i * m;
    if (!LOG) {
      T acc = T(0);
      for (int64_t j = lane; j < m; j += 32) {
        const T cij = Ci[j];
        acc += (dexp(cij / nreg) * cij) * vr[j];
      }
      const T y = warp_sum(acc);
      if (lane == 0) {
        if (yout) yout[bi * n + i] = y;
        part += ur[i] * y;
      }
    } else {
      T mi = NINF;
      for (int64_t j = lane; j < m; j += 32) mi = smax(mi, Lv(i * m + j) + vr[j]);
      mi = warp_max(mi);
      T acc = T(0);
      if (mi != NINF) {
        for (int64_t j = lane; j < m; j += 32) {
          const T vj = vr[j];
          if (vj == NINF) continue;
          acc += Ci[j] * dexp(Lv(i * m + j) + vj - mi);
        }
      }
      acc = warp_sum(acc);
      if (lane == 0) {
        if (yout) yout[bi * n + i] = mi + safe_log(acc);
        const T ui = ur[i];
        if (ui != NINF && acc != T(0)) part += dexp(ui + mi) * acc;
      }
    }
  }
  if (lane == 0) sred[warp] = part;
  __syncthreads();
  if (tid == 0) {
    T s = T(0);
#pragma unroll
    for (int w = 0; w < kRowWarps; ++w) s += sred[w];
    value[bi] = s;
  }
}

// Exact backward per row (backward_row of the CPU op). Scratch: sn [B, 2n], sm_ [B, 2m].
//   scaling: sn = (u_T, x), sm_ = (zv, unused);   log: sn = (log u_t, w), sm_ = (log v_t, z).
template <typename T, bool LOG>
__global__ void __launch_bounds__(kRowThreads)
    rows_backward_kernel(const T* __restrict__ g, const T* __restrict__ a, const T* __restrict__ b,
                         const T* __restrict__ cost, int64_t cost_bstride, const T* __restrict__ Lmat, int64_t B,
                         int64_t n, int64_t m,
                         int T_iters, T nreg, const T* __restrict__ hr, const T* __restrict__ hs,
                         const T* __restrict__ yin, T* ga, T* gb, T* scr_n, T* scr_m, bool gauge, T eps, T log_eps,
                         bool has_eps) {
  const int64_t bi = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const T* C = cost + bi * cost_bstride;
  auto Lv = [&](int64_t k) { return Lmat ? Lmat[k] : C[k] / nreg; };
  const T* ar = a + bi * n;
  const T* br = b + bi * m;
  T* gar = ga + bi * n;
  T* gbr = gb + bi * m;
  T* s1 = scr_n + bi * 2 * n;
  T* s2 = s1 + n;
  T* q1 = scr_m + bi * 2 * m;
  T* q2 = q1 + m;
  const int64_t Bn = B * n, Bm = B * m;
  const int last = T_iters - 1;
  const T gv = g[bi];
  const T NINF = ninf<T>();
  auto R = [&](int64_t t) { return hr + t * Bn + bi * n; };
  auto S = [&](int64_t t) { return hs + t * Bm + bi * m; };
  T G = T(0), zs = T(0);  // gauge correction state (gauge_row)

  if (!LOG) {
    const T* rL = R(last);
    const T* y = yin + bi * n;
    for (int64_t i = tid; i < n; i += kRowThreads) {
      const T ut = ar[i] / rL[i];
      const T w = gv * y[i] / rL[i];
      gar[i] = w;
      s1[i] = ut;
      s2[i] = w * ut;
    }
    __syncthreads();
    for (int t = last; t >= 0; --t) {
      const T* s = S(t);
      for (int64_t j = tid; j < m; j += kRowThreads) {
        T tm = T(0), d = T(0);
        if (t == last) {
          for (int64_t i = 0; i < n; ++i) {
            const T ui = s1[i], xi = s2[i];
            const T cij = C[i * m + j];
            const T k = dexp(cij / nreg);
            if (ui != T(0)) d += ui * (k * cij);
            if (xi != T(0)) tm += xi * k;
          }
        } else {
          for (int64_t i = 0; i < n; ++i) {
            const T xi = s2[i];
            if (xi == T(0)) continue;
            tm += xi * dexp(C[i * m + j] / nreg);
          }
        }
        const T sj = s[j];
        const T z = ((t == last ? gv * d : T(0)) - tm) / sj;
        gbr[j] = t == last ? z : gbr[j] + z;
        q1[j] = z * (br[j] / sj);
      }
      __syncthreads();
      if (gauge) {  // warp 0 (G, zs live there)
        if (warp == 0)
          gauge_row<T, false>(s2, T(1), ar, R(t), q1, br, s, gbr, n, m, eps, log_eps, has_eps, t == last, G, zs);
        __syncthreads();
      }
      if (t == 0) break;
      const T* rp = R(t - 1);
      for (int64_t i = warp; i < n; i += kRowWarps) {
        const T* Ci = C + i * m;
        T acc = T(0);
        for (int64_t j = lane; j < m; j += 32) acc += dexp(Ci[j] / nreg) * q1[j];
        acc = warp_sum(acc);
        if (lane == 0) {
          const T w = -acc / rp[i];
          gar[i] += w;
          s2[i] = w * (ar[i] / rp[i]);
        }
      }
      __syncthreads();
    }
  } else {
    const T* rL = R(last);
    const T* ly = yin + bi * n;
    const T* sL = S(last);
    for (int64_t i = tid; i < n; i += kRowThreads) {
      s1[i] = safe_log(ar[i]) - rL[i];
      s2[i] = ly[i] == NINF ? T(0) : gv * dexp(ly[i] - rL[i]);
      gar[i] = T(0);
    }
    for (int64_t j = tid; j < m; j += kRowThreads) q1[j] = safe_log(br[j]) - sL[j];
    __syncthreads();
    for (int t = last; t >= 0; --t) {
      if (t != last) {
        const T* rt = R(t);
        const T* st = S(t);
        for (int64_t i = tid; i < n; i += kRowThreads) s1[i] = safe_log(ar[i]) - rt[i];
        for (int64_t j = tid; j < m; j += kRowThreads) q1[j] = safe_log(br[j]) - st[j];
      }
      for (int64_t i = tid; i < n; i += kRowThreads) gar[i] += s2[i];
      __syncthreads();
      const T* s = S(t);
      for (int64_t j = tid; j < m; j += kRowThreads) {
        T mx = NINF;
        for (int64_t i = 0; i < n; ++i) {
          const T ui = s1[i];
          if (ui == NINF) continue;
          mx = smax(mx, ui + Lv(i * m + j));
        }
        T sw = T(0), sc = T(0);
        for (int64_t i = 0; i < n; ++i) {
          const T ui = s1[i];
          if (ui == NINF) continue;
          const T ex = dexp(ui + Lv(i * m + j) - mx);
          const T wi = s2[i];
          if (wi != T(0)) sw += wi * ex;
          if (t == last) sc += C[i * m + j] * ex;
        }
        const T prod = sw == T(0) ? T(0) : dexp(mx - s[j]) * sw;
        const T direct = (t == last && sc != T(0)) ? gv * dexp(mx - s[j]) * sc : T(0);
        const T z = direct - prod;
        gbr[j] = t == last ? z : gbr[j] + z;
        q2[j] = z;
      }
      __syncthreads();
      if (gauge) {  // warp 0 (G, zs live there)
        if (warp == 0)
          gauge_row<T, true>(s2, T(1), ar, R(t), q2, br, s, gbr, n, m, eps, log_eps, has_eps, t == last, G, zs);
        __syncthreads();
      }
      if (t == 0) break;
      const T* rp = R(t - 1);
      for (int64_t i = warp; i < n; i += kRowWarps) {
        T mi = NINF;
        for (int64_t j = lane; j < m; j += 32) mi = smax(mi, Lv(i * m + j) + q1[j]);
        mi = warp_max(mi);
        T acc = T(0);
        if (mi != NINF) {
          for (int64_t j = lane; j < m; j += 32) {
            const T vj = q1[j], zj = q2[j];
            if (vj == NINF || zj == T(0)) continue;
            acc += zj * dexp(Lv(i * m + j) + vj - mi);
          }
        }
        acc = warp_sum(acc);
        if (lane == 0) s2[i] = acc == T(0) ? T(0) : -dexp(mi - rp[i]) * acc;
      }
      __syncthreads();
    }
  }
}

// ======================================================================================================
// Single-launch kernels for small C (docs/design.md section 3): shared cost [n, m] with n, m <= kSmallMaxC (256), both
// domains, float32 and float64. The forward (all T iterations, y and the value) is ONE launch, the exact backward's
// whole reverse sweep ONE launch (plus one build launch each when the kernel matrix does not fit in shared memory).
//   * Each CTA owns R consecutive batch rows (R <= kSmallMaxRows, chosen by the host so that the grid fills about
//     two waves, or asked for per call by the tuning ops' rows_per_block; small_plan lowers either to fit shared
//     memory; R changes no result bit: every output is one thread's loop whatever R) and keeps their state in
//     dynamic shared memory: u, v (forward; logs in the log domain), the backward's w/x, z/zv and the grad_a /
//     grad_b accumulators. Nothing is exchanged between CTAs (no atomics, no
//     global scratch); nothing synchronises with the host: graph-capturable.
//   * The kernel matrix M (K = exp(-C/reg) in the scaling domain, L = -C/reg in the log domain) is held in shared
//     memory when M and the state of at least one row fit in the opt-in limit (sm_90, 227 KiB: float32 up to
//     C = 237, float64 up to C = 167; fewer rows per CTA when needed): each CTA forms it from cost with the same expression as the prep kernels (exp(c / -reg), c / -reg),
//     row stride ldk = m rounded up to odd, so that both passes are bank-conflict free (the column pass reads
//     M[i][j] with lanes over j, the row pass with lanes over i). Otherwise small_build_kernel writes M [n, m] and
//     M^T [m, n] to global memory once and the passes read them with coalesced lanes (L2-resident: <= 512 KiB).
//     K∘C (y, the backward's direct term) is formed on the fly as K_ij * C_ij, the prep kernels' rounding.
//   * Each output (a batch row r and a column j, or a row i) is a sequential loop over the reduction index in
//     increasing order. Scaling domain: acc = fma(x_k, M_k, acc), the operations of gemm_epi_kernel's k-loop in
//     its order, so u, v, the history, y and the gradients are bitwise those of the per-half-iteration kernels
//     (the backward's first product too: the g u_T (K∘C) terms, then the -w_T u_T K terms, the 2n-long k-loop
//     over [K∘C ; K]); a thread computes kSmallRB (4) batch rows of one column at a time (rows_dot: one M read
//     serves the 4 rows, the rows' state is read 16 bytes at a time: 8 shared reads per 16 FMAs in float32 instead
//     of 32). The value sum_i u_i y_i is one thread's sequential sum per row (the GEMM path reduces it by shuffles
//     and block partials: equal to rounding). Log domain: the max / sum loops of rows_forward_kernel /
//     rows_backward_kernel, one thread per output (their row passes sum warp-strided: equal to rounding).
//   * State arrays have row strides rounded up to 4 elements (16-byte aligned rows).
//   Barriers: 2 per iteration (+3) forward, 2 per iteration (+2) backward.
// ======================================================================================================
constexpr int kSmallMaxC = 256;
constexpr int kSmallMaxRows = 16;
constexpr int kSmallMaxThreads = 256;

template <typename T>
__device__ __forceinline__ T* dyn_smem() {
#ifdef WKD_CUDA_EMULATE
  return static_cast<T*>(::wkd_emu::dyn_smem());
#else
  extern __shared__ __align__(16) unsigned char wkd_dyn_smem_raw[];
  return reinterpret_cast<T*>(wkd_dyn_smem_raw);
#endif
}

template <typename T>
struct SmallArgs {
  const T* a;
  const T* b;
  const T* cost;
  const T* M;   // global M [n, m] and M^T [m, n] (small_build_kernel), or null: M in shared memory
  const T* MT;
  int64_t B, n, m, ldk;  // ldk: row stride of M in shared memory
  int R;                 // batch rows per CTA
  int T_iters;
  T nreg, eps, log_eps;
  bool has_eps;
  bool gauge;  // backward: the gauge correction (eps given)
  // forward outputs (hr, hs, y null without history)
  T* value;
  T* u;
  T* v;
  T* hr;
  T* hs;
  T* y;
  // backward inputs / outputs
  const T* g;
  const T* hr_in;
  const T* hs_in;
  const T* y_in;
  T* ga;
  T* gb;
};

// M for this CTA: in shared memory (formed from cost) or the global pair. col(i, j): the column pass's read
// (lanes over j); row(i, j): the row pass's read (lanes over i).
template <typename T>
struct SmallM {
  const T* c;
  int64_t cld;
  const T* r;
  int64_t ri, rj;
  __device__ __forceinline__ T col(int64_t i, int64_t j) const { return c[i * cld + j]; }
  __device__ __forceinline__ T row(int64_t i, int64_t j) const { return r[i * ri + j * rj]; }
};

template <typename T, bool LOG>
__device__ __forceinline__ SmallM<T> small_matrix(const SmallArgs<T>& p, T* Ms) {
  const int64_t n = p.n, m = p.m;
  if (p.M) return SmallM<T>{p.M, m, p.MT, 1, n};
  for (int64_t k = threadIdx.x; k < n * m; k += blockDim.x) {
    const T c = p.cost[k];
    Ms[(k / m) * p.ldk + k % m] = LOG ? c / p.nreg : dexp(c / p.nreg);
  }
  return SmallM<T>{Ms, p.ldk, Ms, p.ldk, 1};
}

// RB rows of x (each a row of the CTA's state in shared memory, 16-byte aligned, stride a multiple of 4) times one
// column of a matrix read by get(k): acc[q] = fma(x[q][k], get(k), acc[q]) for k = 0..K-1 in increasing order
// (gemm_epi_kernel's k-loop). x is read four k at a time (one 16-byte read per row, float32; two, float64) and each
// get(k) serves the RB rows: (RB + 4) shared reads per 4 RB FMAs, instead of 2 per FMA.
// rows_dot_acc continues into acc; rows_dot starts from 0.
template <typename T, int RB, class Get>
__device__ __forceinline__ void rows_dot_acc(const T* const (&x)[RB], int64_t K, const Get& get, T (&acc)[RB]) {
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    T xv[RB][4];
#pragma unroll
    for (int q = 0; q < RB; ++q) lds4(x[q] + k, xv[q]);
    T mk[4];
#pragma unroll
    for (int d = 0; d < 4; ++d) mk[d] = get(k + d);
#pragma unroll
    for (int d = 0; d < 4; ++d)
#pragma unroll
      for (int q = 0; q < RB; ++q) acc[q] = fma(xv[q][d], mk[d], acc[q]);
  }
  for (; k < K; ++k) {
    const T mk = get(k);
#pragma unroll
    for (int q = 0; q < RB; ++q) acc[q] = fma(x[q][k], mk, acc[q]);
  }
}

template <typename T, int RB, class Get>
__device__ __forceinline__ void rows_dot(const T* const (&x)[RB], int64_t K, const Get& get, T (&acc)[RB]) {
#pragma unroll
  for (int q = 0; q < RB; ++q) acc[q] = T(0);
  rows_dot_acc<T, RB>(x, K, get, acc);
}

// Rows per thread in the scaling-domain passes (register blocking over the CTA's batch rows).
constexpr int kSmallRB = 4;

// Work items of a scaling pass: (group of kSmallRB rows g, output column c), c fastest (lanes over c). For each
// item, body(c, rows of the group (pointers into the state array x with row stride ldx), nvalid).
template <typename T, class Body>
__device__ __forceinline__ void for_row_groups(int64_t rows, int64_t N, const T* x, int64_t ldx, const Body& body) {
  const int64_t groups = (rows + kSmallRB - 1) / kSmallRB;
  for (int64_t it = threadIdx.x; it < groups * N; it += blockDim.x) {
    const int64_t g = it / N, c = it - g * N;
    const int64_t r0 = g * kSmallRB;
    const T* xr[kSmallRB];
#pragma unroll
    for (int q = 0; q < kSmallRB; ++q) xr[q] = x + (r0 + q < rows ? r0 + q : rows - 1) * ldx;  // (clamped: unused)
    body(c, r0, xr);
  }
}

__host__ __device__ __forceinline__ int64_t round4(int64_t x) { return (x + 3) / 4 * 4; }

template <typename T, bool LOG>
__global__ void __launch_bounds__(kSmallMaxThreads) small_forward_kernel(const SmallArgs<T> p) {
  constexpr int RB = kSmallRB;
  const int64_t n = p.n, m = p.m, B = p.B, ldn = round4(n), ldm = round4(m);
  const int nt = blockDim.x, tid = threadIdx.x;
  const int64_t row0 = int64_t(blockIdx.x) * p.R;
  const int64_t rows = B - row0 < p.R ? B - row0 : int64_t(p.R);
  const T NINF = ninf<T>();
  T* sm = dyn_smem<T>();
  T* us = sm + (p.M ? 0 : round4(n * p.ldk));  // [R, ldn]: u (log u)
  T* vs = us + p.R * ldn;                        // [R, ldm]: v (log v)
  T* ys = vs + p.R * ldm;                        // [R, ldn]: y (log domain: the row maxima of the final pass)
  T* zs = ys + p.R * ldn;                        // [R, ldn]: log domain: the final pass's sums
  const SmallM<T> M = small_matrix<T, LOG>(p, sm);
  const T* a = p.a + row0 * n;  // global [rows, n] / [rows, m] blocks: index o = r * n + i (r * m + j)
  const T* b = p.b + row0 * m;
  const int64_t Bn = B * n, Bm = B * m;
  T* hr = p.hr ? p.hr + row0 * n : nullptr;
  T* hs = p.hs ? p.hs + row0 * m : nullptr;
  auto sn = [&](int64_t o) { return (o / n) * ldn + o % n; };  // global index -> state index
  auto sm_ = [&](int64_t o) { return (o / m) * ldm + o % m; };

  // u_0 = 1/|supp a| on supp a (each thread counts its row's support: n <= 256)
  for (int64_t o = tid; o < rows * n; o += nt) {
    const T* ar = a + (o / n) * n;
    int cnt = 0;
    for (int64_t k = 0; k < n; ++k) cnt += ar[k] > T(0);
    const T u0 = LOG ? -dlog(T(cnt)) : T(1) / T(cnt);
    us[sn(o)] = a[o] > T(0) ? u0 : (LOG ? NINF : T(0));
  }
  __syncthreads();

  for (int t = 0; t < p.T_iters; ++t) {
    // column pass: s_t = K^T u_{t-1} + eps (log: log-sum-exp), v_t = b / s_t
    if (!LOG) {
      for_row_groups<T>(rows, m, us, ldn, [&](int64_t j, int64_t r0, const T* const(&xr)[RB]) {
        T acc[RB];
        rows_dot<T, RB>(xr, n, [&](int64_t i) { return M.col(i, j); }, acc);
#pragma unroll
        for (int q = 0; q < RB; ++q) {
          if (r0 + q >= rows) break;
          const int64_t o = (r0 + q) * m + j;
          const T s = acc[q] + p.eps;
          vs[(r0 + q) * ldm + j] = b[o] / s;
          if (hs) hs[t * Bm + o] = s;
        }
      });
    } else {
      for (int64_t o = tid; o < rows * m; o += nt) {
        const int64_t j = o % m;
        const T* ur = us + (o / m) * ldn;
        T mx = NINF;
        for (int64_t i = 0; i < n; ++i) {
          const T ui = ur[i];
          if (ui == NINF) continue;
          mx = smax(mx, ui + M.col(i, j));
        }
        T sum = T(0);
        for (int64_t i = 0; i < n; ++i) {
          const T ui = ur[i];
          if (ui == NINF) continue;
          sum += dexp(ui + M.col(i, j) - mx);
        }
        const T s = log_add_eps(mx + safe_log(sum), p.log_eps, p.has_eps);
        vs[sm_(o)] = safe_log(b[o]) - s;
        if (hs) hs[t * Bm + o] = s;
      }
    }
    __syncthreads();
    // row pass: r_t = K v_t + eps (log: log-sum-exp), u_t = a / r_t
    if (!LOG) {
      for_row_groups<T>(rows, n, vs, ldm, [&](int64_t i, int64_t r0, const T* const(&xr)[RB]) {
        T acc[RB];
        rows_dot<T, RB>(xr, m, [&](int64_t j) { return M.row(i, j); }, acc);
#pragma unroll
        for (int q = 0; q < RB; ++q) {
          if (r0 + q >= rows) break;
          const int64_t o = (r0 + q) * n + i;
          const T r = acc[q] + p.eps;
          us[(r0 + q) * ldn + i] = a[o] / r;
          if (hr) hr[t * Bn + o] = r;
        }
      });
    } else {
      for (int64_t o = tid; o < rows * n; o += nt) {
        const int64_t i = o % n;
        const T* vr = vs + (o / n) * ldm;
        T mi = NINF;
        for (int64_t j = 0; j < m; ++j) mi = smax(mi, M.row(i, j) + vr[j]);
        T acc = T(0);
        if (mi != NINF) {
          for (int64_t j = 0; j < m; ++j) {
            const T vj = vr[j];
            if (vj == NINF) continue;
            acc += dexp(M.row(i, j) + vj - mi);
          }
        }
        const T r = log_add_eps(mi + safe_log(acc), p.log_eps, p.has_eps);
        us[sn(o)] = safe_log(a[o]) - r;
        if (hr) hr[t * Bn + o] = r;
      }
    }
    __syncthreads();
  }

  // y = (K∘C) v_T (log: log y)
  if (!LOG) {
    for_row_groups<T>(rows, n, vs, ldm, [&](int64_t i, int64_t r0, const T* const(&xr)[RB]) {
      const T* Ci = p.cost + i * m;
      T acc[RB];
      rows_dot<T, RB>(xr, m, [&](int64_t j) { return M.row(i, j) * Ci[j]; }, acc);
#pragma unroll
      for (int q = 0; q < RB; ++q) {
        if (r0 + q >= rows) break;
        ys[(r0 + q) * ldn + i] = acc[q];
        if (p.y) p.y[(row0 + r0 + q) * n + i] = acc[q];
      }
    });
  } else {
    for (int64_t o = tid; o < rows * n; o += nt) {
      const int64_t i = o % n;
      const T* vr = vs + (o / n) * ldm;
      const T* Ci = p.cost + i * m;
      T mi = NINF;
      for (int64_t j = 0; j < m; ++j) mi = smax(mi, M.row(i, j) + vr[j]);
      T acc = T(0);
      if (mi != NINF) {
        for (int64_t j = 0; j < m; ++j) {
          const T vj = vr[j];
          if (vj == NINF) continue;
          acc += Ci[j] * dexp(M.row(i, j) + vj - mi);
        }
      }
      ys[sn(o)] = mi;
      zs[sn(o)] = acc;
      if (p.y) p.y[row0 * n + o] = mi + safe_log(acc);
    }
  }
  __syncthreads();
  for (int64_t o = tid; o < rows * n; o += nt) p.u[row0 * n + o] = us[sn(o)];
  for (int64_t o = tid; o < rows * m; o += nt) p.v[row0 * m + o] = vs[sm_(o)];
  // value = sum_i u_i y_i, one thread per row, in index order
  for (int64_t r = tid; r < rows; r += nt) {
    T s = T(0);
    for (int64_t i = r * ldn; i < r * ldn + n; ++i) {
      if (!LOG) {
        s += us[i] * ys[i];
      } else {
        const T ui = us[i];
        if (ui != NINF && zs[i] != T(0)) s += dexp(ui + ys[i]) * zs[i];
      }
    }
    p.value[row0 + r] = s;
  }
}

// Exact backward, the whole reverse sweep (backward_shared's recurrences in the scaling domain,
// rows_backward_kernel's in the log domain).
//   scaling: xa = g u_T, then x_t = w_t u_t; xb = -w_T u_T; zs = z_t v_t;
//   log:     xa = log u_t, xb = w_t; zs = z_t, qs = log v_t.
template <typename T, bool LOG>
__global__ void __launch_bounds__(kSmallMaxThreads) small_backward_kernel(const SmallArgs<T> p) {
  constexpr int RB = kSmallRB;
  const int64_t n = p.n, m = p.m, B = p.B, ldn = round4(n), ldm = round4(m);
  const int nt = blockDim.x, tid = threadIdx.x;
  const int64_t row0 = int64_t(blockIdx.x) * p.R;
  const int64_t rows = B - row0 < p.R ? B - row0 : int64_t(p.R);
  const T NINF = ninf<T>();
  T* sm = dyn_smem<T>();
  T* gas = sm + (p.M ? 0 : round4(n * p.ldk));  // [R, ldn]
  T Gs[kSmallMaxRows], Zs[kSmallMaxRows];         // gauge correction state per row (gauge_row)
  T* xa = gas + p.R * ldn;                        // [R, ldn]
  T* xb = xa + p.R * ldn;                         // [R, ldn]
  T* gbs = xb + p.R * ldn;                        // [R, ldm]
  T* zs = gbs + p.R * ldm;                        // [R, ldm]
  T* qs = zs + p.R * ldm;                         // [R, ldm]
  const SmallM<T> M = small_matrix<T, LOG>(p, sm);
  const T* a = p.a + row0 * n;
  const T* b = p.b + row0 * m;
  const T* g = p.g + row0;
  const int64_t Bn = B * n, Bm = B * m;
  const int last = p.T_iters - 1;
  auto R = [&](int64_t t) { return p.hr_in + t * Bn + row0 * n; };
  auto S = [&](int64_t t) { return p.hs_in + t * Bm + row0 * m; };
  const T* yv = p.y_in + row0 * n;
  auto sn = [&](int64_t o) { return (o / n) * ldn + o % n; };
  auto sm_ = [&](int64_t o) { return (o / m) * ldm + o % m; };
  // x: w_t u_t times x_sign (scaling) or w_t (log), rows at stride ldn
  // (row q on warp q % warps at every step, so that its Gs[q], Zs[q] stay in that warp)
  auto gauge = [&](int64_t t, const T* x, T x_sign) {
    if (!p.gauge) return;
    for (int64_t q = tid >> 5; q < rows; q += nt >> 5)
      gauge_row<T, LOG>(x + q * ldn, x_sign, a + q * n, R(t) + q * n, zs + q * ldm, b + q * m, S(t) + q * m,
                        gbs + q * ldm, n, m, p.eps, p.log_eps, p.has_eps, t == last, Gs[q], Zs[q]);
    __syncthreads();
  };

  if (!LOG) {
    // w_T = g y / r_T; grad_a = w_T; A1 = [g u_T | -w_T u_T]
    const T* rL = R(last);
    for (int64_t o = tid; o < rows * n; o += nt) {
      const T gv = g[o / n];
      const T r = rL[o];
      const T ut = a[o] / r;
      const T w = gv * yv[o] / r;
      const int64_t k = sn(o);
      gas[k] = w;
      xa[k] = gv * ut;
      xb[k] = -(w * ut);
    }
    __syncthreads();
    // z_T = (g (K∘C)^T u_T - K^T (w_T u_T)) / s_T; grad_b = z_T; zv = z_T v_T
    {
      const T* s = S(last);
      for_row_groups<T>(rows, m, xa, ldn, [&](int64_t j, int64_t r0, const T* const(&xr)[RB]) {
        const T* x2[RB];
#pragma unroll
        for (int q = 0; q < RB; ++q) x2[q] = xb + (xr[q] - xa);
        T acc[RB];
        rows_dot<T, RB>(xr, n, [&](int64_t i) { return M.col(i, j) * p.cost[i * m + j]; }, acc);
        rows_dot_acc<T, RB>(x2, n, [&](int64_t i) { return M.col(i, j); }, acc);
#pragma unroll
        for (int q = 0; q < RB; ++q) {
          if (r0 + q >= rows) break;
          const int64_t o = (r0 + q) * m + j, k = (r0 + q) * ldm + j;
          const T sv = s[o];
          const T z = acc[q] / sv;
          gbs[k] = z;
          zs[k] = z * (b[o] / sv);
        }
      });
    }
    __syncthreads();
    gauge(last, xb, T(-1));
    for (int t = last; t >= 1; --t) {
      // w_{t-1} = -K (z_t v_t) / r_{t-1}; grad_a += w; x = w u_{t-1}
      const T* rp = R(t - 1);
      for_row_groups<T>(rows, n, zs, ldm, [&](int64_t i, int64_t r0, const T* const(&xr)[RB]) {
        T acc[RB];
        rows_dot<T, RB>(xr, m, [&](int64_t j) { return M.row(i, j); }, acc);
#pragma unroll
        for (int q = 0; q < RB; ++q) {
          if (r0 + q >= rows) break;
          const int64_t o = (r0 + q) * n + i, k = (r0 + q) * ldn + i;
          const T rv = rp[o];
          const T w = -acc[q] / rv;
          gas[k] += w;
          xa[k] = w * (a[o] / rv);
        }
      });
      __syncthreads();
      // z_{t-1} = -K^T x / s_{t-1}; grad_b += z; zv = z v_{t-1}
      const T* sp = S(t - 1);
      for_row_groups<T>(rows, m, xa, ldn, [&](int64_t j, int64_t r0, const T* const(&xr)[RB]) {
        T acc[RB];
        rows_dot<T, RB>(xr, n, [&](int64_t i) { return M.col(i, j); }, acc);
#pragma unroll
        for (int q = 0; q < RB; ++q) {
          if (r0 + q >= rows) break;
          const int64_t o = (r0 + q) * m + j, k = (r0 + q) * ldm + j;
          const T sv = sp[o];
          const T z = -acc[q] / sv;
          gbs[k] += z;
          zs[k] = z * (b[o] / sv);
        }
      });
      __syncthreads();
      gauge(t - 1, xa, T(1));
    }
  } else {
    {
      const T* rL = R(last);
      const T* sL = S(last);
      for (int64_t o = tid; o < rows * n; o += nt) {
        const int64_t k = sn(o);
        xa[k] = safe_log(a[o]) - rL[o];
        xb[k] = yv[o] == NINF ? T(0) : g[o / n] * dexp(yv[o] - rL[o]);
        gas[k] = T(0);
      }
      for (int64_t o = tid; o < rows * m; o += nt) qs[sm_(o)] = safe_log(b[o]) - sL[o];
    }
    __syncthreads();
    for (int t = last; t >= 0; --t) {
      if (t != last) {
        const T* rt = R(t);
        const T* st = S(t);
        for (int64_t o = tid; o < rows * n; o += nt) xa[sn(o)] = safe_log(a[o]) - rt[o];
        for (int64_t o = tid; o < rows * m; o += nt) qs[sm_(o)] = safe_log(b[o]) - st[o];
      }
      for (int64_t o = tid; o < rows * n; o += nt) gas[sn(o)] += xb[sn(o)];
      __syncthreads();
      const T* s = S(t);
      for (int64_t o = tid; o < rows * m; o += nt) {
        const int64_t j = o % m;
        const T* lu = xa + (o / m) * ldn;
        const T* wr = xb + (o / m) * ldn;
        T mx = NINF;
        for (int64_t i = 0; i < n; ++i) {
          const T ui = lu[i];
          if (ui == NINF) continue;
          mx = smax(mx, ui + M.col(i, j));
        }
        T sw = T(0), sc = T(0);
        for (int64_t i = 0; i < n; ++i) {
          const T ui = lu[i];
          if (ui == NINF) continue;
          const T ex = dexp(ui + M.col(i, j) - mx);
          const T wi = wr[i];
          if (wi != T(0)) sw += wi * ex;
          if (t == last) sc += p.cost[i * m + j] * ex;
        }
        const T prod = sw == T(0) ? T(0) : dexp(mx - s[o]) * sw;
        const T direct = (t == last && sc != T(0)) ? g[o / m] * dexp(mx - s[o]) * sc : T(0);
        const T z = direct - prod;
        const int64_t k = sm_(o);
        gbs[k] = t == last ? z : gbs[k] + z;
        zs[k] = z;
      }
      __syncthreads();
      gauge(t, xb, T(1));
      if (t == 0) break;
      const T* rp = R(t - 1);
      for (int64_t o = tid; o < rows * n; o += nt) {
        const int64_t i = o % n;
        const T* lv = qs + (o / n) * ldm;
        const T* zr = zs + (o / n) * ldm;
        T mi = NINF;
        for (int64_t j = 0; j < m; ++j) mi = smax(mi, M.row(i, j) + lv[j]);
        T acc = T(0);
        if (mi != NINF) {
          for (int64_t j = 0; j < m; ++j) {
            const T vj = lv[j], zj = zr[j];
            if (vj == NINF || zj == T(0)) continue;
            acc += zj * dexp(M.row(i, j) + vj - mi);
          }
        }
        xb[sn(o)] = acc == T(0) ? T(0) : -dexp(mi - rp[o]) * acc;
      }
      __syncthreads();
    }
  }
  for (int64_t o = tid; o < rows * n; o += nt) p.ga[row0 * n + o] = gas[sn(o)];
  for (int64_t o = tid; o < rows * m; o += nt) p.gb[row0 * m + o] = gbs[sm_(o)];
}

// Global M [n, m] and M^T [m, n] (K, or L in the log domain) when M does not fit in shared memory: 32 x 32 tiles
// through shared memory, 256 threads.
template <typename T, bool LOG>
__global__ void __launch_bounds__(256)
    small_build_kernel(const T* __restrict__ cost, int64_t n, int64_t m, T nreg, T* __restrict__ M,
                       T* __restrict__ MT) {
  __shared__ T tile[32][33];
  const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
  const int64_t tiles_m = (m + 31) / 32;
  const int64_t i0 = (int64_t(blockIdx.x) / tiles_m) * 32, j0 = (int64_t(blockIdx.x) % tiles_m) * 32;
  for (int rr = 0; rr < 32; rr += 8) {
    const int64_t i = i0 + ty + rr, j = j0 + tx;
    if (i < n && j < m) {
      const T c = cost[i * m + j];
      const T k = LOG ? c / nreg : dexp(c / nreg);
      M[i * m + j] = k;
      tile[ty + rr][tx] = k;
    }
  }
  __syncthreads();
  for (int rr = 0; rr < 32; rr += 8) {
    const int64_t j = j0 + ty + rr, i = i0 + tx;
    if (i < n && j < m) MT[j * n + i] = tile[tx][ty + rr];
  }
}

// Opt-in shared memory per block of the current device (cached, like sm_count).
int smem_optin_bytes() {
#ifdef WKD_CUDA_EMULATE
  return emu_config().smem_limit;
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

// The size rule of the single-launch kernels (both directions).
bool use_small_kernels(bool shared_cost, int64_t n, int64_t m) {
#ifdef WKD_CUDA_EMULATE
  if (emu_config().small >= 0) return emu_config().small != 0 && shared_cost && n <= kSmallMaxC && m <= kSmallMaxC;
#endif
  return shared_cost && n <= kSmallMaxC && m <= kSmallMaxC;
}

// Launch plan: rows per CTA, threads, shared memory, where M lives.
struct SmallPlan {
  int R = 1;
  int threads = 32;
  int64_t ldk = 1;
  bool m_in_smem = false;
  size_t smem = 0;
};

// The rows per CTA the single-launch kernels aim for before the shared-memory limit is applied: rows_per_block in
// [1, kSmallMaxRows] (an explicit choice of the tuning ops), or kRowsAuto: clamp(B / (2 x SMs), 1, kSmallMaxRows),
// about two waves of CTAs.
constexpr int kRowsAuto = -1;
inline int small_rows_target(int64_t B, int rows_per_block) {
  if (rows_per_block != kRowsAuto) return rows_per_block;
  const int64_t sms = sm_count();
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(kSmallMaxRows, B / (2 * sms))));
}

// arrays_n / arrays_m: state arrays of n / m values per row; rb: rows per work item (kSmallRB in the scaling
// domain, 1 in the log domain); rows_per_block: small_rows_target's argument. The plan then lowers R while the
// state of R rows does not fit in the opt-in shared memory, and, when M goes on chip, while M and the state of R
// rows do not fit together: an explicit rows_per_block is an upper bound that the plan may lower (never raise),
// exactly as it lowers the automatic target (SmallPlan::R is what runs; wkd_tuning::small_plan reports it).
template <typename T>
SmallPlan small_plan(int64_t B, int64_t n, int64_t m, int arrays_n, int arrays_m, int rb, int rows_per_block) {
  SmallPlan pl;
  const size_t limit = static_cast<size_t>(smem_optin_bytes());
  pl.R = small_rows_target(B, rows_per_block);
  auto state_bytes = [&](int R) {
    return size_t(R) * size_t(arrays_n * round4(n) + arrays_m * round4(m)) * sizeof(T);
  };
  while (pl.R > 1 && state_bytes(pl.R) > limit) --pl.R;
  pl.ldk = m | 1;
  const size_t mbytes = size_t(round4(n * pl.ldk)) * sizeof(T);
  // M on chip if it fits next to the state of at least one row (fewer rows per CTA then, more CTAs).
  int r_on = pl.R;
  while (r_on > 1 && mbytes + state_bytes(r_on) > limit) --r_on;
  pl.m_in_smem = mbytes + state_bytes(r_on) <= limit;
  if (pl.m_in_smem) pl.R = r_on;
  pl.smem = state_bytes(pl.R) + (pl.m_in_smem ? mbytes : 0);
  const int64_t work = ceil_div(pl.R, rb) * std::max(n, m);
  pl.threads = static_cast<int>(std::min<int64_t>(kSmallMaxThreads, std::max<int64_t>(32, ceil_div(work, 32) * 32)));
  return pl;
}

// The plans of the two directions: per row, the forward keeps 3 state arrays of n values and 1 of m, the backward
// 3 of n and 3 of m (the kernels' shared-memory layout).
template <typename T>
SmallPlan small_forward_plan(int64_t B, int64_t n, int64_t m, bool log_domain, int rows_per_block) {
  return small_plan<T>(B, n, m, 3, 1, log_domain ? 1 : kSmallRB, rows_per_block);
}
template <typename T>
SmallPlan small_backward_plan(int64_t B, int64_t n, int64_t m, bool log_domain, int rows_per_block) {
  return small_plan<T>(B, n, m, 3, 3, log_domain ? 1 : kSmallRB, rows_per_block);
}

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

// Global M / M^T for a plan that keeps M off chip (one extra launch); returns the pair (undefined when in smem).
template <typename T>
std::pair<at::Tensor, at::Tensor> small_global_matrix(const SmallPlan& pl, const at::Tensor& cost, double reg,
                                                      bool log_domain, cudaStream_t stream) {
  if (pl.m_in_smem) return {};
  const int64_t n = cost.size(0), m = cost.size(1);
  at::Tensor M = at::empty({n, m}, cost.options()), MT = at::empty({m, n}, cost.options());
  const unsigned tiles = static_cast<unsigned>(ceil_div(n, 32) * ceil_div(m, 32));
  auto* kern = log_domain ? &small_build_kernel<T, true> : &small_build_kernel<T, false>;
  WKD_LAUNCH(kern, tiles, 256, stream, cost.data_ptr<T>(), n, m, static_cast<T>(-reg), M.data_ptr<T>(),
             MT.data_ptr<T>());
  WKD_LAUNCH_CHECK();
  return {M, MT};
}

template <typename T>
void forward_small(const at::Tensor& a, const at::Tensor& b, const at::Tensor& cost, double reg, int64_t T_iters,
                   double eps, bool log_domain, bool keep, at::Tensor& value, at::Tensor& u, at::Tensor& v,
                   at::Tensor& hist_r, at::Tensor& hist_s, at::Tensor& y, int rows_per_block) {
  const int64_t B = a.size(0), n = a.size(1), m = b.size(1);
  const cudaStream_t stream = current_stream();
  const SmallPlan pl = small_forward_plan<T>(B, n, m, log_domain, rows_per_block);
  const auto mats = small_global_matrix<T>(pl, cost, reg, log_domain, stream);
  SmallArgs<T> p{};
  p.a = a.data_ptr<T>();
  p.b = b.data_ptr<T>();
  p.cost = cost.data_ptr<T>();
  p.M = pl.m_in_smem ? nullptr : mats.first.template data_ptr<T>();
  p.MT = pl.m_in_smem ? nullptr : mats.second.template data_ptr<T>();
  p.B = B;
  p.n = n;
  p.m = m;
  p.ldk = pl.ldk;
  p.R = pl.R;
  p.T_iters = static_cast<int>(T_iters);
  p.nreg = static_cast<T>(-reg);
  p.eps = static_cast<T>(eps);
  p.has_eps = eps > 0;
  p.log_eps = p.has_eps ? static_cast<T>(std::log(p.eps)) : T(0);
  p.value = value.data_ptr<T>();
  p.u = u.data_ptr<T>();
  p.v = v.data_ptr<T>();
  p.hr = keep ? hist_r.data_ptr<T>() : nullptr;
  p.hs = keep ? hist_s.data_ptr<T>() : nullptr;
  p.y = keep ? y.data_ptr<T>() : nullptr;
  auto* kern = log_domain ? &small_forward_kernel<T, true> : &small_forward_kernel<T, false>;
  allow_dynamic_smem(kern, pl.smem);
  WKD_LAUNCH_SMEM(kern, static_cast<unsigned>(ceil_div(B, pl.R)), pl.threads, pl.smem, stream, p);
  WKD_LAUNCH_CHECK();
}

template <typename T>
void backward_small(const at::Tensor& g, const at::Tensor& a, const at::Tensor& b, const at::Tensor& cost,
                    const at::Tensor& hist_r, const at::Tensor& hist_s, const at::Tensor& y, double reg,
                    bool log_domain, at::Tensor& ga, at::Tensor& gb, int rows_per_block,
                    std::optional<double> eps) {
  const int64_t B = a.size(0), n = a.size(1), m = b.size(1);
  const cudaStream_t stream = current_stream();
  const SmallPlan pl = small_backward_plan<T>(B, n, m, log_domain, rows_per_block);
  const auto mats = small_global_matrix<T>(pl, cost, reg, log_domain, stream);
  SmallArgs<T> p{};
  p.a = a.data_ptr<T>();
  p.b = b.data_ptr<T>();
  p.cost = cost.data_ptr<T>();
  p.M = pl.m_in_smem ? nullptr : mats.first.template data_ptr<T>();
  p.MT = pl.m_in_smem ? nullptr : mats.second.template data_ptr<T>();
  p.B = B;
  p.n = n;
  p.m = m;
  p.ldk = pl.ldk;
  p.R = pl.R;
  p.T_iters = static_cast<int>(hist_s.size(0));
  p.nreg = static_cast<T>(-reg);
  p.gauge = eps.has_value();
  p.has_eps = eps.value_or(0.0) > 0;
  p.eps = static_cast<T>(eps.value_or(0.0));
  p.log_eps = p.has_eps ? static_cast<T>(std::log(*eps)) : T(0);
  p.g = g.data_ptr<T>();
  p.hr_in = hist_r.data_ptr<T>();
  p.hs_in = hist_s.data_ptr<T>();
  p.y_in = y.data_ptr<T>();
  p.ga = ga.data_ptr<T>();
  p.gb = gb.data_ptr<T>();
  auto* kern = log_domain ? &small_backward_kernel<T, true> : &small_backward_kernel<T, false>;
  allow_dynamic_smem(kern, pl.smem);
  WKD_LAUNCH_SMEM(kern, static_cast<unsigned>(ceil_div(B, pl.R)), pl.threads, pl.smem, stream, p);
  WKD_LAUNCH_CHECK();
}

// ------------------------------------------------------------------------------------------ op entry points
// The launch choices a call runs with: the product ops pass LaunchChoice{} (both automatic); the tuning ops pass
// their arguments `tile` / `rows_per_block` (checked by tuning_choice).
//   tile: index into kTileTable for every product of the per-half-iteration kernels, or kTileAuto (launch_gemm's
//         rule per product). Ignored where those kernels do not run (single-launch, per-row kernels).
//   rows_per_block: the single-launch kernels' target rows per CTA in [1, kSmallMaxRows] (small_plan may lower it
//         to fit shared memory), or kRowsAuto. Ignored where the single-launch kernels do not run.
struct LaunchChoice {
  int tile = kTileAuto;
  int rows_per_block = kRowsAuto;
};

using SinkhornOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// op: the op's name in error messages.
SinkhornOutputs sinkhorn_run(const char* op, const at::Tensor& a_in, const at::Tensor& b_in,
                             const at::Tensor& cost_in, double reg, int64_t num_iters, double eps, bool log_domain,
                             bool keep_history, LaunchChoice choice) {
  const SinkhornDims d = check_sinkhorn_args(a_in, b_in, cost_in, reg, num_iters, eps, op);
  TORCH_CHECK_VALUE(num_iters <= INT_MAX, op, ": `num_iters` is too large: ", num_iters);
#ifndef WKD_CUDA_EMULATE
  TORCH_CHECK_VALUE(a_in.is_cuda(), op, ": expects CUDA tensors, got ", a_in.device());
  const c10::cuda::CUDAGuard guard(a_in.device());
#endif
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), cost = cost_in.contiguous();
  const int64_t B = d.B, n = d.n, m = d.m;
  at::Tensor value = at::empty({B}, a.options());
  at::Tensor u = at::empty({B, n}, a.options());
  at::Tensor v = at::empty({B, m}, a.options());
  at::Tensor hist_r = at::empty({keep_history ? num_iters : 0, B, n}, a.options());
  at::Tensor hist_s = at::empty({keep_history ? num_iters : 0, B, m}, a.options());
  at::Tensor y = at::empty({keep_history ? B : 0, n}, a.options());
  if (B == 0) return {value, u, v, hist_r, hist_s, y};
  TORCH_CHECK_VALUE(ceil_div(B, 16) <= 65535, op, ": batch too large for the CUDA kernels (B=", B, ")");
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "wkd_sinkhorn_cuda", [&] {
    using T = scalar_t;
    if (use_small_kernels(d.shared_cost, n, m)) {
      forward_small<T>(a, b, cost, reg, num_iters, eps, log_domain, keep_history, value, u, v, hist_r, hist_s, y,
                       choice.rows_per_block);
      return;
    }
    if (d.shared_cost && !log_domain) {
      forward_shared<T>(a, b, cost, reg, num_iters, eps, keep_history, value, u, v, hist_r, hist_s, y, choice.tile);
      return;
    }
    const T e = static_cast<T>(eps);
    const bool has_eps = eps > 0;
    const T log_eps = has_eps ? static_cast<T>(std::log(e)) : T(0);
    T* hr = keep_history ? hist_r.data_ptr<T>() : nullptr;
    T* hs = keep_history ? hist_s.data_ptr<T>() : nullptr;
    T* yp = keep_history ? y.data_ptr<T>() : nullptr;
    const int64_t cstride = d.shared_cost ? 0 : n * m;
    const at::Tensor L = shared_log_kernel<T>(cost, d.shared_cost, log_domain, reg, stream);
    const T* L_p = L.defined() ? L.data_ptr<T>() : nullptr;
    auto* kern = log_domain ? &rows_forward_kernel<T, true> : &rows_forward_kernel<T, false>;
    WKD_LAUNCH(kern, static_cast<unsigned>(B), kRowThreads, stream, a.data_ptr<T>(), b.data_ptr<T>(),
               cost.data_ptr<T>(), cstride, L_p, B, n, m, static_cast<int>(num_iters), static_cast<T>(-reg), e,
               log_eps, has_eps, value.data_ptr<T>(), u.data_ptr<T>(), v.data_ptr<T>(), hr, hs, yp);
    WKD_LAUNCH_CHECK();
  });
  return {value, u, v, hist_r, hist_s, y};
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_backward_run(const char* op, const at::Tensor& grad_value,
                                                         const at::Tensor& a_in, const at::Tensor& b_in,
                                                         const at::Tensor& cost_in, const at::Tensor& hist_r_in,
                                                         const at::Tensor& hist_s_in, const at::Tensor& y_in,
                                                         double reg, bool log_domain, LaunchChoice choice,
                                                         std::optional<double> eps) {
  const SinkhornDims d = check_sinkhorn_args(a_in, b_in, cost_in, reg, 1, eps.value_or(0.0), op);
  check_sinkhorn_backward_args(grad_value, a_in, b_in, hist_r_in, hist_s_in, y_in, op);
  TORCH_CHECK_VALUE(hist_s_in.size(0) <= INT_MAX, op, ": history too long: ", hist_s_in.size(0));
#ifndef WKD_CUDA_EMULATE
  TORCH_CHECK_VALUE(a_in.is_cuda(), op, ": expects CUDA tensors, got ", a_in.device());
  const c10::cuda::CUDAGuard guard(a_in.device());
#endif
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), cost = cost_in.contiguous();
  const at::Tensor hist_r = hist_r_in.contiguous(), hist_s = hist_s_in.contiguous(), y = y_in.contiguous();
  const at::Tensor g = grad_value.contiguous();
  at::Tensor ga = at::empty_like(a, at::MemoryFormat::Contiguous);
  at::Tensor gb = at::empty_like(b, at::MemoryFormat::Contiguous);
  const int64_t B = d.B, n = d.n, m = d.m;
  if (B == 0) return {ga, gb};
  TORCH_CHECK_VALUE(ceil_div(B, 16) <= 65535, op, ": batch too large for the CUDA kernels (B=", B, ")");
  const cudaStream_t stream = current_stream();
  const int T_iters = static_cast<int>(hist_s.size(0));
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "wkd_sinkhorn_backward_cuda", [&] {
    using T = scalar_t;
    if (use_small_kernels(d.shared_cost, n, m)) {
      backward_small<T>(g, a, b, cost, hist_r, hist_s, y, reg, log_domain, ga, gb, choice.rows_per_block, eps);
      return;
    }
    if (d.shared_cost && !log_domain) {
      backward_shared<T>(g, a, b, cost, hist_r, hist_s, y, reg, ga, gb, choice.tile, eps);
      return;
    }
    const at::Tensor scr_n = at::empty({B, 2 * n}, a.options()), scr_m = at::empty({B, 2 * m}, a.options());
    const int64_t cstride = d.shared_cost ? 0 : n * m;
    const at::Tensor L = shared_log_kernel<T>(cost, d.shared_cost, log_domain, reg, stream);
    const T* L_p = L.defined() ? L.data_ptr<T>() : nullptr;
    auto* kern = log_domain ? &rows_backward_kernel<T, true> : &rows_backward_kernel<T, false>;
    WKD_LAUNCH(kern, static_cast<unsigned>(B), kRowThreads, stream, g.data_ptr<T>(), a.data_ptr<T>(),
               b.data_ptr<T>(), cost.data_ptr<T>(), cstride, L_p, B, n, m, T_iters, static_cast<T>(-reg),
               hist_r.data_ptr<T>(), hist_s.data_ptr<T>(), y.data_ptr<T>(), ga.data_ptr<T>(), gb.data_ptr<T>(),
               scr_n.data_ptr<T>(), scr_m.data_ptr<T>(), eps.has_value(), static_cast<T>(eps.value_or(0.0)),
               eps.value_or(0.0) > 0 ? static_cast<T>(std::log(*eps)) : T(0), eps.value_or(0.0) > 0);
    WKD_LAUNCH_CHECK();
  });
  return {ga, gb};
}

// The product ops: the automatic launch choices.
SinkhornOutputs sinkhorn_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& cost, double reg,
                              int64_t num_iters, double eps, bool log_domain, bool keep_history) {
  return sinkhorn_run(kFwd, a, b, cost, reg, num_iters, eps, log_domain, keep_history, LaunchChoice{});
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_backward_cuda(const at::Tensor& grad_value, const at::Tensor& a,
                                                          const at::Tensor& b, const at::Tensor& cost,
                                                          const at::Tensor& hist_r, const at::Tensor& hist_s,
                                                          const at::Tensor& y, double reg, bool log_domain,
                                                          std::optional<double> eps) {
  return sinkhorn_backward_run(kBwd, grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain, LaunchChoice{},
                               eps);
}

// ------------------------------------------------------------------------------------------ tuning ops
// Benchmarking only (bench/gpu_quick.py --sweep-cuda-tiles): the product ops with the launch choices as explicit per-call arguments, so
// that one build can time every tile table entry and several rows per CTA (bench/gpu_quick.py --sweep-cuda-tiles).
// Library wkd_tuning (CUDA key) in the real build, wkd_cuda_emu_tuning (CPU key, the emulated kernels) under
// WKD_CUDA_EMULATE; same schemas:
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
const char* const kTuneFwd = WKD_TUNING_LIB ".sinkhorn";
const char* const kTuneBwd = WKD_TUNING_LIB ".sinkhorn_backward";

LaunchChoice tuning_choice(const char* op, int64_t tile, int64_t rows_per_block) {
  TORCH_CHECK_VALUE(tile == kTileAuto || (tile >= 0 && tile < kNumTiles), op, ": `tile` must be -1 (automatic) or "
                    "an index of the tile table in [0, ", kNumTiles - 1, "], got ", tile);
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

int64_t tuning_num_tiles() { return kNumTiles; }

std::vector<int64_t> tuning_tile_table() {
  std::vector<int64_t> out;
  for (const TileCfg& c : kTileTable) out.insert(out.end(), {c.bm, c.bn, c.tm, c.tn, c.min_blocks});
  return out;
}

std::vector<int64_t> tuning_small_plan(int64_t B, int64_t n, int64_t m, at::ScalarType dtype, bool log_domain,
                                       bool backward, int64_t rows_per_block) {
  const char* op = WKD_TUNING_LIB ".small_plan";
  TORCH_CHECK_VALUE(B >= 1 && n >= 1 && m >= 1, op, ": B, n, m must be >= 1, got ", B, ", ", n, ", ", m);
  TORCH_CHECK_VALUE(n <= kSmallMaxC && m <= kSmallMaxC, op, ": the single-launch kernels take n, m <= ", kSmallMaxC,
                    ", got n=", n, ", m=", m);
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble, op, ": `dtype` must be float32 or float64, got ",
                    dtype);
  const LaunchChoice choice = tuning_choice(op, kTileAuto, rows_per_block);
  SmallPlan pl;
  AT_DISPATCH_FLOATING_TYPES(dtype, "wkd_tuning_small_plan", [&] {
    pl = backward ? small_backward_plan<scalar_t>(B, n, m, log_domain, choice.rows_per_block)
                  : small_forward_plan<scalar_t>(B, n, m, log_domain, choice.rows_per_block);
  });
  return {pl.R, ceil_div(B, pl.R), pl.threads, pl.m_in_smem ? 1 : 0, static_cast<int64_t>(pl.smem)};
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
TORCH_LIBRARY_IMPL(wkd, CUDA, m) {
  m.impl("sinkhorn", &sinkhorn_cuda);
  m.impl("sinkhorn_backward", &sinkhorn_backward_cuda);
}
TORCH_LIBRARY(wkd_tuning, m) { define_tuning_ops(m); }
TORCH_LIBRARY_IMPL(wkd_tuning, CUDA, m) { impl_tuning_ops(m); }
#else
// Verification build only: the emulated kernels on CPU tensors, in a library of their own (the schemas of
// wkd::sinkhorn and wkd::sinkhorn_backward, csrc/ops.cpp), so that it loads next to wkd_kernels._C.
TORCH_LIBRARY(wkd_cuda_emu, m) {
  m.def(
      "sinkhorn(Tensor a, Tensor b, Tensor cost, float reg, int num_iters, float eps=0.0, "
      "bool log_domain=False, bool keep_history=True) -> (Tensor value, Tensor u, Tensor v, Tensor hist_r, "
      "Tensor hist_s, Tensor y)");
  m.def(
      "sinkhorn_backward(Tensor grad_value, Tensor a, Tensor b, Tensor cost, Tensor hist_r, Tensor hist_s, "
      "Tensor y, float reg, bool log_domain=False, float? eps=None) -> (Tensor grad_a, Tensor grad_b)");
}
// Verification-only controls: the switches of EmuConfig, the emulator's launch counter and launch log.
void emu_configure(int64_t small, int64_t smem_limit) {
  emu_config().small = static_cast<int>(small);
  emu_config().smem_limit = static_cast<int>(smem_limit);
}
int64_t emu_launch_count() { return ::wkd_emu::launch_count(); }
// The last `count` launches (oldest first), 5 integers each: grid x, y, z, threads per block, dynamic shared memory
// bytes.
std::vector<int64_t> emu_last_launches(int64_t count) {
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
TORCH_LIBRARY_FRAGMENT(wkd_cuda_emu, m) {
  m.def("configure(int small=-1, int smem_limit=232448) -> ()", &emu_configure);
  m.def("launch_count() -> int", &emu_launch_count);
  m.def("last_launches(int count) -> int[]", &emu_last_launches);
}
TORCH_LIBRARY_IMPL(wkd_cuda_emu, CPU, m) {
  m.impl("sinkhorn", &sinkhorn_cuda);
  m.impl("sinkhorn_backward", &sinkhorn_backward_cuda);
}
// The tuning ops on the emulated kernels (CPU tensors), under a name of their own (loads next to a CUDA build of
// wkd_kernels._C, which defines wkd_tuning).
TORCH_LIBRARY(wkd_cuda_emu_tuning, m) { define_tuning_ops(m); }
TORCH_LIBRARY_IMPL(wkd_cuda_emu_tuning, CPU, m) { impl_tuning_ops(m); }
#endif

}  // namespace wkd
