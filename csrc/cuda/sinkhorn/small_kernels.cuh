// The single-launch kernels of the CUDA C++ Sinkhorn kernels (shared cost, n, m <= 256; the overview below and at
// the top of csrc/cuda/sinkhorn.cu): the whole forward in one launch, the whole exact backward in one launch, and
// the build kernel of the kernel matrix when it does not fit in shared memory. Their launch plan: small_plan.cuh.
#pragma once

#include "device_math.cuh"
#include "gauge.cuh"
#include "lse.cuh"

namespace wkd {
namespace cuda_sinkhorn {
namespace {

// ======================================================================================================
// Single-launch kernels for small C (docs/design.md section 3): shared cost [n, m] with n, m <= kSmallMaxC (256), both
// domains, float32 and float64. The forward (all T iterations, y and the value) is ONE launch, the exact backward's
// whole reverse sweep ONE launch (plus one build launch each when the kernel matrix does not fit in shared memory).
//   * Each CTA owns R consecutive batch rows (R <= kSmallMaxRows, chosen by the host so that the grid is one wave
//     with as many CTAs as that allows, or asked for per call by the tuning ops' rows_per_block; small_plan lowers
//     either to fit shared memory; R changes no result bit: every output is one thread's loop whatever R) and keeps
//     their state in dynamic shared memory: u, v (forward; logs in the log domain), the backward's w/x, z/zv and the
//     grad_a / grad_b accumulators. Nothing is exchanged between CTAs (no atomics, no global scratch); nothing
//     synchronises with the host: graph-capturable.
//   * The kernel matrix M (K = exp(-C/reg) in the scaling domain, L = -C/reg in the log domain) is held in shared
//     memory when M and the state of at least one row fit in the opt-in limit (sm_90, 227 KiB: float32 up to
//     C = 237, float64 up to C = 167; fewer rows per CTA when needed): each CTA forms it from cost with the same
//     expression as the prep kernels (exp(c / -reg), c / -reg), row stride ldk = m rounded up to odd, so that both
//     passes are bank-conflict free (the column pass reads M[i][j] with lanes over j, the row pass with lanes over
//     i). Otherwise small_build_kernel writes M [n, m] and
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
constexpr int kSmallMaxThreads = 256;  // threads per CTA at most (kSmallMaxC, kSmallMaxRows: launch.h)

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

// Cost entries each thread loads per iteration of the in-CTA build of M (independent loads in flight together).
constexpr int kSmallBuildUnroll = 8;

// M in shared memory from the cost: entry k = i m + j of cost to Ms[i ldk + j], K = exp(c / -reg) or
// L = c / -reg (the prep kernels' expressions). Each thread issues kSmallBuildUnroll independent loads (strided by
// the CTA's thread count), then forms and stores those entries; 32-bit index arithmetic (n m <= 65536).
template <typename T, bool LOG>
__device__ __forceinline__ void small_build_in_smem(const SmallArgs<T>& p, T* Ms) {
  constexpr int U = kSmallBuildUnroll;
  const unsigned nm = static_cast<unsigned>(p.n * p.m), m = static_cast<unsigned>(p.m);
  const unsigned ldk = static_cast<unsigned>(p.ldk), nt = blockDim.x;
  const T* cost = p.cost;
  const T nreg = p.nreg;
  unsigned k = threadIdx.x;
  for (; k + (U - 1) * nt < nm; k += U * nt) {
    T c[U];
#pragma unroll
    for (int q = 0; q < U; ++q) c[q] = cost[k + q * nt];
#pragma unroll
    for (int q = 0; q < U; ++q) {
      const unsigned e = k + q * nt, i = e / m;
      Ms[i * ldk + (e - i * m)] = LOG ? c[q] / nreg : dexp(c[q] / nreg);
    }
  }
  for (; k < nm; k += nt) {
    const unsigned i = k / m;
    const T c = cost[k];
    Ms[i * ldk + (k - i * m)] = LOG ? c / nreg : dexp(c / nreg);
  }
}

template <typename T, bool LOG>
__device__ __forceinline__ SmallM<T> small_matrix(const SmallArgs<T>& p, T* Ms) {
  const int64_t n = p.n, m = p.m;
  if (p.M) return SmallM<T>{p.M, m, p.MT, 1, n};
  small_build_in_smem<T, LOG>(p, Ms);
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
        T sum = T(0);
        const T mx = lse_passes<T, false, false>(
            n, [&](int64_t i) { return ur[i]; }, [&](int64_t i) { return M.col(i, j); }, KeepAll{},
            [&](int64_t, T e) { sum += e; });
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
        T acc = T(0);
        const T mi = lse_passes<T, false, true>(
            m, [&](int64_t j) { return vr[j]; }, [&](int64_t j) { return M.row(i, j); }, KeepAll{},
            [&](int64_t, T e) { acc += e; });
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
      T acc = T(0);
      const T mi = lse_passes<T, false, true>(
          m, [&](int64_t j) { return vr[j]; }, [&](int64_t j) { return M.row(i, j); }, KeepAll{},
          [&](int64_t j, T e) { acc += Ci[j] * e; });
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
        T sw = T(0), sc = T(0);
        const T mx = lse_passes<T, false, false>(
            n, [&](int64_t i) { return lu[i]; }, [&](int64_t i) { return M.col(i, j); }, KeepAll{},
            [&](int64_t i, T ex) {
              const T wi = wr[i];
              if (wi != T(0)) sw += wi * ex;
              if (t == last) sc += p.cost[i * m + j] * ex;
            });
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
        T acc = T(0);
        const T mi = lse_passes<T, false, true>(
            m, [&](int64_t j) { return lv[j]; }, [&](int64_t j) { return M.row(i, j); },
            [&](int64_t j) { return zr[j] != T(0); }, [&](int64_t j, T e) { acc += zr[j] * e; });
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
}  // namespace
}  // namespace cuda_sinkhorn
}  // namespace wkd
