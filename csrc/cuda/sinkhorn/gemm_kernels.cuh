// The per-half-iteration kernels of a shared cost in the scaling domain (n or m > 256; the overview at the top of
// csrc/cuda/sinkhorn.cu): the tiled SIMT GEMM with fused epilogues, its tile table and launch rule, the prep
// kernels that form the kernel matrices (and run the per-row prologues), and the backward's gauge-correction kernel.
#pragma once

#include "device_math.cuh"
#include "gauge.cuh"

namespace wkd {
namespace cuda_sinkhorn {
namespace {

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
// The tile configurations of gemm_epi_kernel (docs/design.md section 3, tile table). The dtype enters through the
// k-slab (BK = 128 bytes: 32 floats, 16 doubles); the same table serves both dtypes. Every entry gives bitwise the
// same products (each output is one thread's k-loop in increasing k): only the speed changes (and the value's
// partial-sum order, to rounding).
//   0  32 x 64, 4 x 4 per thread, 128 threads   today's big tiles
//   1  16 x 32, 2 x 4 per thread,  64 threads   today's small tiles
//   2  64 x 64, 4 x 4 per thread, 256 threads   __launch_bounds__(256, 2): at most 128 registers per thread, so
//                                               two CTAs per SM (smem 34 KiB float32 / 35 KiB float64 each)
// Choice: the host argument `tile` of forward_shared / backward_shared (launch_gemm): kTileAuto is today's rule
// (0 when it gives at least half a wave of blocks, else 1); 0..kNumTiles-1 forces an entry. The product ops
// (wkd::sinkhorn, wkd::sinkhorn_backward) always pass kTileAuto. A forced entry comes only from the explicit
// argument `tile` of the benchmarking ops wkd_tuning::sinkhorn / wkd_tuning::sinkhorn_backward
// (bench/cuda/sinkhorn_tuning_ops.cu, in a build with WKD_BUILD_TUNING_OPS=1; wkd_cuda_emu_tuning::* under
// emulation), per call: no build-time tile switch, no global state, no environment. Their sweep:
// bench/tune_sinkhorn.py --sweep-cuda-tiles. The defaults (this rule, and the entries themselves) are not measured
// yet: no GPU has run the sweep.
struct TileCfg {
  int bm, bn, tm, tn, min_blocks;
};
constexpr TileCfg kTileTable[] = {{32, 64, 4, 4, 1}, {16, 32, 2, 4, 1}, {64, 64, 4, 4, 2}};
constexpr int kNumTiles = int(sizeof(kTileTable) / sizeof(kTileTable[0]));

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

}  // namespace
}  // namespace cuda_sinkhorn
}  // namespace wkd
