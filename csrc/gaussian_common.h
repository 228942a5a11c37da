// Host-side argument checks and grid-cell geometry shared by the CPU kernels of the Gaussian ops of WKD-F
// (wkd::feature_stats, wkd::sqrtm, wkd::nuclear_norm, wkd::bures_wasserstein and their backwards; docs/design.md
// section 4). Shape/dtype/scalar checks read no data; the value checks (finite, symmetric) read the data and are
// called by the CPU kernels only (on CUDA the Python wrappers run them on request).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <string>
#include <vector>

namespace wkd {

// Adaptive-pooling cell bounds along one axis of length `size` split into `g` cells:
// start = floor(i * size / g), end = ceil((i + 1) * size / g). Neighbouring cells may overlap.
inline int64_t cell_start(int64_t i, int64_t size, int64_t g) { return (i * size) / g; }
inline int64_t cell_end(int64_t i, int64_t size, int64_t g) { return ((i + 1) * size + g - 1) / g; }

// The G x G cells of an H x W map, row-major (cell p = gi * G + gj).
struct Cells {
  int64_t G = 1, H = 1, W = 1, P = 1, max_m = 1, min_m = 1;
  std::vector<int64_t> h0, h1, w0, w1, m;
  Cells(int64_t g, int64_t h, int64_t w) : G(g), H(h), W(w), P(g * g) {
    max_m = 0;
    min_m = h * w;
    for (int64_t gi = 0; gi < g; ++gi) {
      for (int64_t gj = 0; gj < g; ++gj) {
        h0.push_back(cell_start(gi, h, g));
        h1.push_back(cell_end(gi, h, g));
        w0.push_back(cell_start(gj, w, g));
        w1.push_back(cell_end(gj, w, g));
        const int64_t mm = (h1.back() - h0.back()) * (w1.back() - w0.back());
        m.push_back(mm);
        max_m = std::max(max_m, mm);
        min_m = std::min(min_m, mm);
      }
    }
  }
};

inline bool is_float_or_double(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

inline at::ScalarType stats_dtype(at::ScalarType x) {
  return (x == at::kHalf || x == at::kBFloat16) ? at::kFloat : x;
}

inline void check_feature_stats_args(const at::Tensor& x, int64_t grid, bool unbiased, const char* op) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": `x` must be 4-D [N, C, H, W], got shape ", x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
                   ": `x` must be float16, bfloat16, float32 or float64, got ", st);
  TORCH_CHECK_VALUE(x.size(1) >= 1 && x.size(2) >= 1 && x.size(3) >= 1, op,
                    ": `x` needs at least one channel and one spatial position, got shape ", x.sizes());
  TORCH_CHECK_VALUE(grid >= 1, op, ": `grid` must be >= 1, got ", grid);
  TORCH_CHECK_VALUE(grid <= x.size(2) && grid <= x.size(3), op, ": `grid` (", grid,
                    ") must not exceed the spatial size H x W = ", x.size(2), " x ", x.size(3), " of `x`");
  if (unbiased) {
    const Cells cells(grid, x.size(2), x.size(3));
    TORCH_CHECK_VALUE(cells.min_m >= 2, op, ": `unbiased` statistics need at least 2 positions per cell, but `grid`=",
                      grid, " on a ", x.size(2), " x ", x.size(3), " map gives a cell of ", cells.min_m,
                      " position; use a smaller grid or unbiased=False");
  }
}

inline void check_finite(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK_VALUE(at::isfinite(t).all().item<bool>(), op, ": `", name, "` contains non-finite values (inf or nan)");
}

// Batched square matrices [B, n, n], float32/float64.
inline void check_square_batch(const at::Tensor& S, const char* name, const char* op) {
  TORCH_CHECK_VALUE(S.dim() == 3, op, ": `", name, "` must be 3-D [B, n, n] (a batch of square matrices), got shape ",
                    S.sizes());
  TORCH_CHECK_VALUE(S.size(1) == S.size(2), op, ": `", name, "` must hold square matrices [B, n, n], got shape ",
                    S.sizes());
  TORCH_CHECK_VALUE(S.size(1) >= 1, op, ": `", name, "` must hold matrices of size n >= 1, got shape ", S.sizes());
  TORCH_CHECK_TYPE(is_float_or_double(S), op, ": `", name, "` must be float32 or float64, got ", S.scalar_type(),
                   " (the Python wrappers compute float16/bfloat16 in float32)");
}

// Symmetry up to a relative tolerance of 1e-4 of the largest entry (matrices built as X X^T by a GEMM are only
// symmetric to rounding); the kernels use (S + S^T) / 2.
inline void check_symmetric(const at::Tensor& S, const char* name, const char* op) {
  if (S.numel() == 0) return;
  const at::Tensor scale = S.abs().amax({1, 2});
  const at::Tensor asym = (S - S.transpose(1, 2)).abs().amax({1, 2});
  TORCH_CHECK_VALUE((asym <= scale * 1e-4).all().item<bool>(), op, ": `", name,
                    "` must be symmetric (|S - S^T| <= 1e-4 max|S| per matrix); the largest asymmetry is ",
                    asym.max().item<double>());
}

// Positive semi-definiteness of symmetric S [B, n, n] (already symmetrised). Rounding-level negative eigenvalues are
// accepted (the kernels clamp them); S is rejected when it has an eigenvalue below -tau |S|_F with
// tau = max(sqrt(eps), 100 n eps) of its dtype (float32, n = 64: 7.6e-4; float64: 1.5e-8), a negative trace
// included. Test: Cholesky (float64) of S + (tau |S|_F + tiny) I, O(n^3 / 3) per matrix, far below one
// Newton-Schulz step; the eigenvalues are computed only for the error message.
inline void check_psd(const at::Tensor& S, const char* name, const char* op) {
  if (S.numel() == 0) return;
  const int64_t n = S.size(1);
  const double eps = S.scalar_type() == at::kDouble ? DBL_EPSILON : double(FLT_EPSILON);
  const double tau = std::max(std::sqrt(eps), 100.0 * double(n) * eps);
  const at::Tensor Sd = S.to(at::kDouble);
  const at::Tensor fro = Sd.flatten(1).norm(2, {1}).view({-1, 1, 1});
  const at::Tensor shifted = Sd + at::eye(n, Sd.options()) * (fro * tau + DBL_MIN);
  const at::Tensor bad = std::get<1>(at::linalg_cholesky_ex(shifted)).ne(0);
  if (!bad.any().item<bool>()) return;
  const int64_t b = bad.nonzero().select(1, 0)[0].item<int64_t>();
  const double lmin = at::linalg_eigvalsh(Sd[b]).min().item<double>();
  TORCH_CHECK_VALUE(false, op, ": `", name, "` must be positive semi-definite, but matrix ", b,
                    " of the batch has the eigenvalue ", lmin, " (|S|_F = ", fro.view({-1})[b].item<double>(),
                    "); negative eigenvalues below -", tau,
                    " |S|_F are rejected (rounding-level ones are clamped to 0)");
}

inline void check_method(c10::string_view method, const char* op) {
  TORCH_CHECK_VALUE(method == "newton_schulz" || method == "eigh", op,
                    ": `method` must be 'newton_schulz' or 'eigh', got '", std::string(method), "'");
}

inline void check_num_iters(int64_t num_iters, const char* op) {
  TORCH_CHECK_VALUE(num_iters >= 1, op, ": `num_iters` must be >= 1, got ", num_iters);
}

inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name,
                       const char* op) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": `", name, "` has dtype ", t.scalar_type(), " but `",
                   ref_name, "` has ", ref.scalar_type(), "; all inputs must share one dtype");
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": `", name, "` is on ", t.device(), " but `", ref_name,
                    "` is on ", ref.device());
}

inline void check_bures_args(const at::Tensor& mu1, const at::Tensor& S1, const at::Tensor& mu2, const at::Tensor& S2,
                             const char* op) {
  check_square_batch(S1, "S1", op);
  const int64_t B = S1.size(0), n = S1.size(1);
  TORCH_CHECK_VALUE(S2.dim() == 3 && S2.size(0) == B && S2.size(1) == n && S2.size(2) == n, op,
                    ": `S2` must be [B, n, n] = [", B, ", ", n, ", ", n, "] like `S1`, got ", S2.sizes());
  TORCH_CHECK_VALUE(mu1.dim() == 2 && mu1.size(0) == B && mu1.size(1) == n, op, ": `mu1` must be [B, n] = [", B, ", ",
                    n, "] to match `S1`, got ", mu1.sizes());
  TORCH_CHECK_VALUE(mu2.dim() == 2 && mu2.size(0) == B && mu2.size(1) == n, op, ": `mu2` must be [B, n] = [", B, ", ",
                    n, "] to match `S1`, got ", mu2.sizes());
  check_same(S2, S1, "S2", "S1", op);
  check_same(mu1, S1, "mu1", "S1", op);
  check_same(mu2, S1, "mu2", "S1", op);
}

}  // namespace wkd
