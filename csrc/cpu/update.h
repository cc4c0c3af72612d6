// UPDATE on the CPU: the masked AdamW step over many tensors.
//
// Compiled once per CPU capability (kernels_{default,avx2,avx512}.cpp, flags in setup.py) inside
// namespace CPU_CAPABILITY; the per-element math is ../rose_math.h, shared with the CUDA kernels.
#pragma once

#include "cpu/vec.h"
#include "cpu/score.h"

namespace rose_kernels::cpu {
namespace CPU_CAPABILITY {

// ------------------------------------------------------------------------------------------------
// UPDATE: the masked AdamW step (semantics.md section 5)
// ------------------------------------------------------------------------------------------------

template <typename opmath_t>
struct UpdateCoeffs {
  opmath_t beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, eps, lr_wd;
  opmath_t mu;                 // the tensor's mask when it is uniform
  bool uniform;                // false: per-element mask
  opmath_t w1, w2, mu1, mu2;   // element mask: mu = w1 * mu1_j + w2 * mu2_j
  bool element_second;
  opmath_t lo, hi, scale;      // inward float bounds and c of the inline second-order mask
};

// The coefficients of rose_math.h's Adam move, broadcast to vector lanes.
template <typename opmath_t>
inline math::AdamCoefficients<Vectorized<opmath_t>> lanes_of(const UpdateCoeffs<opmath_t>& c) {
  using Vec = Vectorized<opmath_t>;
  return {Vec(c.beta1), Vec(c.beta2), Vec(c.one_minus_beta1), Vec(c.one_minus_beta2),
          Vec(c.step_size), Vec(c.eps), Vec(c.lr_wd)};
}

// The sum of squares of the new exp_avg, which the backend keeps as the next step's ||m|| (the
// tensor-granularity second-order score), summed as sumsq_range sums: fp32 lanes over blocks,
// each block added in float64, and a block whose fp32 sum may have overflowed or lost bits to
// underflow summed again in float64 from the stored values. sumsq_range spreads a block of
// kSumsqBlock over 4 accumulators; the update has one, so its blocks are a quarter as long (the
// same number of fp32 terms per lane). fp32 lanes over a whole 64 Ki chunk, as before, lost
// 1e-5 to 1e-4 relative when a few large values came first (test_ops.py has such a tensor), and
// gave inf or 0 where the squares left float32's range.
constexpr int64_t kUpdateSumsqBlock = kSumsqBlock / 4;

template <typename opmath_t>
struct BlockSumsq {
  using Vec = Vectorized<opmath_t>;
  static constexpr int64_t W = Vec::size();
  Vec acc = Vec(0);
  __at_align__ double lanes[W] = {};  // float64 per lane: the blocks' lane sums added up
  double resummed = 0;                // blocks summed again in float64

  void add(const Vec& x) { acc = at::vec::fmadd(x, x, acc); }

  // Ends a block; `stored` holds its n elements as written.
  void end_block(const opmath_t* stored, int64_t n) {
    if constexpr (!std::is_same_v<opmath_t, double>) {
      // The block's fp32 sum only decides whether it must be summed again (sumsq_range's test;
      // a sum of 0 is exact when every element is +-0, which is checked on the stored values).
      const opmath_t block = at::vec::vec_reduce_all<opmath_t>([](Vec& a, Vec& b) { return a + b; }, acc);
      const bool in_range = block >= opmath_t(1e-28) && block <= opmath_t(1e36);
      if (!in_range && !(block == opmath_t(0) && all_zero(stored, n))) {
        for (int64_t k = 0; k < n; ++k) resummed += static_cast<double>(stored[k]) * stored[k];
        acc = Vec(0);
        return;
      }
    }
    __at_align__ opmath_t tmp[W];
    acc.store(tmp);
    for (int64_t k = 0; k < W; ++k) lanes[k] += static_cast<double>(tmp[k]);
    acc = Vec(0);
  }

  double total() const {
    double s = resummed;
    for (int64_t k = 0; k < W; ++k) s += lanes[k];
    return s;
  }

  static bool all_zero(const opmath_t* x, int64_t n) {
    Vec bits(0);
    for (int64_t i = 0; i < n; i += W) bits = bits | load_as<opmath_t>(x + i, std::min(W, n - i));
    return (bits.abs() == Vec(0)).zero_mask() == 0;  // every element is +-0
  }
};

// One chunk with a uniform mask value. mu == 1 is plain (HF-style) AdamW; mu == 0 freezes p and m
// and moves only v (12 bytes/element instead of 28: frozen tensors cost less than kept ones).
template <typename scalar_t>
void update_uniform(scalar_t* p, const scalar_t* g, typename OpMath<scalar_t>::type* m,
                    typename OpMath<scalar_t>::type* v, int64_t n,
                    const UpdateCoeffs<typename OpMath<scalar_t>::type>& c, double& m_sumsq) {
  using opmath_t = typename OpMath<scalar_t>::type;
  using Vec = Vectorized<opmath_t>;
  constexpr int64_t W = Vec::size();
  const math::AdamCoefficients<Vec> coef = lanes_of(c);
  const Vec b2(c.beta2), omb2(c.one_minus_beta2);
  const Vec mu(c.mu), one(1);
  BlockSumsq<opmath_t> msq;
  for (int64_t b = 0; b < n; b += kUpdateSumsqBlock) {
    const int64_t e = std::min(n, b + kUpdateSumsqBlock);
    if (c.mu == opmath_t(0)) {
      for (int64_t i = b; i < e; i += W) {
        const int64_t count = std::min(W, e - i);
        const Vec mv = load_as<opmath_t>(m + i, count);
        const Vec vv = load_as<opmath_t>(v + i, count);
        (b2 * vv + omb2 * (mv * mv)).store(v + i, count);
        msq.add(mv);
      }
    } else if (c.mu == opmath_t(1)) {
      for (int64_t i = b; i < e; i += W) {
        const int64_t count = std::min(W, e - i);
        const Vec gv = load_as<opmath_t>(g + i, count);
        Vec mv = load_as<opmath_t>(m + i, count);
        Vec vv = load_as<opmath_t>(v + i, count);
        Vec pv = load_as<opmath_t>(p + i, count);
        math::adam_move(coef, gv, pv, mv, vv);
        mv.store(m + i, count);
        vv.store(v + i, count);
        store_as<scalar_t>(p + i, pv, count);
        msq.add(mv);
      }
    } else {
      for (int64_t i = b; i < e; i += W) {
        const int64_t count = std::min(W, e - i);
        const Vec gv = load_as<opmath_t>(g + i, count);
        Vec mv = load_as<opmath_t>(m + i, count);
        Vec vv = load_as<opmath_t>(v + i, count);
        Vec pv = load_as<opmath_t>(p + i, count);
        math::masked_adam_move(coef, mu, one, gv, pv, mv, vv);
        mv.store(m + i, count);
        vv.store(v + i, count);
        store_as<scalar_t>(p + i, pv, count);
        msq.add(mv);
      }
    }
    msq.end_block(m + b, e - b);
  }
  m_sumsq += msq.total();
}

// One chunk with a per-element mask: mu_j = w1 * mu1_j + w2 * mu2_j, where mu1_j comes from the
// 1-bit first-order mask (or is uniform) and mu2_j is computed inline from g and m (or uniform).
// Lanes with mu_j == 0 keep p and m bit for bit.
template <typename scalar_t>
void update_element(scalar_t* p, const scalar_t* g, typename OpMath<scalar_t>::type* m,
                    typename OpMath<scalar_t>::type* v, const uint8_t* bits, int64_t begin,
                    int64_t end, const UpdateCoeffs<typename OpMath<scalar_t>::type>& c,
                    double& kept, double& m_sumsq) {
  using opmath_t = typename OpMath<scalar_t>::type;
  using Vec = Vectorized<opmath_t>;
  constexpr int64_t W = Vec::size();
  const math::AdamCoefficients<Vec> coef = lanes_of(c);
  const Vec one(1), zero(0);
  const Vec w1(c.w1), w2(c.w2), mu1_uniform(c.mu1), mu2_uniform(c.mu2);
  const Vec lo(c.lo), hi(c.hi), scale(c.scale);
  // The kept sum is w1 * sum(mu1) + w2 * sum(mu2): mu1 and mu2 are 0/1, so their lane sums are
  // exact, where summing soft mask values (gamma = 0.162, ...) in fp32 lanes drifted by ~1e-5.
  BlockSumsq<opmath_t> msq;
  Vec kept1(0), kept2(0);
  for (int64_t b = begin; b < end; b += kUpdateSumsqBlock) {
    const int64_t e = std::min(end, b + kUpdateSumsqBlock);
    for (int64_t i = b; i < e; i += W) {
      const int64_t count = std::min(W, e - i);
      const Vec gv = load_as<opmath_t>(g + i, count);
      const Vec m_old = load_as<opmath_t>(m + i, count);
      Vec vv = load_as<opmath_t>(v + i, count);
      const Vec p_old = load_as<opmath_t>(p + i, count);
      const Vec mu1 = bits != nullptr ? bits_to_lanes<opmath_t>(bits, i, count) : mu1_uniform;
      Vec mu2 = mu2_uniform;
      if (c.element_second) {
        const Vec s = math::second_order_score(scale, gv, m_old, one);
        mu2 = ((m_old == zero) | ((s >= lo) & (s <= hi))) & one;
      }
      const Vec mu = math::blended_mask(w1, mu1, w2, mu2);
      Vec mv = m_old;
      Vec pv = p_old;
      math::masked_adam_move(coef, mu, one, gv, pv, mv, vv);
      const Vec frozen = (mu == zero);
      mv = Vec::blendv(mv, m_old, frozen);
      pv = Vec::blendv(pv, p_old, frozen);
      mv.store(m + i, count);
      vv.store(v + i, count);
      store_as<scalar_t>(p + i, pv, count);
      msq.add(mv);
      if (count < W) {
        // Padding lanes (zeros past the tensor's end) can get mu2 = 1 from m == 0: leave them out.
        __at_align__ opmath_t lanes[W];
        for (int64_t k = 0; k < W; ++k) lanes[k] = k < count ? opmath_t(1) : opmath_t(0);
        const Vec real = Vec::loadu(lanes);
        kept1 = kept1 + mu1 * real;
        kept2 = kept2 + mu2 * real;
      } else {
        kept1 = kept1 + mu1;
        kept2 = kept2 + mu2;
      }
    }
    msq.end_block(m + b, e - b);
  }
  kept += static_cast<double>(c.w1) * sum_lanes(kept1) + static_cast<double>(c.w2) * sum_lanes(kept2);
  m_sumsq += msq.total();
}

inline void masked_adamw(const TensorList& params, const TensorList& grads, const TensorList& exp_avgs,
                         const TensorList& exp_avg_sqs, const OptionalTensorList& first_masks,
                         const double* hyper, const double* masks, const double* steps, double* out) {
  const int64_t n = static_cast<int64_t>(params.size());
  const auto chunks = make_chunks(params);
  std::vector<double> kept_partial(chunks.size(), 0.0), msq_partial(chunks.size(), 0.0);
  // Per-tensor coefficients in double first; each chunk rounds them to its opmath type.
  struct TensorPlan {
    double beta1, beta2, step_size, eps, lr_wd, mu, w1, w2, mu1, mu2, lo, hi, scale;
    bool uniform, element_second, has_bits;
  };
  std::vector<TensorPlan> plans(n);
  for (int64_t t = 0; t < n; ++t) {
    const double* row = hyper + t * kNumHyperColumns;
    const double* mask_row = masks + t * kNumMaskColumns;
    TensorPlan& pl = plans[t];
    const double step = steps[t];
    pl.beta1 = row[kBeta1];
    pl.beta2 = row[kBeta2];
    pl.step_size = math::step_size(row[kLr], pl.beta1, pl.beta2, step, row[kCorrectBias] != 0.0);
    pl.eps = row[kEps];
    pl.lr_wd = row[kLr] * row[kWeightDecay];
    pl.w1 = row[kWeightFirst];
    pl.w2 = row[kWeightSecond];
    pl.mu1 = mask_row[kMaskFirst];
    pl.mu2 = mask_row[kMaskSecond];
    pl.lo = mask_row[kLower];
    pl.hi = mask_row[kUpper];
    pl.scale = row[kScale];
    pl.has_bits = first_masks[t].has_value() && first_masks[t]->defined();
    pl.element_second = row[kElementSecond] != 0.0;
    const bool warmup = step <= row[kWarmupSteps];
    pl.uniform = warmup || (!pl.has_bits && !pl.element_second);
    pl.mu = warmup ? 1.0 : pl.w1 * pl.mu1 + pl.w2 * pl.mu2;
  }
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo_c, int64_t hi_c) {
    for (int64_t ci = lo_c; ci < hi_c; ++ci) {
      const Chunk& ch = chunks[ci];
      const TensorPlan& pl = plans[ch.tensor];
      dispatch_float_type(params[ch.tensor].scalar_type(), [&](auto* tag) {
        using scalar_t = std::remove_pointer_t<decltype(tag)>;
        using opmath_t = typename OpMath<scalar_t>::type;
        UpdateCoeffs<opmath_t> c;
        c.beta1 = static_cast<opmath_t>(pl.beta1);
        c.beta2 = static_cast<opmath_t>(pl.beta2);
        c.one_minus_beta1 = static_cast<opmath_t>(1.0 - pl.beta1);
        c.one_minus_beta2 = static_cast<opmath_t>(1.0 - pl.beta2);
        c.step_size = static_cast<opmath_t>(pl.step_size);
        c.eps = static_cast<opmath_t>(pl.eps);
        c.lr_wd = static_cast<opmath_t>(pl.lr_wd);
        c.mu = static_cast<opmath_t>(pl.mu);
        c.uniform = pl.uniform;
        c.w1 = static_cast<opmath_t>(pl.w1);
        c.w2 = static_cast<opmath_t>(pl.w2);
        c.mu1 = static_cast<opmath_t>(pl.mu1);
        c.mu2 = static_cast<opmath_t>(pl.mu2);
        c.element_second = pl.element_second;
        c.scale = static_cast<opmath_t>(pl.scale);
        inward_bounds(pl.lo, pl.hi, c.lo, c.hi);
        scalar_t* p = params[ch.tensor].data_ptr<scalar_t>();
        const scalar_t* g = grads[ch.tensor].data_ptr<scalar_t>();
        opmath_t* m = exp_avgs[ch.tensor].data_ptr<opmath_t>();
        opmath_t* v = exp_avg_sqs[ch.tensor].data_ptr<opmath_t>();
        if (c.uniform) {
          update_uniform<scalar_t>(p + ch.begin, g + ch.begin, m + ch.begin, v + ch.begin,
                                   ch.end - ch.begin, c, msq_partial[ci]);
          kept_partial[ci] = static_cast<double>(c.mu) * static_cast<double>(ch.end - ch.begin);
        } else {
          const uint8_t* bits = pl.has_bits ? first_masks[ch.tensor]->data_ptr<uint8_t>() : nullptr;
          update_element<scalar_t>(p, g, m, v, bits, ch.begin, ch.end, c, kept_partial[ci],
                                   msq_partial[ci]);
        }
      });
    }
  });
  for (int64_t t = 0; t < n; ++t) out[2 * t] = out[2 * t + 1] = 0;
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    out[2 * chunks[ci].tensor] += kept_partial[ci];
    out[2 * chunks[ci].tensor + 1] += msq_partial[ci];
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace rose_kernels::cpu
