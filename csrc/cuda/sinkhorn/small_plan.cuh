// The launch plan of the single-launch kernels (small_kernels.cuh): whether they run (the size rule), the batch
// rows per CTA, threads per CTA, dynamic shared memory, and whether the kernel matrix lives in shared memory.
// Host code.
#pragma once

#include "device_math.cuh"
#include "small_kernels.cuh"

namespace wkd {
namespace cuda_sinkhorn {
namespace {

// The size rule of the single-launch kernels (both directions).
bool use_small_kernels(bool shared_cost, int64_t n, int64_t m) {
#ifdef WKD_CUDA_EMULATE
  const int forced = ::wkd_emu::config().small;
  if (forced >= 0) return forced != 0 && shared_cost && n <= kSmallMaxC && m <= kSmallMaxC;
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
}  // namespace
}  // namespace cuda_sinkhorn
}  // namespace wkd
