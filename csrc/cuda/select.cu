// SELECT on the GPU (semantics.md section 3): the exact quantile thresholds of element scores from
// the scores' integer keys, with every intermediate result kept on the device.
//
// Element scores are >= 0, so their IEEE bit patterns (math::key_of) sort like the scores. A pool
// needs four order statistics (x_k and x_k1 of each threshold). Each one is found by an MSD radix
// select with 8-bit digits over `key - base`, where base is 0 (the whole key range: the radix
// route) or the start of a window of keys known to hold the rank (the window route).
//
// Window route (the `guesses` of the previous call, kept by the caller and updated here). A guess
// is the 1/16-octave bucket of the rank's key found last time (key >> bucket_shift); the rank's
// window is that bucket and its two neighbours.
//
//   pass 0   reads every input once: the finiteness probe of every a (and of b where pooled), and
//            per pool n and, per window, the defined scores below it and inside it; the keys
//            inside any window are appended to the pool's candidate region (int64 counter, room
//            for about 1/8 of the pool);
//   pick 0   (one warp per pool) the four wanted ranks; a hit (every rank inside its window, the
//            rule from one optimizer step to the next) continues on the candidates;
//   cand p   radix digits of key - window start over the candidate region only (21-bit offsets
//            for float32 keys: 3 passes; 50 bits for float64: 7), each followed by a pick.
//
//   So a hit reads the inputs once. A pool whose candidates overflowed their region (heavy ties
//   inside a window) runs the same window digits over its full inputs instead (1 + 3 or 1 + 7
//   reads); a miss (a rank outside its window) runs the radix route from its first digit
//   (1 + 4 or 1 + 8 reads).
//
// Radix route (no usable guess: `guesses` absent or holding negatives, strategy kSelectRadix):
//
//   pass 0   as above, but it histograms the top 7 key bits of each pool's defined scores instead
//            of counting windows; pick 0 finds each rank's bucket;
//   pass p   (p >= 1) reads the pool again and histograms the next 8 key bits of the scores whose
//            known prefix equals one of the ranks' prefixes (at most 4 distinct ones);
//   pick p   refines each rank's prefix by one digit.
//
//   float32 keys hold 31 value bits (7 + 3 * 8: 4 passes), float64 keys 63 (7 + 7 * 8: 8 passes).
//
// Whether a pool hit is known only on the device: the host launches every pass a call may need,
// and the blocks of a pool that does not need a pass leave before reading anything. Counting is
// integer arithmetic only, so the result does not depend on the order of the atomics, and every
// route finds the same keys; finalize converts them to float64, interpolates, and writes each
// found key's bucket back to `guesses` for the next call.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cuda/ops_cuda.h"
#include "rose_math.h"

namespace rose_kernels::cuda {
namespace {

constexpr int kThreads = 256;         // threads of a block over the inputs
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunk = 16384;     // elements per input block (64 per thread)
constexpr int kRanks = 4;             // x_k and x_k1 of each of the two thresholds
static_assert(kRanks == kGuessRanks, "one guess column per wanted order statistic");
constexpr int kTopBits = 7;           // first radix digit: 31 = 7 + 3 * 8 and 63 = 7 + 7 * 8
// 8-bit digits: 4 ranks x 256 bins (16 KB with the 4 copies below) keep the per-block zero/flush
// small against a 16K-element chunk; 11 bits would save one of four float32 passes but need 8x the
// shared counters (128 KB) and up to 8x the per-block flush (4 x 2048 global atomics).
constexpr int kDigitBits = 8;
constexpr int kBins = 1 << kDigitBits;
// Each bin has 4 copies, picked by lane % 4: with equal keys (ties are common: exact-zero
// gradients give many scores of exactly 1.0) at most 8 lanes of a warp hit one address, not 32.
constexpr int kParts = 4;
constexpr int kHistPerPool = kRanks * kBins;  // global int64 counters per pool
// Shared memory of an input block: the histogram copies, or (window counting) each warp's staging
// area for candidate keys, so that a block appends its candidates with one global atomic.
constexpr int kSharedBytes = kRanks * kBins * kParts * 4;
constexpr int kPickThreads = 128;             // 4 pools (one per warp) per pick block
constexpr int kFinalThreads = 128;
constexpr int kCandThreads = 256;             // threads of a candidate block
constexpr int64_t kCandChunk = 4096;          // candidate keys per candidate block
// Candidate regions: 1/8 of the pool's elements (0.5 byte per float32 key of memory, 1 per
// float64 one), and never less than min(pool, kMinCapacity) keys, so small pools cannot overflow.
// A 3/16-octave window holds a few percent of a smooth pool; more (heavy ties) overflows into
// full passes, which is slower but just as exact.
constexpr int64_t kCapacityDivisor = 8;
constexpr int64_t kMinCapacity = 4096;
constexpr unsigned kFullMask = 0xffffffffu;

static_assert((kParts & (kParts - 1)) == 0, "kParts must be a power of two");
static_assert(kBins % 32 == 0, "a pick lane owns whole bins");
static_assert(kChunk % (kThreads * 4) == 0, "chunks are whole block iterations");
static_assert(kSharedBytes % (kWarps * 8) == 0, "whole keys per warp staging area");

template <typename scalar_t>
using opmath_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The digits of a select over offsets of `bits` bits: 8 bits each, the first one holds the rest.
__host__ __device__ constexpr int levels_for(int bits) { return (bits + kDigitBits - 1) / kDigitBits; }

// Right shift that brings digit `level` (0: the most significant) of such offsets to the low end.
__host__ __device__ constexpr int level_shift(int levels, int level) { return kDigitBits * (levels - 1 - level); }

// Right shift from a key of `width` value bits (31 or 63) to its guess bucket: the exponent and
// the top 4 mantissa bits, 1/16 of an octave of scores for either width.
__host__ __device__ constexpr int bucket_shift(int width) { return width == 63 ? 52 - 4 : 23 - 4; }

// Buckets of a key type (2^12 for float32, 2^15 for float64), as a log2.
__host__ __device__ constexpr int bucket_bits(int width) { return width - bucket_shift(width); }

// A window is 3 buckets, so offsets from its start fit in bucket_shift + 2 bits.
__host__ __device__ constexpr int window_bits(int width) { return bucket_shift(width) + 2; }

static_assert(levels_for(31) == 4 && levels_for(63) == 8, "radix digit plan");
static_assert(level_shift(levels_for(31), 0) == 31 - kTopBits, "radix digit plan");
static_assert(level_shift(levels_for(63), 0) == 63 - kTopBits, "radix digit plan");
static_assert(levels_for(window_bits(31)) == 3 && levels_for(window_bits(63)) == 7, "window digit plan");
// Window ends are multiples of 2^bucket_shift, so every digit's buckets end at a window's end.
static_assert(level_shift(levels_for(window_bits(31)), 0) <= bucket_shift(31), "window digit plan");
static_assert(level_shift(levels_for(window_bits(63)), 0) <= bucket_shift(63), "window digit plan");

// What a pool still needs.
enum PoolMode : int {
  kModeDone = 0,  // empty, or every rank found
  kModeFull = 1,  // digits read from the full inputs (radix route, or an overflowed window route)
  kModeCand = 2,  // digits read from the candidate region (window route)
};

// Which pass a pick follows.
enum PickStage : int { kPickFirst = 0, kPickFull = 1, kPickCand = 2 };

// Per-pool selection state in device memory (zero-initialised). Pass 0 accumulates n, the window
// counts and the candidate counter; each pick reads the histogram of the pass before it and
// writes what the next pass counts. Ranks r = 0..3 are k_lo, k1_lo, k_hi, k1_hi; rank r's key is
// base[r] + (the offset whose leading digits are prefix[r]).
struct PoolState {
  unsigned long long n;                     // defined scores in the pool
  unsigned long long below[kRanks];         // per distinct window: defined scores below it
  unsigned long long inside[kRanks];        // per distinct window: defined scores inside it
  unsigned long long counter;               // keys appended to the candidate region (may pass it)
  long long rank[kRanks];                   // rank of x_r among the keys that match its prefix
  unsigned long long base[kRanks];          // offsets of rank r are key - base[r]
  unsigned long long prefix[kRanks];        // the digits of x_r's offset found so far
  unsigned long long target_base[kRanks];   // the distinct (base, prefix) pairs the next pass counts
  unsigned long long target_prefix[kRanks];
  int target_of[kRanks];                    // index into the targets (the histogram slot) of each rank
  int num_targets;
  int width;                                // key value bits of the pool's scores (31 or 63); 0 if unread
  int mode;                                 // PoolMode
  int level;                                // the digit the next pass counts
  int levels;                               // digits of the route's offsets
  int full_reads;                           // passes that read the pool's inputs
  int overflow;                             // the candidate region was too small
  int lost;                                 // a rank was not found in its bucket (cannot happen)
};
static_assert(sizeof(PoolState) % 8 == 0, "PoolState keeps its 8-byte alignment in an array");

// Tensors of one launch, passed by value (no host-to-device copy): block b handles elements
// [(b - first_block[t]) * kChunk, + kChunk) of the tensor t with first_block[t] <= b < first_block[t + 1].
constexpr int kTableTensors = 72;
struct LaunchTable {
  const void* a[kTableTensors];
  const void* b[kTableTensors];
  int64_t numel[kTableTensors];
  int64_t region[kTableTensors];    // byte offset of the candidate region of the tensor's pool
  int64_t capacity[kTableTensors];  // keys that region holds
  int32_t tensor[kTableTensors];    // index into a, b, scales, pooled (and the pool when per tensor)
  int32_t first_block[kTableTensors + 1];
  int32_t count;
};
// Kernel parameters stay under 4 KB with PassArgs.
static_assert(sizeof(LaunchTable) <= 3584, "launch table too large for the kernel parameters");

struct PassArgs {
  PoolState* states;
  unsigned long long* hist;     // [pools, kRanks, kBins], zero between passes
  int* nonfinite;               // 1 once any probed input is inf or NaN
  const double* scales;         // [n] (second-order scores only)
  const unsigned char* pooled;  // [n] bool
  const long long* guesses;     // [pools, kRanks] (pass 0 of the window route), else null
  unsigned char* keys;          // the candidate regions
  int global_pool;              // pool of tensor i: 0 if set, else i
};

// Pools with candidate regions, for the candidate passes: block b reads keys
// [(b - first_block[e]) * kCandChunk, + kCandChunk) of the region of pool[e].
constexpr int kCandPools = 192;
struct CandTable {
  int64_t region[kCandPools];  // byte offset of the region
  int32_t pool[kCandPools];
  int32_t first_block[kCandPools + 1];
  int32_t count;
};
static_assert(sizeof(CandTable) <= 3584, "candidate table too large for the kernel parameters");

struct CandArgs {
  PoolState* states;
  unsigned long long* hist;
  const unsigned char* keys;
};

// A vector of N elements loaded with one instruction (16 bytes for opmath inputs).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// The opmath score of one element and whether it is defined (semantics.md section 2).
template <bool kSecond, typename opmath_t>
__device__ __forceinline__ bool score_of(opmath_t a, opmath_t b, opmath_t scale, opmath_t& s) {
  if constexpr (kSecond) {
    s = math::second_order_score(scale, a, b, opmath_t(1));
    return b != opmath_t(0) && s == s;
  } else {
    s = math::first_order_score(a);
    return s == s;
  }
}

// The windows of a pool's guesses for keys of `width` bits: per rank, [start, start + len) spans
// buckets guess - 1 .. guess + 1 (clipped to the key range); `start`, `len` list the distinct
// windows (count of them) and window_of maps each rank to one. False when any guess is not a
// bucket of this width (negative: no guess yet), which sends the pool down the radix route.
__host__ __device__ __forceinline__ bool plan_windows(const long long* guess, int width,
                                                      unsigned long long (&start)[kRanks],
                                                      unsigned long long (&len)[kRanks], int (&window_of)[kRanks],
                                                      int& count) {
  const int shift = bucket_shift(width);
  const long long buckets = 1ll << bucket_bits(width);
  bool valid = true;
  count = 0;
#pragma unroll
  for (int t = 0; t < kRanks; ++t) {
    start[t] = 0;
    len[t] = 0;
  }
#pragma unroll
  for (int r = 0; r < kRanks; ++r) {
    long long g = guess[r];
    if (g < 0 || g >= buckets) {
      valid = false;
      g = 0;
    }
    const long long lo = g > 0 ? g - 1 : 0;
    const long long hi = g + 2 < buckets ? g + 2 : buckets;
    const unsigned long long s = static_cast<unsigned long long>(lo) << shift;
    const unsigned long long l = (static_cast<unsigned long long>(hi) << shift) - s;
    int slot = -1;
#pragma unroll
    for (int t = kRanks - 1; t >= 0; --t)
      if (t < count && start[t] == s && len[t] == l) slot = t;
    if (slot < 0) {
#pragma unroll
      for (int t = 0; t < kRanks; ++t)
        if (t == count) {
          start[t] = s;
          len[t] = l;
        }
      slot = count++;
    }
    window_of[r] = slot;
  }
  return valid;
}

// Loads kVec elements of one thread: the aligned route takes 16-byte vectors (element i .. i +
// kVec - 1); the other route takes coalesced scalars (element base + j * kThreads + threadIdx.x).
// Either way a block iteration covers [base, base + kThreads * kVec) once. Lanes past `end` get
// `inside` false and the value 0.
template <bool kAligned, typename T, typename opmath_t, int kVec>
__device__ __forceinline__ void load_lanes(const T* __restrict__ p, int64_t base, int64_t end,
                                           opmath_t (&v)[kVec], bool (&inside)[kVec]) {
  if constexpr (kAligned) {
    const int64_t i = base + static_cast<int64_t>(threadIdx.x) * kVec;
    if (i + kVec <= end) {
      const Pack<T, kVec> pack = *reinterpret_cast<const Pack<T, kVec>*>(p + i);
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        v[j] = static_cast<opmath_t>(pack.v[j]);
        inside[j] = true;
      }
      return;
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      inside[j] = i + j < end;
      v[j] = inside[j] ? static_cast<opmath_t>(p[i + j]) : opmath_t(0);
    }
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      const int64_t i = base + static_cast<int64_t>(j) * kThreads + threadIdx.x;
      inside[j] = i < end;
      v[j] = inside[j] ? static_cast<opmath_t>(p[i]) : opmath_t(0);
    }
  }
}

__device__ __forceinline__ unsigned warp_sum(unsigned x) {
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) x += __shfl_down_sync(kFullMask, x, d);
  return x;
}

// Appends `staged` keys of a warp's staging area to the pool's candidate region (warp-wide). The
// counter keeps counting past the capacity, and the pool is marked as overflowed.
template <typename key_t>
__device__ __forceinline__ void flush_stage(const key_t* stage, int staged, PoolState* st, key_t* region,
                                            long long capacity) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  __syncwarp();
  unsigned long long at = 0;
  if (lane == 0) at = atomicAdd(&st->counter, static_cast<unsigned long long>(staged));
  at = __shfl_sync(kFullMask, at, 0);
  for (int i = lane; i < staged; i += 32)
    if (at + i < static_cast<unsigned long long>(capacity)) region[at + i] = stage[i];
  if (lane == 0 && at + staged > static_cast<unsigned long long>(capacity)) atomicOr(&st->overflow, 1);
  __syncwarp();
}

// Stages the chosen keys of one block iteration in the warp's area (flushing it first when they
// might not fit); returns the new number of staged keys. Warp-uniform.
template <typename key_t, int kVec, int kStage>
__device__ __forceinline__ int stage_keys(key_t* stage, int staged, const key_t (&key)[kVec],
                                          const bool (&chosen)[kVec], PoolState* st, key_t* region,
                                          long long capacity) {
  const unsigned lane = threadIdx.x & 31;
  const unsigned lower_lanes = (1u << lane) - 1u;
  unsigned mask[kVec];
  int total = 0;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    mask[j] = __ballot_sync(kFullMask, chosen[j]);
    total += __popc(mask[j]);
  }
  if (total == 0) return staged;
  if (staged + total > kStage) {
    flush_stage(stage, staged, st, region, capacity);
    staged = 0;
  }
  int at = staged;
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    if (chosen[j]) stage[at + __popc(mask[j] & lower_lanes)] = key[j];
    at += __popc(mask[j]);
  }
  return at;
}

// One full read of the launch's tensors.
//
// kFirst (pass 0): the finiteness probe of every a (and of b where pooled), the key width and n of
// each pool, and per pool either (kWindows and the pool's guesses are usable) the window counts
// and candidates, or the histogram of the top kTopBits key bits of every defined score.
//
// Otherwise, for the pools in kModeFull: per target (base, prefix), the histogram of the digit at
// the pool's level of key - base over the scores whose higher digits equal the prefix (keys below
// base wrap around to offsets that match no prefix).
//
// Block counts go to shared memory, then their non-zero bins to the pool's global histogram.
template <typename scalar_t, bool kSecond, bool kAligned, bool kFirst, bool kWindows>
__global__ void __launch_bounds__(kThreads)
    full_pass_kernel(const __grid_constant__ LaunchTable table, const PassArgs args) {
  using opmath_t = opmath_of<scalar_t>;
  using key_t = typename math::KeyOf<opmath_t>::type;
  constexpr int kWidth = math::KeyOf<opmath_t>::kValueBits;
  constexpr int kVec = 16 / static_cast<int>(sizeof(opmath_t));
  constexpr int kStage = kSharedBytes / kWarps / static_cast<int>(sizeof(key_t));  // keys per warp area
  static_assert(kFirst || !kWindows, "windows are counted in pass 0");
  static_assert(kStage >= 32 * kVec, "one block iteration fits an empty staging area");
  __shared__ unsigned long long shared_words[kSharedBytes / 8];
  __shared__ unsigned int block_sums[1 + 2 * kRanks];  // n, then below and inside of each window
  __shared__ unsigned int warp_staged[kWarps];
  __shared__ unsigned long long block_at;
  unsigned int* counts = reinterpret_cast<unsigned int*>(shared_words);

  // The block's tensor: the last t with first_block[t] <= blockIdx.x (the entries increase).
  const int block = static_cast<int>(blockIdx.x);
  int lo = 0, hi = table.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table.first_block[mid] <= block) lo = mid; else hi = mid - 1;
  }
  const int tensor = table.tensor[lo];
  const int64_t begin = static_cast<int64_t>(block - table.first_block[lo]) * kChunk;
  const int64_t end = begin + kChunk < table.numel[lo] ? begin + kChunk : table.numel[lo];
  const int64_t pool = args.global_pool ? 0 : tensor;
  const bool pooled = args.pooled[tensor] != 0;
  const scalar_t* __restrict__ a = static_cast<const scalar_t*>(table.a[lo]);
  const opmath_t* __restrict__ b = static_cast<const opmath_t*>(table.b[lo]);
  const opmath_t scale = kSecond ? static_cast<opmath_t>(args.scales[tensor]) : opmath_t(1);
  PoolState* st = args.states + pool;

  // Pass 0 of a pool with usable guesses: its distinct windows [start, start + len).
  key_t start[kRanks], len[kRanks];
  int windows = 0;
  bool windowed = false;
  if constexpr (kWindows) {
    if (pooled) {
      unsigned long long s[kRanks], l[kRanks];
      int window_of[kRanks];
      windowed = plan_windows(args.guesses + pool * kRanks, kWidth, s, l, window_of, windows);
#pragma unroll
      for (int t = 0; t < kRanks; ++t) {
        start[t] = static_cast<key_t>(s[t]);
        len[t] = static_cast<key_t>(l[t]);
      }
    }
  }

  // Later passes: the pool's targets (unused ones are never compared).
  key_t target_base[kRanks], target_prefix[kRanks];
  int num_targets = 0;
  int shift = level_shift(levels_for(kWidth), 0);
  if constexpr (!kFirst) {
    if (!pooled) return;
    if (st->mode != kModeFull) return;
    num_targets = st->num_targets;
    shift = level_shift(st->levels, st->level);
#pragma unroll
    for (int t = 0; t < kRanks; ++t) {
      target_base[t] = static_cast<key_t>(st->target_base[t]);
      target_prefix[t] = static_cast<key_t>(st->target_prefix[t]);
    }
  }
  int bins;  // shared bins in use
  if constexpr (kFirst) bins = pooled && !windowed ? (1 << kTopBits) : 0;
  else bins = num_targets * kBins;

  for (int i = threadIdx.x; i < bins * kParts; i += kThreads) counts[i] = 0;
  if (kFirst && threadIdx.x < 1 + 2 * kRanks) block_sums[threadIdx.x] = 0;
  __syncthreads();

  const int part = threadIdx.x & (kParts - 1);
  const int warp = static_cast<int>(threadIdx.x >> 5);
  key_t* stage = reinterpret_cast<key_t*>(shared_words) + warp * kStage;
  key_t* region = reinterpret_cast<key_t*>(args.keys + table.region[lo]);
  const long long capacity = table.capacity[lo];
  int staged = 0;  // keys in this warp's staging area (warp-uniform)
  unsigned int defined_count = 0, below_count[kRanks] = {0, 0, 0, 0}, inside_count[kRanks] = {0, 0, 0, 0};
  opmath_t probe = opmath_t(0);  // x * 0 is 0 for finite x, NaN for inf and NaN
  for (int64_t base = begin; base < end; base += static_cast<int64_t>(kThreads) * kVec) {
    opmath_t av[kVec], bv[kVec];
    bool inside[kVec];
    load_lanes<kAligned>(a, base, end, av, inside);
    if (kSecond && pooled) {
      load_lanes<kAligned>(b, base, end, bv, inside);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) bv[j] = opmath_t(0);
    }
    if constexpr (kFirst) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        probe = probe + av[j] * opmath_t(0);
        if (kSecond) probe = probe + bv[j] * opmath_t(0);  // b is 0 where not loaded
      }
      if (!pooled) continue;  // a tensor outside every pool: probe only
    }
    key_t key[kVec];
    bool defined[kVec];
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      opmath_t s;
      defined[j] = score_of<kSecond>(av[j], bv[j], scale, s) && inside[j];
      key[j] = math::key_of(s);
      if (kFirst) defined_count += defined[j] ? 1u : 0u;
    }
    if constexpr (kWindows) {
      if (windowed) {
        bool chosen[kVec];
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          chosen[j] = false;
#pragma unroll
          for (int w = 0; w < kRanks; ++w) {
            if (w < windows) {
              const bool in = defined[j] && static_cast<key_t>(key[j] - start[w]) < len[w];
              below_count[w] += defined[j] && key[j] < start[w] ? 1u : 0u;
              inside_count[w] += in ? 1u : 0u;
              chosen[j] = chosen[j] || in;
            }
          }
        }
        staged = stage_keys<key_t, kVec, kStage>(stage, staged, key, chosen, st, region, capacity);
        continue;
      }
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if constexpr (kFirst) {
        if (defined[j]) atomicAdd(&counts[static_cast<int>(key[j] >> shift) * kParts + part], 1u);
      } else {
#pragma unroll
        for (int t = 0; t < kRanks; ++t) {
          const key_t offset = static_cast<key_t>(key[j] - target_base[t]);
          const key_t high = static_cast<key_t>(offset >> shift);
          if (t < num_targets && defined[j] && static_cast<key_t>(high >> kDigitBits) == target_prefix[t])
            atomicAdd(&counts[(t * kBins + static_cast<int>(high & key_t(kBins - 1))) * kParts + part], 1u);
        }
      }
    }
  }

  if constexpr (kFirst) {
    // Block totals: n and the window counts (each thread's counts are at most kChunk).
    const int lane = static_cast<int>(threadIdx.x & 31);
    if (pooled) {
      const unsigned n_warp = warp_sum(defined_count);
      if (lane == 0 && n_warp != 0) atomicAdd(&block_sums[0], n_warp);
      if (windowed) {
#pragma unroll
        for (int w = 0; w < kRanks; ++w) {
          if (w < windows) {
            const unsigned below_warp = warp_sum(below_count[w]);
            const unsigned inside_warp = warp_sum(inside_count[w]);
            if (lane == 0) {
              atomicAdd(&block_sums[1 + 2 * w], below_warp);
              atomicAdd(&block_sums[2 + 2 * w], inside_warp);
            }
          }
        }
        if (lane == 0) warp_staged[warp] = static_cast<unsigned>(staged);
      }
    }
    __syncthreads();
    if (windowed) {
      // One append for the whole block: thread 0 reserves, each warp copies its own area.
      if (threadIdx.x == 0) {
        unsigned total = 0;
        for (int w = 0; w < kWarps; ++w) {
          const unsigned mine = warp_staged[w];
          warp_staged[w] = total;
          total += mine;
        }
        unsigned long long at = 0;
        if (total != 0) {
          at = atomicAdd(&st->counter, static_cast<unsigned long long>(total));
          if (at + total > static_cast<unsigned long long>(capacity)) atomicOr(&st->overflow, 1);
        }
        block_at = at;
      }
      __syncthreads();
      const unsigned long long at = block_at + warp_staged[warp];
      for (int i = lane; i < staged; i += 32)
        if (at + i < static_cast<unsigned long long>(capacity)) region[at + i] = stage[i];
    }
    if (pooled && threadIdx.x < 1 + 2 * kRanks) {
      const unsigned c = block_sums[threadIdx.x];
      unsigned long long* field = threadIdx.x == 0 ? &st->n
                                  : (threadIdx.x & 1) ? &st->below[(threadIdx.x - 1) / 2]
                                                      : &st->inside[(threadIdx.x - 1) / 2];
      if (c != 0) atomicAdd(field, static_cast<unsigned long long>(c));
    }
  } else {
    __syncthreads();
  }

  unsigned long long* hist = args.hist + pool * kHistPerPool;
  for (int bin = threadIdx.x; bin < bins; bin += kThreads) {
    unsigned int c = 0;
#pragma unroll
    for (int q = 0; q < kParts; ++q) c += counts[bin * kParts + q];
    if (c != 0) atomicAdd(hist + bin, static_cast<unsigned long long>(c));
  }
  if constexpr (kFirst) {
    const int bad = __syncthreads_or(probe != probe);
    if (threadIdx.x == 0) {
      if (bad) atomicOr(args.nonfinite, 1);
      if (pooled) atomicMax(&st->width, kWidth);
    }
  }
}

// One digit over the candidate regions of the pools in kModeCand (the same targets and counting
// as full_pass_kernel, on the compacted keys).
template <typename key_t>
__global__ void __launch_bounds__(kCandThreads)
    candidate_pass_kernel(const __grid_constant__ CandTable table, const CandArgs args) {
  __shared__ unsigned int counts[kRanks * kBins * kParts];
  const int block = static_cast<int>(blockIdx.x);
  int lo = 0, hi = table.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table.first_block[mid] <= block) lo = mid; else hi = mid - 1;
  }
  const int64_t pool = table.pool[lo];
  const PoolState* st = args.states + pool;
  if (st->mode != kModeCand) return;
  const int64_t count = static_cast<int64_t>(st->counter);  // <= capacity: the pool did not overflow
  const int64_t begin = static_cast<int64_t>(block - table.first_block[lo]) * kCandChunk;
  if (begin >= count) return;
  const int64_t end = begin + kCandChunk < count ? begin + kCandChunk : count;
  const key_t* __restrict__ keys = reinterpret_cast<const key_t*>(args.keys + table.region[lo]);

  const int num_targets = st->num_targets;
  const int shift = level_shift(st->levels, st->level);
  key_t target_base[kRanks], target_prefix[kRanks];
#pragma unroll
  for (int t = 0; t < kRanks; ++t) {
    target_base[t] = static_cast<key_t>(st->target_base[t]);
    target_prefix[t] = static_cast<key_t>(st->target_prefix[t]);
  }
  const int bins = num_targets * kBins;
  for (int i = threadIdx.x; i < bins * kParts; i += kCandThreads) counts[i] = 0;
  __syncthreads();

  const int part = threadIdx.x & (kParts - 1);
  for (int64_t i = begin + threadIdx.x; i < end; i += kCandThreads) {
    const key_t key = keys[i];
#pragma unroll
    for (int t = 0; t < kRanks; ++t) {
      const key_t offset = static_cast<key_t>(key - target_base[t]);
      const key_t high = static_cast<key_t>(offset >> shift);
      if (t < num_targets && static_cast<key_t>(high >> kDigitBits) == target_prefix[t])
        atomicAdd(&counts[(t * kBins + static_cast<int>(high & key_t(kBins - 1))) * kParts + part], 1u);
    }
  }
  __syncthreads();
  unsigned long long* hist = args.hist + pool * kHistPerPool;
  for (int bin = threadIdx.x; bin < bins; bin += kCandThreads) {
    unsigned int c = 0;
#pragma unroll
    for (int q = 0; q < kParts; ++q) c += counts[bin * kParts + q];
    if (c != 0) atomicAdd(hist + bin, static_cast<unsigned long long>(c));
  }
}

__device__ __forceinline__ long long warp_inclusive_sum(long long x) {
  const int lane = static_cast<int>(threadIdx.x & 31);
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const long long y = __shfl_up_sync(kFullMask, x, d);
    if (lane >= d) x += y;
  }
  return x;
}

// One warp per pool, after a pass.
//
// kPickFirst: n and the four wanted ranks. A pool with usable guesses checks that every rank lies
// in its window and the candidates fit (kModeCand), or continues over the full inputs with the
// window digits (the candidates overflowed) or with the radix digits (a miss). A pool without
// usable guesses had its top digit counted by pass 0 and picks it below.
//
// Then, for the pools the pass counted: for each rank, the bin that holds it (the first lane
// whose inclusive total exceeds the rank, then that lane's own bins); the digit extends the
// rank's prefix, the rank becomes its rank within the bin, the histogram is zeroed for the next
// pass and the distinct (base, prefix) pairs become the next pass's targets. Lane l owns bins
// [l * 8, (l + 1) * 8) of each slot: it alone reads and then zeroes them.
__global__ void __launch_bounds__(kPickThreads)
    pick_kernel(PoolState* states, unsigned long long* hist, int64_t pools, int stage, const long long* guesses,
                double q_lo, double q_hi) {
  constexpr int kPerLane = kBins / 32;
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int64_t pool = static_cast<int64_t>(blockIdx.x) * (kPickThreads / 32) + (threadIdx.x >> 5);
  if (pool >= pools) return;  // whole warps leave together
  PoolState& st = states[pool];
  unsigned long long* h = hist + pool * kHistPerPool;

  long long rank[kRanks];
  unsigned long long base[kRanks], prefix[kRanks];
  int target_of[kRanks];
  int slots, level, levels, mode, full_reads;
  bool pick_now = true;  // whether the pass before counted a digit of this pool
  if (stage == kPickFirst) {
    const long long n = static_cast<long long>(st.n);
    if (n == 0) {  // nothing was counted, so the histogram is still zero
      if (lane == 0) {
        st.mode = kModeDone;
        st.full_reads = 1;
      }
      return;
    }
    const math::QuantilePosition pl = math::quantile_position(n, q_lo);
    const math::QuantilePosition ph = math::quantile_position(n, q_hi);
    rank[0] = pl.k;
    rank[1] = pl.k1;
    rank[2] = ph.k;
    rank[3] = ph.k1;
    const int width = st.width;
    unsigned long long start[kRanks], len[kRanks];
    int window_of[kRanks], windows = 0;
    const bool windowed =
        guesses != nullptr && plan_windows(guesses + pool * kRanks, width, start, len, window_of, windows);
    bool hit = windowed;
    if (windowed) {
#pragma unroll
      for (int r = 0; r < kRanks; ++r) {
        const long long below = static_cast<long long>(st.below[window_of[r]]);
        const long long inside = static_cast<long long>(st.inside[window_of[r]]);
        hit = hit && rank[r] >= below && rank[r] - below < inside;
      }
    }
#pragma unroll
    for (int r = 0; r < kRanks; ++r) {
      prefix[r] = 0;
      target_of[r] = 0;
      base[r] = 0;
      if (hit) {
#pragma unroll
        for (int t = 0; t < kRanks; ++t)
          if (t == window_of[r]) base[r] = start[t];
        rank[r] -= static_cast<long long>(st.below[window_of[r]]);
      }
    }
    mode = hit && st.overflow == 0 ? kModeCand : kModeFull;
    levels = levels_for(hit ? window_bits(width) : width);
    level = 0;
    slots = 1;
    full_reads = 1;
    pick_now = !windowed;  // pass 0 counted windows, not digits, for a windowed pool
  } else {
    mode = st.mode;
    if (mode != (stage == kPickFull ? kModeFull : kModeCand)) return;
    slots = st.num_targets;
    level = st.level;
    levels = st.levels;
    full_reads = st.full_reads + (stage == kPickFull ? 1 : 0);
#pragma unroll
    for (int r = 0; r < kRanks; ++r) {
      rank[r] = st.rank[r];
      base[r] = st.base[r];
      prefix[r] = st.prefix[r];
      target_of[r] = st.target_of[r];
    }
  }

  bool lost = false;
  if (pick_now) {
#pragma unroll
    for (int r = 0; r < kRanks; ++r) {
      const unsigned long long* mine_bins = h + target_of[r] * kBins + lane * kPerLane;
      long long mine = 0;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) mine += static_cast<long long>(mine_bins[j]);
      const long long through = warp_inclusive_sum(mine);  // keys in this lane's bins and below
      const unsigned holders = __ballot_sync(kFullMask, through > rank[r]);
      lost = lost || holders == 0;
      const int owner = holders != 0 ? __ffs(static_cast<int>(holders)) - 1 : 31;
      long long below = through - mine;
      int digit = kPerLane - 1;
      bool found = false;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        if (!found) {
          const long long c = static_cast<long long>(mine_bins[j]);
          if (below + c > rank[r]) {
            digit = j;
            found = true;
          } else {
            below += c;
          }
        }
      }
      digit = __shfl_sync(kFullMask, lane * kPerLane + digit, owner);
      below = __shfl_sync(kFullMask, below, owner);
      rank[r] -= below;
      prefix[r] = (prefix[r] << kDigitBits) | static_cast<unsigned long long>(digit);
    }

    // Every lane has read its own bins above; zero them for the next pass.
#pragma unroll
    for (int t = 0; t < kRanks; ++t)
      if (t < slots) {
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) h[t * kBins + lane * kPerLane + j] = 0;
      }
    ++level;
    if (level == levels) mode = kModeDone;
  }

  // The distinct (base, prefix) pairs, in rank order (register arrays indexed by unrolled constants only).
  unsigned long long target_base[kRanks], target_prefix[kRanks];
#pragma unroll
  for (int t = 0; t < kRanks; ++t) {
    target_base[t] = 0;
    target_prefix[t] = 0;
  }
  int count = 0;
#pragma unroll
  for (int r = 0; r < kRanks; ++r) {
    int slot = -1;
#pragma unroll
    for (int t = kRanks - 1; t >= 0; --t)
      if (t < count && target_base[t] == base[r] && target_prefix[t] == prefix[r]) slot = t;
    if (slot < 0) {
#pragma unroll
      for (int t = 0; t < kRanks; ++t)
        if (t == count) {
          target_base[t] = base[r];
          target_prefix[t] = prefix[r];
        }
      slot = count++;
    }
    target_of[r] = slot;
  }

  // Every lane read the pool's state above; shuffles and ballots order no memory accesses, so the
  // warp meets here before lane 0 overwrites it.
  __syncwarp();
  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRanks; ++r) {
      st.rank[r] = rank[r];
      st.base[r] = base[r];
      st.prefix[r] = prefix[r];
      st.target_base[r] = target_base[r];
      st.target_prefix[r] = target_prefix[r];
      st.target_of[r] = target_of[r];
    }
    st.num_targets = count;
    st.mode = mode;
    st.level = level;
    st.levels = levels;
    st.full_reads = full_reads;
    if (lost) st.lost = 1;
  }
}

// One thread per pool: the output row from the exact keys (semantics.md section 3), and each
// found key's bucket as the pool's guesses for the next call (pools without scores keep theirs).
__global__ void __launch_bounds__(kFinalThreads)
    finalize_kernel(const PoolState* states, const int* nonfinite, double* out, long long* guesses, int64_t pools,
                    double q_lo, double q_hi) {
  const int64_t pool = static_cast<int64_t>(blockIdx.x) * kFinalThreads + threadIdx.x;
  if (pool >= pools) return;
  const PoolState& st = states[pool];
  const long long n = static_cast<long long>(st.n);
  const bool wide = st.width == math::KeyOf<double>::kValueBits;
  const bool found = n > 0 && st.lost == 0 && st.mode == kModeDone;
  unsigned long long key[kRanks];
  double x[kRanks];
#pragma unroll
  for (int r = 0; r < kRanks; ++r) {
    key[r] = st.base[r] + st.prefix[r];
    x[r] = wide ? math::value_of<double>(key[r])
                : static_cast<double>(math::value_of<float>(static_cast<uint32_t>(key[r])));
  }
  double lower = std::numeric_limits<double>::quiet_NaN();
  double upper = lower;
  if (found) {
    lower = math::interpolate(n, math::quantile_position(n, q_lo), x[0], x[1]);
    upper = math::interpolate(n, math::quantile_position(n, q_hi), x[2], x[3]);
    if (guesses != nullptr) {
#pragma unroll
      for (int r = 0; r < kRanks; ++r)
        guesses[pool * kRanks + r] = static_cast<long long>(key[r] >> bucket_shift(st.width));
    }
  }
  double* row = out + pool * kNumThresholdColumns;
  row[kThrLower] = lower;
  row[kThrUpper] = upper;
  row[kThrCount] = static_cast<double>(n);
  row[kThrNonFinite] = *nonfinite != 0 ? 1.0 : 0.0;
  row[kThrFullReads] = n > 0 ? static_cast<double>(st.full_reads) : 1.0;
}

struct Launch {
  LaunchTable table;
  int blocks;
  at::ScalarType dtype;
  bool aligned;
};

struct CandLaunch {
  CandTable table;
  int blocks;
  int width;
};

int key_width(at::ScalarType dtype) {
  return dtype == at::kDouble ? math::KeyOf<double>::kValueBits : math::KeyOf<float>::kValueBits;
}

template <typename scalar_t, bool kSecond, bool kFirst, bool kWindows>
void launch_typed(const Launch& l, const PassArgs& args, cudaStream_t stream) {
  if (l.aligned) {
    full_pass_kernel<scalar_t, kSecond, true, kFirst, kWindows><<<l.blocks, kThreads, 0, stream>>>(l.table, args);
  } else {
    full_pass_kernel<scalar_t, kSecond, false, kFirst, kWindows><<<l.blocks, kThreads, 0, stream>>>(l.table, args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// kind 0: pass 0 of the radix route, 1: pass 0 with windows, 2: a later digit pass.
template <typename scalar_t>
void launch_pass(const Launch& l, const PassArgs& args, bool second, int kind, cudaStream_t stream) {
  if (second) {
    if (kind == 0) launch_typed<scalar_t, true, true, false>(l, args, stream);
    else if (kind == 1) launch_typed<scalar_t, true, true, true>(l, args, stream);
    else launch_typed<scalar_t, true, false, false>(l, args, stream);
  } else {
    if (kind == 0) launch_typed<scalar_t, false, true, false>(l, args, stream);
    else if (kind == 1) launch_typed<scalar_t, false, true, true>(l, args, stream);
    else launch_typed<scalar_t, false, false, false>(l, args, stream);
  }
}

// Candidate region of a pool of `numel` elements, in keys.
int64_t capacity_for(int64_t numel) {
  if (numel == 0) return 0;
  return std::max((numel + kCapacityDivisor - 1) / kCapacityDivisor, std::min(numel, kMinCapacity));
}

}  // namespace

at::Tensor element_thresholds(const TensorList& a, const TensorList& b, const at::Tensor& scales,
                              const at::Tensor& pooled, double q_lo, double q_hi, bool global_pool,
                              const std::optional<at::Tensor>& guesses, int64_t strategy) {
  const int64_t n = static_cast<int64_t>(a.size());
  const int64_t pools = global_pool ? 1 : n;
  const at::Device device = n > 0 ? a[0].device() : pooled.device();
  c10::cuda::CUDAGuard guard(device);
  const auto doubles = at::TensorOptions().dtype(at::kDouble).device(device);
  if (n == 0) {
    at::Tensor out = at::zeros({pools, kNumThresholdColumns}, doubles);
    if (pools > 0) out.narrow(1, kThrLower, 2).fill_(std::numeric_limits<double>::quiet_NaN());
    return out;
  }
  const bool second = !b.empty();
  const at::Tensor pooled_flags = pooled.to(at::kBool).contiguous();
  const at::Tensor scale_values = second ? scales.to(at::kDouble).contiguous() : at::Tensor();
  // The window route needs the previous call's guesses; kSelectRadix ignores them.
  const bool windows = strategy != kSelectRadix && guesses.has_value() && guesses->defined();

  // One zeroed workspace: pool states, histograms, the non-finite flag.
  const int64_t state_bytes = pools * static_cast<int64_t>(sizeof(PoolState));
  const int64_t hist_bytes = pools * kHistPerPool * static_cast<int64_t>(sizeof(unsigned long long));
  at::Tensor work = at::zeros({state_bytes + hist_bytes + 16}, at::TensorOptions().dtype(at::kByte).device(device));
  uint8_t* base = work.data_ptr<uint8_t>();
  PoolState* states = reinterpret_cast<PoolState*>(base);
  unsigned long long* hist = reinterpret_cast<unsigned long long*>(base + state_bytes);
  int* nonfinite = reinterpret_cast<int*>(base + state_bytes + hist_bytes);

  // Candidate regions (window route only): per pool, capacity_for(its elements) keys of its key
  // width, at 16-byte aligned byte offsets. Sized from every tensor of the pool, pooled or not
  // (the pooled flags live on the device).
  std::vector<int64_t> capacity(static_cast<size_t>(pools), 0), region(static_cast<size_t>(pools), 0);
  std::vector<int> pool_width(static_cast<size_t>(pools), 0);
  at::Tensor keys;
  if (windows) {
    std::vector<int64_t> elements(static_cast<size_t>(pools), 0);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p = global_pool ? 0 : i;
      elements[p] += a[i].numel();
      pool_width[p] = std::max(pool_width[p], key_width(a[i].scalar_type()));
    }
    int64_t bytes = 0;
    for (int64_t p = 0; p < pools; ++p) {
      capacity[p] = capacity_for(elements[p]);
      region[p] = bytes;
      bytes += (capacity[p] * (pool_width[p] == 63 ? 8 : 4) + 15) / 16 * 16;
    }
    keys = at::empty({std::max<int64_t>(bytes, 16)}, at::TensorOptions().dtype(at::kByte).device(device));
  }

  // Launch tables, one group per (dtype, aligned) so that an unaligned view does not slow the rest.
  std::vector<Launch> launches;
  const at::ScalarType dtypes[] = {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble};
  for (const at::ScalarType dtype : dtypes) {
    for (const bool aligned : {true, false}) {
      Launch cur{};
      cur.dtype = dtype;
      cur.aligned = aligned;
      auto flush = [&]() {
        if (cur.table.count == 0) return;
        cur.table.first_block[cur.table.count] = cur.blocks;
        launches.push_back(cur);
        cur.table = LaunchTable{};
        cur.blocks = 0;
      };
      for (int64_t i = 0; i < n; ++i) {
        const at::Tensor& t = a[i];
        if (t.scalar_type() != dtype || t.numel() == 0) continue;
        // 16-byte loads of the opmath inputs: a in kVec elements of its own type, b in 16 bytes.
        const int64_t vec = dtype == at::kDouble ? 2 : 4;
        const bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % (vec * t.element_size()) == 0 &&
                        (!second || reinterpret_cast<uintptr_t>(b[i].data_ptr()) % 16 == 0);
        if (ok != aligned) continue;
        const int64_t blocks = (t.numel() + kChunk - 1) / kChunk;
        TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "element_thresholds: tensor too large");
        if (cur.table.count == kTableTensors || cur.blocks + blocks > std::numeric_limits<int32_t>::max()) flush();
        const int c = cur.table.count++;
        const int64_t p = global_pool ? 0 : i;
        cur.table.a[c] = t.data_ptr();
        cur.table.b[c] = second ? b[i].data_ptr() : nullptr;
        cur.table.numel[c] = t.numel();
        cur.table.region[c] = region[p];
        cur.table.capacity[c] = capacity[p];
        cur.table.tensor[c] = static_cast<int32_t>(i);
        cur.table.first_block[c] = cur.blocks;
        cur.blocks += static_cast<int>(blocks);
      }
      flush();
    }
  }

  // Candidate tables, one group per key width.
  std::vector<CandLaunch> cand_launches;
  if (windows) {
    for (const int width : {31, 63}) {
      CandLaunch cur{};
      cur.width = width;
      auto flush = [&]() {
        if (cur.table.count == 0) return;
        cur.table.first_block[cur.table.count] = cur.blocks;
        cand_launches.push_back(cur);
        cur.table = CandTable{};
        cur.blocks = 0;
      };
      for (int64_t p = 0; p < pools; ++p) {
        if (pool_width[p] != width || capacity[p] == 0) continue;
        const int64_t blocks = (capacity[p] + kCandChunk - 1) / kCandChunk;
        if (cur.table.count == kCandPools || cur.blocks + blocks > std::numeric_limits<int32_t>::max()) flush();
        const int c = cur.table.count++;
        cur.table.region[c] = region[p];
        cur.table.pool[c] = static_cast<int32_t>(p);
        cur.table.first_block[c] = cur.blocks;
        cur.blocks += static_cast<int>(blocks);
      }
      flush();
    }
  }

  // Full passes after pass 0: a radix route that started in pass 0 needs levels - 1 more; with
  // windows, a miss starts the radix route after pass 0 and needs all of them.
  int full_levels = levels_for(math::KeyOf<float>::kValueBits);
  for (const Launch& l : launches) full_levels = std::max(full_levels, levels_for(key_width(l.dtype)));
  const int later_passes = windows ? full_levels : full_levels - 1;
  int cand_levels = 0;
  for (const CandLaunch& l : cand_launches) cand_levels = std::max(cand_levels, levels_for(window_bits(l.width)));

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  PassArgs args{};
  args.states = states;
  args.hist = hist;
  args.nonfinite = nonfinite;
  args.scales = second ? scale_values.data_ptr<double>() : nullptr;
  args.pooled = reinterpret_cast<const unsigned char*>(pooled_flags.data_ptr<bool>());
  args.guesses = windows ? reinterpret_cast<const long long*>(guesses->data_ptr<int64_t>()) : nullptr;
  args.keys = windows ? keys.data_ptr<uint8_t>() : nullptr;
  args.global_pool = global_pool ? 1 : 0;
  const unsigned pick_blocks = static_cast<unsigned>((pools + kPickThreads / 32 - 1) / (kPickThreads / 32));
  for (int pass = 0; pass <= later_passes; ++pass) {
    for (const Launch& l : launches) {
      const int width = key_width(l.dtype);
      if (pass > (windows ? levels_for(width) : levels_for(width) - 1)) continue;
      const int kind = pass > 0 ? 2 : windows ? 1 : 0;
      switch (l.dtype) {
        case at::kFloat: launch_pass<float>(l, args, second, kind, stream); break;
        case at::kDouble: launch_pass<double>(l, args, second, kind, stream); break;
        case at::kHalf: launch_pass<c10::Half>(l, args, second, kind, stream); break;
        case at::kBFloat16: launch_pass<c10::BFloat16>(l, args, second, kind, stream); break;
        default: TORCH_CHECK(false, "element_thresholds: unsupported dtype ", l.dtype);
      }
    }
    pick_kernel<<<pick_blocks, kPickThreads, 0, stream>>>(states, hist, pools, pass == 0 ? kPickFirst : kPickFull,
                                                          args.guesses, q_lo, q_hi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  CandArgs cand_args{};
  cand_args.states = states;
  cand_args.hist = hist;
  cand_args.keys = args.keys;
  for (int level = 0; level < cand_levels; ++level) {
    for (const CandLaunch& l : cand_launches) {
      if (level >= levels_for(window_bits(l.width))) continue;
      if (l.width == 63) {
        candidate_pass_kernel<uint64_t><<<l.blocks, kCandThreads, 0, stream>>>(l.table, cand_args);
      } else {
        candidate_pass_kernel<uint32_t><<<l.blocks, kCandThreads, 0, stream>>>(l.table, cand_args);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    pick_kernel<<<pick_blocks, kPickThreads, 0, stream>>>(states, hist, pools, kPickCand, nullptr, q_lo, q_hi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  at::Tensor out = at::empty({pools, kNumThresholdColumns}, doubles);
  const unsigned final_blocks = static_cast<unsigned>((pools + kFinalThreads - 1) / kFinalThreads);
  long long* guesses_out = windows ? reinterpret_cast<long long*>(guesses->data_ptr<int64_t>()) : nullptr;
  finalize_kernel<<<final_blocks, kFinalThreads, 0, stream>>>(states, nonfinite, out.data_ptr<double>(),
                                                               guesses_out, pools, q_lo, q_hi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace rose_kernels::cuda
