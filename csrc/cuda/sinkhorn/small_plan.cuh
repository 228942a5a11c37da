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

// The plan for a target of R_target rows per CTA: R is lowered while the state of R rows does not fit in the opt-in
// shared memory, and, when M goes on chip, while M and the state of R rows do not fit together (never raised;
// SmallPlan::R is what runs). arrays_n / arrays_m: state arrays of n / m values per row; rb: rows per work item
// (kSmallRB in the scaling domain, 1 in the log domain).
template <typename T>
SmallPlan small_plan_rows(int64_t n, int64_t m, int arrays_n, int arrays_m, int rb, int R_target) {
  SmallPlan pl;
  const size_t limit = static_cast<size_t>(smem_optin_bytes());
  pl.R = R_target;
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

// The launch plan of B rows. rows_per_block in [1, kSmallMaxRows] (an explicit choice of the tuning ops): that
// target, lowered by small_plan_rows. kRowsAuto: one wave of CTAs, with as many CTAs as that allows: the smallest R
// with ceil(B / R) <= resident_ctas(plan) x SMs, where resident_ctas(plan) is how many CTAs of that plan (threads,
// dynamic shared memory) one SM holds at once (the occupancy calculator; registers included); kSmallMaxRows (as
// lowered) when B needs more than one wave even then. (Each CTA forms its own copy of M: more CTAs than fit at once
// would only queue behind the first wave.) Fewer or more rows per CTA change no result bit: every output is one
// thread's loop whatever R. The resident count does not grow with R (threads and shared memory do not shrink), so
// the search starts at the R that one wave of R = 1's resident count needs: a few occupancy queries.
template <typename T, class ResidentCtas>
SmallPlan small_plan(int64_t B, int64_t n, int64_t m, int arrays_n, int arrays_m, int rb, int rows_per_block,
                     const ResidentCtas& resident_ctas) {
  if (rows_per_block != kRowsAuto) return small_plan_rows<T>(n, m, arrays_n, arrays_m, rb, rows_per_block);
  const int64_t sms = sm_count();
  const int64_t most = int64_t(resident_ctas(small_plan_rows<T>(n, m, arrays_n, arrays_m, rb, 1))) * sms;
  int R = static_cast<int>(std::min<int64_t>(kSmallMaxRows, std::max<int64_t>(1, ceil_div(B, most))));
  for (;; ++R) {
    const SmallPlan pl = small_plan_rows<T>(n, m, arrays_n, arrays_m, rb, R);
    // shared memory caps R (larger targets give this same plan), or the largest R
    if (pl.R < R || R == kSmallMaxRows) return pl;
    if (ceil_div(B, pl.R) <= int64_t(resident_ctas(pl)) * sms) return pl;
  }
}

// The plans of the two directions: per row, the forward keeps 3 state arrays of n values and 1 of m, the backward
// 3 of n and 3 of m (the kernels' shared-memory layout); the resident CTAs are those of the kernel that runs.
template <typename T>
SmallPlan small_forward_plan(int64_t B, int64_t n, int64_t m, bool log_domain, int rows_per_block) {
  auto* kern = log_domain ? &small_forward_kernel<T, true> : &small_forward_kernel<T, false>;
  return small_plan<T>(B, n, m, 3, 1, log_domain ? 1 : kSmallRB, rows_per_block,
                       [&](const SmallPlan& pl) { return resident_ctas_per_sm(kern, pl.threads, pl.smem); });
}
template <typename T>
SmallPlan small_backward_plan(int64_t B, int64_t n, int64_t m, bool log_domain, int rows_per_block) {
  auto* kern = log_domain ? &small_backward_kernel<T, true> : &small_backward_kernel<T, false>;
  return small_plan<T>(B, n, m, 3, 3, log_domain ? 1 : kSmallRB, rows_per_block,
                       [&](const SmallPlan& pl) { return resident_ctas_per_sm(kern, pl.threads, pl.smem); });
}

}  // namespace
}  // namespace cuda_sinkhorn
}  // namespace wkd
