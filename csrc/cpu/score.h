// SCORE on the CPU: per-tensor sums of squares and the 1-bit first-order mask.
//
// Compiled once per CPU capability (kernels_{default,avx2,avx512}.cpp, flags in setup.py) inside
// namespace CPU_CAPABILITY; the per-element math is ../rose_math.h, shared with the CUDA kernels.
#pragma once

#include "cpu/vec.h"

namespace rose_kernels::cpu {
namespace CPU_CAPABILITY {

// ------------------------------------------------------------------------------------------------
// SCORE: sums of squares
// ------------------------------------------------------------------------------------------------

// fp32 lanes accumulate blocks of 1024 elements (<= 128 terms per lane on AVX2, relative error
// ~1e-7), blocks add up in float64: as fast as a pure-fp32 sum, as accurate as the reference's
// float64 sum to ~1e-7. A block whose fp32 sum may have overflowed or lost bits to underflow
// (squares beyond ~1e36 or below ~1e-28; never for real gradients) is summed again in float64.
// Elements per fp32 partial sum of squares: sumsq_range's blocks and the update's exp_avg sum.
constexpr int64_t kSumsqBlock = 1024;

template <typename scalar_t>
double sumsq_range(const scalar_t* x, int64_t n) {
  using opmath_t = typename OpMath<scalar_t>::type;
  using Vec = Vectorized<opmath_t>;
  constexpr int64_t kBlock = kSumsqBlock;
  constexpr int64_t W = Vec::size();
  double total = 0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    Vec acc0(0), acc1(0), acc2(0), acc3(0), bits(0);
    int64_t i = b;
    for (; i + 4 * W <= e; i += 4 * W) {
      Vec x0 = load_as<opmath_t>(x + i), x1 = load_as<opmath_t>(x + i + W);
      Vec x2 = load_as<opmath_t>(x + i + 2 * W), x3 = load_as<opmath_t>(x + i + 3 * W);
      acc0 = at::vec::fmadd(x0, x0, acc0);
      acc1 = at::vec::fmadd(x1, x1, acc1);
      acc2 = at::vec::fmadd(x2, x2, acc2);
      acc3 = at::vec::fmadd(x3, x3, acc3);
      bits = bits | (x0 | x1) | (x2 | x3);
    }
    for (; i < e; i += W) {
      Vec x0 = load_as<opmath_t>(x + i, std::min(W, e - i));
      acc0 = at::vec::fmadd(x0, x0, acc0);
      bits = bits | x0;
    }
    double block = sum_lanes((acc0 + acc1) + (acc2 + acc3));
    if constexpr (!std::is_same_v<opmath_t, double>) {
      const bool all_zero = (bits.abs() == Vec(0)).zero_mask() == 0;  // every element is +-0
      if (!all_zero && !(block >= 1e-28 && block <= 1e36)) {
        block = 0;
        for (int64_t k = b; k < e; ++k) {
          const double v = static_cast<double>(static_cast<opmath_t>(x[k]));
          block += v * v;
        }
      }
    }
    total += block;
  }
  return total;
}

// Runs f(chunk, tag) -> double over every chunk of xs in parallel (tag: a null pointer of the
// tensor's element type) and sums the results per tensor into out. Chunks are summed in a fixed
// order, so the result does not depend on the thread count.
template <typename F>
void reduce_chunks(const TensorList& xs, double* out, F&& f) {
  const auto chunks = make_chunks(xs);
  std::vector<double> partial(chunks.size());
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c)
      dispatch_float_type(xs[chunks[c].tensor].scalar_type(), [&](auto* tag) { partial[c] = f(chunks[c], tag); });
  });
  for (size_t t = 0; t < xs.size(); ++t) out[t] = 0;
  for (size_t c = 0; c < chunks.size(); ++c) out[chunks[c].tensor] += partial[c];
}

inline void sumsq(const TensorList& xs, double* out) {
  reduce_chunks(xs, out, [&](const Chunk& ch, auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    return sumsq_range(xs[ch.tensor].data_ptr<scalar_t>() + ch.begin, ch.end - ch.begin);
  });
}

// out[i] = number of chunks of xs[i] holding a non-finite element (0: all finite). x * 0 is 0 for
// finite x and NaN otherwise: one FMA per vector, where a sum of squares would also flag finite
// float64 values past ~1.3e154 (their squares overflow).
inline void nonfinite_chunks(const TensorList& xs, double* out) {
  reduce_chunks(xs, out, [&](const Chunk& ch, auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    using opmath_t = typename OpMath<scalar_t>::type;
    using Vec = Vectorized<opmath_t>;
    constexpr int64_t W = Vec::size();
    const scalar_t* x = xs[ch.tensor].data_ptr<scalar_t>();
    Vec probe(0);
    for (int64_t i = ch.begin; i < ch.end; i += W)
      probe = at::vec::fmadd(load_as<opmath_t>(x + i, std::min(W, ch.end - i)), Vec(0), probe);
    return (probe == probe).zero_mask() != 0 ? 1.0 : 0.0;  // a NaN lane compares unequal: zero bits
  });
}


// ------------------------------------------------------------------------------------------------
// SCORE, first order, element granularity: the 1-bit mask
// ------------------------------------------------------------------------------------------------

template <typename scalar_t>
int64_t first_order_mask_range(const scalar_t* g, uint8_t* bits, int64_t begin, int64_t end,
                               double lo, double hi) {
  using opmath_t = typename OpMath<scalar_t>::type;
  using Vec = Vectorized<opmath_t>;
  constexpr int64_t W = Vec::size();
  opmath_t lo_f, hi_f;
  inward_bounds(lo, hi, lo_f, hi_f);
  const Vec lov(lo_f), hiv(hi_f);
  int64_t kept = 0;
  // begin is a multiple of 64: build one 64-bit word per 64 elements.
  for (int64_t w = begin; w < end; w += 64) {
    const int64_t wend = std::min(end, w + 64);
    uint64_t word = 0;
    for (int64_t i = w; i < wend; i += W) {
      const int64_t count = std::min(W, wend - i);
      const Vec s = load_as<opmath_t>(g + i, count).abs();
      const Vec keep = (s >= lov) & (s <= hiv);
      uint64_t lane_bits = static_cast<uint64_t>(~keep.zero_mask()) & ((uint64_t(1) << W) - 1);
      if (count < W) lane_bits &= (uint64_t(1) << count) - 1;
      word |= lane_bits << (i - w);
    }
    kept += __builtin_popcountll(word);
    const int64_t nbytes = (wend - w + 7) / 8;
    std::memcpy(bits + w / 8, &word, nbytes);  // little-endian: bit j of the word is element w + j
  }
  return kept;
}

inline void first_order_mask(const TensorList& g, const double* thresholds, TensorList& masks,
                             double* kept) {
  reduce_chunks(g, kept, [&](const Chunk& ch, auto* tag) {
    using scalar_t = std::remove_pointer_t<decltype(tag)>;
    return static_cast<double>(first_order_mask_range(g[ch.tensor].data_ptr<scalar_t>(),
                                                      masks[ch.tensor].data_ptr<uint8_t>(), ch.begin, ch.end,
                                                      thresholds[2 * ch.tensor], thresholds[2 * ch.tensor + 1]));
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace rose_kernels::cpu
