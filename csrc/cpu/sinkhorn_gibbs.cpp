// The BLAS path of the CPU Sinkhorn (a shared cost [n, m] in the scaling domain) and the CPU kernels of
// wkd::sinkhorn_gibbs / wkd::sinkhorn_gibbs_backward (contract: the schema comments in csrc/ops.cpp).
//
// Every half-iteration of the whole batch is one BLAS product (U @ K or V @ K^T, [B, n] x [n, m]); the first one
// (u0 is a masked constant) is replaced by the float64 column sums of K minus the few zero-mass rows, and the
// backward skips the product whose result (the adjoint of the constant u0) is unused. wkd::sinkhorn builds
// K = exp(-cost / reg) and K∘cost per call and runs this path; wkd::sinkhorn_gibbs takes them precomputed (once per
// cost: WKDLogitLoss), so that a call reads K once (its column sums and its checks, one pass) besides the products.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "../sinkhorn_common.h"
#include "interrupt.h"
#include "sinkhorn_cpu.h"
#include "sinkhorn_row_passes.h"

namespace wkd {
namespace sinkhorn_cpu {
namespace {

constexpr const char* kGibbs = "wkd.sinkhorn_gibbs";
constexpr const char* kGibbsBwd = "wkd.sinkhorn_gibbs_backward";

// Elementwise passes over [B, len] buffers, fused by hand and run in parallel over the batch, in chunks of whole rows
// of >= kRowChunkElements elements (each row by one thread: the digits do not depend on the thread count). The passes
// run between two BLAS products, whose OpenMP threads are still spinning, so a parallel region costs a few
// microseconds: at B = 256, C = 100 (25,600 elements a pass) two threads made a forward + backward ~10% faster with
// 8,192 than with 65,536 (one thread for the whole pass), on a 2-core machine.
constexpr int64_t kRowChunkElements = 8192;

template <typename F>
void rows_parallel(int64_t B, int64_t len, const F& f) {
  const int64_t rows_per_chunk = std::max<int64_t>(1, kRowChunkElements / std::max<int64_t>(len, 1));
  at::parallel_for(0, B, rows_per_chunk, [&](int64_t b0, int64_t b1) {
    for (int64_t bi = b0; bi < b1; ++bi) f(bi, bi * len);
  });
}

// One read of K [n, m]: cs_j = sum_i K_ij in float64 (in order of i; for float32 K, ATen's sum would first copy K
// to float64, 8 bytes an entry, and the sum rounded to float32 is the same), and the check that K is usable: every entry
// finite and >= 0 (else 1), no row and no column entirely 0 (else 2: the scaling iterations would divide by 0 on
// it; with K = exp(-cost / reg), where exp underflowed). Branch-free, so that it vectorises. Returns 0 when usable.
template <typename T>
int kernel_column_sums(const T* K, int64_t n, int64_t m, double* cs) {
  std::fill(cs, cs + m, 0.0);
  const T big = std::numeric_limits<T>::max();
  int in_range = 1, rows_live = 1;
  for (int64_t i = 0; i < n; ++i) {
    const T* Ki = K + i * m;
    int ok = 1, live = 0;  // NaN fails both comparisons
    for (int64_t j = 0; j < m; ++j) {
      cs[j] += double(Ki[j]);
      ok &= (Ki[j] >= T(0)) & (Ki[j] <= big);
      live |= Ki[j] > T(0);
    }
    in_range &= ok;
    rows_live &= live;
  }
  if (!in_range) return 1;
  for (int64_t j = 0; j < m; ++j) rows_live &= cs[j] > 0.0;
  return rows_live ? 0 : 2;
}

// s_1 = K^T u0 + eps with u0 = 1{a>0}/|supp a|: the column sums cs of K minus the few zero-mass rows, accumulated in
// float64. Returns false when rows have too many zeros (then the caller runs the product).
// The subtraction cancels where the zero-mass rows carry most of a column (e.g. a zero-mass row whose
// K entry is 1 over a column of exp(-37) entries: the difference is exactly 0 and v = b / 0): such a
// column is recomputed exactly over the support (column j of K, read with stride m, only for the
// affected columns: O(n) each). "Most" is dtype-aware: the float64 difference has an absolute error of a few
// float64 ulps of the column sum, so it is kept when that is below the output dtype's rounding
// (float32: the column sum exceeds the difference by < 2^20; float64: by < 2).
template <typename T>
bool first_half_by_colsum(const T* a, int64_t B, int64_t n, const T* kp, const double* cs, int64_t m, double eps,
                          T* out) {
  if (B == 0) return false;
  int64_t max_zeros = 0;
  for (int64_t k = 0; k < B * n; k += n) {
    int64_t zeros = 0;
    for (int64_t i = 0; i < n; ++i) zeros += a[k + i] <= T(0);
    max_zeros = std::max(max_zeros, zeros);
  }
  if (max_zeros * 8 > n) return false;
  const double keep_ratio = std::is_same<T, float>::value ? std::ldexp(1.0, -20) : 0.5;
  at::parallel_for(0, B, std::max<int64_t>(1, 65536 / m), [&](int64_t b0, int64_t b1) {
    std::vector<double> acc(m);
    for (int64_t bi = b0; bi < b1; ++bi) {
      std::copy(cs, cs + m, acc.begin());
      const T* arow = a + bi * n;
      int64_t zeros = 0;
      for (int64_t i = 0; i < n; ++i) {
        if (arow[i] > T(0)) continue;
        ++zeros;
        const T* Ki = kp + i * m;
        for (int64_t j = 0; j < m; ++j) acc[j] -= double(Ki[j]);
      }
      if (zeros > 0) {
        for (int64_t j = 0; j < m; ++j) {
          if (acc[j] > cs[j] * keep_ratio) continue;
          double exact = 0;  // cancelled: sum over the support exactly (column j of K, stride m; rare)
          for (int64_t i = 0; i < n; ++i) exact += arow[i] > T(0) ? double(kp[i * m + j]) : 0.0;
          acc[j] = exact;
        }
      }
      const double inv = 1.0 / double(n - zeros);
      for (int64_t j = 0; j < m; ++j) out[bi * m + j] = static_cast<T>(acc[j] * inv + eps);
    }
  });
  return true;
}

// Forward: s_t = U K + eps (one GEMM), v = b / s; r_t = V K^T + eps (one GEMM), u = a / r.
// History: hist_r[t] = r_t, hist_s[t] = s_t; y = (K∘C) v_T (the value is sum_i u_i y_i; the backward reuses y).
template <typename T>
Outputs forward_blas(const at::Tensor& a, const at::Tensor& b, const at::Tensor& K, const at::Tensor& KC,
                     int64_t T_iters, double eps, bool keep_history, const char* op, double reg) {
  const int64_t B = a.size(0), n = a.size(1), m = b.size(1);
  const row_passes::Table<T>& P = row_passes::table<T>();
  const T* k_p = K.data_ptr<T>();
  std::vector<double> colsum(m);
  const int k_state = kernel_column_sums<T>(k_p, n, m, colsum.data());
  if (k_state != 0 && reg > 0) kernel_range_error(op, a.scalar_type(), reg, false);
  TORCH_CHECK_VALUE(k_state != 1, op, ": `K` contains non-finite or negative values");
  TORCH_CHECK_VALUE(k_state != 2, op, ": `K` has a row or a column that is entirely 0 (K = exp(-cost / reg) "
                    "underflowed there): the scaling iterations would divide by 0. Use log_domain=True, or a larger "
                    "`reg`");
  if constexpr (std::is_same<T, double>::value) {  // float64: ATen's sums (no conversion copy), the digits of before
    const at::Tensor cs = K.sum(0);
    std::copy(cs.data_ptr<double>(), cs.data_ptr<double>() + m, colsum.begin());
  }
  at::Tensor hist_r = at::empty({keep_history ? T_iters : 0, B, n}, a.options());
  at::Tensor hist_s = at::empty({keep_history ? T_iters : 0, B, m}, a.options());
  at::Tensor r_tmp = keep_history ? at::Tensor() : at::empty_like(a);
  at::Tensor s_tmp = keep_history ? at::Tensor() : at::empty_like(b);
  at::Tensor u = at::empty_like(a), v = at::empty_like(b);
  const T *a_p = a.data_ptr<T>(), *b_p = b.data_ptr<T>();
  T *u_p = u.data_ptr<T>(), *v_p = v.data_ptr<T>();
  const T e = T(eps);
  for (int64_t t = 0; t < T_iters; ++t) {
    check_interrupt();  // Ctrl-C between iterations
    at::Tensor s = keep_history ? hist_s[t] : s_tmp;
    at::Tensor r = keep_history ? hist_r[t] : r_tmp;
    bool s_has_eps = true;
    if (t > 0 || !first_half_by_colsum<T>(a_p, B, n, k_p, colsum.data(), m, eps, s.data_ptr<T>())) {
      if (t == 0) {
        const at::Tensor supp = a.gt(0).to(a.scalar_type());
        at::div_out(u, supp, supp.sum(1, true));
      }
      at::mm_out(s, u, K);
      s_has_eps = false;
    }
    T* s_p = s.data_ptr<T>();
    rows_parallel(B, m, [&](int64_t, int64_t o) { P.add_divide(s_p + o, b_p + o, v_p + o, m, e, !s_has_eps); });
    at::mm_out(r, v, K.t());
    T* r_p = r.data_ptr<T>();
    rows_parallel(B, n, [&](int64_t, int64_t o) { P.add_divide(r_p + o, a_p + o, u_p + o, n, e, true); });
  }
  at::Tensor y = at::empty({B, n}, a.options());
  at::mm_out(y, v, KC.t());
  const at::Tensor value = at::empty({B}, a.options());
  T* val_p = value.data_ptr<T>();
  const T* y_p = y.data_ptr<T>();
  rows_parallel(B, n, [&](int64_t bi, int64_t o) { val_p[bi] = static_cast<T>(P.dot(u_p + o, y_p + o, n)); });
  return {value, u, v, hist_r, hist_s, keep_history ? y : at::empty({0, n}, a.options())};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> backward_blas(const at::Tensor& grad_value, const at::Tensor& a, const at::Tensor& b,
                                                 const at::Tensor& K, const at::Tensor& KC, const at::Tensor& hist_r,
                                                 const at::Tensor& hist_s, const at::Tensor& y, double eps,
                                                 bool correct) {
  const int64_t B = a.size(0), n = a.size(1), m = b.size(1);
  const row_passes::Table<T>& P = row_passes::table<T>();
  const int64_t T_iters = hist_s.size(0), last = T_iters - 1;
  const bool has_eps = eps > 0;
  const T *a_p = a.data_ptr<T>(), *b_p = b.data_ptr<T>(), *g_p = grad_value.data_ptr<T>();
  const T *hr = hist_r.data_ptr<T>(), *hs = hist_s.data_ptr<T>(), *y_p = y.data_ptr<T>();
  at::Tensor ga = at::empty_like(a), gb = at::empty_like(b), x = at::empty_like(a), ut = at::empty_like(a);
  at::Tensor zv = at::empty_like(b), tmp_m = at::empty_like(b), tmp_n = at::empty_like(a);
  T *ga_p = ga.data_ptr<T>(), *gb_p = gb.data_ptr<T>(), *x_p = x.data_ptr<T>(), *ut_p = ut.data_ptr<T>();
  T* zv_p = zv.data_ptr<T>();
  const T *tm_p = tmp_m.data_ptr<T>(), *tn_p = tmp_n.data_ptr<T>();
  // gauge[bi] = G_t of row bi; zs[bi] = sum_j b_j z_{t+1,j} / s_{t+1,j} (eps > 0); sbb[bi] = sum_j b_j^2
  std::vector<double> gauge(B, 0.0), zs(B, 0.0), sbb(B, 0.0);
  // direct_T = g (K∘C)^T u_T; w_T = g y / r_T; ga = w_T; x = w_T u_T
  const T* r_last = hr + last * B * n;
  rows_parallel(B, n, [&](int64_t bi, int64_t o) {
    P.last_w(a_p + o, r_last + o, y_p + o, g_p[bi], ut_p + o, ga_p + o, x_p + o, n);
    if (has_eps) gauge[bi] = eps * P.sum(x_p + o, n);  // sum_i a_i w_i / r_i = sum_i x_i
    sbb[bi] = P.dot(b_p + bi * m, b_p + bi * m, m);
  });
  at::Tensor direct = at::mm(ut, KC);
  const T* d_p = direct.data_ptr<T>();
  for (int64_t t = last; t >= 0; --t) {
    at::mm_out(tmp_m, x, K);  // K^T (w_t u_t) per row
    const T* s = hs + t * B * m;
    rows_parallel(B, m, [&](int64_t bi, int64_t o) {
      P.z(d_p + o, tm_p + o, s + o, g_p[bi], t == last, zv_p + o, m);  // z_t
      const double sbz = P.dot(b_p + o, zv_p + o, m);
      const double c = correct && sbb[bi] > 0 ? (sbz - gauge[bi]) / sbb[bi] : 0.0;  // the gauge correction
      P.correct(zv_p + o, gb_p + o, b_p + o, s + o, c, t == last, m);
      if (has_eps) zs[bi] = P.sum(zv_p + o, m);  // sum_j b_j z_j / s_j = sum_j (z v)_j
    });
    if (t == 0) break;
    at::mm_out(tmp_n, zv, K.t());  // K (z_t v_t) per row
    const T* r = hr + (t - 1) * B * n;
    rows_parallel(B, n, [&](int64_t bi, int64_t o) {
      P.w(tn_p + o, r + o, a_p + o, ga_p + o, x_p + o, n);
      if (has_eps) gauge[bi] += eps * (P.sum(x_p + o, n) - zs[bi]);
    });
  }
  return {ga, gb};
}

// --------------------------------- value checks ---------------------------------
template <typename T>
bool rows_valid(const at::Tensor& t, int64_t len, bool need_positive_rows) {
  const T* p = t.data_ptr<T>();
  const int64_t rows = t.numel() / len;
  const T big = std::numeric_limits<T>::max();
  std::atomic<bool> ok{true};
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(len, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1 && ok.load(std::memory_order_relaxed); ++r) {
      const T* x = p + r * len;
      int in_range = 1, positive = 0;  // NaN fails both comparisons
      for (int64_t k = 0; k < len; ++k) {
        in_range &= (x[k] >= T(0)) & (x[k] <= big);
        positive |= x[k] > T(0);
      }
      if (!in_range || (need_positive_rows && !positive)) ok.store(false, std::memory_order_relaxed);
    }
  });
  return ok.load();
}


// Shapes, dtypes and devices of the Gibbs ops' kernel matrices (the rest: check_sinkhorn_args with K as the cost).
void check_gibbs_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& K, const at::Tensor& KC,
                      int64_t num_iters, double eps, const char* op) {
  TORCH_CHECK_VALUE(K.dim() == 2, op, ": `K` must be [n, m] (the Gibbs kernel of a cost shared by the batch), got "
                    "shape ", K.sizes());
  TORCH_CHECK_VALUE(KC.sizes() == K.sizes(), op, ": `KC` must have the shape of `K` ", K.sizes(), ", got ",
                    KC.sizes());
  check_sinkhorn_args(a, b, K, 1.0, num_iters, eps, op);
  TORCH_CHECK_TYPE(KC.scalar_type() == a.scalar_type(), op, ": `KC` has dtype ", KC.scalar_type(), " but `a` has ",
                   a.scalar_type(), "; all inputs must share one dtype");
  TORCH_CHECK_VALUE(KC.device() == a.device(), op, ": `KC` is on ", KC.device(), " but `a` is on ", a.device());
}

// --------------------------------- op entry points of the Gibbs ops ---------------------------------
Outputs sinkhorn_gibbs_cpu(const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& K_in,
                           const at::Tensor& KC_in, int64_t num_iters, double eps, bool keep_history) {
  check_gibbs_args(a_in, b_in, K_in, KC_in, num_iters, eps, kGibbs);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), K = K_in.contiguous(), KC = KC_in.contiguous();
  check_values_cpu(a, b, at::Tensor(), kGibbs);
  Outputs out = forward_gibbs(a, b, K, KC, num_iters, eps, keep_history, kGibbs, 0.0);
  check_result_finite(std::get<0>(out), 0.0, kGibbs, false);
  return out;
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_gibbs_backward_cpu(
    const at::Tensor& grad_value, const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& K_in,
    const at::Tensor& KC_in, const at::Tensor& hist_r, const at::Tensor& hist_s, const at::Tensor& y,
    std::optional<double> eps) {
  check_gibbs_args(a_in, b_in, K_in, KC_in, 1, eps.value_or(0.0), kGibbsBwd);
  check_sinkhorn_backward_args(grad_value, a_in, b_in, hist_r, hist_s, y, kGibbsBwd);
  const at::Tensor g = grad_value.contiguous();
  auto out = backward_gibbs(g, a_in.contiguous(), b_in.contiguous(), K_in.contiguous(), KC_in.contiguous(),
                            hist_r.contiguous(), hist_s.contiguous(), y.contiguous(), eps.value_or(0.0),
                            eps.has_value());
  if (all_finite(g)) {
    check_result_finite(std::get<0>(out), 0.0, kGibbsBwd, true);
    check_result_finite(std::get<1>(out), 0.0, kGibbsBwd, true);
  }
  return out;
}

}  // namespace

void check_values_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& cost, const char* op) {
  const bool ok = AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "wkd_check_values", [&] {
    return rows_valid<scalar_t>(a, a.size(1), true) && rows_valid<scalar_t>(b, b.size(1), true) &&
           (!cost.defined() || rows_valid<scalar_t>(cost, cost.size(-1), false));
  });
  if (!ok) check_sinkhorn_values(a, b, cost.defined() ? cost : at::zeros({1, 1}, a.options()), op);
}

bool all_finite(const at::Tensor& t) {
  return AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "wkd_all_finite", [&] {
    const at::Tensor c = t.contiguous();
    const scalar_t* p = c.data_ptr<scalar_t>();
    int ok = 1;
    for (int64_t k = 0; k < c.numel(); ++k) ok &= std::isfinite(p[k]) ? 1 : 0;
    return ok != 0;
  });
}

void check_result_finite(const at::Tensor& t, double reg, const char* op, bool gradient) {
  if (all_finite(t)) return;
  const at::ScalarType st = t.scalar_type();
  const char* what = gradient ? "gradient" : "value";
  TORCH_CHECK_VALUE(reg <= 0, op, ": the scaling-domain iterations gave a non-finite ", what, " with `reg` = ", reg,
                    " in ", dtype_name(st), ": K = exp(-cost / reg) underflows (cost / reg > ",
                    st == at::kFloat ? 87 : 708, " somewhere) or the scalings overflow. Use log_domain=True, or a "
                    "larger `reg`");
  TORCH_CHECK_VALUE(false, op, ": the scaling-domain iterations gave a non-finite ", what, " in ", dtype_name(st),
                    ": entries of `K` underflow where the problem needs them, or the scalings overflow. Use "
                    "log_domain=True, or a larger `reg`");
}

Outputs forward_gibbs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& K, const at::Tensor& KC,
                      int64_t num_iters, double eps, bool keep_history, const char* op, double reg) {
  return AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "wkd_sinkhorn_blas", [&] {
    return forward_blas<scalar_t>(a, b, K, KC, num_iters, eps, keep_history, op, reg);
  });
}

std::tuple<at::Tensor, at::Tensor> backward_gibbs(const at::Tensor& grad_value, const at::Tensor& a,
                                                  const at::Tensor& b, const at::Tensor& K, const at::Tensor& KC,
                                                  const at::Tensor& hist_r, const at::Tensor& hist_s,
                                                  const at::Tensor& y, double eps, bool correct) {
  return AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "wkd_sinkhorn_blas_backward", [&] {
    return backward_blas<scalar_t>(grad_value, a, b, K, KC, hist_r, hist_s, y, eps, correct);
  });
}

}  // namespace sinkhorn_cpu

TORCH_LIBRARY_IMPL(wkd, CPU, m) {
  m.impl("sinkhorn_gibbs", &sinkhorn_cpu::sinkhorn_gibbs_cpu);
  m.impl("sinkhorn_gibbs_backward", &sinkhorn_cpu::sinkhorn_gibbs_backward_cpu);
}

}  // namespace wkd
