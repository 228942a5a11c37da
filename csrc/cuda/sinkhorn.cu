// Hand-written CUDA C++ kernels of wkd::sinkhorn and wkd::sinkhorn_backward, registered on their CUDA dispatch key
// (contract: the schema comment in csrc/ops.cpp; the recurrences mirror csrc/cpu/sinkhorn.cpp line by line).
//
// Size rule: a shared cost with n, m <= 256 (CIFAR-100, COCO's 81 / 91 classes, ...), either domain, runs the
// single-launch kernels (csrc/cuda/sinkhorn/small_kernels.cuh): the whole forward in one launch and
// the whole exact backward in one launch (+ one build launch each where the kernel matrix does not fit in shared
// memory). Everything else runs the per-half-iteration kernels described here:
//
// Shared cost [n, m] (n or m > 256), scaling domain: every half-iteration of the whole batch is one
// [B, k] x [k, N] product done by gemm_epi_kernel, a tiled shared-memory SIMT GEMM whose epilogue fuses
// what follows the product (+eps, the division, the history write, the backward's accumulations):
//   * tiles: BM x BN outputs per block, from a small table (the tile table in gemm_kernels.cuh; by default
//     32 x 64, 128 threads, 4 x 4 outputs per thread; or 16 x 32, 64 threads, 2 x 4 when the big tiles would not
//     fill half the SMs; a 64 x 64 / 256-thread entry with two CTAs per SM is selectable per call through the
//     tuning ops), k-slabs of 128 bytes (32 floats / 16 doubles), double-buffered in shared memory with a
//     register-staged prefetch of the next slab, 16-byte global loads when rows are 16-byte aligned (scalar
//     fallback with bounds checks otherwise; the kernel matrices' leading dimensions are padded to 16 elements, so
//     their loads always are), 16-byte shared-memory reads (one A read serves 4 k-steps).
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
// Files (csrc/cuda/sinkhorn/): platform.cuh (CUDA runtime or its host emulation, launch macros, device
// attributes), device_math.cuh (device math with the CPU op's semantics, warp reductions, 16-byte vector access),
// lse.cuh (the log-sum-exp of every log-domain pass), gauge.cuh (the backward's gauge correction),
// gemm_kernels.cuh (GEMM, epilogues, tile table, prep kernels), row_kernels.cuh (per-row kernels),
// small_kernels.cuh and small_plan.cuh (single-launch kernels and their launch plan), launch.h (the host
// interface below, for the other translation units). The benchmarking ops wkd_tuning::* (the entry points below
// with the launch choices as per-call arguments) are bench/cuda/sinkhorn_tuning_ops.cu, compiled next to this file
// only with setup.py's WKD_BUILD_TUNING_OPS=1. This file: the launch logic of the three kernel families and the
// registration on wkd's CUDA key.
//
// WKD_CUDA_EMULATE (verification only, never set by the build): these sources compile as host C++ against
// csrc/cuda/cuda_emu.cuh, a cooperative-fiber emulator of the CUDA subset they use;
// python_tests/cuda_emulation/emu_sinkhorn_cuda.cpp includes this file and the tuning ops and registers the entry
// points below as CPU kernels of a library of its own (wkd_cuda_emu, wkd_cuda_emu_tuning), so that the kernels
// and their launch code are checked against the CPU op without a GPU. This file then registers nothing.
#include "sinkhorn/gemm_kernels.cuh"
#include "sinkhorn/row_kernels.cuh"
#include "sinkhorn/small_plan.cuh"

#include "../sinkhorn_common.h"

namespace wkd {
namespace cuda_sinkhorn {
namespace {

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

}  // namespace

// ------------------------------------------------------------------------------------------ entry points
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

int64_t num_tiles() { return kNumTiles; }

std::vector<int64_t> tile_table_entries() {
  std::vector<int64_t> out;
  for (const TileCfg& c : kTileTable) out.insert(out.end(), {c.bm, c.bn, c.tm, c.tn, c.min_blocks});
  return out;
}

std::vector<int64_t> small_plan_summary(int64_t B, int64_t n, int64_t m, at::ScalarType dtype, bool log_domain,
                                        bool backward, int rows_per_block) {
  SmallPlan pl;
  AT_DISPATCH_FLOATING_TYPES(dtype, "wkd_small_plan_summary", [&] {
    pl = backward ? small_backward_plan<scalar_t>(B, n, m, log_domain, rows_per_block)
                  : small_forward_plan<scalar_t>(B, n, m, log_domain, rows_per_block);
  });
  return {pl.R, ceil_div(B, pl.R), pl.threads, pl.m_in_smem ? 1 : 0, static_cast<int64_t>(pl.smem)};
}

#ifndef WKD_CUDA_EMULATE
namespace {

// The product ops: the automatic launch choices.
SinkhornOutputs sinkhorn_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& cost, double reg,
                              int64_t num_iters, double eps, bool log_domain, bool keep_history) {
  return sinkhorn_run("wkd.sinkhorn", a, b, cost, reg, num_iters, eps, log_domain, keep_history, LaunchChoice{});
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_backward_cuda(const at::Tensor& grad_value, const at::Tensor& a,
                                                          const at::Tensor& b, const at::Tensor& cost,
                                                          const at::Tensor& hist_r, const at::Tensor& hist_s,
                                                          const at::Tensor& y, double reg, bool log_domain,
                                                          std::optional<double> eps) {
  return sinkhorn_backward_run("wkd.sinkhorn_backward", grad_value, a, b, cost, hist_r, hist_s, y, reg, log_domain,
                               LaunchChoice{}, eps);
}

}  // namespace

TORCH_LIBRARY_IMPL(wkd, CUDA, m) {
  m.impl("sinkhorn", &sinkhorn_cuda);
  m.impl("sinkhorn_backward", &sinkhorn_backward_cuda);
}
#endif

}  // namespace cuda_sinkhorn
}  // namespace wkd
