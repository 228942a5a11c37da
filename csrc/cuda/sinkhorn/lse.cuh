// The log-domain arithmetic of the CUDA C++ Sinkhorn kernels: the one log-sum-exp every log-domain pass runs
// (per-row kernels and single-launch kernels, forward and backward), and log(exp(x) + eps).
#pragma once

#include "device_math.cuh"

namespace wkd {
namespace cuda_sinkhorn {
namespace {

// log(exp(x) + eps), from log eps.
template <typename T>
__device__ __forceinline__ T log_add_eps(T x, T log_eps, bool has_eps) {
  if (!has_eps) return x;
  const T hi = x < log_eps ? log_eps : x;
  const T lo = log_eps < x ? log_eps : x;
  return hi + dlog1p(dexp(lo - hi));
}

// Log-sum-exp in the CPU op's two-pass form (csrc/cpu/sinkhorn.cpp): the maximum, then the sum shifted by it. The
// terms are x(k) + l(k) for k = first, first + step, ... < K: x the state (log u or log v), l the log kernel entry
// (L = -C/reg). A term with x(k) = -inf (zero mass) is skipped in both passes.
//   pass 1: mx = the maximum of the terms (the skipped ones cannot raise it: -inf + l is -inf or NaN, which
//           smax ignores). WARP: first = the lane, step = 32, and the lanes' maxima are combined (warp_max), so
//           every lane holds the maximum over all K terms; otherwise one thread, first = 0, step = 1.
//   pass 2: add(k, exp(x(k) + l(k) - mx)) for every term not skipped and with keep(k), in increasing k (per lane
//           with WARP). GUARD: no pass 2 when mx = -inf (every term -inf: the sums stay as they are).
// Returns mx. The sums are the caller's: `add` accumulates them (several, weighted: add(k, e) does acc += w_k e),
// and with WARP the caller reduces them over the warp (warp_sum).
template <typename T, bool WARP, bool GUARD, class X, class L, class Keep, class Add>
__device__ __forceinline__ T lse_passes(int64_t K, const X& x, const L& l, const Keep& keep, const Add& add) {
  const T NINF = ninf<T>();
  const int64_t first = WARP ? int64_t(threadIdx.x & 31) : 0, step = WARP ? 32 : 1;
  T mx = NINF;
  for (int64_t k = first; k < K; k += step) {
    const T xk = x(k);
    if (xk == NINF) continue;
    mx = smax(mx, xk + l(k));
  }
  if (WARP) mx = warp_max(mx);
  if (GUARD && mx == NINF) return mx;
  for (int64_t k = first; k < K; k += step) {
    const T xk = x(k);
    if (xk == NINF || !keep(k)) continue;
    add(k, dexp(xk + l(k) - mx));
  }
  return mx;
}

// keep(k) of lse_passes when every term counts.
struct KeepAll {
  __device__ __forceinline__ bool operator()(int64_t) const { return true; }
};

}  // namespace
}  // namespace cuda_sinkhorn
}  // namespace wkd
