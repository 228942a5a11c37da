// Sparse (CSR) Sinkhorn on CPU: the CPU kernels of wkd::sparse_sinkhorn and wkd::sparse_sinkhorn_backward (contract:
// the schema comment in csrc/ops.cpp; docs/vocabulary_ot.md).
//
// One shared CSR kernel K = exp(-cost / reg) [C, C] (and K∘cost) serves every row of masses, held as the columns
// of [C, B] tensors. Each product is one pass over the rows of K (or of K^T, its CSR transpose), rows in parallel
// (at::parallel_for over fixed chunks of rows): per stored entry a contiguous run of B values is gathered and
// accumulated (the access of a CSR x dense product), and the eps, the division by the masses and the history write
// are fused into the same pass, so each half-iteration reads and writes every [C, B] array once. Per-token sums
// (the value, the gauge sums of the backward) are float64, per chunk, added in chunk order: results do not depend
// on the thread count. The exact backward is the reverse sweep of wkd::sinkhorn_backward (docs/design.md section 3)
// with its gauge correction, over the O(T C B) history the forward kept.
//
// The gathers of random rows are latency-bound: each row prefetches the runs of the next row in software, which
// doubled their speed (loaded 2-core VM, single thread, V = 50,257, B = 128, random k = 8 graph), to parity with
// the ATen (MKL) CSR x dense product there; with 2 threads at B = 512 the forward alone measured slower than that
// product and the exact forward + backward faster (the fused reverse sweep), which is the rule of backend="auto"
// (wkd_kernels/ops/sparse_sinkhorn.py). A first version in blocks of 16 tokens with compact [C, 16] scalings
// (K streamed once per half-iteration per block) gathered one 64-byte line per stored entry and was slower still.
//
// The log domain (small reg) runs the ATen implementation (wkd::sparse_sinkhorn_torch[_backward], registered from
// Python): its segment log-sum-exp reductions are not re-implemented here.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "interrupt.h"

namespace wkd {
namespace {

using Tensors6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// ---------------------------------------------------------------------------------------------------------------
// Argument checks (the errors name the argument, as the Python checks of wkd_kernels/ops/sparse_sinkhorn.py)
// ---------------------------------------------------------------------------------------------------------------
void check_pattern(const at::Tensor& a, const at::Tensor& crow, const at::Tensor& col, const at::Tensor& cost,
                   const char* sfx, const char* op) {
  const int64_t C = a.size(0);
  TORCH_CHECK(crow.dim() == 1 && crow.size(0) == C + 1 &&
                  (crow.scalar_type() == at::kInt || crow.scalar_type() == at::kLong),
              op, ": `crow", sfx, "` must be an int32/int64 [C + 1] = [", C + 1, "] tensor");
  TORCH_CHECK(col.dim() == 1 && (col.scalar_type() == at::kInt || col.scalar_type() == at::kLong), op, ": `col",
              sfx, "` must be an int32/int64 [nnz] tensor");
  TORCH_CHECK(cost.dim() == 1 && cost.size(0) == col.size(0), op, ": `cost", sfx, "` must be [nnz] like `col", sfx,
              "` (", col.size(0), ")");
  TORCH_CHECK(cost.scalar_type() == a.scalar_type(), op, ": `cost", sfx, "` must have the dtype of `a`");
  TORCH_CHECK(crow.device().is_cpu() && col.device().is_cpu() && cost.device().is_cpu(), op, ": `crow", sfx,
              "`, `col", sfx, "`, `cost", sfx, "` must be CPU tensors");
}

void check_args(const at::Tensor& a, const at::Tensor& b, const at::Tensor& crow, const at::Tensor& col,
                const at::Tensor& cost, const at::Tensor& crow_t, const at::Tensor& col_t, const at::Tensor& cost_t,
                double reg, int64_t num_iters, double eps, const char* op) {
  TORCH_CHECK(a.dim() == 2, op, ": `a` must be a [C, B] tensor, got ", a.sizes());
  TORCH_CHECK(b.dim() == 2, op, ": `b` must be a [C, B] tensor, got ", b.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble, op,
              ": `a` must be float32 or float64, got ", a.scalar_type());
  TORCH_CHECK(b.sizes() == a.sizes(), op, ": `b` must have the shape of `a` ", a.sizes(), ", got ", b.sizes());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), op, ": `b` must have the dtype of `a`");
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), op, ": `a` and `b` must be CPU tensors");
  check_pattern(a, crow, col, cost, "", op);
  check_pattern(a, crow_t, col_t, cost_t, "_t", op);
  TORCH_CHECK(col_t.size(0) == col.size(0), op, ": `col_t` must hold the nnz = ", col.size(0),
              " entries of `col`, got ", col_t.size(0));
  TORCH_CHECK(reg > 0 && std::isfinite(reg), op, ": `reg` must be a positive finite number, got ", reg);
  TORCH_CHECK(num_iters >= 1, op, ": `num_iters` must be >= 1, got ", num_iters);
  TORCH_CHECK(eps >= 0 && std::isfinite(eps), op, ": `eps` must be a finite number >= 0, got ", eps);
}

// One CSR orientation, ready for the passes: int64 row pointers and columns, K and K∘cost values.
template <typename T>
struct Csr {
  at::Tensor crow_, col_, k_, kc_;
  const int64_t* crow;
  const int64_t* col;
  const T* k;
  const T* kc;
  Csr(const at::Tensor& crow_in, const at::Tensor& col_in, const at::Tensor& cost, double reg, bool weighted) {
    crow_ = crow_in.to(at::kLong).contiguous();
    col_ = col_in.to(at::kLong).contiguous();
    const at::Tensor c = cost.contiguous();
    k_ = at::exp(c * (-1.0 / reg));
    crow = crow_.data_ptr<int64_t>();
    col = col_.data_ptr<int64_t>();
    k = k_.data_ptr<T>();
    if (weighted) {
      kc_ = k_ * c;
      kc = kc_.data_ptr<T>();
    } else {
      kc = nullptr;
    }
    const int64_t nnz = col_.numel(), C = crow_.numel() - 1;
    TORCH_CHECK(crow[0] == 0 && crow[C] == nnz, "wkd.sparse_sinkhorn: `crow` must run from 0 to nnz = ", nnz);
  }
};

// acc[0:B] = sum over the stored entries e of row i of w[e] x[col[e], 0:B]  (x: [C, B] contiguous). Tiles of TL
// tokens held in registers while the row's entries are walked: the loads of the row's entries are independent and
// in flight together (the gathers are memory-bound), and acc is written once.
constexpr int64_t TL = 32;

template <typename T>
static inline __attribute__((always_inline)) void gather_body(const int64_t* __restrict crow,
                                                              const int64_t* __restrict col, const T* __restrict w,
                                                              const T* __restrict x, int64_t B, int64_t i,
                                                              T* __restrict acc, int64_t n_rows) {
  const int64_t e0 = crow[i], e1 = crow[i + 1];
  if (i + 1 < n_rows) {  // software prefetch of the next row's gathered runs (random rows: the hardware cannot)
    constexpr int64_t per_line = 64 / sizeof(T);
    for (int64_t e = e1, e2 = crow[i + 2]; e < e2; ++e) {
      const T* xr = x + col[e] * B;
      for (int64_t l = 0; l < B; l += per_line) __builtin_prefetch(xr + l);
    }
  }
  int64_t l0 = 0;
  for (; l0 + TL <= B; l0 += TL) {
    T t[TL];
    for (int64_t l = 0; l < TL; ++l) t[l] = T(0);
    for (int64_t e = e0; e < e1; ++e) {
      const T we = w[e];
      const T* __restrict xr = x + col[e] * B + l0;
      for (int64_t l = 0; l < TL; ++l) t[l] += we * xr[l];
    }
    for (int64_t l = 0; l < TL; ++l) acc[l0 + l] = t[l];
  }
  for (int64_t l = l0; l < B; ++l) {
    T t = T(0);
    for (int64_t e = e0; e < e1; ++e) t += w[e] * x[col[e] * B + l];
    acc[l] = t;
  }
}

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
// The extension is compiled for the baseline ISA (SSE2); the gathers get an AVX2 + FMA copy, chosen at run time.
template <typename T>
__attribute__((target("avx2,fma"))) void gather_row_avx2(const int64_t* crow, const int64_t* col, const T* w,
                                                         const T* x, int64_t B, int64_t i, T* acc, int64_t n_rows) {
  gather_body(crow, col, w, x, B, i, acc, n_rows);
}
static bool has_avx2() {
  static const bool yes = [] {
    __builtin_cpu_init();  // needed before __builtin_cpu_supports in code that may run during static initialisation
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
}
#endif

template <typename T>
inline void gather_row(const int64_t* crow, const int64_t* col, const T* w, const T* x, int64_t B, int64_t i,
                       T* acc, int64_t n_rows) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if (has_avx2()) return gather_row_avx2(crow, col, w, x, B, i, acc, n_rows);
#endif
  gather_body(crow, col, w, x, B, i, acc, n_rows);
}

// A [C, B] operand with any strides (the masses come as transposed views of [B, C] memory).
template <typename T>
struct Mat {
  const T* p;
  int64_t s0, s1;
  explicit Mat(const at::Tensor& t) : p(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)) {}
  inline T operator()(int64_t i, int64_t l) const { return p[i * s0 + l * s1]; }
};

// Rows in fixed chunks (independent of the thread count), chunks in parallel: fn(chunk, r0, r1, acc, acc2) with
// two [B] scratch rows. Per-token sums are accumulated per chunk and added in chunk order: deterministic.
constexpr int64_t ROWS_PER_CHUNK = 256;

template <typename T, typename F>
void for_row_chunks(int64_t C, int64_t B, const F& fn) {
  const int64_t nchunk = (C + ROWS_PER_CHUNK - 1) / ROWS_PER_CHUNK;
  at::parallel_for(0, nchunk, 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> acc(B), acc2(B);
    for (int64_t c = c0; c < c1; ++c)
      fn(c, c * ROWS_PER_CHUNK, std::min(C, (c + 1) * ROWS_PER_CHUNK), acc.data(), acc2.data());
  });
}

// Per-chunk partial sums [nchunk, B] (float64), reduced in chunk order into out[0:B].
struct ChunkSums {
  int64_t nchunk, B;
  std::vector<double> part;
  ChunkSums(int64_t C, int64_t B_) : nchunk((C + ROWS_PER_CHUNK - 1) / ROWS_PER_CHUNK), B(B_), part(nchunk * B_) {}
  double* row(int64_t c) { return part.data() + c * B; }
  void zero() { std::fill(part.begin(), part.end(), 0.0); }
  void reduce(double* out) const {
    for (int64_t l = 0; l < B; ++l) out[l] = 0.0;
    for (int64_t c = 0; c < nchunk; ++c)
      for (int64_t l = 0; l < B; ++l) out[l] += part[c * B + l];
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Forward: scaling domain. u, v (the outputs) are the working scalings; each half-iteration is one pass over the
// rows of K (or K^T) with the eps and the division fused, writing the history row as it goes.
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
void forward_scaling(const Csr<T>& K, const Csr<T>& Kt, const at::Tensor& a_t, const at::Tensor& b_t,
                     int64_t T_iters, T eps, bool keep, T* value, T* u, T* v, T* hist_r, T* hist_s, T* y_out,
                     int64_t C, int64_t B) {
  const Mat<T> a(a_t), b(b_t);
  std::vector<int64_t> cnt(B, 0);  // u_0 = 1 / |supp a| on supp a
  for (int64_t i = 0; i < C; ++i)
    for (int64_t l = 0; l < B; ++l) cnt[l] += a(i, l) > T(0);
  for_row_chunks<T>(C, B, [&](int64_t, int64_t r0, int64_t r1, T*, T*) {
    for (int64_t i = r0; i < r1; ++i)
      for (int64_t l = 0; l < B; ++l)
        u[i * B + l] = a(i, l) > T(0) ? T(1) / T(std::max<int64_t>(cnt[l], 1)) : T(0);
  });
  for (int64_t t = 0; t < T_iters; ++t) {
    check_interrupt();
    T* hs = keep ? hist_s + t * C * B : nullptr;
    for_row_chunks<T>(C, B, [&](int64_t, int64_t r0, int64_t r1, T* acc, T*) {
      for (int64_t j = r0; j < r1; ++j) {  // s = K^T u + eps, v = b / s
        gather_row(Kt.crow, Kt.col, Kt.k, u, B, j, acc, r1);
        for (int64_t l = 0; l < B; ++l) acc[l] += eps;
        for (int64_t l = 0; l < B; ++l) v[j * B + l] = b(j, l) / acc[l];
        if (keep) std::copy(acc, acc + B, hs + j * B);
      }
    });
    T* hr = keep ? hist_r + t * C * B : nullptr;
    for_row_chunks<T>(C, B, [&](int64_t, int64_t r0, int64_t r1, T* acc, T*) {
      for (int64_t i = r0; i < r1; ++i) {  // r = K v + eps, u = a / r
        gather_row(K.crow, K.col, K.k, v, B, i, acc, r1);
        for (int64_t l = 0; l < B; ++l) acc[l] += eps;
        for (int64_t l = 0; l < B; ++l) u[i * B + l] = a(i, l) / acc[l];
        if (keep) std::copy(acc, acc + B, hr + i * B);
      }
    });
  }
  // y = (K∘c) v_T, value = sum_i u_i y_i (float64 partial sums in chunk order); then u, v -> log u, log v
  ChunkSums sums(C, B);
  for_row_chunks<T>(C, B, [&](int64_t c, int64_t r0, int64_t r1, T* acc, T*) {
    double* part = sums.row(c);
    for (int64_t i = r0; i < r1; ++i) {
      gather_row(K.crow, K.col, K.kc, v, B, i, acc, r1);
      for (int64_t l = 0; l < B; ++l) part[l] += double(u[i * B + l]) * double(acc[l]);
      if (keep) std::copy(acc, acc + B, y_out + i * B);
    }
    for (int64_t k = r0 * B; k < r1 * B; ++k) u[k] = std::log(u[k]);
  });
  for_row_chunks<T>(C, B, [&](int64_t, int64_t r0, int64_t r1, T*, T*) {
    for (int64_t k = r0 * B; k < r1 * B; ++k) v[k] = std::log(v[k]);
  });
  std::vector<double> val(B);
  sums.reduce(val.data());
  for (int64_t l = 0; l < B; ++l) value[l] = T(val[l]);
}

Tensors6 sparse_sinkhorn_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& crow,
                             const at::Tensor& col, const at::Tensor& cost, const at::Tensor& crow_t,
                             const at::Tensor& col_t, const at::Tensor& cost_t, double reg, int64_t num_iters,
                             double eps, bool log_domain, bool keep_history, std::optional<int64_t> chunk_elements) {
  const char* op = "wkd.sparse_sinkhorn";
  check_args(a, b, crow, col, cost, crow_t, col_t, cost_t, reg, num_iters, eps, op);
  if (log_domain) {  // the ATen implementation (see the file comment)
    static auto torch_op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("wkd::sparse_sinkhorn_torch", "")
                               .typed<Tensors6(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, double, int64_t, double, bool,
                                               bool, std::optional<int64_t>)>();
    return torch_op.call(a, b, crow, col, cost, crow_t, col_t, cost_t, reg, num_iters, eps, log_domain,
                         keep_history, chunk_elements);
  }
  const int64_t C = a.size(0), B = a.size(1), T_keep = keep_history ? num_iters : 0;
  auto opts = a.options();
  at::Tensor value = at::empty({B}, opts), u = at::empty({C, B}, opts), v = at::empty({C, B}, opts);
  at::Tensor hist_r = at::empty({T_keep, C, B}, opts), hist_s = at::empty({T_keep, C, B}, opts);
  at::Tensor y = at::empty({keep_history ? C : 0, B}, opts);
  if (B == 0) return {value, u, v, hist_r, hist_s, y};
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "sparse_sinkhorn_cpu", [&] {
    using T = scalar_t;
    const Csr<T> K(crow, col, cost, reg, true), Kt(crow_t, col_t, cost_t, reg, false);
    forward_scaling<T>(K, Kt, a, b, num_iters, T(eps), keep_history, value.data_ptr<T>(), u.data_ptr<T>(),
                       v.data_ptr<T>(), keep_history ? hist_r.data_ptr<T>() : nullptr,
                       keep_history ? hist_s.data_ptr<T>() : nullptr, keep_history ? y.data_ptr<T>() : nullptr, C, B);
  });
  return {value, u, v, hist_r, hist_s, y};
}

// ---------------------------------------------------------------------------------------------------------------
// Backward: the exact reverse sweep (scaling domain), one pass over the rows per product. With w_t = dL/du_t / r_t
// and z_t = dL/dv_t / s_t:
//   w_T = g y / r_T,  direct = g (K∘C)^T u_T
//   for t = T..1:  ga += w_t;  z_t = (direct if t = T) - K^T (w_t u_t) / s_t;  gauge-correct z_t;  gb += z_t
//                  w_{t-1} = -K (z_t v_t) / r_{t-1}
// The gauge correction (eps given): z_t -= b (sum_j b_j z_t,j - G_t) / sum_j b_j^2 with G_T = eps sum_i x_T,i and
// G_t = G_{t+1} + eps (sum_i x_t,i - sum_j (z v)_{t+1,j}), x_t = w_t u_t (docs/design.md section 3); the sums are
// float64 per token, in chunk order.
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
void backward_scaling(const Csr<T>& K, const Csr<T>& Kt, const T* g, const at::Tensor& a_t, const at::Tensor& b_t,
                      const T* hist_r, const T* hist_s, const T* y, int64_t T_iters, double eps, bool correct, T* ga,
                      T* gb, int64_t C, int64_t B) {
  const Mat<T> a(a_t), b(b_t);
  const bool has_eps = eps > 0;
  const auto opts = a_t.options();
  at::Tensor xbuf = at::empty({C, B}, opts), zbuf = at::empty({C, B}, opts), utbuf = at::empty({C, B}, opts);
  T* x = xbuf.data_ptr<T>();
  T* z = zbuf.data_ptr<T>();  // z_t, then (z v)_t in place
  T* ut = utbuf.data_ptr<T>();  // u_T, for the direct term (freed after the first step)
  ChunkSums sums(C, B);
  std::vector<double> G(B, 0.0), zs(B, 0.0), sumx(B, 0.0), sbb(B, 0.0), sbz(B), c(B);
  for (int64_t j = 0; j < C; ++j)
    for (int64_t l = 0; l < B; ++l) sbb[l] += double(b(j, l)) * double(b(j, l));
  const int64_t last = T_iters - 1;
  {
    const T* hr = hist_r + last * C * B;
    sums.zero();
    for_row_chunks<T>(C, B, [&](int64_t ch, int64_t r0, int64_t r1, T*, T*) {
      double* part = sums.row(ch);
      for (int64_t i = r0; i < r1; ++i)
        for (int64_t l = 0; l < B; ++l) {
          const T r = hr[i * B + l], u_i = a(i, l) / r, wi = g[l] * y[i * B + l] / r;
          ut[i * B + l] = u_i;
          x[i * B + l] = wi * u_i;
          ga[i * B + l] = wi;
          part[l] += double(wi * u_i);
        }
    });
    sums.reduce(sumx.data());
  }
  for (int64_t t = last; t >= 0; --t) {
    check_interrupt();
    const T* hs = hist_s + t * C * B;
    for (int64_t l = 0; l < B; ++l) {
      const double awr = eps * sumx[l];
      G[l] = t == last ? awr : G[l] + awr - zs[l];
    }
    sums.zero();
    for_row_chunks<T>(C, B, [&](int64_t ch, int64_t r0, int64_t r1, T* acc, T* acc2) {
      double* part = sums.row(ch);
      for (int64_t j = r0; j < r1; ++j) {  // z = (direct - K^T x) / s
        gather_row(Kt.crow, Kt.col, Kt.k, x, B, j, acc, r1);
        if (t == last) {
          gather_row(Kt.crow, Kt.col, Kt.kc, ut, B, j, acc2, r1);
          for (int64_t l = 0; l < B; ++l) acc[l] = g[l] * acc2[l] - acc[l];
        } else {
          for (int64_t l = 0; l < B; ++l) acc[l] = -acc[l];
        }
        for (int64_t l = 0; l < B; ++l) z[j * B + l] = acc[l] / hs[j * B + l];
        if (correct)
          for (int64_t l = 0; l < B; ++l) part[l] += double(b(j, l)) * double(z[j * B + l]);
      }
    });
    sums.reduce(sbz.data());
    for (int64_t l = 0; l < B; ++l) c[l] = correct && sbb[l] > 0 ? (sbz[l] - G[l]) / sbb[l] : 0.0;
    sums.zero();
    for_row_chunks<T>(C, B, [&](int64_t ch, int64_t r0, int64_t r1, T*, T*) {
      double* part = sums.row(ch);
      for (int64_t j = r0; j < r1; ++j)  // gauge correction, gb += z, z v in place
        for (int64_t l = 0; l < B; ++l) {
          const T bj = b(j, l), zj = z[j * B + l] - T(c[l]) * bj;
          gb[j * B + l] = t == last ? zj : gb[j * B + l] + zj;
          const T zv = bj / hs[j * B + l] * zj;
          z[j * B + l] = zv;
          part[l] += double(zv);
        }
    });
    sums.reduce(zs.data());
    for (int64_t l = 0; l < B; ++l) zs[l] *= eps;
    if (t == last) utbuf.reset();
    if (t == 0) break;
    const T* hr = hist_r + (t - 1) * C * B;
    sums.zero();
    for_row_chunks<T>(C, B, [&](int64_t ch, int64_t r0, int64_t r1, T* acc, T*) {
      double* part = sums.row(ch);
      for (int64_t i = r0; i < r1; ++i) {  // w = -K (z v) / r_{t-1}; ga += w; x = w u_{t-1}
        gather_row(K.crow, K.col, K.k, z, B, i, acc, r1);
        for (int64_t l = 0; l < B; ++l) {
          const T r = hr[i * B + l], wn = acc[l] / r;  // -w_{t-1}
          ga[i * B + l] -= wn;
          const T xi = -(a(i, l) / r) * wn;
          x[i * B + l] = xi;
          if (has_eps) part[l] += double(xi);
        }
      }
    });
    sums.reduce(sumx.data());
  }
}

std::tuple<at::Tensor, at::Tensor> sparse_sinkhorn_backward_cpu(
    const at::Tensor& grad_value, const at::Tensor& a, const at::Tensor& b, const at::Tensor& crow,
    const at::Tensor& col, const at::Tensor& cost, const at::Tensor& crow_t, const at::Tensor& col_t,
    const at::Tensor& cost_t, const at::Tensor& hist_r, const at::Tensor& hist_s, const at::Tensor& y, double reg,
    bool log_domain, std::optional<double> eps, std::optional<int64_t> chunk_elements) {
  const char* op = "wkd.sparse_sinkhorn_backward";
  check_args(a, b, crow, col, cost, crow_t, col_t, cost_t, reg, 1, eps.value_or(0.0), op);
  const int64_t C = a.size(0), B = a.size(1);
  TORCH_CHECK(grad_value.dim() == 1 && grad_value.size(0) == B && grad_value.scalar_type() == a.scalar_type(), op,
              ": `grad_value` must be a [", B, "] tensor of the dtype of `a`");
  for (const auto& [name, h] : {std::pair<const char*, const at::Tensor*>{"hist_r", &hist_r}, {"hist_s", &hist_s}})
    TORCH_CHECK(h->dim() == 3 && h->size(0) >= 1 && h->size(1) == C && h->size(2) == B &&
                    h->scalar_type() == a.scalar_type(),
                op, ": `", name, "` must be the [T, C, B] = [T, ", C, ", ", B,
                "] history of a keep_history=True forward (T >= 1), got ", h->sizes());
  TORCH_CHECK(hist_s.size(0) == hist_r.size(0), op, ": `hist_r` and `hist_s` must have the same T");
  TORCH_CHECK(y.dim() == 2 && y.size(0) == C && y.size(1) == B && y.scalar_type() == a.scalar_type(), op,
              ": `y` must be [C, B] = [", C, ", ", B, "], got ", y.sizes());
  if (log_domain) {
    static auto torch_op =
        c10::Dispatcher::singleton()
            .findSchemaOrThrow("wkd::sparse_sinkhorn_torch_backward", "")
            .typed<std::tuple<at::Tensor, at::Tensor>(
                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                const at::Tensor&, const at::Tensor&, double, bool, std::optional<double>, std::optional<int64_t>)>();
    return torch_op.call(grad_value, a, b, crow, col, cost, crow_t, col_t, cost_t, hist_r, hist_s, y, reg,
                         log_domain, eps, chunk_elements);
  }
  const at::Tensor g = grad_value.contiguous(), hr = hist_r.contiguous(), hs = hist_s.contiguous(),
                   yc = y.contiguous();
  at::Tensor ga = at::empty({C, B}, a.options()), gb = at::empty({C, B}, a.options());
  if (B == 0) return {ga, gb};
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "sparse_sinkhorn_backward_cpu", [&] {
    using T = scalar_t;
    const Csr<T> K(crow, col, cost, reg, false), Kt(crow_t, col_t, cost_t, reg, true);
    backward_scaling<T>(K, Kt, g.data_ptr<T>(), a, b, hr.data_ptr<T>(), hs.data_ptr<T>(), yc.data_ptr<T>(),
                        hr.size(0), eps.value_or(0.0), eps.has_value(), ga.data_ptr<T>(), gb.data_ptr<T>(), C, B);
  });
  return {ga, gb};
}

}  // namespace
}  // namespace wkd

TORCH_LIBRARY_IMPL(wkd, CPU, m) {
  m.impl("sparse_sinkhorn", &wkd::sparse_sinkhorn_cpu);
  m.impl("sparse_sinkhorn_backward", &wkd::sparse_sinkhorn_backward_cpu);
}
