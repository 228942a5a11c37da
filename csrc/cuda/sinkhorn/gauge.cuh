// The gauge correction of the exact backward (docs/design.md section 3), shared by the three kernel families.
#pragma once

#include "device_math.cuh"

namespace wkd {
namespace cuda_sinkhorn {
namespace {

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

}  // namespace
}  // namespace cuda_sinkhorn
}  // namespace wkd
