// Hand-written CUDA C++ kernels of wkd::sinkhorn and wkd::sinkhorn_backward, registered on their CUDA dispatch key
// (contract: the schema comment in csrc/ops.cpp; the recurrences mirror csrc/cpu/sinkhorn.cpp line by line).
//
// Shared cost [n, m], scaling domain (the WKD-L case): every half-iteration of the whole batch is one
// [B, k] x [k, N] product done by gemm_epi_kernel, a tiled shared-memory SIMT GEMM whose epilogue fuses
// what follows the product (+eps, the division, the history write, the backward's accumulations):
//   * tiles: BM x BN outputs per block (32 x 64, 128 threads, 4 x 4 outputs per thread; or 16 x 32, 64
//     threads, 2 x 4 when the big tiles would not fill half the SMs), k-slabs of 128 bytes (32 floats /
//     16 doubles), double-buffered in shared memory with a register-staged prefetch of the next slab,
//     16-byte global loads when rows are 16-byte aligned (scalar fallback with bounds checks otherwise),
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
// Per-row cost [B, n, m] and the log domain (any cost layout): one block per row, loops; the kernel entries
// exp(-C/reg) (or -C/reg) are recomputed from the cost on the fly, never stored (no B x n x m tensor); for a
// shared cost in the log domain, L = -C/reg [n, m] is formed once (the same division as the CPU op).
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
// python_tests/test_sinkhorn_cuda.py::test_kernels_under_host_emulation).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>

#ifdef WKD_CUDA_EMULATE
#include "cuda_emu.cuh"
#define WKD_LAUNCH(kern, grid, block, stream, ...) ::wkd_emu::launch(grid, block, [=] { kern(__VA_ARGS__); })
#define WKD_LAUNCH_CHECK()
#define WKD_CHECK_ALIGNED16(p) ::wkd_emu::check_aligned16(p)
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#define WKD_LAUNCH(kern, grid, block, stream, ...) kern<<<grid, block, 0, stream>>>(__VA_ARGS__)
#define WKD_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define WKD_CHECK_ALIGNED16(p) ((void)0)
#endif

#include "../sinkhorn_common.h"

namespace wkd {
namespace {

#ifndef WKD_CUDA_EMULATE
constexpr const char* kFwd = "wkd.sinkhorn";
constexpr const char* kBwd = "wkd.sinkhorn_backward";
#else
constexpr const char* kFwd = "wkd_cuda_emu.sinkhorn";
constexpr const char* kBwd = "wkd_cuda_emu.sinkhorn_backward";
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

template <typename T, int BM, int BN, int TM, int TN, class Epi>
__global__ void __launch_bounds__((BM / TM) * (BN / TN))
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

// Big tiles when they give at least half a wave of blocks, else small tiles (C = 100 at B = 256, ...).
template <typename T, class Epi>
void launch_gemm(const T* A, int64_t lda, const T* W, int64_t ldw, int64_t rows, int64_t Kd, int64_t N,
                 const Epi& epi, int sms, cudaStream_t stream) {
  const bool vA = vec_ok(A, lda, Kd), vW = vec_ok(W, ldw, N);
  const int64_t big_blocks = ceil_div(rows, 32) * ceil_div(N, 64);
  if (2 * big_blocks >= sms) {
    const dim3 grid(static_cast<unsigned>(ceil_div(N, 64)), static_cast<unsigned>(ceil_div(rows, 32)));
    auto* kern = &gemm_epi_kernel<T, 32, 64, 4, 4, Epi>;
    WKD_LAUNCH(kern, grid, 128, stream, A, lda, W, ldw, rows, Kd, N, vA, vW, epi);
  } else {
    const dim3 grid(static_cast<unsigned>(ceil_div(N, 32)), static_cast<unsigned>(ceil_div(rows, 16)));
    auto* kern = &gemm_epi_kernel<T, 16, 32, 2, 4, Epi>;
    WKD_LAUNCH(kern, grid, 64, stream, A, lda, W, ldw, rows, Kd, N, vA, vW, epi);
  }
  WKD_LAUNCH_CHECK();
}

// ======================================================================================================
// Prep kernels: kernel matrices (32 x 32 tiles, 256 threads, transposed through shared memory) in blocks
// [0, ntiles), per-row prologue in blocks [ntiles, ntiles + B).
// ======================================================================================================
constexpr int kPrepThreads = 256;

// FWD: Kout = K [n, m], KT = K^T [m, n], W2 [m, 2n] with W2[j, 2i] = K_ij, W2[j, 2i+1] = K_ij C_ij.
// BWD: Kout = M2 [2n, m] = [K∘C ; K], KT = K^T [m, n].
template <typename T, bool FWD>
__device__ __forceinline__ void prep_tile(const T* __restrict__ cost, int64_t n, int64_t m, T nreg, int64_t tile,
                                          int64_t tiles_m, T* __restrict__ Kout, T* __restrict__ KT,
                                          T* __restrict__ W2) {
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
        Kout[i * m + j] = k;
      } else {
        Kout[i * m + j] = kc;
        Kout[(n + i) * m + j] = k;
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
      KT[j * n + i] = k;
      if (FWD) {
        W2[j * 2 * n + 2 * i] = k;
        W2[j * 2 * n + 2 * i + 1] = skc[tx][ty + rr];
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
    prep_tile<T, true>(cost, n, m, nreg, blockIdx.x, tiles_m, K, KT, W2);
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
    prep_tile<T, false>(cost, n, m, nreg, blockIdx.x, tiles_m, M2, KT, nullptr);
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
                    at::Tensor& hist_s, at::Tensor& y) {
  const int64_t B = a.size(0), n = a.size(1), m = b.size(1);
  const cudaStream_t stream = current_stream();
  const int sms = sm_count();
  const auto opts = a.options();
  const at::Tensor K = at::empty({n, m}, opts), KT = at::empty({m, n}, opts), W2 = at::empty({m, 2 * n}, opts);
  const int64_t ntickets = ceil_div(B, 16);  // >= gridDim.y of either tile configuration
  const at::Tensor tickets = at::empty({ntickets}, opts.dtype(at::kInt));
  const at::Tensor part = at::empty({ceil_div(2 * n, 32) * B}, opts);  // >= gridDim.x * B of either configuration
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
    launch_gemm<T>(u_p, n, K_p, m, B, n, m, EpiScale<T>{b_p, v_p, keep ? hs + t * B * m : nullptr, e}, sms, stream);
    if (t + 1 < T_iters) {
      // r_t = K v + eps, u = a / r_t
      launch_gemm<T>(v_p, m, KT_p, n, B, m, n, EpiScale<T>{a_p, u_p, keep ? hr + t * B * n : nullptr, e}, sms,
                     stream);
    } else {
      // r_T and y = (K∘C) v_T in one product; u, history, value
      EpiLast<T> epi{a_p, u_p, keep ? hr + t * B * n : nullptr, yp, e, n,
                     part.data_ptr<T>(), tk_p, value.data_ptr<T>()};
      launch_gemm<T>(v_p, m, W2_p, 2 * n, B, m, 2 * n, epi, sms, stream);
    }
  }
}

template <typename T>
void backward_shared(const at::Tensor& g, const at::Tensor& a, const at::Tensor& b, const at::Tensor& cost,
                     const at::Tensor& hist_r, const at::Tensor& hist_s, const at::Tensor& y, double reg,
                     at::Tensor& ga, at::Tensor& gb) {
  const int64_t B = a.size(0), n = a.size(1), m = b.size(1);
  const int64_t T_iters = hist_s.size(0), last = T_iters - 1;
  const cudaStream_t stream = current_stream();
  const int sms = sm_count();
  const auto opts = a.options();
  const at::Tensor M2 = at::empty({2 * n, m}, opts), KT = at::empty({m, n}, opts);
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
  const T* K_p = M2_p + n * m;  // the lower half of M2 is K

  auto* prep = &prep_backward_kernel<T>;
  WKD_LAUNCH(prep, static_cast<unsigned>(ntiles + B), kPrepThreads, stream, cost.data_ptr<T>(), n, m,
             static_cast<T>(-reg), tiles_m, ntiles, M2_p, KT_p, a_p, g.data_ptr<T>(), hr + last * B * n,
             y.data_ptr<T>(), ga_p, A1_p);
  WKD_LAUNCH_CHECK();

  // t = T: z_T = (g (K∘C)^T u_T - K^T (w_T u_T)) / s_T
  launch_gemm<T>(A1_p, 2 * n, M2_p, m, B, 2 * n, m,
                 EpiZ<T>{hs + last * B * m, b_p, gb_p, last > 0 ? zv_p : nullptr, true}, sms, stream);
  for (int64_t t = last; t >= 1; --t) {
    // w_{t-1} = -K (z_t v_t) / r_{t-1}; grad_a += w; x = w u_{t-1}
    launch_gemm<T>(zv_p, m, KT_p, n, B, m, n, EpiW<T>{hr + (t - 1) * B * n, a_p, ga_p, x_p}, sms, stream);
    // z_{t-1} = -K^T x / s_{t-1}; grad_b += z; zv = z v_{t-1}
    launch_gemm<T>(x_p, n, K_p, m, B, n, m,
                   EpiZ<T>{hs + (t - 1) * B * m, b_p, gb_p, t - 1 > 0 ? zv_p : nullptr, false}, sms, stream);
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
                         const T* __restrict__ yin, T* ga, T* gb, T* scr_n, T* scr_m) {
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

// ------------------------------------------------------------------------------------------ op entry points
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_cuda(
    const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& cost_in, double reg, int64_t num_iters,
    double eps, bool log_domain, bool keep_history) {
  const SinkhornDims d = check_sinkhorn_args(a_in, b_in, cost_in, reg, num_iters, eps, kFwd);
  TORCH_CHECK_VALUE(num_iters <= INT_MAX, kFwd, ": `num_iters` is too large: ", num_iters);
#ifndef WKD_CUDA_EMULATE
  TORCH_CHECK_VALUE(a_in.is_cuda(), kFwd, ": expects CUDA tensors, got ", a_in.device());
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
  TORCH_CHECK_VALUE(ceil_div(B, 16) <= 65535, kFwd, ": batch too large for the CUDA kernels (B=", B, ")");
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "wkd_sinkhorn_cuda", [&] {
    using T = scalar_t;
    if (d.shared_cost && !log_domain) {
      forward_shared<T>(a, b, cost, reg, num_iters, eps, keep_history, value, u, v, hist_r, hist_s, y);
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

std::tuple<at::Tensor, at::Tensor> sinkhorn_backward_cuda(const at::Tensor& grad_value, const at::Tensor& a_in,
                                                          const at::Tensor& b_in, const at::Tensor& cost_in,
                                                          const at::Tensor& hist_r_in, const at::Tensor& hist_s_in,
                                                          const at::Tensor& y_in, double reg, bool log_domain) {
  const SinkhornDims d = check_sinkhorn_args(a_in, b_in, cost_in, reg, 1, 0.0, kBwd);
  check_sinkhorn_backward_args(grad_value, a_in, b_in, hist_r_in, hist_s_in, y_in, kBwd);
  TORCH_CHECK_VALUE(hist_s_in.size(0) <= INT_MAX, kBwd, ": history too long: ", hist_s_in.size(0));
#ifndef WKD_CUDA_EMULATE
  TORCH_CHECK_VALUE(a_in.is_cuda(), kBwd, ": expects CUDA tensors, got ", a_in.device());
  const c10::cuda::CUDAGuard guard(a_in.device());
#endif
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), cost = cost_in.contiguous();
  const at::Tensor hist_r = hist_r_in.contiguous(), hist_s = hist_s_in.contiguous(), y = y_in.contiguous();
  const at::Tensor g = grad_value.contiguous();
  at::Tensor ga = at::empty_like(a, at::MemoryFormat::Contiguous);
  at::Tensor gb = at::empty_like(b, at::MemoryFormat::Contiguous);
  const int64_t B = d.B, n = d.n, m = d.m;
  if (B == 0) return {ga, gb};
  TORCH_CHECK_VALUE(ceil_div(B, 16) <= 65535, kBwd, ": batch too large for the CUDA kernels (B=", B, ")");
  const cudaStream_t stream = current_stream();
  const int T_iters = static_cast<int>(hist_s.size(0));
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "wkd_sinkhorn_backward_cuda", [&] {
    using T = scalar_t;
    if (d.shared_cost && !log_domain) {
      backward_shared<T>(g, a, b, cost, hist_r, hist_s, y, reg, ga, gb);
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
               scr_n.data_ptr<T>(), scr_m.data_ptr<T>());
    WKD_LAUNCH_CHECK();
  });
  return {ga, gb};
}

}  // namespace

#ifndef WKD_CUDA_EMULATE
TORCH_LIBRARY_IMPL(wkd, CUDA, m) {
  m.impl("sinkhorn", &sinkhorn_cuda);
  m.impl("sinkhorn_backward", &sinkhorn_backward_cuda);
}
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
      "Tensor y, float reg, bool log_domain=False) -> (Tensor grad_a, Tensor grad_b)");
}
TORCH_LIBRARY_IMPL(wkd_cuda_emu, CPU, m) {
  m.impl("sinkhorn", &sinkhorn_cuda);
  m.impl("sinkhorn_backward", &sinkhorn_backward_cuda);
}
#endif

}  // namespace wkd
