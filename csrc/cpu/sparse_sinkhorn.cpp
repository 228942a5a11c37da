// Sparse (CSR) Sinkhorn on CPU: the CPU kernels of wkd::sparse_sinkhorn and wkd::sparse_sinkhorn_backward (contract:
// the schema comment in csrc/ops.cpp; docs/vocabulary_ot.md).
//
// One shared CSR kernel K = exp(-cost / reg) [C, C] (and K∘cost) serves every row of masses. The B rows (the columns
// of the [C, B] masses) are processed in blocks of NB tokens: a block keeps its scalings in compact [C, NB] buffers
// (tokens innermost, so that one stored entry K_ij updates NB lanes from one contiguous run of the gathered vector),
// and streams K once per half-iteration. Blocks are independent (at::parallel_for over blocks, no barrier); K's
// exp, division by reg and the eps of every denominator are fused into the passes. The exact backward is the
// reverse sweep of wkd::sinkhorn_backward (docs/design.md section 3) with its gauge correction (float64 sums in
// order, per token), over the O(T C B) history the forward kept.
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

constexpr int64_t NB = 16;  // tokens per block: one 64-byte line of float32 per gathered row

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

// acc[l] = sum over the stored entries e of row i of w[e] x[col[e], l]  (x: compact [C, NB])
template <typename T>
inline void gather_row(const int64_t* __restrict crow, const int64_t* __restrict col, const T* __restrict w,
                       const T* __restrict x, int64_t i, T* __restrict acc) {
  for (int64_t l = 0; l < NB; ++l) acc[l] = T(0);
  for (int64_t e = crow[i], end = crow[i + 1]; e < end; ++e) {
    const T we = w[e];
    const T* __restrict xr = x + col[e] * NB;
    for (int64_t l = 0; l < NB; ++l) acc[l] += we * xr[l];
  }
}

// A block of tokens [b0, b0 + w) of a [C, B] tensor with strides (s0, s1); lanes >= w read `pad`.
template <typename T>
struct Lanes {
  const T* p;
  int64_t s0, s1, w;
  T pad;
  inline T operator()(int64_t i, int64_t l) const { return l < w ? p[i * s0 + l * s1] : pad; }
};

template <typename T>
Lanes<T> lanes_of(const at::Tensor& t, int64_t b0, int64_t w, T pad) {
  return Lanes<T>{t.data_ptr<T>() + b0 * t.stride(1), t.stride(0), t.stride(1), w, pad};
}

// ---------------------------------------------------------------------------------------------------------------
// Forward: scaling domain
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
void forward_block(const Csr<T>& K, const Csr<T>& Kt, const at::Tensor& a, const at::Tensor& b, int64_t b0,
                   int64_t w, int64_t T_iters, T eps, bool keep, T* value, T* u_out, T* v_out, T* hist_r, T* hist_s,
                   T* y_out, int64_t C, int64_t B) {
  // padded lanes carry unit masses (finite, never written out)
  const Lanes<T> A = lanes_of<T>(a, b0, w, T(1)), Bm = lanes_of<T>(b, b0, w, T(1));
  std::vector<T> ubuf(C * NB), vbuf(C * NB);
  T* __restrict u = ubuf.data();
  T* __restrict v = vbuf.data();
  T acc[NB];
  // u_0 = 1 / |supp a| on supp a
  int64_t cnt[NB] = {0};
  for (int64_t i = 0; i < C; ++i)
    for (int64_t l = 0; l < NB; ++l) cnt[l] += A(i, l) > T(0);
  for (int64_t i = 0; i < C; ++i)
    for (int64_t l = 0; l < NB; ++l) u[i * NB + l] = A(i, l) > T(0) ? T(1) / T(std::max<int64_t>(cnt[l], 1)) : T(0);
  for (int64_t t = 0; t < T_iters; ++t) {
    T* hs = keep ? hist_s + t * C * B + b0 : nullptr;
    for (int64_t j = 0; j < C; ++j) {  // s = K^T u + eps, v = b / s
      gather_row(Kt.crow, Kt.col, Kt.k, u, j, acc);
      for (int64_t l = 0; l < NB; ++l) {
        const T s = acc[l] + eps;
        v[j * NB + l] = Bm(j, l) / s;
        if (keep && l < w) hs[j * B + l] = s;
      }
    }
    T* hr = keep ? hist_r + t * C * B + b0 : nullptr;
    for (int64_t i = 0; i < C; ++i) {  // r = K v + eps, u = a / r
      gather_row(K.crow, K.col, K.k, v, i, acc);
      for (int64_t l = 0; l < NB; ++l) {
        const T r = acc[l] + eps;
        u[i * NB + l] = A(i, l) / r;
        if (keep && l < w) hr[i * B + l] = r;
      }
    }
  }
  // y = (K∘c) v_T, value = sum_i u_i y_i (float64 sum in order)
  double val[NB] = {0};
  for (int64_t i = 0; i < C; ++i) {
    gather_row(K.crow, K.col, K.kc, v, i, acc);
    for (int64_t l = 0; l < NB; ++l) val[l] += double(u[i * NB + l]) * double(acc[l]);
    for (int64_t l = 0; l < w; ++l) {
      if (keep) y_out[i * B + b0 + l] = acc[l];
      u_out[i * B + b0 + l] = std::log(u[i * NB + l]);  // the op returns log-scalings
      v_out[i * B + b0 + l] = std::log(v[i * NB + l]);
    }
  }
  for (int64_t l = 0; l < w; ++l) value[b0 + l] = T(val[l]);
}

// Runs fn(b0, w) for every block of NB tokens, blocks in parallel; Ctrl-C is seen between waves of blocks.
template <typename F>
void for_blocks(int64_t B, const F& fn) {
  const int64_t nblk = (B + NB - 1) / NB;
  const int64_t wave = std::max<int64_t>(1, at::get_num_threads()) * 4;
  for (int64_t k0 = 0; k0 < nblk; k0 += wave) {
    check_interrupt();
    at::parallel_for(k0, std::min(nblk, k0 + wave), 1, [&](int64_t k_begin, int64_t k_end) {
      for (int64_t k = k_begin; k < k_end; ++k) fn(k * NB, std::min(NB, B - k * NB));
    });
  }
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
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "sparse_sinkhorn_cpu", [&] {
    using T = scalar_t;
    const Csr<T> K(crow, col, cost, reg, true), Kt(crow_t, col_t, cost_t, reg, false);
    for_blocks(B, [&](int64_t b0, int64_t w) {
      forward_block<T>(K, Kt, a, b, b0, w, num_iters, T(eps), keep_history, value.data_ptr<T>(), u.data_ptr<T>(),
                       v.data_ptr<T>(), keep_history ? hist_r.data_ptr<T>() : nullptr,
                       keep_history ? hist_s.data_ptr<T>() : nullptr, keep_history ? y.data_ptr<T>() : nullptr, C,
                       B);
    });
  });
  return {value, u, v, hist_r, hist_s, y};
}

// ---------------------------------------------------------------------------------------------------------------
// Backward: the exact reverse sweep (scaling domain), per block of tokens. With w_t = dL/du_t / r_t and
// z_t = dL/dv_t / s_t:
//   w_T = g y / r_T,  direct = g (K∘C)^T u_T
//   for t = T..1:  ga += w_t;  z_t = (direct if t = T) - K^T (w_t u_t) / s_t;  gauge-correct z_t;  gb += z_t
//                  w_{t-1} = -K (z_t v_t) / r_{t-1}
// The gauge correction (eps given): z_t -= b (sum_j b_j z_t,j - G_t) / sum_j b_j^2 with G_T = eps sum_i x_T,i and
// G_t = G_{t+1} + eps (sum_i x_t,i - sum_j (z v)_{t+1,j}), x_t = w_t u_t (docs/design.md section 3).
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
void backward_block(const Csr<T>& K, const Csr<T>& Kt, const T* g, const at::Tensor& a, const at::Tensor& b,
                    const T* hist_r, const T* hist_s, const T* y, int64_t T_iters, double eps, bool correct,
                    int64_t b0, int64_t w, T* ga, T* gb, int64_t C, int64_t B) {
  const Lanes<T> A = lanes_of<T>(a, b0, w, T(1)), Bm = lanes_of<T>(b, b0, w, T(1));
  const bool has_eps = eps > 0;
  std::vector<T> xbuf(C * NB), utbuf(C * NB), zbuf(C * NB);
  T* __restrict x = xbuf.data();
  T* __restrict ut = utbuf.data();
  T* __restrict z = zbuf.data();  // z_t, then (z v)_t in place
  T gl[NB], acc[NB], acc2[NB];
  double G[NB] = {0}, zs[NB] = {0}, sumx[NB] = {0}, sbb[NB] = {0}, sbz[NB], c[NB];
  for (int64_t l = 0; l < NB; ++l) gl[l] = l < w ? g[b0 + l] : T(0);
  for (int64_t j = 0; j < C; ++j)
    for (int64_t l = 0; l < w; ++l) sbb[l] += double(Bm(j, l)) * double(Bm(j, l));
  const int64_t last = T_iters - 1;
  const int64_t o = b0;  // offset of the block in a [C, B] row
  {
    const T* hr = hist_r + last * C * B + o;
    const T* yy = y + o;
    for (int64_t i = 0; i < C; ++i)
      for (int64_t l = 0; l < NB; ++l) {
        const T r = l < w ? hr[i * B + l] : T(1), yl = l < w ? yy[i * B + l] : T(0);
        const T u_i = A(i, l) / r, wi = gl[l] * yl / r;
        ut[i * NB + l] = u_i;
        x[i * NB + l] = wi * u_i;
        if (l < w) ga[i * B + o + l] = wi;
        if (has_eps) sumx[l] += double(wi * u_i);
      }
  }
  for (int64_t t = last; t >= 0; --t) {
    const T* hs = hist_s + t * C * B + o;
    for (int64_t l = 0; l < NB; ++l) {
      const double awr = eps * sumx[l];
      G[l] = t == last ? awr : G[l] + awr - zs[l];
      sbz[l] = 0.0;
    }
    for (int64_t j = 0; j < C; ++j) {  // z = (direct - K^T x) / s
      gather_row(Kt.crow, Kt.col, Kt.k, x, j, acc);
      if (t == last) {
        gather_row(Kt.crow, Kt.col, Kt.kc, ut, j, acc2);
        for (int64_t l = 0; l < NB; ++l) acc[l] = gl[l] * acc2[l] - acc[l];
      } else {
        for (int64_t l = 0; l < NB; ++l) acc[l] = -acc[l];
      }
      for (int64_t l = 0; l < NB; ++l) {
        const T s = l < w ? hs[j * B + l] : T(1);
        const T zj = acc[l] / s;
        z[j * NB + l] = zj;
        if (correct) sbz[l] += double(Bm(j, l)) * double(zj);
      }
    }
    for (int64_t l = 0; l < NB; ++l) {
      c[l] = correct && l < w && sbb[l] > 0 ? (sbz[l] - G[l]) / sbb[l] : 0.0;
      zs[l] = 0.0;
    }
    for (int64_t j = 0; j < C; ++j)  // gauge correction, gb += z, z v in place
      for (int64_t l = 0; l < NB; ++l) {
        const T bj = Bm(j, l), s = l < w ? hs[j * B + l] : T(1);
        const T zj = z[j * NB + l] - T(c[l]) * bj;
        if (l < w) {
          if (t == last) gb[j * B + o + l] = zj; else gb[j * B + o + l] += zj;
        }
        const T zv = bj / s * zj;
        z[j * NB + l] = zv;
        if (has_eps) zs[l] += double(zv);
      }
    for (int64_t l = 0; l < NB; ++l) zs[l] *= eps;
    if (t == 0) break;
    const T* hr = hist_r + (t - 1) * C * B + o;
    for (int64_t l = 0; l < NB; ++l) sumx[l] = 0.0;
    for (int64_t i = 0; i < C; ++i) {  // w = -K (z v) / r_{t-1}; ga += w; x = w u_{t-1}
      gather_row(K.crow, K.col, K.k, z, i, acc);
      for (int64_t l = 0; l < NB; ++l) {
        const T r = l < w ? hr[i * B + l] : T(1);
        const T wn = acc[l] / r;  // -w_{t-1}
        if (l < w) ga[i * B + o + l] -= wn;
        const T xi = -(A(i, l) / r) * wn;
        x[i * NB + l] = xi;
        if (has_eps) sumx[l] += double(xi);
      }
    }
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
  const int64_t T_iters = hr.size(0);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "sparse_sinkhorn_backward_cpu", [&] {
    using T = scalar_t;
    const Csr<T> K(crow, col, cost, reg, false), Kt(crow_t, col_t, cost_t, reg, true);
    for_blocks(B, [&](int64_t b0, int64_t w) {
      backward_block<T>(K, Kt, g.data_ptr<T>(), a, b, hr.data_ptr<T>(), hs.data_ptr<T>(), yc.data_ptr<T>(),
                        T_iters, eps.value_or(0.0), eps.has_value(), b0, w, ga.data_ptr<T>(), gb.data_ptr<T>(), C,
                        B);
    });
  });
  return {ga, gb};
}

}  // namespace
}  // namespace wkd

TORCH_LIBRARY_IMPL(wkd, CPU, m) {
  m.impl("sparse_sinkhorn", &wkd::sparse_sinkhorn_cpu);
  m.impl("sparse_sinkhorn_backward", &wkd::sparse_sinkhorn_backward_cpu);
}
