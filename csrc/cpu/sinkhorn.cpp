// CPU kernels of wkd::sinkhorn and wkd::sinkhorn_backward (contract: the schema comment in csrc/ops.cpp).
//
// Two paths:
//  * shared cost [n, m], scaling domain: K = exp(-cost / reg) and K∘cost are built here, then the BLAS path of
//    csrc/cpu/sinkhorn_gibbs.cpp (one BLAS product per half-iteration of the whole batch) runs on them, the one
//    wkd::sinkhorn_gibbs runs on a K and K∘cost built once per cost.
//  * per-row cost [B, n, m] or log domain: rows run in parallel (at::parallel_for), each with its own
//    n x m kernel buffer (K = exp(-cost/reg), or L = -cost/reg in the log domain) and plain loops.
// The exact backward walks the iterations in reverse from the stored r_t = K v_t + eps and
// s_t = K^T u_{t-1} + eps (or their logs): O(B (n + m) num_iters) memory, never B x n x m.
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

namespace wkd {
namespace sinkhorn_cpu {
namespace {

// ------------------------------- scaling-domain row helpers -------------------------------
// out_j = sum_i x_i M_ij (W_ij if W)      M, W row-major n x m
template <typename T>
void vec_mat(const T* M, const T* W, const T* x, T* out, int64_t n, int64_t m) {
  std::fill(out, out + m, T(0));
  for (int64_t i = 0; i < n; ++i) {
    const T xi = x[i];
    if (xi == T(0)) continue;
    const T* Mi = M + i * m;
    if (W) {
      const T* Wi = W + i * m;
      for (int64_t j = 0; j < m; ++j) out[j] += xi * (Mi[j] * Wi[j]);
    } else {
      for (int64_t j = 0; j < m; ++j) out[j] += xi * Mi[j];
    }
  }
}

// out_i = sum_j M_ij (W_ij if W) y_j
template <typename T>
void mat_vec(const T* M, const T* W, const T* y, T* out, int64_t n, int64_t m) {
  for (int64_t i = 0; i < n; ++i) {
    const T* Mi = M + i * m;
    T acc = 0;
    if (W) {
      const T* Wi = W + i * m;
      for (int64_t j = 0; j < m; ++j) acc += (Mi[j] * Wi[j]) * y[j];
    } else {
      for (int64_t j = 0; j < m; ++j) acc += Mi[j] * y[j];
    }
    out[i] = acc;
  }
}

// --------------------------------- log-domain row helpers ---------------------------------
// Column reduction: for each j, mx_j = max_i (p_i + L_ij) over i with finite p_i, and
// sum_j = sum_i c_i W_ij exp(p_i + L_ij - mx_j)   (c = 1 and W = 1 when null).
template <typename T>
void col_reduce(const T* L, const T* W, const T* p, const T* c, T* mx, T* sum, int64_t n, int64_t m) {
  const T ninf = -std::numeric_limits<T>::infinity();
  std::fill(mx, mx + m, ninf);
  std::fill(sum, sum + m, T(0));
  for (int64_t i = 0; i < n; ++i) {
    if (p[i] == ninf) continue;
    const T* Li = L + i * m;
    for (int64_t j = 0; j < m; ++j) mx[j] = std::max(mx[j], p[i] + Li[j]);
  }
  for (int64_t i = 0; i < n; ++i) {
    if (p[i] == ninf || (c && c[i] == T(0))) continue;
    const T* Li = L + i * m;
    const T ci = c ? c[i] : T(1);
    if (W) {
      const T* Wi = W + i * m;
      for (int64_t j = 0; j < m; ++j) sum[j] += ci * Wi[j] * std::exp(p[i] + Li[j] - mx[j]);
    } else {
      for (int64_t j = 0; j < m; ++j) sum[j] += ci * std::exp(p[i] + Li[j] - mx[j]);
    }
  }
}

// Row reduction: for each i, mx_i = max_j (L_ij + q_j), sum_i = sum_j c_j W_ij exp(L_ij + q_j - mx_i).
template <typename T>
void row_reduce(const T* L, const T* W, const T* q, const T* c, T* mx, T* sum, int64_t n, int64_t m) {
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    const T* Li = L + i * m;
    T mi = ninf;
    for (int64_t j = 0; j < m; ++j) mi = std::max(mi, Li[j] + q[j]);
    T acc = 0;
    if (mi != ninf) {
      for (int64_t j = 0; j < m; ++j) {
        if (q[j] == ninf || (c && c[j] == T(0))) continue;
        const T cj = (c ? c[j] : T(1)) * (W ? W[i * m + j] : T(1));
        acc += cj * std::exp(Li[j] + q[j] - mi);
      }
    }
    mx[i] = mi;
    sum[i] = acc;
  }
}

// log(exp(x) + eps)
template <typename T>
inline T log_add_eps(T x, T log_eps, bool has_eps) {
  if (!has_eps) return x;
  const T hi = std::max(x, log_eps), lo = std::min(x, log_eps);
  return hi + std::log1p(std::exp(lo - hi));
}

template <typename T>
inline T safe_log(T x) {
  return x > T(0) ? std::log(x) : -std::numeric_limits<T>::infinity();
}

// Kernel matrix of one cost block: K = exp(-C/reg) (scaling) or L = -C/reg (log domain).
template <typename T>
void kernel_matrix(const T* C, T* out, int64_t nm, T reg, bool log_domain) {
  if (log_domain)
    for (int64_t k = 0; k < nm; ++k) out[k] = -C[k] / reg;
  else
    for (int64_t k = 0; k < nm; ++k) out[k] = std::exp(-C[k] / reg);
}

// K (scaling) or L (log domain) of one [n, m] block is usable when no row and no column is entirely 0 (K: exp
// underflowed) or -inf (L: -cost/reg overflowed): otherwise every iteration divides by 0 on it.
template <typename T>
bool kernel_block_ok(const T* M, int64_t n, int64_t m, bool log_domain) {
  const T dead = log_domain ? -std::numeric_limits<T>::infinity() : T(0);
  std::vector<char> col(m, 0);
  for (int64_t i = 0; i < n; ++i) {  // branch-free, so that it vectorises
    const T* Mi = M + i * m;
    char any = 0;
    for (int64_t j = 0; j < m; ++j) {
      const char live = Mi[j] != dead;
      col[j] |= live;
      any |= live;
    }
    if (!any) return false;
  }
  return std::all_of(col.begin(), col.end(), [](char c) { return c != 0; });
}

// --------------------------------- one row, forward ---------------------------------
// M: K or L of this row; C: cost of this row. Writes value, u/v (log u/log v in the log domain)
// and, when r_hist/s_hist/y_out are non-null, r_t/s_t (at stride B*n / B*m) and y = (K∘C) v_T (logs in the
// log domain).
template <typename T>
void forward_row(const T* M, const T* C, const T* a, const T* b, int64_t n, int64_t m, int64_t T_iters, T eps,
                 bool log_domain, T* value, T* u, T* v, T* r_hist, T* s_hist, T* y_out, int64_t r_stride,
                 int64_t s_stride) {
  const int64_t nm = std::max(n, m);
  std::vector<T> r(n), s(m), tmp(nm), mx(log_domain ? nm : 0), sm(log_domain ? nm : 0);
  int64_t cnt = 0;
  for (int64_t i = 0; i < n; ++i) cnt += a[i] > T(0);
  const bool has_eps = eps > T(0);
  const T log_eps = has_eps ? std::log(eps) : T(0);
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i)
    u[i] = log_domain ? (a[i] > T(0) ? -std::log(T(cnt)) : ninf) : (a[i] > T(0) ? T(1) / T(cnt) : T(0));
  for (int64_t t = 0; t < T_iters; ++t) {
    if (!log_domain) {
      vec_mat<T>(M, nullptr, u, s.data(), n, m);
      for (int64_t j = 0; j < m; ++j) {
        s[j] += eps;
        v[j] = b[j] / s[j];
      }
      mat_vec<T>(M, nullptr, v, r.data(), n, m);
      for (int64_t i = 0; i < n; ++i) {
        r[i] += eps;
        u[i] = a[i] / r[i];
      }
    } else {
      col_reduce<T>(M, nullptr, u, nullptr, mx.data(), sm.data(), n, m);
      for (int64_t j = 0; j < m; ++j) {
        s[j] = log_add_eps(mx[j] + safe_log(sm[j]), log_eps, has_eps);
        v[j] = safe_log(b[j]) - s[j];
      }
      row_reduce<T>(M, nullptr, v, nullptr, mx.data(), sm.data(), n, m);
      for (int64_t i = 0; i < n; ++i) {
        r[i] = log_add_eps(mx[i] + safe_log(sm[i]), log_eps, has_eps);
        u[i] = safe_log(a[i]) - r[i];
      }
    }
    if (r_hist) {
      std::copy(r.begin(), r.end(), r_hist + t * r_stride);
      std::copy(s.begin(), s.end(), s_hist + t * s_stride);
    }
  }
  T acc = 0;  // y = (K∘C) v_T (scaling), log y = log (K∘C) v_T (log domain); value = sum_i u_i y_i
  if (!log_domain) {
    mat_vec<T>(M, C, v, tmp.data(), n, m);
    for (int64_t i = 0; i < n; ++i) acc += u[i] * tmp[i];
  } else {
    row_reduce<T>(M, C, v, nullptr, mx.data(), sm.data(), n, m);
    for (int64_t i = 0; i < n; ++i) {
      tmp[i] = mx[i] + safe_log(sm[i]);
      if (u[i] != ninf && sm[i] != T(0)) acc += std::exp(u[i] + mx[i]) * sm[i];
    }
  }
  *value = acc;
  if (y_out) std::copy(tmp.begin(), tmp.begin() + n, y_out);
}

// --------------------------------- one row, backward ---------------------------------
// Reverse sweep (scaling form; w_t = dL/du_t / r_t, z_t = dL/dv_t / s_t):
//   w_T = g (K∘C) v_T / r_T,  direct_T = g (K∘C)^T u_T
//   for t = T..1:  ga += w_t;  z_t = (direct_T if t = T) - K^T (w_t u_t) / s_t;  gauge_correct(z_t);  gb += z_t
//                  w_{t-1} = -K (z_t v_t) / r_{t-1}        (t > 1; u0 is a constant)
//
// Gauge correction (derivation and why: docs/design.md section 3). The exact adjoint obeys sum_j b_j z_t,j = G_t,
//   G_T = eps sum_i a_i w_T,i / r_T,i,  G_t = G_{t+1} + eps (sum_i a_i w_t,i / r_t,i - sum_j b_j z_{t+1,j} / s_{t+1,j})
// (0 for eps = 0: rescaling v_t leaves the value unchanged). The sweep's z_t violates it by a rounding residual,
// which zero-mass entries amplify by up to exp(max cost / reg); z_t -= b (sum_j b_j z_t,j - G_t) / sum_j b_j^2
// restores it. Without eps (the legacy call, correct = false) nothing is corrected.

template <typename T>
void backward_row(const T* M, const T* C, const T* a, const T* b, T g, int64_t n, int64_t m, int64_t T_iters,
                  bool log_domain, const T* r_hist, const T* s_hist, const T* y_in, int64_t r_stride,
                  int64_t s_stride, T* ga, T* gb, double eps, bool correct) {
  const int64_t nm = std::max(n, m), last = T_iters - 1;
  std::vector<T> w(n), z(m), direct(m), ut(n), vt(m), x(n), y(m), tmp(nm);
  std::vector<T> mx(log_domain ? nm : 0), sm(log_domain ? nm : 0), loga(log_domain ? n : 0), logb(log_domain ? m : 0);
  std::fill(ga, ga + n, T(0));
  std::fill(gb, gb + m, T(0));
  auto r_at = [&](int64_t t) { return r_hist + t * r_stride; };
  auto s_at = [&](int64_t t) { return s_hist + t * s_stride; };
  const T ninf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < int64_t(loga.size()); ++i) loga[i] = safe_log(a[i]);
  for (int64_t j = 0; j < int64_t(logb.size()); ++j) logb[j] = safe_log(b[j]);
  auto load_uv = [&](int64_t t) {  // u_t, v_t (scaling) or log u_t, log v_t (log domain)
    const T* r = r_at(t);
    const T* s = s_at(t);
    for (int64_t i = 0; i < n; ++i) ut[i] = log_domain ? loga[i] - r[i] : a[i] / r[i];
    for (int64_t j = 0; j < m; ++j) vt[j] = log_domain ? logb[j] - s[j] : b[j] / s[j];
  };
  load_uv(last);
  // w_T from y = (K∘C) v_T (or its log), stored by the forward; direct_T = (K∘C)^T u_T (times g in the log domain)
  for (int64_t i = 0; i < n; ++i)
    w[i] = !log_domain ? g * y_in[i] / r_at(last)[i] : y_in[i] == ninf ? T(0) : g * std::exp(y_in[i] - r_at(last)[i]);
  if (!log_domain) {
    vec_mat<T>(M, C, ut.data(), direct.data(), n, m);
  } else {
    col_reduce<T>(M, C, ut.data(), nullptr, mx.data(), sm.data(), n, m);
    for (int64_t j = 0; j < m; ++j)
      direct[j] = sm[j] == T(0) ? T(0) : g * std::exp(mx[j] - s_at(last)[j]) * sm[j];
  }
  double G = 0, zs = 0;  // G_t; sum_j b_j z_{t+1,j} / s_{t+1,j} of the previous step (eps > 0)
  // The log domain folds eps into its sums (eps / r_t as exp(log eps - log r_t)): there the factor is 1.
  const double log_eps = eps > 0 ? std::log(eps) : 0.0, sum_factor = log_domain ? 1.0 : eps;
  auto eps_term = [&](double num, double den) {  // num / den; the log domain: num eps / exp(den), den = log r or log s
    return log_domain ? num * std::exp(log_eps - den) : num / den;
  };
  for (int64_t t = last; t >= 0; --t) {
    if (t != last) load_uv(t);
    double awr = 0;  // sum_i a_i w_t,i / r_t,i
    const T* r = r_at(t);
    for (int64_t i = 0; i < n; ++i) {
      ga[i] += w[i];
      if (!log_domain) x[i] = w[i] * ut[i];
      if (eps > 0 && a[i] > T(0)) awr += eps_term(double(a[i]) * double(w[i]), double(r[i]));
    }
    G = (t == last ? 0.0 : G - sum_factor * zs) + sum_factor * awr;
    if (!log_domain) vec_mat<T>(M, nullptr, x.data(), tmp.data(), n, m);
    else col_reduce<T>(M, nullptr, ut.data(), w.data(), mx.data(), sm.data(), n, m);
    const T* s = s_at(t);
    double sbz = 0, sbb = 0;
    for (int64_t j = 0; j < m; ++j) {
      if (!log_domain) {
        z[j] = ((t == last ? g * direct[j] : T(0)) - tmp[j]) / s[j];
      } else {
        const T prod = sm[j] == T(0) ? T(0) : std::exp(mx[j] - s[j]) * sm[j];
        z[j] = (t == last ? direct[j] : T(0)) - prod;
      }
      sbz += double(b[j]) * double(z[j]);
      sbb += double(b[j]) * double(b[j]);
    }
    const double c = correct && sbb > 0 ? (sbz - G) / sbb : 0.0;  // z_t -= c b restores sum_j b_j z_t,j = G_t
    zs = 0;  // sum_j b_j z_j / s_j (log domain: times eps)
    for (int64_t j = 0; j < m; ++j) {
      z[j] = T(double(z[j]) - c * double(b[j]));
      if (eps > 0 && b[j] > T(0)) zs += eps_term(double(b[j]) * double(z[j]), double(s[j]));
      gb[j] += z[j];
      if (!log_domain) y[j] = z[j] * vt[j];
    }
    if (t == 0) break;
    const T* rp = r_at(t - 1);
    if (!log_domain) {
      mat_vec<T>(M, nullptr, y.data(), tmp.data(), n, m);
      for (int64_t i = 0; i < n; ++i) w[i] = -tmp[i] / rp[i];
    } else {
      row_reduce<T>(M, nullptr, vt.data(), z.data(), mx.data(), sm.data(), n, m);
      for (int64_t i = 0; i < n; ++i) w[i] = sm[i] == T(0) ? T(0) : -std::exp(mx[i] - rp[i]) * sm[i];
    }
  }
}

// --------------------------------- per-row path ---------------------------------
// Calls row(bi, M, C) for every row bi, rows in parallel, with C the cost of row bi and M its kernel matrix (K, or L
// in the log domain): one for a shared cost, else built per row into a per-thread buffer. Rows run in blocks (of
// >= ~2^24 multiply-adds), each one parallel region: Ctrl-C is seen between blocks (the interrupt check must run on
// the calling thread). With check_range, a dead row or column of M (kernel_block_ok) skips it and returns false.
template <typename T, typename F>
bool for_each_row(const at::Tensor& cost, int64_t B, int64_t n, int64_t m, int64_t T_iters, double reg,
                  bool log_domain, bool check_range, const F& row) {
  const bool shared = cost.dim() == 2;
  const at::Tensor shared_M = !shared ? at::Tensor() : log_domain ? cost.div(-reg) : at::exp(cost.div(-reg));
  const T* sM = shared ? shared_M.data_ptr<T>() : nullptr;
  if (shared && check_range && !kernel_block_ok<T>(sM, n, m, log_domain)) return false;
  const T* c_p = cost.data_ptr<T>();
  std::atomic<bool> range_ok{true};
  const int64_t per_row = std::max<int64_t>(1, 2 * T_iters * n * m);
  const int64_t rows_per_block = std::max<int64_t>(at::get_num_threads(), (int64_t(1) << 24) / per_row);
  for (int64_t blk = 0; blk < B; blk += rows_per_block) {
    check_interrupt();
    at::parallel_for(blk, std::min(B, blk + rows_per_block), 1, [&](int64_t b0, int64_t b1) {
      std::vector<T> Mbuf(shared ? 0 : n * m);
      for (int64_t bi = b0; bi < b1; ++bi) {
        const T* C = shared ? c_p : c_p + bi * n * m;
        const T* M = sM;
        if (!shared) {
          kernel_matrix<T>(C, Mbuf.data(), n * m, T(reg), log_domain);
          M = Mbuf.data();
          if (check_range && !kernel_block_ok<T>(M, n, m, log_domain)) {
            range_ok.store(false);
            continue;
          }
        }
        row(bi, M, C);
      }
    });
  }
  return range_ok.load();
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_rows(
    const at::Tensor& a, const at::Tensor& b, const at::Tensor& cost, double reg, int64_t T_iters, double eps,
    bool log_domain, bool keep_history) {
  const int64_t B = a.size(0), n = a.size(1), m = b.size(1), T_hist = keep_history ? T_iters : 0;
  at::Tensor value = at::empty({B}, a.options()), u = at::empty_like(a), v = at::empty_like(b);
  at::Tensor hist_r = at::empty({T_hist, B, n}, a.options()), hist_s = at::empty({T_hist, B, m}, a.options());
  at::Tensor y = at::empty({keep_history ? B : 0, n}, a.options());
  const T *a_p = a.data_ptr<T>(), *b_p = b.data_ptr<T>();
  T *val_p = value.data_ptr<T>(), *u_p = u.data_ptr<T>(), *v_p = v.data_ptr<T>();
  T* hr = keep_history ? hist_r.data_ptr<T>() : nullptr;
  T* hs = keep_history ? hist_s.data_ptr<T>() : nullptr;
  T* yp = keep_history ? y.data_ptr<T>() : nullptr;
  const bool ok = for_each_row<T>(cost, B, n, m, T_iters, reg, log_domain, true,
                                  [&](int64_t bi, const T* M, const T* C) {
    forward_row<T>(M, C, a_p + bi * n, b_p + bi * m, n, m, T_iters, T(eps), log_domain, val_p + bi, u_p + bi * n,
                   v_p + bi * m, hr ? hr + bi * n : nullptr, hs ? hs + bi * m : nullptr, yp ? yp + bi * n : nullptr,
                   B * n, B * m);
  });
  if (!ok) kernel_range_error(kFwd, a.scalar_type(), reg, log_domain);
  return {value, u, v, hist_r, hist_s, y};
}

template <typename T>
std::tuple<at::Tensor, at::Tensor> backward_rows(const at::Tensor& grad_value, const at::Tensor& a, const at::Tensor& b,
                                                 const at::Tensor& cost, const at::Tensor& hist_r,
                                                 const at::Tensor& hist_s, const at::Tensor& y, double reg,
                                                 bool log_domain, double eps, bool correct) {
  const int64_t B = a.size(0), n = a.size(1), m = b.size(1), T_iters = hist_s.size(0);
  at::Tensor ga = at::empty_like(a), gb = at::empty_like(b);
  const T *a_p = a.data_ptr<T>(), *b_p = b.data_ptr<T>(), *g_p = grad_value.data_ptr<T>();
  const T *hr = hist_r.data_ptr<T>(), *hs = hist_s.data_ptr<T>(), *yp = y.data_ptr<T>();
  T *ga_p = ga.data_ptr<T>(), *gb_p = gb.data_ptr<T>();
  for_each_row<T>(cost, B, n, m, T_iters, reg, log_domain, false,
                  [&](int64_t bi, const T* M, const T* C) {
    backward_row<T>(M, C, a_p + bi * n, b_p + bi * m, g_p[bi], n, m, T_iters, log_domain, hr + bi * n, hs + bi * m,
                    yp + bi * n, B * n, B * m, ga_p + bi * n, gb_p + bi * m, eps, correct);
  });
  return {ga, gb};
}

// --------------------------------- op entry points ---------------------------------
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_cpu(
    const at::Tensor& a_in, const at::Tensor& b_in, const at::Tensor& cost_in, double reg, int64_t num_iters,
    double eps, bool log_domain, bool keep_history) {
  const SinkhornDims d = check_sinkhorn_args(a_in, b_in, cost_in, reg, num_iters, eps, kFwd);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), cost = cost_in.contiguous();
  check_values_cpu(a, b, cost, kFwd);
  const bool f32 = a.scalar_type() == at::kFloat;
  TORCH_CHECK_VALUE(!f32 || static_cast<float>(reg) > 0.f, kFwd, ": `reg` = ", reg,
                    " underflows to 0 in float32 (cost / reg is computed in the dtype of the inputs); use a larger "
                    "`reg` or float64");
  Outputs out;
  if (d.shared_cost && !log_domain) {
    at::Tensor K = cost.div(-reg);
    K.exp_();  // K = exp(-cost / reg), in place (the values of at::exp)
    out = forward_gibbs(a, b, K, K.mul(cost), num_iters, eps, keep_history, kFwd, reg);
  } else {
    out = AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "wkd_sinkhorn_cpu", [&] {
      return forward_rows<scalar_t>(a, b, cost, reg, num_iters, eps, log_domain, keep_history);
    });
  }
  if (!log_domain) check_result_finite(std::get<0>(out), reg, kFwd, false);
  return out;
}

std::tuple<at::Tensor, at::Tensor> sinkhorn_backward_cpu(const at::Tensor& grad_value, const at::Tensor& a_in,
                                                         const at::Tensor& b_in, const at::Tensor& cost_in,
                                                         const at::Tensor& hist_r_in, const at::Tensor& hist_s_in,
                                                         const at::Tensor& y_in, double reg, bool log_domain,
                                                         std::optional<double> eps_in) {
  const SinkhornDims d = check_sinkhorn_args(a_in, b_in, cost_in, reg, 1, eps_in.value_or(0.0), kBwd);
  const double eps = eps_in.value_or(0.0);
  const bool correct = eps_in.has_value();
  check_sinkhorn_backward_args(grad_value, a_in, b_in, hist_r_in, hist_s_in, y_in, kBwd);
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous(), cost = cost_in.contiguous();
  const at::Tensor hist_r = hist_r_in.contiguous(), hist_s = hist_s_in.contiguous(), y = y_in.contiguous();
  const at::Tensor g = grad_value.contiguous();
  at::Tensor ga, gb;
  if (d.shared_cost && !log_domain) {
    at::Tensor K = cost.div(-reg);
    K.exp_();
    std::tie(ga, gb) = backward_gibbs(g, a, b, K, K.mul(cost), hist_r, hist_s, y, eps, correct);
  } else {
    std::tie(ga, gb) = AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "wkd_sinkhorn_backward_cpu", [&] {
      return backward_rows<scalar_t>(g, a, b, cost, hist_r, hist_s, y, reg, log_domain, eps, correct);
    });
  }
  if (!log_domain && all_finite(g)) {
    check_result_finite(ga, reg, kBwd, true);
    check_result_finite(gb, reg, kBwd, true);
  }
  return {ga, gb};
}

}  // namespace
}  // namespace sinkhorn_cpu

TORCH_LIBRARY_IMPL(wkd, CPU, m) {
  m.impl("sinkhorn", &sinkhorn_cpu::sinkhorn_cpu);
  m.impl("sinkhorn_backward", &sinkhorn_cpu::sinkhorn_backward_cpu);
}

}  // namespace wkd
