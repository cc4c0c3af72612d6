// SELECT on the CPU: exact quantile thresholds of element scores.
//
// Compiled once per CPU capability (kernels_{default,avx2,avx512}.cpp, flags in setup.py) inside
// namespace CPU_CAPABILITY; the per-element math is ../rose_math.h, shared with the CUDA kernels.
#pragma once

#include "cpu/vec.h"

namespace rose_kernels::cpu {
namespace CPU_CAPABILITY {

// ------------------------------------------------------------------------------------------------
// SELECT: exact order statistics of element scores
// ------------------------------------------------------------------------------------------------
//
// A pool is a list of (a, b) tensor pairs. Score of element j: |a_j| when there is no b, else
// |scale * a_j / b_j - 1|, undefined (left out of the pool) where b_j == 0. Scores are computed in
// the opmath type (fp32 for fp32/bf16/fp16 inputs, fp64 for fp64) exactly as the reference does,
// so both agree bit for bit on every score.
//
// Strategy (measured on 2 cores: a scalar 64 Ki-bucket histogram costs ~4 cycles/element, a
// vectorised compare-and-count pass runs at memory speed):
//  1. sample: a deterministic sample of ~(3N)^(2/3) scores (runs of 8 at even strides) gives,
//     for each wanted rank, a bracket [x, y] of values that contains it with >= 6 sigma margin;
//  2. one vectorised pass counts, per bracket, scores < x, == x, == y and gathers those in (x, y);
//  3. if every wanted rank falls inside its bracket, nth_element on the small gathered set gives
//     the exact value; otherwise (an unlucky sample, or huge ties inside a bracket) the radix path
//     runs: histogram refinement on the order-preserving integer keys of the scores, 16 bits per
//     pass, restricted to the prefixes holding the wanted ranks, until the keys are exact.
// Pools up to kDirectPool scores are simply gathered whole.
//
// Guessed windows (the `guesses` of the previous call, which the caller keeps): when a pool has
// them, step 1 is skipped and the count pass of step 2 uses the previous call's windows as its
// brackets: one read of the inputs when they still hold the ranks (the usual case from one
// optimizer step to the next). Every call writes the windows for the next one: the values at ranks
// k - w and k1 + w of the pool it just selected, w a half-width that follows how far the ranks
// moved inside the last window. A window that misses costs its pass, and the call goes on as if
// there had been no guess (steps 1-3), so the result never depends on the guesses.

constexpr int64_t kDirectPool = 1 << 15;
constexpr int kRadixBits = 16;
// guesses[pool] holds the keys of the window [low, high] of threshold t (0: q_lo, 1: q_hi) at
// columns 2t and 2t + 1 (q_lo == q_hi: columns 0, 1); a negative key (backends/quantiles.py's
// NO_GUESS) is none. Quantiles 0 and 1 need no window.
constexpr int64_t kGuessColumns = kGuessRanks;
constexpr int64_t kNoGuess = -8;

using math::KeyOf;
using math::key_of;
using math::value_of;

struct PoolPart {
  at::Tensor a;
  at::Tensor b;  // undefined: score = |a|
  double scale;  // c of |c * a / b - 1|
};

// Scores of one vector of elements. Lanes without a defined score (b == 0, or past `count`) are
// set to NaN so that every later comparison is false for them; `invalid` marks those lanes.
// Non-finite inputs are detected by accumulating x * 0 (0 for finite x, NaN otherwise): one FMA
// per vector instead of a compare-and-or, since only "any non-finite?" is needed.
template <typename opmath_t, typename scalar_t>
struct ScoreSource {
  const scalar_t* a;
  const opmath_t* b;  // null: score = |a|
  opmath_t scale;

  inline void score(int64_t i, int64_t count, Vectorized<opmath_t>& s, Vectorized<opmath_t>& invalid,
                    Vectorized<opmath_t>& nonfinite_acc) const {
    using Vec = Vectorized<opmath_t>;
    const Vec zero(0);
    const Vec av = load_as<opmath_t>(a + i, count);
    nonfinite_acc = at::vec::fmadd(av, zero, nonfinite_acc);
    if (b == nullptr) {
      s = math::first_order_score(av);
      invalid = (s != s);
    } else {
      const Vec bv = load_as<opmath_t>(b + i, count);
      nonfinite_acc = at::vec::fmadd(bv, zero, nonfinite_acc);
      s = math::second_order_score(Vec(scale), av, bv, Vec(1));
      invalid = (bv == zero) | (s != s);  // NaN scores (from NaN or inf / inf inputs) join no pool
    }
    if (count < Vec::size()) {
      __at_align__ opmath_t lanes[Vec::size()];
      for (int64_t k = 0; k < Vec::size(); ++k) lanes[k] = k < count ? opmath_t(0) : opmath_t(1);
      invalid = invalid | (Vec::loadu(lanes) != zero);
    }
    s = s | invalid;  // all-ones bits: NaN
  }

  inline bool score_one(int64_t i, opmath_t& s) const {
    const opmath_t av = static_cast<opmath_t>(a[i]);
    if (b == nullptr) {
      s = math::first_order_score(av);
    } else {
      const opmath_t bv = b[i];
      if (bv == opmath_t(0)) return false;
      s = math::second_order_score(scale, av, bv, opmath_t(1));
    }
    return s == s;
  }
};

// Visits every element of a pool (split over threads when `parallel`) as vectors of scores.
template <typename opmath_t, typename F>
void for_each_score_vector(const std::vector<PoolPart>& parts, bool parallel, F&& f) {
  TensorList as;
  for (const auto& p : parts) as.push_back(p.a);
  const auto chunks = make_chunks(as);
  auto body = [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& ch = chunks[c];
      const PoolPart& part = parts[ch.tensor];
      dispatch_float_type(part.a.scalar_type(), [&](auto* tag) {
        using scalar_t = std::remove_pointer_t<decltype(tag)>;
        if constexpr (std::is_same_v<opmath_t, typename OpMath<scalar_t>::type>) {
          ScoreSource<opmath_t, scalar_t> src{part.a.data_ptr<scalar_t>(),
                                              part.b.defined() ? part.b.data_ptr<opmath_t>() : nullptr,
                                              static_cast<opmath_t>(part.scale)};
          f(src, ch.begin, ch.end);
        } else {
          TORCH_CHECK(false, "rose_kernels: mixed float64 and float32 tensors in one pool");
        }
      });
    }
  };
  if (parallel) {
    at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, body);
  } else {
    body(0, static_cast<int64_t>(chunks.size()));
  }
}

template <typename opmath_t>
struct Wanted {
  // Ranks whose values are needed (sorted, unique, < n) and their values once found.
  std::vector<int64_t> ranks;
  std::vector<opmath_t> values;
};

inline void wanted_ranks(int64_t n, double q, std::vector<int64_t>& ranks) {
  if (n == 0) return;
  const math::QuantilePosition p = math::quantile_position(n, q);
  ranks.push_back(p.k);
  if (math::needs_second(n, p)) ranks.push_back(p.k1);
}

// The quantile from the values of the wanted ranks (math::interpolate, as reference.quantile).
template <typename opmath_t>
double interpolate(int64_t n, double q, const std::vector<int64_t>& ranks,
                   const std::vector<opmath_t>& values) {
  if (n == 0) return std::numeric_limits<double>::quiet_NaN();
  const math::QuantilePosition p = math::quantile_position(n, q);
  auto value_at = [&](int64_t rank) {
    const auto it = std::lower_bound(ranks.begin(), ranks.end(), rank);
    return static_cast<double>(values[it - ranks.begin()]);
  };
  const double x_k = value_at(p.k);
  return math::interpolate(n, p, x_k, math::needs_second(n, p) ? value_at(p.k1) : x_k);
}

// Radix refinement: finds the exact value of each rank in `ranks` (ascending) among the pool's
// defined scores. Memory: one 2^16-bucket histogram per distinct prefix and thread.
template <typename opmath_t>
void radix_select(const std::vector<PoolPart>& parts, bool parallel,
                  const std::vector<int64_t>& ranks, std::vector<opmath_t>& values) {
  using key_t = typename KeyOf<opmath_t>::type;
  constexpr int kBits = KeyOf<opmath_t>::kValueBits;
  constexpr int64_t kBuckets = int64_t(1) << kRadixBits;
  const size_t nr = ranks.size();
  std::vector<key_t> prefix(nr, 0);           // known high bits of each rank's key
  std::vector<int64_t> rank_in_prefix(ranks);  // rank among the scores sharing that prefix
  int known = 0;
  const int nthreads = parallel ? at::get_num_threads() : 1;
  while (known < kBits) {
    const int digit_bits = std::min(kRadixBits, kBits - known);
    const int shift = kBits - known - digit_bits;
    // Distinct prefixes still being refined (at most 4: two ranks per threshold).
    std::vector<key_t> targets;
    for (size_t r = 0; r < nr; ++r)
      if (std::find(targets.begin(), targets.end(), prefix[r]) == targets.end())
        targets.push_back(prefix[r]);
    const int64_t nt = static_cast<int64_t>(targets.size());
    std::vector<int64_t> hist(static_cast<size_t>(nthreads) * nt * kBuckets, 0);
    const int known_shift = kBits - known;  // key >> known_shift is the known prefix
    const key_t digit_mask = (key_t(1) << digit_bits) - 1;
    for_each_score_vector<opmath_t>(parts, parallel, [&](const auto& src, int64_t b, int64_t e) {
      const int tid = parallel ? at::get_thread_num() : 0;
      int64_t* h = hist.data() + static_cast<size_t>(tid) * nt * kBuckets;
      for (int64_t i = b; i < e; ++i) {
        opmath_t s;
        if (!src.score_one(i, s)) continue;
        const key_t k = key_of(s);
        const key_t p = known == 0 ? key_t(0) : static_cast<key_t>(k >> known_shift);
        for (int64_t t = 0; t < nt; ++t) {
          if (p == targets[t]) {
            ++h[t * kBuckets + static_cast<int64_t>((k >> shift) & digit_mask)];
            break;
          }
        }
      }
    });
    for (int tid = 1; tid < nthreads; ++tid)
      for (int64_t j = 0; j < nt * kBuckets; ++j) hist[j] += hist[tid * nt * kBuckets + j];
    for (size_t r = 0; r < nr; ++r) {
      const int64_t t = std::find(targets.begin(), targets.end(), prefix[r]) - targets.begin();
      const int64_t* h = hist.data() + t * kBuckets;
      int64_t below = 0, d = 0;
      const int64_t digits = int64_t(1) << digit_bits;
      while (d < digits && below + h[d] <= rank_in_prefix[r]) below += h[d++];
      TORCH_CHECK(d < digits, "rose_kernels: radix select lost a rank (internal error)");
      rank_in_prefix[r] -= below;
      prefix[r] = static_cast<key_t>((prefix[r] << digit_bits) | static_cast<key_t>(d));
    }
    known += digit_bits;
  }
  values.resize(nr);
  for (size_t r = 0; r < nr; ++r) values[r] = value_of<opmath_t>(prefix[r]);
}

// The rank-th smallest of n non-negative scores at data (reordered and overwritten): MSD radix
// select on the scores' bit patterns, 11 bits per pass, keeping only the bucket that holds the rank.
// Measured ~5x faster than std::nth_element on the 10^4-10^5 scores a bracket gathers.
// `known` high bits are already common to every score (a bracket's bounds share them).
template <typename opmath_t>
opmath_t radix_select_in_place(opmath_t* data, int64_t n, int64_t rank, int known = 0) {
  using key_t = typename KeyOf<opmath_t>::type;
  constexpr int kBits = KeyOf<opmath_t>::kValueBits;
  constexpr int kDigit = 11;
  std::array<int64_t, 1 << kDigit> counts;
  while (n > 512 && known < kBits) {
    const int digit_bits = std::min(kDigit, kBits - known);
    const int shift = kBits - known - digit_bits;
    const key_t mask = (key_t(1) << digit_bits) - 1;
    counts.fill(0);
    for (int64_t i = 0; i < n; ++i) ++counts[(key_of(data[i]) >> shift) & mask];
    int64_t below = 0, d = 0;
    while (below + counts[d] <= rank) below += counts[d++];
    rank -= below;
    int64_t kept = 0;
    for (int64_t i = 0; i < n; ++i)
      if (static_cast<int64_t>((key_of(data[i]) >> shift) & mask) == d) data[kept++] = data[i];
    n = kept;
    known += digit_bits;
  }
  std::nth_element(data, data + rank, data + n);
  return data[rank];
}

// Sorts xs (non-negative scores whose keys share all but their low `low_bits` bits) ascending: LSD
// radix sort of those bits, 11 per pass (stable, so the order is the keys' order).
template <typename opmath_t>
void radix_sort_low_bits(std::vector<opmath_t>& xs, int low_bits, std::vector<opmath_t>& tmp) {
  using key_t = typename KeyOf<opmath_t>::type;
  constexpr int kDigit = 11;
  const int64_t n = static_cast<int64_t>(xs.size());
  tmp.resize(xs.size());
  opmath_t* src = xs.data();
  opmath_t* dst = tmp.data();
  std::array<int64_t, 1 << kDigit> counts;
  for (int shift = 0; shift < low_bits; shift += kDigit) {
    const int digit_bits = std::min(kDigit, low_bits - shift);
    const key_t mask = (key_t(1) << digit_bits) - 1;
    counts.fill(0);
    for (int64_t i = 0; i < n; ++i) ++counts[(key_of(src[i]) >> shift) & mask];
    int64_t sum = 0;
    for (int d = 0; d < (1 << digit_bits); ++d) {
      const int64_t c = counts[d];
      counts[d] = sum;
      sum += c;
    }
    for (int64_t i = 0; i < n; ++i) dst[counts[(key_of(src[i]) >> shift) & mask]++] = src[i];
    std::swap(src, dst);
  }
  if (src != xs.data()) std::copy(src, src + n, xs.data());
}

// Selects ranks of a gathered set without reordering it. A call that resolves a threshold and
// writes the next call's windows asks for 3 to 4 ranks of one set: the set is sorted once (a copy,
// radix-sorted on the key bits its elements do not share), then each rank is a lookup; one radix
// select per rank passed over the set ~6 times each (measured: ~20 ns per gathered score, the
// largest cost of a guessed call whose window held 2% of its pool). Where the elements share too
// few bits (float64 over a wide range), rank r + 1 (the usual second rank of a linear
// interpolation) follows from rank r's value v by one scan: it is v again if more than r + 1
// scores are <= v, else the smallest score above v; other ranks take a radix select.
template <typename opmath_t>
struct RankSelector {
  const std::vector<opmath_t>* xs;
  int common_bits = 0;  // high key bits shared by every element of xs
  int64_t last_rank = -1;
  opmath_t last_value = 0;
  std::vector<opmath_t> scratch;
  std::vector<opmath_t> tmp;
  const opmath_t* sorted_from = nullptr;  // xs->data() and size when scratch holds xs sorted
  size_t sorted_size = 0;

  opmath_t operator()(int64_t rank) {
    const auto& v = *xs;
    const int low_bits = KeyOf<opmath_t>::kValueBits - common_bits;
    if (v.size() > 256 && low_bits <= 33) {
      if (sorted_from != v.data() || sorted_size != v.size()) {
        scratch.assign(v.begin(), v.end());
        radix_sort_low_bits(scratch, low_bits, tmp);
        sorted_from = v.data();
        sorted_size = v.size();
      }
      last_rank = rank;
      last_value = scratch[rank];
      return last_value;
    }
    if (last_rank >= 0 && rank == last_rank + 1) {
      int64_t at_most = 0;
      opmath_t next = std::numeric_limits<opmath_t>::infinity();
      for (opmath_t x : v) {
        if (x <= last_value) ++at_most; else next = std::min(next, x);
      }
      last_value = at_most > rank ? last_value : next;
    } else {
      scratch.assign(v.begin(), v.end());
      sorted_from = nullptr;
      last_value = radix_select_in_place(scratch.data(), static_cast<int64_t>(scratch.size()), rank, common_bits);
    }
    last_rank = rank;
    return last_value;
  }
};

// Number of leading value bits that keys of every score in [lo, hi] share (scores are >= 0).
template <typename opmath_t>
int common_prefix_bits(opmath_t lo, opmath_t hi) {
  using key_t = typename KeyOf<opmath_t>::type;
  constexpr int kBits = KeyOf<opmath_t>::kValueBits;
  const key_t diff = key_of(lo) ^ key_of(hi);
  if (diff == 0) return kBits;
  int highest = 0;  // index of the highest differing bit
  for (key_t d = diff; d > 1; d >>= 1) ++highest;
  return kBits - 1 - highest;
}

template <typename opmath_t>
struct Bracket {
  // Scores < low, == low and == high are counted; scores strictly between low and high are
  // gathered. Ties at either end are never gathered: gradients of exactly 0 give many scores of
  // exactly 1.0, and a momentum of exactly c * g many of exactly 0.
  opmath_t low;
  opmath_t high;
  int64_t below = 0, at_low = 0, at_high = 0;
  std::vector<opmath_t> inside;
  bool overflow = false;
  RankSelector<opmath_t> selector{&inside};
};

// Writes the lanes of v selected by the bit mask `lanes` contiguously to dst (which has room for a
// whole vector) and returns how many were written. Branch-free on AVX2/AVX-512: gathering the
// ~1-6% of scores inside a bracket with a per-hit branch cost as much as the rest of the pass.
template <typename opmath_t>
inline int64_t compress_store(opmath_t* dst, const Vectorized<opmath_t>& v, int lanes) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<opmath_t, float>) {
    // Compress in a register, then a plain store: compress-to-memory is microcoded on Zen 4
    // (measured: the count pass went from 11 ms to 26 ms on 22.7M scores).
    _mm512_storeu_ps(dst, _mm512_maskz_compress_ps(static_cast<__mmask16>(lanes), static_cast<__m512>(v)));
    return __builtin_popcount(lanes);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<opmath_t, float>) {
    // Permutation that moves the selected lanes to the front, one per 8-bit mask.
    static const auto table = [] {
      std::array<std::array<int32_t, 8>, 256> t{};
      for (int m = 0; m < 256; ++m) {
        int k = 0;
        for (int lane = 0; lane < 8; ++lane)
          if ((m >> lane) & 1) t[m][k++] = lane;
      }
      return t;
    }();
    const __m256i perm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(table[lanes].data()));
    _mm256_storeu_ps(dst, _mm256_permutevar8x32_ps(static_cast<__m256>(v), perm));
    return __builtin_popcount(lanes);
  }
#endif
  if (lanes == 0) return 0;
  __at_align__ opmath_t tmp[Vectorized<opmath_t>::size()];
  v.store(tmp);
  int64_t n = 0;
  for (; lanes != 0; lanes &= lanes - 1) dst[n++] = tmp[__builtin_ctz(lanes)];
  return n;
}

// ---- The count pass on float32 inputs, with the comparisons as bit masks (AVX2 / AVX-512) -----
//
// The generic pass keeps every comparison as a vector of 0/1 lanes and adds them up (measured
// ~2.2 cycles per element on 2 Zen 4 cores: compute-bound, 3x a read of the same bytes). Here a
// comparison is a bit mask (AVX-512 mask registers; AVX2 movemask) counted with popcount, the
// score is masked instead of overwritten with NaN, and the finiteness check is a class test: the
// same counts, minimum, maximum and gathered scores (the score's float operations are rose_math.h's,
// in the same order), at about half the instructions.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#define ROSE_KERNELS_MASK_COUNT 1
struct MaskLanes {
#if defined(CPU_CAPABILITY_AVX512)
  using V = __m512;
  using M = __mmask16;
  static constexpr int W = 16;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V mul(V x, V y) { return _mm512_mul_ps(x, y); }
  static V div(V x, V y) { return _mm512_div_ps(x, y); }
  static V sub(V x, V y) { return _mm512_sub_ps(x, y); }
  static V abs(V x) { return _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7fffffff))); }
  template <int P> static M cmp(V x, V y) { return _mm512_cmp_ps_mask(x, y, P); }
  template <int P> static M cmp_where(M m, V x, V y) { return _mm512_mask_cmp_ps_mask(m, x, y, P); }
  static M and_not(M m, M n) { return static_cast<M>(m & ~n); }
  static int bits(M m) { return static_cast<int>(m); }
  static M nonfinite(V x) { return _mm512_fpclass_ps_mask(x, 0x99); }  // +-inf, quiet or signalling NaN
  static M none() { return 0; }
  static M or_(M x, M y) { return static_cast<M>(x | y); }
  static V min_where(V acc, V s, M m) { return _mm512_mask_min_ps(acc, m, acc, s); }
  static V max_where(V acc, V s, M m) { return _mm512_mask_max_ps(acc, m, acc, s); }
#else
  using V = __m256;
  using M = __m256;  // lanes of all ones or zeros
  static constexpr int W = 8;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V mul(V x, V y) { return _mm256_mul_ps(x, y); }
  static V div(V x, V y) { return _mm256_div_ps(x, y); }
  static V sub(V x, V y) { return _mm256_sub_ps(x, y); }
  static V abs(V x) { return _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }
  template <int P> static M cmp(V x, V y) { return _mm256_cmp_ps(x, y, P); }
  template <int P> static M cmp_where(M m, V x, V y) { return _mm256_and_ps(m, _mm256_cmp_ps(x, y, P)); }
  static M and_not(M m, M n) { return _mm256_andnot_ps(n, m); }
  static int bits(M m) { return _mm256_movemask_ps(m); }
  static M nonfinite(V x) {
    const __m256i exponent = _mm256_set1_epi32(0x7f800000);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(x), exponent), exponent));
  }
  static M none() { return _mm256_setzero_ps(); }
  static M or_(M x, M y) { return _mm256_or_ps(x, y); }
  static V min_where(V acc, V s, M m) { return _mm256_blendv_ps(acc, _mm256_min_ps(acc, s), m); }
  static V max_where(V acc, V s, M m) { return _mm256_blendv_ps(acc, _mm256_max_ps(acc, s), m); }
#endif
};

// Counts of one range [i, e) of float32 a (and b) into the pass's per-thread sums; returns the
// first element it left (a tail shorter than a vector) for the generic code.
template <bool kSecond, typename Local, typename Brackets>
int64_t count_range_masked(const float* a, const float* b, float scale, int64_t i, int64_t e, int nb,
                           const Brackets& brackets, bool track_min, bool track_max, bool* gather,
                           int64_t per_thread_limit, Local& l) {
  using L = MaskLanes;
  constexpr int64_t W = L::W;
  constexpr float inf = std::numeric_limits<float>::infinity();
  const L::V zero = L::set1(0.0f), one = L::set1(1.0f), c = L::set1(scale);
  L::V lowv[2], highv[2];
  bool ties_high[2] = {false, false};
  for (int j = 0; j < nb; ++j) {
    lowv[j] = L::set1(brackets[j].low);
    highv[j] = L::set1(brackets[j].high);
    ties_high[j] = brackets[j].high != brackets[j].low;
  }
  L::M nonfinite = L::none();
  L::V min_acc = L::set1(inf), max_acc = L::set1(-inf);
  int64_t valid_n = 0, below[2] = {0, 0}, at_low[2] = {0, 0}, at_high[2] = {0, 0};
  // The gather's cursor lives in registers, not in `l` (whose vector members every store could
  // alias): with it in memory the first-order pass (no division to hide behind) ran at 3.7x a
  // read of its input when a window was open, 1.2x without one.
  float* dst[2] = {l.inside[0].data(), l.inside[1].data()};
  int64_t used[2] = {l.used[0], l.used[1]};
  int64_t room[2] = {static_cast<int64_t>(l.inside[0].size()), static_cast<int64_t>(l.inside[1].size())};
  for (; i + W <= e; i += W) {
    const L::V av = L::load(a + i);
    L::V s;
    L::M valid;
    if constexpr (kSecond) {
      const L::V bv = L::load(b + i);
      nonfinite = L::or_(nonfinite, L::or_(L::nonfinite(av), L::nonfinite(bv)));
      s = L::abs(L::sub(L::div(L::mul(c, av), bv), one));
      // Defined where b != 0 and the score is not NaN (NaN or inf / inf inputs): ScoreSource's rule.
      valid = L::cmp_where<_CMP_ORD_Q>(L::cmp<_CMP_NEQ_UQ>(bv, zero), s, s);
    } else {
      nonfinite = L::or_(nonfinite, L::nonfinite(av));
      s = L::abs(av);
      valid = L::cmp<_CMP_ORD_Q>(s, s);
    }
    valid_n += __builtin_popcount(L::bits(valid));
    if (track_min) min_acc = L::min_where(min_acc, s, valid);
    if (track_max) max_acc = L::max_where(max_acc, s, valid);
    for (int j = 0; j < nb; ++j) {
      const L::M lt = L::cmp_where<_CMP_LT_OQ>(valid, s, lowv[j]);
      const L::M eq_low = L::cmp_where<_CMP_EQ_OQ>(valid, s, lowv[j]);
      below[j] += __builtin_popcount(L::bits(lt));
      at_low[j] += __builtin_popcount(L::bits(eq_low));
      if (ties_high[j]) at_high[j] += __builtin_popcount(L::bits(L::cmp_where<_CMP_EQ_OQ>(valid, s, highv[j])));
      if (!gather[j]) continue;
      const int hits = L::bits(L::cmp_where<_CMP_LT_OQ>(L::cmp_where<_CMP_GT_OQ>(valid, s, lowv[j]), s, highv[j]));
      if (hits == 0) continue;  // most vectors: a window holds ~0.4% of the scores
      if (used[j] + W > room[j]) {
        auto& buf = l.inside[j];
        if (used[j] > per_thread_limit) {
          l.overflow[j] = true;
          gather[j] = false;
          std::vector<float>().swap(buf);
          continue;
        }
        buf.resize(std::max<int64_t>(4096, 2 * static_cast<int64_t>(buf.size())));
        dst[j] = buf.data();
        room[j] = static_cast<int64_t>(buf.size());
      }
      used[j] += compress_store<float>(dst[j] + used[j], Vectorized<float>(s), hits);
    }
  }
  l.used[0] = used[0];
  l.used[1] = used[1];
  l.stats.n_valid += valid_n;
  l.stats.nonfinite = l.stats.nonfinite || L::bits(nonfinite) != 0;
  __at_align__ float lanes[W];
  Vectorized<float>(min_acc).store(lanes);
  for (int64_t k = 0; k < W; ++k) l.stats.min = std::min(l.stats.min, lanes[k]);
  Vectorized<float>(max_acc).store(lanes);
  for (int64_t k = 0; k < W; ++k) l.stats.max = std::max(l.stats.max, lanes[k]);
  for (int j = 0; j < nb; ++j) {
    l.below[j] += below[j];
    l.at_low[j] += at_low[j];
    l.at_high[j] += at_high[j];
  }
  return i;
}
#endif

// Stats of one pool in one vectorised pass: defined-score count, whether any input was
// non-finite, the minimum and maximum defined score, and the bracket counts.
template <typename opmath_t>
struct PoolStats {
  int64_t n_valid = 0;
  bool nonfinite = false;
  opmath_t min = std::numeric_limits<opmath_t>::infinity();
  opmath_t max = -std::numeric_limits<opmath_t>::infinity();
};

// track_min / track_max: whether quantile 0 / 1 is wanted (the loop is unswitched on them).
template <typename opmath_t>
void count_pass(const std::vector<PoolPart>& parts, bool parallel,
                std::vector<Bracket<opmath_t>>& brackets, int64_t gather_limit, PoolStats<opmath_t>& stats,
                bool track_min = true, bool track_max = true) {
  using Vec = Vectorized<opmath_t>;
  constexpr int64_t W = Vec::size();
  constexpr opmath_t inf = std::numeric_limits<opmath_t>::infinity();
  const int nthreads = parallel ? at::get_num_threads() : 1;
  const size_t nb = brackets.size();
  TORCH_CHECK(nb <= 2, "rose_kernels: at most 2 brackets per pass");
  struct Local {
    PoolStats<opmath_t> stats;
    int64_t below[2] = {0, 0}, at_low[2] = {0, 0}, at_high[2] = {0, 0};
    std::vector<opmath_t> inside[2];
    int64_t used[2] = {0, 0};
    bool overflow[2] = {false, false};
  };
  std::vector<Local> locals(nthreads);
  const int64_t per_thread_limit = gather_limit / nthreads + 1;
  for_each_score_vector<opmath_t>(parts, parallel, [&](const auto& src, int64_t b, int64_t e) {
    Local& l = locals[parallel ? at::get_thread_num() : 0];
    // Lane counters are opmath values, exact since a chunk (<= 2^16 elements) is summed at its end.
    const Vec one(1), zero(0);
    Vec valid_acc(0), nonfinite_acc(0), min_acc(inf), max_acc(-inf);
    Vec below_acc[2] = {zero, zero}, low_acc[2] = {zero, zero}, high_acc[2] = {zero, zero};
    Vec lowv[2], highv[2];
    bool gather[2] = {false, false};
    for (size_t j = 0; j < nb; ++j) {
      lowv[j] = Vec(brackets[j].low);
      highv[j] = Vec(brackets[j].high);
      gather[j] = brackets[j].low != brackets[j].high && !l.overflow[j];
    }
    int64_t start = b;
#if defined(ROSE_KERNELS_MASK_COUNT)
    if constexpr (std::is_same_v<std::decay_t<decltype(src)>, ScoreSource<float, float>>) {
      const int n_brackets = static_cast<int>(nb);
      start = src.b == nullptr
          ? count_range_masked<false>(src.a, nullptr, src.scale, b, e, n_brackets, brackets, track_min, track_max,
                                      gather, per_thread_limit, l)
          : count_range_masked<true>(src.a, src.b, src.scale, b, e, n_brackets, brackets, track_min, track_max,
                                     gather, per_thread_limit, l);
    }
#endif
    for (int64_t i = start; i < e; i += W) {
      const int64_t count = std::min(W, e - i);
      Vec s, invalid;
      src.score(i, count, s, invalid, nonfinite_acc);
      valid_acc = valid_acc + Vec::blendv(one, zero, invalid);
      if (track_min) min_acc = Vec::blendv(at::vec::minimum(min_acc, s), min_acc, invalid);
      if (track_max) max_acc = Vec::blendv(at::vec::maximum(max_acc, s), max_acc, invalid);
      for (size_t j = 0; j < nb; ++j) {
        const Vec below = s < lowv[j];
        const Vec at_low = s == lowv[j];
        const Vec at_high = s == highv[j];
        below_acc[j] = below_acc[j] + (below & one);
        low_acc[j] = low_acc[j] + (at_low & one);
        high_acc[j] = high_acc[j] + (at_high & one);
        if (!gather[j]) continue;
        // low < s < high: "s <= high and not below" minus the two tie sets (subsets of it).
        const Vec inside = ((s <= highv[j]) ^ below) ^ at_low ^ at_high;
        const int hits = ~inside.zero_mask() & ((1 << W) - 1);
        auto& buf = l.inside[j];
        if (l.used[j] + W > static_cast<int64_t>(buf.size())) {
          if (l.used[j] > per_thread_limit) {
            l.overflow[j] = true;
            gather[j] = false;
            std::vector<opmath_t>().swap(buf);
            continue;
          }
          buf.resize(std::max<int64_t>(4096, 2 * static_cast<int64_t>(buf.size())));
        }
        l.used[j] += compress_store(buf.data() + l.used[j], s, hits);
      }
    }
    l.stats.n_valid += static_cast<int64_t>(sum_lanes(valid_acc));
    l.stats.nonfinite = l.stats.nonfinite || std::isnan(sum_lanes(nonfinite_acc));
    __at_align__ opmath_t lanes[W];
    min_acc.store(lanes);
    for (int64_t k = 0; k < W; ++k) l.stats.min = std::min(l.stats.min, lanes[k]);
    max_acc.store(lanes);
    for (int64_t k = 0; k < W; ++k) l.stats.max = std::max(l.stats.max, lanes[k]);
    for (size_t j = 0; j < nb; ++j) {
      l.below[j] += static_cast<int64_t>(sum_lanes(below_acc[j]));
      l.at_low[j] += static_cast<int64_t>(sum_lanes(low_acc[j]));
      l.at_high[j] += static_cast<int64_t>(sum_lanes(high_acc[j]));
    }
  });
  for (auto& l : locals) {
    stats.n_valid += l.stats.n_valid;
    stats.nonfinite = stats.nonfinite || l.stats.nonfinite;
    stats.min = std::min(stats.min, l.stats.min);
    stats.max = std::max(stats.max, l.stats.max);
    for (size_t j = 0; j < nb; ++j) {
      auto& br = brackets[j];
      br.below += l.below[j];
      br.at_low += l.at_low[j];
      if (br.high != br.low) br.at_high += l.at_high[j];
      br.overflow = br.overflow || l.overflow[j];
      if (!br.overflow) br.inside.insert(br.inside.end(), l.inside[j].begin(), l.inside[j].begin() + l.used[j]);
    }
  }
}

// Gathers a deterministic sample of defined scores: runs of 16 consecutive elements (one cache
// line of fp32) at even strides over the pool. The sample is latency-bound (each run is a cache
// and TLB miss), so large pools spread the runs over threads.
template <typename opmath_t>
std::vector<opmath_t> sample_scores(const std::vector<PoolPart>& parts, int64_t total,
                                    int64_t want, bool parallel) {
  constexpr int64_t kRun = 16;
  const int64_t runs = std::max<int64_t>(1, want / kRun);
  const double stride = static_cast<double>(total) / static_cast<double>(runs);
  std::vector<int64_t> part_begin(parts.size() + 1, 0);
  for (size_t p = 0; p < parts.size(); ++p) part_begin[p + 1] = part_begin[p] + parts[p].a.numel();
  const int nthreads = parallel ? at::get_num_threads() : 1;
  std::vector<std::vector<opmath_t>> local(nthreads);
  auto body = [&](int64_t r0, int64_t r1) {
    auto& out = local[parallel ? at::get_thread_num() : 0];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t pos = static_cast<int64_t>(static_cast<double>(r) * stride);
      const int64_t part = std::upper_bound(part_begin.begin(), part_begin.end(), pos) - part_begin.begin() - 1;
      const PoolPart& pp = parts[part];
      const int64_t first = pos - part_begin[part];
      const int64_t end = std::min(first + kRun, pp.a.numel());
      dispatch_float_type(pp.a.scalar_type(), [&](auto* tag) {
        using scalar_t = std::remove_pointer_t<decltype(tag)>;
        if constexpr (std::is_same_v<opmath_t, typename OpMath<scalar_t>::type>) {
          ScoreSource<opmath_t, scalar_t> src{pp.a.data_ptr<scalar_t>(),
                                              pp.b.defined() ? pp.b.data_ptr<opmath_t>() : nullptr,
                                              static_cast<opmath_t>(pp.scale)};
          for (int64_t i = first; i < end; ++i) {
            opmath_t sc;
            if (src.score_one(i, sc)) out.push_back(sc);
          }
        }
      });
    }
  };
  if (parallel) {
    at::parallel_for(0, runs, 64, body);
  } else {
    body(0, runs);
  }
  std::vector<opmath_t> out;
  out.reserve(runs * kRun);
  for (auto& l : local) out.insert(out.end(), l.begin(), l.end());
  return out;
}

// The value at `rank` of a pool whose bracket `br` was counted (and gathered, unless it overflowed),
// or false when the bracket does not hold that rank. Scores in [low, high] hold the ranks
// [below, below + at_low + inside + at_high), in that order.
template <typename opmath_t>
bool value_in_bracket(Bracket<opmath_t>& br, int64_t rank, opmath_t& value) {
  const int64_t first_inside = br.below + br.at_low;
  br.selector.xs = &br.inside;
  br.selector.common_bits = common_prefix_bits(br.low, br.high);
  if (rank >= br.below && rank < first_inside) {
    value = br.low;
    return true;
  }
  if (br.overflow) return false;
  const int64_t inside = static_cast<int64_t>(br.inside.size());
  if (rank >= first_inside && rank < first_inside + inside) {
    value = br.selector(rank - first_inside);
    return true;
  }
  if (rank >= first_inside + inside && rank < first_inside + inside + br.at_high) {
    value = br.high;
    return true;
  }
  return false;
}

// Half-width (in ranks) of the windows a call writes for the next one: at least ~0.2% of the pool
// (a window then gathers ~0.4%) and 5 standard deviations of the rank at which the quantile q of n
// fresh scores falls (sqrt(n q (1 - q)): a step draws new gradients, so its threshold moves by that
// much with nothing drifting; with 0.2% alone, pools of ~10^5 scores missed ~1 step in 8), plus
// twice how far the ranks moved inside the window just used beyond 2 of those deviations (the
// move that is noise is covered already), so that a drifting threshold stays inside; at most 1/32
// of the pool (gathering more costs as much as the sampled route). `span`: the ranks the window
// just used held (0: no window was used). Narrow matters: selecting among the gathered scores
// costs ~50x a read per score, so a window holding 2% of a pool costs what a miss does.
inline int64_t window_half_width(int64_t n, double q, int64_t drift, bool missed, int64_t span) {
  const double sigma = std::sqrt(static_cast<double>(n) * q * (1.0 - q));
  const int64_t least = std::max<int64_t>({256, n >> 9, static_cast<int64_t>(std::ceil(5.0 * sigma))});
  int64_t w = least + 2 * std::max<int64_t>(0, drift - static_cast<int64_t>(2.0 * sigma));
  if (missed) w = std::max(w, 4 * std::max(least, span / 2));  // a miss widens the next window fourfold
  return std::max<int64_t>(1, std::min(w, std::max<int64_t>(least, n / 32)));
}

// The window of one threshold (ranks k .. k1 of n) for the next call, into guess[0..2): the values
// at ranks k - w and k1 + w where `br` holds them; past its ends, one width of `br` further out
// (a bracket open above has no width: its own low end then).
template <typename opmath_t>
void write_window(Bracket<opmath_t>& br, int64_t n, int64_t k, int64_t k1, int64_t w, opmath_t x_k, opmath_t x_k1,
                  int64_t* guess) {
  constexpr opmath_t inf = std::numeric_limits<opmath_t>::infinity();
  opmath_t low = x_k, high = x_k1;
  if (!br.overflow) {
    const opmath_t width = br.high - br.low;  // +inf when the bracket is open above
    const int64_t lo_rank = std::max<int64_t>(0, k - w), hi_rank = std::min<int64_t>(n - 1, k1 + w);
    // Past the bracket's ends the values are unknown: go out by twice the missing ranks at the
    // bracket's own density (ranks per unit of value), at most one bracket width. Going out by a
    // whole width every time made windows double from step to step while they held.
    const int64_t held = br.at_low + static_cast<int64_t>(br.inside.size()) + br.at_high;
    auto reach = [&](int64_t missing) -> opmath_t {
      if (!std::isfinite(width) || held <= 1) return width;
      return std::min(width, width * static_cast<opmath_t>(2.0 * static_cast<double>(missing) / static_cast<double>(held)));
    };
    if (!value_in_bracket(br, lo_rank, low))
      low = lo_rank < br.below ? (std::isfinite(width) ? std::max(opmath_t(0), br.low - reach(br.below - lo_rank)) : br.low)
                               : x_k;
    if (!value_in_bracket(br, hi_rank, high))
      high = hi_rank >= br.below ? br.high + reach(hi_rank - (br.below + held) + 1) : x_k1;
    if (!(high <= inf)) high = inf;  // NaN from inf - inf: open above
  }
  low = std::min(low, x_k);
  high = std::max(high, x_k1);
  guess[0] = static_cast<int64_t>(key_of(low));
  guess[1] = static_cast<int64_t>(key_of(high));
}

// Brackets from a pool's guesses (the window at each of `columns`); false when any is not a window
// of keys of this width (none yet, or written for another dtype).
template <typename opmath_t>
bool guessed_brackets(const int64_t* guess, const std::vector<int64_t>& columns,
                      std::vector<Bracket<opmath_t>>& brackets) {
  using key_t = typename KeyOf<opmath_t>::type;
  const int64_t inf_key = static_cast<int64_t>(key_of(std::numeric_limits<opmath_t>::infinity()));
  for (int64_t c : columns) {
    const int64_t lo = guess[c], hi = guess[c + 1];
    if (lo < 0 || hi < lo || hi > inf_key) return false;
  }
  for (int64_t c : columns) {
    Bracket<opmath_t> br;
    br.low = value_of<opmath_t>(static_cast<key_t>(guess[c]));
    br.high = value_of<opmath_t>(static_cast<key_t>(guess[c + 1]));
    brackets.push_back(std::move(br));
  }
  return true;
}

// Thresholds of one pool into out[0..kNumThresholdColumns); `guess` (kGuessColumns keys, or null)
// is read, and written for the next call.
template <typename opmath_t>
void select_pool(const std::vector<PoolPart>& parts, double q_lo, double q_hi,
                 bool parallel, int64_t strategy, double* out, int64_t* guess = nullptr) {
  int64_t total = 0;
  for (const auto& p : parts) total += p.a.numel();
  const double qs[2] = {q_lo, q_hi};
  PoolStats<opmath_t> stats;
  std::vector<int64_t> ranks;
  std::vector<opmath_t> values;
  int reads = 0;  // passes over the pool's inputs, for kThrFullReads
  auto finish = [&]() {
    for (int t = 0; t < 2; ++t) out[t] = interpolate<opmath_t>(stats.n_valid, qs[t], ranks, values);
    out[kThrCount] = static_cast<double>(stats.n_valid);
    out[kThrNonFinite] = stats.nonfinite ? 1.0 : 0.0;
    out[kThrFullReads] = static_cast<double>(reads);
  };
  auto rank_list = [&]() {
    ranks.clear();
    for (double q : qs) wanted_ranks(stats.n_valid, q, ranks);
    std::sort(ranks.begin(), ranks.end());
    ranks.erase(std::unique(ranks.begin(), ranks.end()), ranks.end());
  };

  if (total <= kDirectPool) {
    // Small pool: gather every defined score, then nth_element per wanted rank.
    std::vector<Bracket<opmath_t>> none;
    count_pass<opmath_t>(parts, false, none, 0, stats);
    reads = 2;  // the count pass and the gather
    std::vector<opmath_t> all;
    all.reserve(stats.n_valid);
    for_each_score_vector<opmath_t>(parts, false, [&](const auto& src, int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        opmath_t s;
        if (src.score_one(i, s)) all.push_back(s);
      }
    });
    rank_list();
    values.clear();
    RankSelector<opmath_t> select{&all};
    for (int64_t r : ranks) values.push_back(select(r));
    finish();
    return;
  }

  if (strategy == kSelectAuto) {
    // Quantiles 0 and 1 are the pool's min and max, which the count pass tracks; every other
    // quantile gets a bracket: the previous call's window, else one from a sample.
    std::vector<double> bracketed;
    std::vector<int64_t> column;  // of each bracketed quantile's window in `guess`
    for (int t = 0; t < 2; ++t)
      if (qs[t] > 0.0 && qs[t] < 1.0 && std::find(bracketed.begin(), bracketed.end(), qs[t]) == bracketed.end()) {
        bracketed.push_back(qs[t]);
        column.push_back(2 * t);
      }
    // Past this many gathered scores the radix path is cheaper than selecting among them.
    const int64_t gather_limit = std::max<int64_t>(1 << 16, total / 16);
    // Every wanted rank from the brackets' counts (min and max from the pass itself).
    auto resolve = [&](std::vector<Bracket<opmath_t>>& brackets) {
      rank_list();
      values.clear();
      for (int64_t r : ranks) {
        opmath_t v;
        bool found = false;
        if (r == 0 && q_lo == 0.0) {
          v = stats.min;
          found = true;
        } else if (r == stats.n_valid - 1 && q_hi == 1.0) {
          v = stats.max;
          found = true;
        }
        for (size_t j = 0; j < brackets.size() && !found; ++j) found = value_in_bracket(brackets[j], r, v);
        if (!found) return false;
        values.push_back(v);
      }
      return true;
    };
    auto value_at = [&](int64_t rank) {
      return values[std::lower_bound(ranks.begin(), ranks.end(), rank) - ranks.begin()];
    };
    // The ranks [first, first + span) each window this call started from held: how far the ranks
    // moved since the call that wrote it.
    std::vector<std::pair<int64_t, int64_t>> used;
    auto spans_of = [&](const std::vector<Bracket<opmath_t>>& brackets) {
      used.clear();
      for (const auto& u : brackets)
        used.emplace_back(u.below, u.at_low + u.at_high + (u.overflow ? gather_limit : static_cast<int64_t>(u.inside.size())));
    };
    // The next call's windows from the brackets that held this call's ranks.
    auto write_guesses = [&](std::vector<Bracket<opmath_t>>& brackets, bool missed) {
      if (guess == nullptr || stats.n_valid == 0) return;
      const int64_t n = stats.n_valid;
      for (size_t t = 0; t < bracketed.size(); ++t) {
        const math::QuantilePosition p = math::quantile_position(n, bracketed[t]);
        const int64_t k1 = math::needs_second(n, p) ? p.k1 : p.k;
        int64_t drift = 0, span = 0;
        if (t < used.size()) {
          // How far the ranks moved: the half-width the window was written with, less the room
          // left on its nearer side (a side clipped at rank 0 or n - 1 has no say).
          const int64_t first = used[t].first, end = used[t].first + used[t].second;
          span = used[t].second;
          // Two readings: the room the nearer side lost against the least half-width a window is
          // written with; and, where both sides kept at least that much (neither was extended
          // past a bracket's end, where the window is lopsided by construction), how far the rank
          // sits off the window's centre. Reading a lopsided window's own half-width as the
          // reference made windows double from step to step while they held.
          const int64_t least = window_half_width(n, bracketed[t], 0, false, 0);
          const int64_t half = std::min<int64_t>(std::max<int64_t>(0, (span - 1 - (k1 - p.k)) / 2), least);
          const int64_t left = p.k - first, right = end - 1 - k1;
          int64_t room = std::numeric_limits<int64_t>::max();
          if (first > 0) room = std::min(room, left);
          if (end < n) room = std::min(room, right);
          if (room != std::numeric_limits<int64_t>::max()) drift = std::max<int64_t>(0, half - room);
          if (first > 0 && end < n && left >= least && right >= least)
            drift = std::max<int64_t>(drift, std::abs(left - right) / 2);
        }
        const int64_t w = window_half_width(n, bracketed[t], drift, missed || used.empty(), span);
        write_window(brackets[t], n, p.k, k1, w, value_at(p.k), value_at(k1), guess + column[t]);
      }
    };

    std::vector<Bracket<opmath_t>> guessed;
    bool missed = false;
    if (!bracketed.empty() && guess != nullptr && guessed_brackets(guess, column, guessed)) {
      count_pass<opmath_t>(parts, parallel, guessed, gather_limit, stats, q_lo == 0.0, q_hi == 1.0);
      reads = 1;
      spans_of(guessed);
      if (resolve(guessed)) {
        write_guesses(guessed, false);
        finish();
        return;
      }
      missed = true;
      stats = PoolStats<opmath_t>();
      guessed.clear();
    }

    std::vector<Bracket<opmath_t>> brackets;
    if (!bracketed.empty()) {
      // ~(3N)^(2/3) samples balance the sample's selection against the gathered bracket size.
      const int64_t want = std::min<int64_t>(total, std::max<int64_t>(
          4096, static_cast<int64_t>(std::pow(3.0 * static_cast<double>(total), 2.0 / 3.0))));
      std::vector<opmath_t> sample = sample_scores<opmath_t>(parts, total, want, parallel);
      const int64_t ns = static_cast<int64_t>(sample.size());
      std::vector<opmath_t> scratch;
      for (double q : bracketed) {
        Bracket<opmath_t> br;
        br.low = opmath_t(0);  // scores are >= 0: nothing below
        br.high = std::numeric_limits<opmath_t>::infinity();
        if (ns > 0) {
          // The quantile's rank within the sample, widened by 6 standard deviations of a sample
          // order statistic plus slack for correlated runs; the count pass checks the claim.
          const double center = q * static_cast<double>(ns - 1);
          const double margin = 6.0 * std::sqrt(static_cast<double>(ns) * q * (1 - q)) + 16;
          const int64_t lo_rank = static_cast<int64_t>(std::floor(center - margin));
          const int64_t hi_rank = static_cast<int64_t>(std::ceil(center + margin)) + 1;
          if (lo_rank > 0) {
            scratch.assign(sample.begin(), sample.end());
            br.low = radix_select_in_place(scratch.data(), ns, lo_rank);
          }
          if (hi_rank < ns) {
            scratch.assign(sample.begin(), sample.end());
            br.high = radix_select_in_place(scratch.data(), ns, hi_rank);
          }
        }
        brackets.push_back(std::move(br));
      }
    }
    count_pass<opmath_t>(parts, parallel, brackets, gather_limit, stats, q_lo == 0.0, q_hi == 1.0);
    reads += 1;
    if (resolve(brackets)) {
      write_guesses(brackets, missed);
      finish();
      return;
    }
  } else {
    std::vector<Bracket<opmath_t>> none;
    count_pass<opmath_t>(parts, parallel, none, 0, stats);
    reads = 1;
    rank_list();
  }
  reads += (KeyOf<opmath_t>::kValueBits + kRadixBits - 1) / kRadixBits;
  radix_select<opmath_t>(parts, parallel, ranks, values);
  // Heavy ties defeated the brackets: the next call starts from a sample again.
  if (guess != nullptr && strategy == kSelectAuto) std::fill(guess, guess + kGuessColumns, kNoGuess);
  finish();
}

inline void element_thresholds(const TensorList& a, const TensorList& b, const std::vector<double>& scales,
                               double q_lo, double q_hi, bool global_pool, int64_t strategy, double* out,
                               const std::vector<int64_t*>& guesses) {
  std::vector<std::vector<PoolPart>> pools;
  for (size_t i = 0; i < a.size(); ++i) {
    PoolPart part{a[i], b.empty() ? at::Tensor() : b[i], scales.empty() ? 1.0 : scales[i]};
    if (global_pool) {
      if (pools.empty()) pools.emplace_back();
      pools[0].push_back(part);
    } else {
      pools.push_back({part});
    }
  }
  if (global_pool && pools.empty()) pools.emplace_back();
  auto run = [&](int64_t pool, bool parallel) {
    double* row = out + pool * kNumThresholdColumns;
    int64_t* guess = guesses.empty() ? nullptr : guesses[pool];
    if (!pools[pool].empty() && pools[pool][0].a.scalar_type() == at::kDouble) {
      select_pool<double>(pools[pool], q_lo, q_hi, parallel, strategy, row, guess);
    } else {
      select_pool<float>(pools[pool], q_lo, q_hi, parallel, strategy, row, guess);
    }
  };
  // Pools are spread over threads whole, largest first onto the least-loaded thread: each pool's
  // sample and final selection are serial, and running them side by side beat splitting every
  // pool over the threads by ~1.4x on BERT-base's 72 matrices (measured, 2 cores). A pool larger
  // than a thread's fair share (one global pool, or one huge tensor) uses every thread inside.
  const int nthreads = std::max(1, at::get_num_threads());
  int64_t all_elements = 0;
  for (const auto& pool : pools)
    for (const auto& part : pool) all_elements += part.a.numel();
  const int64_t fair_share = all_elements / nthreads;
  std::vector<int64_t> small;
  for (int64_t p = 0; p < static_cast<int64_t>(pools.size()); ++p) {
    int64_t size = 0;
    for (const auto& part : pools[p]) size += part.a.numel();
    if (size > kDirectPool && size > fair_share) run(p, true); else small.push_back(p);
  }
  if (small.empty()) return;
  auto size_of = [&](int64_t p) {
    int64_t size = 0;
    for (const auto& part : pools[p]) size += part.a.numel();
    return size;
  };
  std::sort(small.begin(), small.end(), [&](int64_t x, int64_t y) { return size_of(x) > size_of(y); });
  std::vector<std::vector<int64_t>> assigned(nthreads);
  std::vector<int64_t> load(nthreads, 0);
  for (int64_t p : small) {
    const int t = static_cast<int>(std::min_element(load.begin(), load.end()) - load.begin());
    assigned[t].push_back(p);
    load[t] += size_of(p) + 1024;
  }
  at::parallel_for(0, nthreads, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t)
      for (int64_t p : assigned[t]) run(p, false);
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace rose_kernels::cpu
