// The elementwise passes of the CPU Sinkhorn's BLAS path (csrc/cpu/sinkhorn_gibbs.cpp) over one row of [B, len]
// buffers, compiled twice on x86-64: for the baseline ISA (SSE2) and for AVX2, chosen once per process by the CPU.
//
// Both builds give the same digits: the passes are IEEE divisions, multiplications, additions and float <-> double
// conversions, each correctly rounded whatever the vector width, in an order the source fixes (the compiler may not
// reassociate them without -ffast-math), and the AVX2 build does not enable FMA, so no a * b + c is contracted.
// At B = 256, C = 100 the division-bound passes are about a tenth of a forward + backward on SSE2; AVX2 halves them.
// WKD_CPU_ISA=baseline (read once, at the first call) selects the baseline build on any CPU, which the tests use to
// compare the two builds bit for bit.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace wkd {
namespace sinkhorn_cpu {
namespace row_passes {

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define WKD_ROW_PASSES_AVX2 1
#define WKD_PASS_INLINE inline __attribute__((always_inline))
#else
#define WKD_ROW_PASSES_AVX2 0
#define WKD_PASS_INLINE inline
#endif

// ------------------------------------------------------------------------------------------------------------------
// The passes (restrict pointers, so that they vectorise); inlined into each ISA's entry points below.
// ------------------------------------------------------------------------------------------------------------------
template <typename T>  // den += add (when do_add); out = num / den     (v = b / s, u = a / r)
WKD_PASS_INLINE void add_divide(T* __restrict den, const T* __restrict num, T* __restrict out, int64_t len, T add,
                                bool do_add) {
  if (do_add)
    for (int64_t k = 0; k < len; ++k) den[k] += add;
  for (int64_t k = 0; k < len; ++k) out[k] = num[k] / den[k];
}
template <typename T>  // u = a / r, w = g y / r; ut = u, ga = w, x = w u     (the last step of the backward sweep)
WKD_PASS_INLINE void last_w(const T* __restrict a, const T* __restrict r, const T* __restrict y, T g,
                            T* __restrict ut, T* __restrict ga, T* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T u_i = a[i] / r[i], w = g * y[i] / r[i];
    ut[i] = u_i, ga[i] = w, x[i] = w * u_i;
  }
}
template <typename T>  // w = -prod / r; ga += w; x = w a / r
WKD_PASS_INLINE void w(const T* __restrict prod, const T* __restrict r, const T* __restrict a, T* __restrict ga,
                       T* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T w_i = -prod[i] / r[i];
    ga[i] += w_i, x[i] = w_i * (a[i] / r[i]);
  }
}
template <typename T>  // z = ((g direct if last) - prod) / s
WKD_PASS_INLINE void z(const T* __restrict direct, const T* __restrict prod, const T* __restrict s, T g, bool last,
                       T* __restrict z_out, int64_t m) {
  for (int64_t j = 0; j < m; ++j) z_out[j] = ((last ? g * direct[j] : T(0)) - prod[j]) / s[j];
}
template <typename T>  // z -= c b; gb += z (gb = z if last); zv = z v = z b / s
WKD_PASS_INLINE void correct(T* __restrict zv, T* __restrict gb, const T* __restrict b, const T* __restrict s,
                             double c, bool last, int64_t m) {
  for (int64_t j = 0; j < m; ++j) {
    const T z_j = T(double(zv[j]) - c * double(b[j]));
    gb[j] = last ? z_j : gb[j] + z_j;
    zv[j] = z_j * (b[j] / s[j]);
  }
}

// Row sums and dot products in float64 over 8 interleaved partial sums, added in a fixed order at the end: the same
// digits in both builds and on every CPU, without the serial dependency of a single accumulator (one addition's
// latency per term: 40 us a pass over 256 x 100).
constexpr int kLanes = 8;

WKD_PASS_INLINE double combine_lanes(const double* acc) {
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}
template <typename T>
WKD_PASS_INLINE double sum(const T* __restrict p, int64_t len) {
  double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += double(p[k + l]);
  for (int l = 0; k + l < len; ++l) acc[l] += double(p[k + l]);
  return combine_lanes(acc);
}
template <typename T>
WKD_PASS_INLINE double dot(const T* __restrict x, const T* __restrict y, int64_t len) {
  double acc[kLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += double(x[k + l]) * double(y[k + l]);
  for (int l = 0; k + l < len; ++l) acc[l] += double(x[k + l]) * double(y[k + l]);
  return combine_lanes(acc);
}

// ------------------------------------------------------------------------------------------------------------------
// One entry point per pass and ISA (the pass inlined, so compiled for that ISA), and the table the kernels call.
// ------------------------------------------------------------------------------------------------------------------
template <typename T>
struct Table {
  void (*add_divide)(T*, const T*, T*, int64_t, T, bool);
  void (*last_w)(const T*, const T*, const T*, T, T*, T*, T*, int64_t);
  void (*w)(const T*, const T*, const T*, T*, T*, int64_t);
  void (*z)(const T*, const T*, const T*, T, bool, T*, int64_t);
  void (*correct)(T*, T*, const T*, const T*, double, bool, int64_t);
  double (*sum)(const T*, int64_t);
  double (*dot)(const T*, const T*, int64_t);
};

#define WKD_ROW_PASS_ENTRIES(NS, ATTR)                                                                                \
  namespace NS {                                                                                                    \
  template <typename T>                                                                                             \
  ATTR void add_divide(T* den, const T* num, T* out, int64_t len, T add, bool do_add) {                             \
    row_passes::add_divide<T>(den, num, out, len, add, do_add);                                                     \
  }                                                                                                                 \
  template <typename T>                                                                                             \
  ATTR void last_w(const T* a, const T* r, const T* y, T g, T* ut, T* ga, T* x, int64_t n) {                        \
    row_passes::last_w<T>(a, r, y, g, ut, ga, x, n);                                                                \
  }                                                                                                                 \
  template <typename T>                                                                                             \
  ATTR void w(const T* prod, const T* r, const T* a, T* ga, T* x, int64_t n) {                                      \
    row_passes::w<T>(prod, r, a, ga, x, n);                                                                         \
  }                                                                                                                 \
  template <typename T>                                                                                             \
  ATTR void z(const T* direct, const T* prod, const T* s, T g, bool last, T* z_out, int64_t m) {                    \
    row_passes::z<T>(direct, prod, s, g, last, z_out, m);                                                           \
  }                                                                                                                 \
  template <typename T>                                                                                             \
  ATTR void correct(T* zv, T* gb, const T* b, const T* s, double c, bool last, int64_t m) {                         \
    row_passes::correct<T>(zv, gb, b, s, c, last, m);                                                              \
  }                                                                                                                 \
  template <typename T>                                                                                             \
  ATTR double sum(const T* p, int64_t len) {                                                                        \
    return row_passes::sum<T>(p, len);                                                                              \
  }                                                                                                                 \
  template <typename T>                                                                                             \
  ATTR double dot(const T* x, const T* y, int64_t len) {                                                            \
    return row_passes::dot<T>(x, y, len);                                                                           \
  }                                                                                                                 \
  template <typename T>                                                                                             \
  Table<T> table() {                                                                                                \
    return {&add_divide<T>, &last_w<T>, &w<T>, &z<T>, &correct<T>, &sum<T>, &dot<T>};                               \
  }                                                                                                                 \
  }

WKD_ROW_PASS_ENTRIES(baseline, )
#if WKD_ROW_PASSES_AVX2
WKD_ROW_PASS_ENTRIES(avx2, __attribute__((target("avx2"))))
#endif

// Whether the AVX2 build runs: the CPU (and its OS) support AVX2 and WKD_CPU_ISA is not "baseline". Decided once.
inline bool use_avx2() {
#if WKD_ROW_PASSES_AVX2
  static const bool avx2 = [] {
    const char* isa = std::getenv("WKD_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "baseline") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return avx2;
#else
  return false;
#endif
}

template <typename T>
const Table<T>& table() {
#if WKD_ROW_PASSES_AVX2
  static const Table<T> chosen = use_avx2() ? avx2::table<T>() : baseline::table<T>();
#else
  static const Table<T> chosen = baseline::table<T>();
#endif
  return chosen;
}

#undef WKD_ROW_PASS_ENTRIES
}  // namespace row_passes
}  // namespace sinkhorn_cpu
}  // namespace wkd
