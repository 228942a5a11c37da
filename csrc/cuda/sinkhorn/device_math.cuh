// Device helpers shared by every kernel family of the CUDA C++ Sinkhorn kernels: math of both dtypes with the CPU
// op's semantics (csrc/cpu/sinkhorn.cpp), warp reductions, 16-byte vector access, dynamic shared memory, the padded
// row strides.
#pragma once

#include "platform.cuh"

namespace wkd {
namespace cuda_sinkhorn {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

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

// Dynamic shared memory of the running launch (extern __shared__), as T.
template <typename T>
__device__ __forceinline__ T* dyn_smem() {
#ifdef WKD_CUDA_EMULATE
  return static_cast<T*>(::wkd_emu::dyn_smem());
#else
  extern __shared__ __align__(16) unsigned char wkd_dyn_smem_raw[];
  return reinterpret_cast<T*>(wkd_dyn_smem_raw);
#endif
}

// Row strides rounded up to 4 elements (16-byte aligned rows of float32 / float64 state arrays).
__host__ __device__ __forceinline__ int64_t round4(int64_t x) { return (x + 3) / 4 * 4; }

// Leading dimension of the kernel matrices formed by the prep kernels (W operands): a multiple of 16 elements, so
// that their rows are 16-byte aligned and the W-tile loads are 16-byte vectors whatever n and m (the padding
// columns are never written and only feed output columns >= N, which the epilogues drop).
__host__ __device__ __forceinline__ int64_t padded_ld(int64_t cols) { return (cols + 15) / 16 * 16; }

}  // namespace
}  // namespace cuda_sinkhorn
}  // namespace wkd
