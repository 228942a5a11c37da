// CPU kernels of wkd::feature_stats and wkd::feature_stats_backward (docs/design.md section 4).
//
// x [N, C, H, W] -> per sample n, grid cell p (G x G adaptive-pooling cells, row-major) and channel c:
//   mean[n, p, c] = sum_{k in cell p} x[n, c, k] / m_p
//   diag: var[n, p, c]    = sum_k (x[n, c, k] - mean)^2 / (m_p - unbiased)
//   full: cov[n, p, c, d] = sum_k (x[n, c, k] - mean_c) (x[n, d, k] - mean_d) / (m_p - unbiased)
// Statistics are accumulated in double for float32 input and in float32 for float16/bfloat16 input (outputs are
// then float32). Diagonal: one thread per (n, c) row reads each cell of the row once (two passes in cache: mean,
// then centred squares). Full: the centred cells are written once into a zero-padded [N, P, C, max_m] buffer (times a
// power of two ~ 1 / sqrt(m_p - unbiased), so that the sums do not overflow where the covariance does not) and one
// batched GEMM gives every covariance.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../gaussian_common.h"

namespace wkd {
namespace {

constexpr const char* kFwd = "wkd.feature_stats";
constexpr const char* kBwd = "wkd.feature_stats_backward";

// mean of one cell of one channel row (acc_t accumulation)
template <typename scalar_t, typename acc_t>
acc_t cell_mean(const scalar_t* row, const Cells& cells, int64_t p) {
  acc_t s = 0;
  for (int64_t h = cells.h0[p]; h < cells.h1[p]; ++h) {
    const scalar_t* r = row + h * cells.W;
    for (int64_t w = cells.w0[p]; w < cells.w1[p]; ++w) s += static_cast<acc_t>(r[w]);
  }
  return s / static_cast<acc_t>(cells.m[p]);
}

template <typename scalar_t>
void forward_diag(const at::Tensor& x, const Cells& cells, bool unbiased, at::Tensor& mean, at::Tensor& var) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  using out_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), P = cells.P;
  const scalar_t* x_p = x.data_ptr<scalar_t>();
  out_t* mean_p = mean.data_ptr<out_t>();
  out_t* var_p = var.data_ptr<out_t>();
  at::parallel_for(0, N * C, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / C, c = r % C;
      const scalar_t* row = x_p + r * HW;
      for (int64_t p = 0; p < P; ++p) {
        const acc_t mu = cell_mean<scalar_t, acc_t>(row, cells, p);
        acc_t ss = 0;
        for (int64_t h = cells.h0[p]; h < cells.h1[p]; ++h) {
          const scalar_t* rr = row + h * cells.W;
          for (int64_t w = cells.w0[p]; w < cells.w1[p]; ++w) {
            const acc_t d = static_cast<acc_t>(rr[w]) - mu;
            ss += d * d;
          }
        }
        const int64_t o = (n * P + p) * C + c;
        mean_p[o] = static_cast<out_t>(mu);
        var_p[o] = static_cast<out_t>(ss / static_cast<acc_t>(cells.m[p] - (unbiased ? 1 : 0)));
      }
    }
  });
}

// r_p = 2^-round(log2(den_p) / 2) ~ 1 / sqrt(den_p), a power of two (exact), per cell: the forward writes the centred
// values times r_p, so that the GEMM sums r_p^2 sum_k xc_c xc_d, of the order of the covariance itself (den_p r_p^2
// in [0.5, 2)), instead of m_p times it, which overflows float32 at values ~1e18 although the covariance does not.
std::vector<double> cell_scales(const Cells& cells, bool unbiased) {
  std::vector<double> r(cells.P);
  for (int64_t p = 0; p < cells.P; ++p)
    r[p] = std::ldexp(1.0, -int(std::floor(std::log2(double(cells.m[p] - (unbiased ? 1 : 0))) * 0.5 + 0.5)));
  return r;
}

// Writes mean [N, P, C] and the centred cells, times scale[p] when `scale` is not empty, into xc [N, P, C, max_m]
// (zero beyond m_p). When `given_mean` is defined it is used instead of recomputing the mean (backward).
template <typename scalar_t>
void centre_cells(const at::Tensor& x, const Cells& cells, at::Tensor& mean, at::Tensor& xc, bool given_mean,
                  const std::vector<double>& scale = {}) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  using out_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), P = cells.P, M = cells.max_m;
  const scalar_t* x_p = x.data_ptr<scalar_t>();
  out_t* mean_p = mean.data_ptr<out_t>();
  out_t* xc_p = xc.data_ptr<out_t>();
  at::parallel_for(0, N * C, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / C, c = r % C;
      const scalar_t* row = x_p + r * HW;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t o = (n * P + p) * C + c;
        acc_t mu;
        if (given_mean) {
          mu = static_cast<acc_t>(mean_p[o]);
        } else {
          mu = cell_mean<scalar_t, acc_t>(row, cells, p);
          mean_p[o] = static_cast<out_t>(mu);
        }
        out_t* dst = xc_p + o * M;
        const acc_t rp = scale.empty() ? acc_t(1) : static_cast<acc_t>(scale[p]);
        int64_t k = 0;
        for (int64_t h = cells.h0[p]; h < cells.h1[p]; ++h) {
          const scalar_t* rr = row + h * cells.W;
          for (int64_t w = cells.w0[p]; w < cells.w1[p]; ++w)
            dst[k++] = static_cast<out_t>((static_cast<acc_t>(rr[w]) - mu) * rp);
        }
        for (; k < M; ++k) dst[k] = out_t(0);
      }
    }
  });
}

// den_p = m_p - unbiased, times scale[p]^2 when `scale` is not empty
at::Tensor denominators(const Cells& cells, bool unbiased, at::ScalarType dtype,
                        const std::vector<double>& scale = {}) {
  std::vector<double> d(cells.P);
  for (int64_t p = 0; p < cells.P; ++p)
    d[p] = double(cells.m[p] - (unbiased ? 1 : 0)) * (scale.empty() ? 1.0 : scale[p] * scale[p]);
  return at::tensor(d, at::TensorOptions().dtype(at::kDouble)).to(dtype);
}

std::tuple<at::Tensor, at::Tensor> feature_stats_cpu(const at::Tensor& x_in, int64_t grid, bool full, bool unbiased) {
  check_feature_stats_args(x_in, grid, unbiased, kFwd);
  check_finite(x_in, "x", kFwd);
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  const Cells cells(grid, x.size(2), x.size(3));
  const auto opts = x.options().dtype(stats_dtype(x.scalar_type()));
  at::Tensor mean = at::empty({N, cells.P, C}, opts);
  if (!full) {
    at::Tensor var = at::empty({N, cells.P, C}, opts);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "wkd_feature_stats_diag", [&] {
      forward_diag<scalar_t>(x, cells, unbiased, mean, var);
    });
    return {mean, var};
  }
  at::Tensor xc = at::empty({N, cells.P, C, cells.max_m}, opts);
  const std::vector<double> r = cell_scales(cells, unbiased);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "wkd_feature_stats_full", [&] {
    centre_cells<scalar_t>(x, cells, mean, xc, /*given_mean=*/false, r);
  });
  at::Tensor cov = at::matmul(xc, xc.transpose(-1, -2));  // r_p^2 times the sums: no overflow (see cell_scales)
  cov.div_(denominators(cells, unbiased, opts.dtype().toScalarType(), r).view({1, cells.P, 1, 1}));
  return {mean, cov};
}

// grad_x[n, c, k] = sum over cells p containing k of  grad_mean[n,p,c] / m_p  +  D[n,p,c,k]
//   diag: D = 2 grad_var[n,p,c] (x[n,c,k] - mean[n,p,c]) / den_p
//   full: D = ((grad_cov + grad_cov^T) xc)[c, k] / den_p      (the centring term vanishes: rows of xc sum to 0)
template <typename scalar_t>
void backward_scatter(const at::Tensor& x, const Cells& cells, bool unbiased, const at::Tensor& grad_mean,
                      const at::Tensor& grad_var, const at::Tensor& mean, const at::Tensor& D, at::Tensor& grad_x) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
  using out_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), P = cells.P, W = cells.W;
  const bool full = D.defined();
  const int64_t M = full ? D.size(3) : 0;
  const scalar_t* x_p = x.data_ptr<scalar_t>();
  const out_t* gm_p = grad_mean.data_ptr<out_t>();
  const out_t* gv_p = full ? nullptr : grad_var.data_ptr<out_t>();
  const out_t* mu_p = full ? nullptr : mean.data_ptr<out_t>();
  const out_t* d_p = full ? D.data_ptr<out_t>() : nullptr;
  scalar_t* gx_p = grad_x.data_ptr<scalar_t>();
  at::parallel_for(0, N * C, 1, [&](int64_t r0, int64_t r1) {
    std::vector<acc_t> acc(HW);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / C, c = r % C;
      const scalar_t* row = x_p + r * HW;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t p = 0; p < P; ++p) {
        const int64_t o = (n * P + p) * C + c;
        const acc_t a = static_cast<acc_t>(gm_p[o]) / static_cast<acc_t>(cells.m[p]);
        const acc_t den = static_cast<acc_t>(cells.m[p] - (unbiased ? 1 : 0));
        if (full) {
          const out_t* dr = d_p + o * M;
          int64_t k = 0;
          for (int64_t h = cells.h0[p]; h < cells.h1[p]; ++h)
            for (int64_t w = cells.w0[p]; w < cells.w1[p]; ++w) acc[h * W + w] += a + static_cast<acc_t>(dr[k++]);
        } else {
          const acc_t b = acc_t(2) * static_cast<acc_t>(gv_p[o]) / den;
          const acc_t mu = static_cast<acc_t>(mu_p[o]);
          for (int64_t h = cells.h0[p]; h < cells.h1[p]; ++h)
            for (int64_t w = cells.w0[p]; w < cells.w1[p]; ++w)
              acc[h * W + w] += a + b * (static_cast<acc_t>(row[h * W + w]) - mu);
        }
      }
      scalar_t* dst = gx_p + r * HW;
      for (int64_t k = 0; k < HW; ++k) dst[k] = static_cast<scalar_t>(acc[k]);
    }
  });
}

at::Tensor feature_stats_backward_cpu(const at::Tensor& grad_mean_in, const at::Tensor& grad_var_in,
                                      const at::Tensor& x_in, const at::Tensor& mean_in, int64_t grid, bool full,
                                      bool unbiased) {
  check_feature_stats_args(x_in, grid, unbiased, kBwd);
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  const Cells cells(grid, x.size(2), x.size(3));
  const auto sdt = stats_dtype(x.scalar_type());
  const std::vector<int64_t> vshape = {N, cells.P, C};
  std::vector<int64_t> cshape = vshape;
  if (full) cshape.push_back(C);
  TORCH_CHECK_VALUE(grad_mean_in.sizes() == at::IntArrayRef(vshape), kBwd, ": `grad_mean` must be ", at::IntArrayRef(vshape),
                    ", got ", grad_mean_in.sizes());
  TORCH_CHECK_VALUE(mean_in.sizes() == at::IntArrayRef(vshape), kBwd, ": `mean` must be ", at::IntArrayRef(vshape), ", got ",
                    mean_in.sizes());
  TORCH_CHECK_VALUE(grad_var_in.sizes() == at::IntArrayRef(cshape), kBwd, ": `grad_var` must be ", at::IntArrayRef(cshape),
                    ", got ", grad_var_in.sizes());
  for (const at::Tensor* t : {&grad_mean_in, &grad_var_in, &mean_in}) {
    TORCH_CHECK_TYPE(t->scalar_type() == sdt, kBwd, ": `grad_mean`, `grad_var` and `mean` must be ", sdt,
                     " (the statistics dtype of `x`), got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == x.device(), kBwd, ": all tensors must be on the device of `x` (", x.device(),
                      "), got ", t->device());
  }
  const at::Tensor gm = grad_mean_in.contiguous(), gv = grad_var_in.contiguous();
  at::Tensor mean = mean_in.contiguous();
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor D;
  if (full) {
    const auto opts = x.options().dtype(sdt);
    at::Tensor xc = at::empty({N, cells.P, C, cells.max_m}, opts);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "wkd_feature_stats_centre", [&] {
      centre_cells<scalar_t>(x, cells, mean, xc, /*given_mean=*/true);
    });
    const at::Tensor gsym = (gv + gv.transpose(-1, -2)).div_(denominators(cells, unbiased, opts.dtype().toScalarType()).view({1, cells.P, 1, 1}));
    D = at::matmul(gsym, xc).contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "wkd_feature_stats_backward", [&] {
    backward_scatter<scalar_t>(x, cells, unbiased, gm, gv, mean, D, grad_x);
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(wkd, CPU, m) {
  m.impl("feature_stats", &feature_stats_cpu);
  m.impl("feature_stats_backward", &feature_stats_backward_cpu);
}

}  // namespace wkd
