// SELECT on the GPU (semantics.md section 3): the exact quantile thresholds of element scores by
// MSD radix select on the scores' integer keys, with every intermediate result kept on the device.
//
// Element scores are >= 0, so their IEEE bit patterns (math::key_of) sort like the scores. A pool
// needs four order statistics (x_k and x_k1 of each threshold). Per call:
//
//   pass 0   reads every input once: the finiteness probe of every a (and of b where pooled), and
//            per pool a histogram of the top 7 key bits of its defined scores;
//   pick 0   (one warp per pool) n = the histogram's total, the four wanted ranks, and for each
//            rank the bucket that holds it and its rank within that bucket;
//   pass p   (p >= 1) reads the pool again and histograms the next 8 key bits of the scores whose
//            known prefix equals one of the ranks' prefixes (at most 4 distinct ones);
//   pick p   refines each rank's prefix by one digit;
//   finalize converts the four exact keys to float64 and interpolates.
//
// float32 keys hold 31 value bits (7 + 3 * 8: 4 passes), float64 keys 63 (7 + 7 * 8: 8 passes).
// Counting is integer arithmetic only, so the result does not depend on the order of the atomics.
// The `guesses` of the previous call are not used: every call runs the full radix select.

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

constexpr int kThreads = 256;         // threads of a histogram block
constexpr int64_t kChunk = 16384;     // elements per histogram block (64 per thread)
constexpr int kRanks = 4;             // x_k and x_k1 of each of the two thresholds
constexpr int kTopBits = 7;           // first digit: 31 = 7 + 3 * 8 and 63 = 7 + 7 * 8
// 8-bit digits: 4 ranks x 256 bins (16 KB with the 4 copies below) keep the per-block zero/flush
// small against a 16K-element chunk; 11 bits would save one of four float32 passes but need 8x the
// shared counters (128 KB) and up to 8x the per-block flush (4 x 2048 global atomics).
constexpr int kDigitBits = 8;
constexpr int kBins = 1 << kDigitBits;
// Each bin has 4 copies, picked by lane % 4: with equal keys (ties are common: exact-zero
// gradients give many scores of exactly 1.0) at most 8 lanes of a warp hit one address, not 32.
constexpr int kParts = 4;
constexpr int kHistPerPool = kRanks * kBins;  // global int64 counters per pool
constexpr int kPickThreads = 128;             // 4 pools (one per warp) per pick block
constexpr int kFinalThreads = 128;
constexpr unsigned kFullMask = 0xffffffffu;

static_assert((kParts & (kParts - 1)) == 0, "kParts must be a power of two");
static_assert((1 << kTopBits) % 32 == 0 && kBins % 32 == 0, "a pick lane owns whole bins");
static_assert(kChunk % (kThreads * 4) == 0, "chunks are whole block iterations");

template <typename scalar_t>
using opmath_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Full passes that find every bit of a key of `width` value bits (31 or 63).
__host__ __device__ constexpr int passes_for(int width) { return 1 + (width - kTopBits) / kDigitBits; }

// Right shift that brings pass p's digit of a key of `width` bits to the low end.
__host__ __device__ constexpr int digit_shift(int width, int pass) {
  return pass == 0 ? width - kTopBits : width - kTopBits - kDigitBits * pass;
}

static_assert(passes_for(31) == 4 && passes_for(63) == 8, "digit plan");
static_assert(digit_shift(31, 3) == 0 && digit_shift(63, 7) == 0, "digit plan");

// Per-pool selection state in device memory (zero-initialised), written by the pick kernels and
// read by the next pass. Ranks r = 0..3 are k_lo, k1_lo, k_hi, k1_hi.
struct PoolState {
  long long n;                      // defined scores in the pool (after pick 0)
  long long rank[kRanks];           // rank of x_r among the scores whose key starts with prefix[r]
  unsigned long long prefix[kRanks];  // the digits of x_r's key found so far
  unsigned long long target[kRanks];  // the distinct prefixes the next pass counts; unused: ~0
  int target_of[kRanks];            // index into target (and the histogram slot) of each rank
  int num_targets;                  // 0: nothing left to count (empty pool)
  int width;                        // key value bits of the pool's scores (31 or 63); 0 if unread
  int lost;                         // a rank was not found in its bucket (cannot happen)
  int unused;
};
static_assert(sizeof(PoolState) % 8 == 0, "PoolState keeps its 8-byte alignment in an array");

// Tensors of one launch, passed by value (no host-to-device copy): block b handles elements
// [(b - first_block[t]) * kChunk, + kChunk) of the tensor t with first_block[t] <= b < first_block[t + 1].
constexpr int kTableTensors = 96;
struct LaunchTable {
  const void* a[kTableTensors];
  const void* b[kTableTensors];
  int64_t numel[kTableTensors];
  int32_t tensor[kTableTensors];  // index into a, b, scales, pooled (and the pool when per tensor)
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
  int shift;                    // digit_shift of this pass for the launch's key width
  int global_pool;              // pool of tensor i: 0 if set, else i
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

// One full read of the launch's tensors. kFirst (pass 0): the finiteness probe of every a (and of
// b where pooled), the key width of each pool, and the histogram of the top kTopBits key bits of
// every defined score. Otherwise: for the scores whose key prefix (the bits above this pass's
// digit) equals one of the pool's targets, the histogram of the digit at args.shift per target.
// Block counts go to shared memory, then their non-zero bins to the pool's global histogram.
template <typename scalar_t, bool kSecond, bool kAligned, bool kFirst>
__global__ void __launch_bounds__(kThreads)
    digit_histogram_kernel(const __grid_constant__ LaunchTable table, const PassArgs args) {
  using opmath_t = opmath_of<scalar_t>;
  using key_t = typename math::KeyOf<opmath_t>::type;
  constexpr int kWidth = math::KeyOf<opmath_t>::kValueBits;
  constexpr int kVec = 16 / static_cast<int>(sizeof(opmath_t));
  __shared__ unsigned int counts[kRanks * kBins * kParts];

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

  // Targets (unused ones ~0: no key prefix has all bits set, since prefixes have < kWidth bits).
  key_t target[kRanks];
  int bins;  // shared bins in use
  if constexpr (kFirst) {
#pragma unroll
    for (int r = 0; r < kRanks; ++r) target[r] = ~key_t(0);
    bins = pooled ? (1 << kTopBits) : 0;
  } else {
    if (!pooled) return;
    const PoolState& st = args.states[pool];
    const int num_targets = st.num_targets;
    if (num_targets == 0) return;
#pragma unroll
    for (int r = 0; r < kRanks; ++r) target[r] = static_cast<key_t>(st.target[r]);
    bins = num_targets * kBins;
  }
  const int shift = kFirst ? digit_shift(kWidth, 0) : args.shift;

  for (int i = threadIdx.x; i < bins * kParts; i += kThreads) counts[i] = 0;
  __syncthreads();

  const int part = threadIdx.x & (kParts - 1);
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
#pragma unroll
    for (int j = 0; j < kVec; ++j) {
      if constexpr (kFirst) {
        probe = probe + av[j] * opmath_t(0);
        if (kSecond) probe = probe + bv[j] * opmath_t(0);  // b is 0 where not loaded
      }
      if (bins == 0) continue;  // pass 0 over a tensor outside every pool: probe only
      opmath_t s;
      const bool defined = score_of<kSecond>(av[j], bv[j], scale, s) && inside[j];
      const key_t key = math::key_of(s);
      int bin;
      if constexpr (kFirst) {
        bin = static_cast<int>(key >> shift);
      } else {
        const key_t prefix = key >> (shift + kDigitBits);
        const int digit = static_cast<int>((key >> shift) & key_t(kBins - 1));
        bin = -1;
#pragma unroll
        for (int r = 0; r < kRanks; ++r)
          if (prefix == target[r]) bin = r * kBins + digit;
      }
      if (defined && bin >= 0) atomicAdd(&counts[bin * kParts + part], 1u);
    }
  }

  __syncthreads();
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
      if (pooled) atomicMax(&args.states[pool].width, kWidth);
    }
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

// After pass `pass`, one warp per pool: pick 0 derives n and the wanted ranks from the top-digit
// histogram; every pick then finds, for each rank, the bucket that holds it (the first lane whose
// inclusive bucket total exceeds the rank, then that lane's own bins), appends the bucket to the
// rank's prefix, keeps the rank within it, zeroes the histogram for the next pass and lists the
// distinct prefixes the next pass counts. Lane l owns bins [l * per_lane, (l + 1) * per_lane) of
// each slot: it alone reads and then zeroes them.
__global__ void __launch_bounds__(kPickThreads)
    pick_kernel(PoolState* states, unsigned long long* hist, int64_t pools, int pass, double q_lo, double q_hi) {
  const int lane = static_cast<int>(threadIdx.x & 31);
  const int64_t pool = static_cast<int64_t>(blockIdx.x) * (kPickThreads / 32) + (threadIdx.x >> 5);
  if (pool >= pools) return;  // whole warps leave together
  PoolState& st = states[pool];
  unsigned long long* h = hist + pool * kHistPerPool;
  const int bits = pass == 0 ? kTopBits : kDigitBits;
  const int per_lane = (1 << bits) / 32;  // 4 or 8

  long long rank[kRanks];
  unsigned long long prefix[kRanks];
  int target_of[kRanks];
  int slots;  // histogram slots the pass filled
  if (pass == 0) {
    long long mine = 0;
#pragma unroll
    for (int j = 0; j < kBins / 32; ++j)
      if (j < per_lane) mine += static_cast<long long>(h[lane * per_lane + j]);
    const long long n = __shfl_sync(kFullMask, warp_inclusive_sum(mine), 31);
    if (n == 0) {
#pragma unroll
      for (int j = 0; j < kBins / 32; ++j)
        if (j < per_lane) h[lane * per_lane + j] = 0;
      if (lane == 0) {
        st.n = 0;
        st.num_targets = 0;
      }
      return;
    }
    const math::QuantilePosition pl = math::quantile_position(n, q_lo);
    const math::QuantilePosition ph = math::quantile_position(n, q_hi);
    rank[0] = pl.k;
    rank[1] = pl.k1;
    rank[2] = ph.k;
    rank[3] = ph.k1;
#pragma unroll
    for (int r = 0; r < kRanks; ++r) {
      prefix[r] = 0;
      target_of[r] = 0;
    }
    slots = 1;
    if (lane == 0) st.n = n;
  } else {
    slots = st.num_targets;
    if (slots == 0 || pass >= passes_for(st.width)) return;  // empty pool, or its key is complete
#pragma unroll
    for (int r = 0; r < kRanks; ++r) {
      rank[r] = st.rank[r];
      prefix[r] = st.prefix[r];
      target_of[r] = st.target_of[r];
    }
  }

  bool lost = false;
#pragma unroll
  for (int r = 0; r < kRanks; ++r) {
    const unsigned long long* mine_bins = h + target_of[r] * kBins + lane * per_lane;
    long long mine = 0;
#pragma unroll
    for (int j = 0; j < kBins / 32; ++j)
      if (j < per_lane) mine += static_cast<long long>(mine_bins[j]);
    const long long through = warp_inclusive_sum(mine);  // scores in this lane's bins and below
    const unsigned holders = __ballot_sync(kFullMask, through > rank[r]);
    lost = lost || holders == 0;
    const int owner = holders != 0 ? __ffs(static_cast<int>(holders)) - 1 : 31;
    long long below = through - mine;
    int digit = per_lane - 1;
    bool found = false;
#pragma unroll
    for (int j = 0; j < kBins / 32; ++j) {
      if (j < per_lane && !found) {
        const long long c = static_cast<long long>(mine_bins[j]);
        if (below + c > rank[r]) {
          digit = j;
          found = true;
        } else {
          below += c;
        }
      }
    }
    digit = __shfl_sync(kFullMask, lane * per_lane + digit, owner);
    below = __shfl_sync(kFullMask, below, owner);
    rank[r] -= below;
    prefix[r] = (prefix[r] << bits) | static_cast<unsigned long long>(digit);
  }

  // Every lane has read its own bins above; zero them for the next pass.
#pragma unroll
  for (int t = 0; t < kRanks; ++t)
    if (t < slots) {
#pragma unroll
      for (int j = 0; j < kBins / 32; ++j)
        if (j < per_lane) h[t * kBins + lane * per_lane + j] = 0;
    }

  // The distinct prefixes, in rank order (register arrays indexed by unrolled constants only).
  unsigned long long target[kRanks];
#pragma unroll
  for (int t = 0; t < kRanks; ++t) target[t] = ~0ull;
  int count = 0;
#pragma unroll
  for (int r = 0; r < kRanks; ++r) {
    int slot = -1;
#pragma unroll
    for (int t = kRanks - 1; t >= 0; --t)
      if (t < count && target[t] == prefix[r]) slot = t;
    if (slot < 0) {
#pragma unroll
      for (int t = 0; t < kRanks; ++t)
        if (t == count) target[t] = prefix[r];
      slot = count++;
    }
    target_of[r] = slot;
  }

  if (lane == 0) {
#pragma unroll
    for (int r = 0; r < kRanks; ++r) {
      st.rank[r] = rank[r];
      st.prefix[r] = prefix[r];
      st.target[r] = target[r];
      st.target_of[r] = target_of[r];
    }
    st.num_targets = count;
    if (lost) st.lost = 1;
  }
}

// One thread per pool: the output row from the exact keys (semantics.md section 3).
__global__ void __launch_bounds__(kFinalThreads)
    finalize_kernel(const PoolState* states, const int* nonfinite, double* out, int64_t pools, double q_lo,
                    double q_hi) {
  const int64_t pool = static_cast<int64_t>(blockIdx.x) * kFinalThreads + threadIdx.x;
  if (pool >= pools) return;
  const PoolState& st = states[pool];
  const long long n = st.n;
  const bool wide = st.width == math::KeyOf<double>::kValueBits;
  double x[kRanks];
#pragma unroll
  for (int r = 0; r < kRanks; ++r)
    x[r] = wide ? math::value_of<double>(st.prefix[r])
                : static_cast<double>(math::value_of<float>(static_cast<uint32_t>(st.prefix[r])));
  double lower = std::numeric_limits<double>::quiet_NaN();
  double upper = lower;
  if (n > 0 && st.lost == 0) {
    lower = math::interpolate(n, math::quantile_position(n, q_lo), x[0], x[1]);
    upper = math::interpolate(n, math::quantile_position(n, q_hi), x[2], x[3]);
  }
  double* row = out + pool * kNumThresholdColumns;
  row[kThrLower] = lower;
  row[kThrUpper] = upper;
  row[kThrCount] = static_cast<double>(n);
  row[kThrNonFinite] = *nonfinite != 0 ? 1.0 : 0.0;
  row[kThrFullReads] = n > 0 ? static_cast<double>(passes_for(st.width)) : 1.0;
}

struct Launch {
  LaunchTable table;
  int blocks;
  at::ScalarType dtype;
  bool aligned;
};

int key_width(at::ScalarType dtype) {
  return dtype == at::kDouble ? math::KeyOf<double>::kValueBits : math::KeyOf<float>::kValueBits;
}

template <typename scalar_t, bool kSecond, bool kFirst>
void launch_typed(const Launch& l, const PassArgs& args, cudaStream_t stream) {
  if (l.aligned) {
    digit_histogram_kernel<scalar_t, kSecond, true, kFirst><<<l.blocks, kThreads, 0, stream>>>(l.table, args);
  } else {
    digit_histogram_kernel<scalar_t, kSecond, false, kFirst><<<l.blocks, kThreads, 0, stream>>>(l.table, args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_pass(const Launch& l, const PassArgs& args, bool second, bool first, cudaStream_t stream) {
  if (second) {
    if (first) launch_typed<scalar_t, true, true>(l, args, stream);
    else launch_typed<scalar_t, true, false>(l, args, stream);
  } else {
    if (first) launch_typed<scalar_t, false, true>(l, args, stream);
    else launch_typed<scalar_t, false, false>(l, args, stream);
  }
}

}  // namespace

at::Tensor element_thresholds(const TensorList& a, const TensorList& b, const at::Tensor& scales,
                              const at::Tensor& pooled, double q_lo, double q_hi, bool global_pool,
                              const std::optional<at::Tensor>& guesses, int64_t strategy) {
  // Both strategies run the radix select; guesses are speed hints only and are not needed by it.
  (void)guesses;
  (void)strategy;
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

  // One zeroed workspace: pool states, histograms, the non-finite flag.
  const int64_t state_bytes = pools * static_cast<int64_t>(sizeof(PoolState));
  const int64_t hist_bytes = pools * kHistPerPool * static_cast<int64_t>(sizeof(unsigned long long));
  at::Tensor work = at::zeros({state_bytes + hist_bytes + 16}, at::TensorOptions().dtype(at::kByte).device(device));
  uint8_t* base = work.data_ptr<uint8_t>();
  PoolState* states = reinterpret_cast<PoolState*>(base);
  unsigned long long* hist = reinterpret_cast<unsigned long long*>(base + state_bytes);
  int* nonfinite = reinterpret_cast<int*>(base + state_bytes + hist_bytes);

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
        cur.table.a[c] = t.data_ptr();
        cur.table.b[c] = second ? b[i].data_ptr() : nullptr;
        cur.table.numel[c] = t.numel();
        cur.table.tensor[c] = static_cast<int32_t>(i);
        cur.table.first_block[c] = cur.blocks;
        cur.blocks += static_cast<int>(blocks);
      }
      flush();
    }
  }

  int passes = passes_for(math::KeyOf<float>::kValueBits);
  for (const Launch& l : launches) passes = std::max(passes, passes_for(key_width(l.dtype)));

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  PassArgs args{};
  args.states = states;
  args.hist = hist;
  args.nonfinite = nonfinite;
  args.scales = second ? scale_values.data_ptr<double>() : nullptr;
  args.pooled = reinterpret_cast<const unsigned char*>(pooled_flags.data_ptr<bool>());
  args.global_pool = global_pool ? 1 : 0;
  const unsigned pick_blocks = static_cast<unsigned>((pools + kPickThreads / 32 - 1) / (kPickThreads / 32));
  for (int pass = 0; pass < passes; ++pass) {
    for (const Launch& l : launches) {
      const int width = key_width(l.dtype);
      if (pass >= passes_for(width)) continue;
      args.shift = digit_shift(width, pass);
      switch (l.dtype) {
        case at::kFloat: launch_pass<float>(l, args, second, pass == 0, stream); break;
        case at::kDouble: launch_pass<double>(l, args, second, pass == 0, stream); break;
        case at::kHalf: launch_pass<c10::Half>(l, args, second, pass == 0, stream); break;
        case at::kBFloat16: launch_pass<c10::BFloat16>(l, args, second, pass == 0, stream); break;
        default: TORCH_CHECK(false, "element_thresholds: unsupported dtype ", l.dtype);
      }
    }
    pick_kernel<<<pick_blocks, kPickThreads, 0, stream>>>(states, hist, pools, pass, q_lo, q_hi);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  at::Tensor out = at::empty({pools, kNumThresholdColumns}, doubles);
  const unsigned final_blocks = static_cast<unsigned>((pools + kFinalThreads - 1) / kFinalThreads);
  finalize_kernel<<<final_blocks, kFinalThreads, 0, stream>>>(states, nonfinite, out.data_ptr<double>(), pools,
                                                               q_lo, q_hi);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace rose_kernels::cuda
