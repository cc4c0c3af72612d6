// The per-element math of ROSE (docs/semantics.md sections 2, 3 and 5), shared by the CPU kernels
// (csrc/cpu, on scalars and on at::vec::Vectorized lanes) and the CUDA kernels (csrc/cuda), so that
// the CPU tests exercise the very formulas the GPU runs. Nothing here touches memory or ATen.
//
// Every formula is written once as a template over the value type V (float, double, or a vector of
// them); the only functions V needs are abs_of and sqrt_of below (a Vectorized has .abs() and
// .sqrt()). Both compilers build this without contraction (-ffp-contract=off for g++, -fmad=false
// for nvcc) and with IEEE division and square root, so a CUDA step rounds as a CPU step does; the
// one exception is step_size's float64 pow (CUDA documents up to 2 ulp, glibc ~0.5), which can
// move a parameter by an ulp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__)
#define ROSE_HD __host__ __device__ __forceinline__
#else
#define ROSE_HD inline
#endif

namespace rose_kernels::math {

ROSE_HD float abs_of(float x) { return fabsf(x); }
ROSE_HD double abs_of(double x) { return fabs(x); }
ROSE_HD float sqrt_of(float x) { return sqrtf(x); }
ROSE_HD double sqrt_of(double x) { return sqrt(x); }
// nextafter in the argument's own type (an unqualified nextafter on floats would pick the C
// double function and round its result back: no step at all).
ROSE_HD float next_toward(float x, float y) { return nextafterf(x, y); }
ROSE_HD double next_toward(double x, double y) { return nextafter(x, y); }
template <typename V>
inline auto abs_of(const V& x) -> decltype(x.abs()) { return x.abs(); }
template <typename V>
inline auto sqrt_of(const V& x) -> decltype(x.sqrt()) { return x.sqrt(); }

// ---- SCORE (semantics section 2) -------------------------------------------------------------

// Second-order element score |c g / m - 1|, in the opmath type; undefined (left out of every pool,
// and kept by the update) where m == 0. (c g) / m, not c (g / m): the reference's order.
template <typename V>
ROSE_HD V second_order_score(const V& scale, const V& g, const V& m, const V& one) {
  return abs_of(scale * g / m - one);
}

// First-order element score |g| (of the KL gradient).
template <typename V>
ROSE_HD V first_order_score(const V& g) {
  return abs_of(g);
}

// ---- SELECT (semantics section 3) -------------------------------------------------------------

// Order-preserving integer keys of non-negative scores: the IEEE bit pattern (sign bit clear).
template <typename T>
struct KeyOf;
template <>
struct KeyOf<float> {
  using type = uint32_t;
  static constexpr int kValueBits = 31;
};
template <>
struct KeyOf<double> {
  using type = uint64_t;
  static constexpr int kValueBits = 63;
};

template <typename T>
ROSE_HD typename KeyOf<T>::type key_of(T s) {
  typename KeyOf<T>::type k;
  memcpy(&k, &s, sizeof(s));
  return k;
}

template <typename T>
ROSE_HD T value_of(typename KeyOf<T>::type k) {
  T s;
  memcpy(&s, &k, sizeof(s));
  return s;
}

// Position of quantile q among n sorted values: r = q (n - 1), k = min(floor(r), n - 1), and the
// second order statistic k1 = min(k + 1, n - 1). n must be > 0.
struct QuantilePosition {
  double r;
  int64_t k;
  int64_t k1;
};

ROSE_HD QuantilePosition quantile_position(int64_t n, double q) {
  QuantilePosition p;
  p.r = q * static_cast<double>(n - 1);
  p.k = static_cast<int64_t>(floor(p.r));
  if (p.k > n - 1) p.k = n - 1;
  if (p.k < 0) p.k = 0;
  p.k1 = p.k + 1 < n ? p.k + 1 : n - 1;
  return p;
}

// Whether the quantile needs the second order statistic x_k1 (else it is x_k itself).
ROSE_HD bool needs_second(int64_t n, const QuantilePosition& p) {
  return p.r > static_cast<double>(p.k) && p.k + 1 < n;
}

// quantile = x_k + (r - k) (x_k1 - x_k), evaluated as reference.quantile does; NaN for n == 0.
ROSE_HD double interpolate(int64_t n, const QuantilePosition& p, double x_k, double x_k1) {
  if (n == 0) return std::numeric_limits<double>::quiet_NaN();
  const double frac = p.r - static_cast<double>(p.k);
  if (frac == 0.0 || p.k + 1 >= n || x_k == x_k1) return x_k;
  return x_k + frac * (x_k1 - x_k);
}

// The opmath bounds equivalent to comparing an opmath score s with float64 thresholds: for every
// s, lo <= s <= hi holds exactly when lo_f <= s <= hi_f. A +inf score is kept only when lo is +inf
// (semantics section 3), so hi_f is capped at the largest finite value otherwise; NaN thresholds
// (an empty pool) keep nothing.
template <typename T>
ROSE_HD void inward_bounds(double lo, double hi, T& lo_f, T& hi_f) {
  const T inf = std::numeric_limits<T>::infinity();
  if (lo != lo || hi != hi) {
    lo_f = inf;
    hi_f = -inf;
    return;
  }
  lo_f = static_cast<T>(lo);
  if (static_cast<double>(lo_f) < lo) lo_f = next_toward(lo_f, inf);
  hi_f = static_cast<T>(hi);
  if (static_cast<double>(hi_f) > hi) hi_f = next_toward(hi_f, -inf);
  const T largest = std::numeric_limits<T>::max();
  if (lo != std::numeric_limits<double>::infinity() && hi_f > largest) hi_f = largest;
}

// ---- UPDATE (semantics section 5) -------------------------------------------------------------

// lr times the bias correction sqrt(1 - beta2^t) / (1 - beta1^t) (t: the incremented step), or lr.
ROSE_HD double step_size(double lr, double beta1, double beta2, double step, bool correct_bias) {
  if (!correct_bias) return lr;
  return lr * sqrt(1.0 - pow(beta2, step)) / (1.0 - pow(beta1, step));
}

// The mask value of an element: 1 during warm-up, else w1 mu1 + w2 mu2.
template <typename V>
ROSE_HD V blended_mask(const V& w1, const V& mu1, const V& w2, const V& mu2) {
  return w1 * mu1 + w2 * mu2;
}

// Per-tensor coefficients of the masked AdamW move, rounded to the opmath type.
template <typename V>
struct AdamCoefficients {
  V beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, eps, lr_weight_decay;
};

// The masked AdamW move of one element (or lane) with mask value mu:
//   g' = mu g + (1 - mu) m;  m' = b1 m + (1 - b1) g';  v' = b2 v + (1 - b2) g'^2;
//   p' = p - step_size (mu m') / (sqrt(v') + eps);  p' = p' - (lr wd mu) p'.
// Where mu == 0 the caller keeps p and m as they were (frozen: bit for bit, whatever g holds).
template <typename V>
ROSE_HD void masked_adam_move(const AdamCoefficients<V>& c, const V& mu, const V& one, const V& g, V& p, V& m,
                              V& v) {
  const V g_masked = mu * g + (one - mu) * m;
  m = c.beta1 * m + c.one_minus_beta1 * g_masked;
  v = c.beta2 * v + c.one_minus_beta2 * (g_masked * g_masked);
  p = p - c.step_size * (mu * m) / (sqrt_of(v) + c.eps);
  p = p - (c.lr_weight_decay * mu) * p;
}

// The move with mu == 1 (plain AdamW, as torch's fused AdamW computes it): masked_adam_move's
// result for mu == 1 in fewer operations.
template <typename V>
ROSE_HD void adam_move(const AdamCoefficients<V>& c, const V& g, V& p, V& m, V& v) {
  m = c.beta1 * m + c.one_minus_beta1 * g;
  v = c.beta2 * v + c.one_minus_beta2 * (g * g);
  p = p - c.step_size * m / (sqrt_of(v) + c.eps);
  p = p - c.lr_weight_decay * p;
}

}  // namespace rose_kernels::math
