// The per-row kernels of the CUDA C++ Sinkhorn kernels: a per-row cost [B, n, m] in either domain, and a shared cost
// in the log domain with n or m > 256 (the overview at the top of csrc/cuda/sinkhorn.cu).
#pragma once

#include "device_math.cuh"
#include "gauge.cuh"
#include "lse.cuh"

namespace wkd {
namespace cuda_sinkhorn {
namespace {

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
        T sm = T(0);
        const T mx = lse_passes<T, false, false>(
            n, [&](int64_t i) { return ur[i]; }, [&](int64_t i) { return Lv(i * m + j); }, KeepAll{},
            [&](int64_t, T e) { sm += e; });
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
        T acc = T(0);
        const T mi = lse_passes<T, true, true>(
            m, [&](int64_t j) { return vr[j]; }, [&](int64_t j) { return Lv(i * m + j); }, KeepAll{},
            [&](int64_t, T e) { acc += e; });
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
      T acc = T(0);
      const T mi = lse_passes<T, true, true>(
          m, [&](int64_t j) { return vr[j]; }, [&](int64_t j) { return Lv(i * m + j); }, KeepAll{},
          [&](int64_t j, T e) { acc += Ci[j] * e; });
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
        T sw = T(0), sc = T(0);
        const T mx = lse_passes<T, false, false>(
            n, [&](int64_t i) { return s1[i]; }, [&](int64_t i) { return Lv(i * m + j); }, KeepAll{},
            [&](int64_t i, T ex) {
              const T wi = s2[i];
              if (wi != T(0)) sw += wi * ex;
              if (t == last) sc += C[i * m + j] * ex;
            });
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
        T acc = T(0);
        const T mi = lse_passes<T, true, true>(
            m, [&](int64_t j) { return q1[j]; }, [&](int64_t j) { return Lv(i * m + j); },
            [&](int64_t j) { return q2[j] != T(0); }, [&](int64_t j, T e) { acc += q2[j] * e; });
        acc = warp_sum(acc);
        if (lane == 0) s2[i] = acc == T(0) ? T(0) : -dexp(mi - rp[i]) * acc;
      }
      __syncthreads();
    }
  }
}

}  // namespace
}  // namespace cuda_sinkhorn
}  // namespace wkd
