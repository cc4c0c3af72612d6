// Multi-tensor launch machinery of the CUDA kernels (score.cu, update.cu, and any other kernel that
// walks a list of tensors): the per-launch argument table, the host planner that splits a list into
// launches of (tensor, chunk) blocks, the alignment test, dtype grouping and dispatch, fragment
// loads and stores, and the deterministic per-tensor reduction of per-block partial sums.
//
// The rules every user keeps (so that a step can be captured in a CUDA graph):
//  - tables travel BY VALUE as kernel arguments (no host-to-device copy, no synchronisation);
//  - every launch goes on at::cuda::getCurrentCUDAStream() under a c10::cuda::CUDAGuard;
//  - scratch memory comes from at::empty (the caching allocator);
//  - sums are deterministic: each block writes its partial to its own slot, and
//    segment_sum_kernel adds a tensor's partials in a fixed order (no floating-point atomics).
//
// Work decomposition. A tensor is cut into chunks of kChunk elements; one thread block handles one
// chunk. Inside a chunk, the unit is one 16-byte vector of the tensor's element type
// (kVecElems<T> elements) and unit u of the chunk belongs to thread u % kThreads, so consecutive
// threads touch consecutive vectors (coalesced) and a warp holds 32 consecutive units. The
// assignment and the order in which a thread adds its values are the same on the vector path
// (16-byte loads, all addresses 16-byte aligned) and on the scalar path (element loads), so a
// tensor's sums depend only on its size, never on its address, the path or the timing.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "dtype_dispatch.h"

namespace rose_kernels::cuda::mt {

using TensorList = std::vector<at::Tensor>;

// ---- Launch geometry ---------------------------------------------------------------------------

// 256 threads (8 warps): several blocks fit on an SM at up to 128 registers per thread, and a
// partially filled tail chunk wastes at most one block's worth of threads.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Elements per block: 4096 is 16 KB of fp32 (8 KB of bf16/fp16, 32 KB of fp64) per operand, which
// keeps per-block overhead (table lookup, one partial, one reduction) small against the memory
// traffic while a 1M-element tensor still spreads over 256 blocks. A multiple of 8 so that a
// 1-bit mask byte never straddles two blocks, and of kThreads * 16 bytes for every element type.
constexpr int kChunk = 4096;

// Bytes a launch table may occupy: the CUDA limit on kernel arguments is 4 KB on every supported
// toolkit and device, and the kernels take a few pointers besides the table.
constexpr int kTableBytes = 3584;

// gridDim.x is at most 2^31 - 1: a launch never holds more blocks than that.
constexpr int64_t kMaxGrid = INT32_MAX;

static_assert(kThreads % 32 == 0, "whole warps only");

// ---- Element types -----------------------------------------------------------------------------

// The opmath type: float64 for float64, float32 for float32, bfloat16 and float16.
template <typename T>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};
template <typename T>
using opmath_t = typename OpMath<T>::type;

// Elements in one 16-byte vector of T: the unit of work of a thread.
template <typename T>
constexpr int kVecElems = 16 / static_cast<int>(sizeof(T));

// Units of one chunk per thread (fp32: 4, fp64: 8, bf16/fp16: 2).
template <typename T>
constexpr int kUnitsPerThread = kChunk / (kVecElems<T> * kThreads);

// Element distance between a thread's consecutive units.
template <typename T>
constexpr int kUnitStride = kThreads * kVecElems<T>;

static_assert(kChunk % (kThreads * 8) == 0, "a chunk must hold whole units for every element type");
static_assert(kChunk % 8 == 0, "mask bytes must not straddle chunks");

using rose_kernels::dispatch_float_type;  // dtype_dispatch.h, shared with the CPU kernels

// The tensors of one dtype, as indices (rows) into the op's list, in list order.
struct DtypeGroup {
  at::ScalarType dtype;
  std::vector<int64_t> rows;
};

// Groups a list by dtype (groups in order of first appearance): each group becomes launches of one
// kernel instantiation, so mixed fp32/bf16 lists work without per-element type switches.
inline std::vector<DtypeGroup> group_by_dtype(const TensorList& xs) {
  std::vector<DtypeGroup> groups;
  for (int64_t i = 0; i < static_cast<int64_t>(xs.size()); ++i) {
    const at::ScalarType t = xs[i].scalar_type();
    DtypeGroup* g = nullptr;
    for (auto& existing : groups)
      if (existing.dtype == t) g = &existing;
    if (g == nullptr) {
      groups.push_back({t, {}});
      g = &groups.back();
    }
    g->rows.push_back(i);
  }
  return groups;
}

// 16-byte alignment of an address (null counts as aligned: it is never dereferenced).
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---- The launch table ----------------------------------------------------------------------------

// One launch over up to kMax tensors, each cut into chunks; block b of the launch handles chunk
// (b - block_end[s - 1]) of slot s, where s is the first slot with block_end[s] > b. Only the
// tensor count is limited per launch (not the block count), so a tensor is never split across
// launches and its partials are contiguous. kDepth: pointers per tensor (p, g, m, v, ...).
template <int kDepth>
struct TensorTable {
  // Per slot: kDepth addresses, numel (8 bytes), row and block_end (4 bytes each).
  static constexpr int kMax = (kTableBytes - 16) / (8 * kDepth + 16);
  void* addr[kDepth][kMax];
  int64_t numel[kMax];
  int64_t partial_base;    // partial slot of the launch's block 0
  int32_t row[kMax];       // the tensor's index in the op's lists (its output row)
  int32_t block_end[kMax]; // inclusive prefix sum of the slots' block counts
  int32_t count;           // slots in use
};

// The block's share of its launch: slot, first element of its chunk, and chunk length.
struct BlockWork {
  int slot;
  int len;
  int64_t start;
};

// Binary search of blockIdx.x in block_end (all threads read the same words: uniform loads of the
// kernel-parameter bank, no local copy with __grid_constant__ tables).
template <int kDepth>
__device__ __forceinline__ BlockWork locate(const TensorTable<kDepth>& table) {
  const int b = static_cast<int>(blockIdx.x);
  int lo = 0;
  int hi = table.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (table.block_end[mid] > b) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  const int first = lo == 0 ? 0 : table.block_end[lo - 1];
  BlockWork w;
  w.slot = lo;
  w.start = static_cast<int64_t>(b - first) * kChunk;
  const int64_t left = table.numel[lo] - w.start;
  w.len = left < kChunk ? static_cast<int>(left) : kChunk;
  return w;
}

// ---- Host planning ---------------------------------------------------------------------------------

// Where each tensor's block partials lie in the op's partial buffer (one row per list entry;
// tensors without elements have none), and how many partials all launches write together.
struct Segments {
  int64_t total = 0;
  std::vector<int64_t> first;
  std::vector<int32_t> blocks;
  explicit Segments(size_t rows) : first(rows, 0), blocks(rows, 0) {}
};

template <int kDepth>
struct Launch {
  TensorTable<kDepth> table;
  int64_t blocks;  // grid size
  bool aligned;    // every address in an aligned role is 16-byte aligned: the vector path may run
};

// Splits the tensors `rows` (all of one dtype) into launches, in order, and records their partial
// slots in `seg`. addr(row) returns the kDepth addresses of a row; numel comes from like[row].
// Bit d of align_mask puts role d under the alignment test (roles read element-wise, such as a
// byte mask, stay out of it). Tensors without elements get no block.
template <int kDepth, typename AddrFn>
std::vector<Launch<kDepth>> plan_launches(const std::vector<int64_t>& rows, const TensorList& like, AddrFn&& addr,
                                          unsigned align_mask, Segments& seg) {
  using Table = TensorTable<kDepth>;
  static_assert(sizeof(Table) <= kTableBytes, "launch table too large for the kernel arguments");
  std::vector<Launch<kDepth>> launches;
  Launch<kDepth>* cur = nullptr;
  for (const int64_t row : rows) {
    const int64_t numel = like[row].numel();
    if (numel == 0) continue;
    const int64_t blocks = (numel + kChunk - 1) / kChunk;
    TORCH_CHECK(blocks <= kMaxGrid, "rose_kernels: tensor ", row, " has too many elements (", numel, ")");
    if (cur == nullptr || cur->table.count == Table::kMax || cur->blocks + blocks > kMaxGrid) {
      if (cur != nullptr) seg.total += cur->blocks;
      launches.emplace_back();
      cur = &launches.back();
      std::memset(&cur->table, 0, sizeof(Table));
      cur->table.partial_base = seg.total;
      cur->blocks = 0;
      cur->aligned = true;
    }
    const int s = cur->table.count++;
    const std::array<void*, kDepth> a = addr(row);
    for (int d = 0; d < kDepth; ++d) {
      cur->table.addr[d][s] = a[d];
      if ((align_mask >> d) & 1u) cur->aligned = cur->aligned && aligned16(a[d]);
    }
    cur->table.numel[s] = numel;
    cur->table.row[s] = static_cast<int32_t>(row);
    seg.first[row] = cur->table.partial_base + cur->blocks;
    seg.blocks[row] = static_cast<int32_t>(blocks);
    cur->blocks += blocks;
    cur->table.block_end[s] = static_cast<int32_t>(cur->blocks);
  }
  if (cur != nullptr) seg.total += cur->blocks;
  return launches;
}

// ---- Fragment loads and stores -------------------------------------------------------------------

// Loads N elements of T at p into opmath registers. kVector: 16-byte loads (p 16-byte aligned,
// N * sizeof(T) a multiple of 16). kGuard: only elements j < rem exist; the others read as 0.
template <int N, bool kVector, bool kGuard, typename T, typename O>
__device__ __forceinline__ void load_frag(const T* p, int rem, O (&out)[N]) {
  if constexpr (kVector) {
    static_assert(!kGuard, "the vector path is for whole units");
    static_assert((N * sizeof(T)) % 16 == 0, "whole 16-byte vectors only");
    constexpr int kWords = static_cast<int>(N * sizeof(T) / 16);
    constexpr int kPer = static_cast<int>(16 / sizeof(T));
    T raw[N];
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      const uint4 bits = reinterpret_cast<const uint4*>(p)[w];
      std::memcpy(&raw[w * kPer], &bits, 16);
    }
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = static_cast<O>(raw[j]);
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = (!kGuard || j < rem) ? static_cast<O>(p[j]) : O(0);
  }
}

// Stores N opmath values at p as T (bf16/fp16: round to nearest even, by c10's conversions).
// Same kVector / kGuard contract as load_frag; with kGuard only elements j < rem are written.
template <int N, bool kVector, bool kGuard, typename T, typename O>
__device__ __forceinline__ void store_frag(T* p, int rem, const O (&in)[N]) {
  T raw[N];
#pragma unroll
  for (int j = 0; j < N; ++j) raw[j] = static_cast<T>(in[j]);
  if constexpr (kVector) {
    static_assert(!kGuard, "the vector path is for whole units");
    static_assert((N * sizeof(T)) % 16 == 0, "whole 16-byte vectors only");
    constexpr int kWords = static_cast<int>(N * sizeof(T) / 16);
    constexpr int kPer = static_cast<int>(16 / sizeof(T));
#pragma unroll
    for (int w = 0; w < kWords; ++w) {
      uint4 bits;
      std::memcpy(&bits, &raw[w * kPer], 16);
      reinterpret_cast<uint4*>(p)[w] = bits;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j)
      if (!kGuard || j < rem) p[j] = raw[j];
  }
}

// Runs op(full, i0) over this thread's units of a chunk of `len` elements, kIlp units per call:
// unit k of a call starts at element i0 + k * kThreads * V of the chunk (it may lie past len on a
// tail chunk; op then sees rem = len - i <= 0). `full` is std::true_type on whole chunks (no
// bounds checks, vector loads allowed) and std::false_type on the tail chunk. Every thread makes
// the same calls, so op may use warp shuffles.
template <int V, int kIlp, typename Op>
__device__ __forceinline__ void for_each_group(int len, Op&& op) {
  constexpr int kUnits = kChunk / (V * kThreads);
  static_assert(kUnits % kIlp == 0, "kIlp must divide the units per thread");
  const int base = static_cast<int>(threadIdx.x) * V;
  if (len == kChunk) {
#pragma unroll 1
    for (int it = 0; it < kUnits; it += kIlp) op(std::true_type{}, it * kThreads * V + base);
  } else {
#pragma unroll 1
    for (int it = 0; it < kUnits; it += kIlp) op(std::false_type{}, it * kThreads * V + base);
  }
}

// ---- Deterministic sums --------------------------------------------------------------------------

// Sums C values over the block: warp shuffles, then warp 0's lane 0 adds the kWarps warp sums in
// warp order. The result is valid in thread 0 only. Fixed order: the same inputs always give the
// same bits. Uses a static shared buffer: call at most once per kernel.
template <int C>
__device__ __forceinline__ void block_sum(double (&v)[C]) {
  __shared__ double warp_sums[kWarps][C];
#pragma unroll
  for (int c = 0; c < C; ++c)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v[c] += __shfl_down_sync(0xffffffffu, v[c], o);
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  if (lane == 0) {
#pragma unroll
    for (int c = 0; c < C; ++c) warp_sums[warp][c] = v[c];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int c = 0; c < C; ++c) {
      double s = warp_sums[0][c];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) s += warp_sums[w][c];
      v[c] = s;
    }
  }
}

// Rows of one segment-sum launch: tensor row r sums partials [first, first + blocks).
struct SegmentTable {
  static constexpr int kMax = (kTableBytes - 16) / 16;
  int64_t first[kMax];
  int32_t blocks[kMax];
  int32_t row[kMax];
  int32_t count;
};
static_assert(sizeof(SegmentTable) <= kTableBytes, "segment table too large for the kernel arguments");

// One block per tensor: thread k adds partials k, k + kThreads, ... of the tensor (C columns,
// row-major [partial][C]), then block_sum; finalize(row, blocks, sums) runs in thread 0.
// Deterministic: the order depends only on the tensor's block count.
template <int C, typename Finalize>
__global__ void __launch_bounds__(kThreads)
    segment_sum_kernel(const __grid_constant__ SegmentTable table, const double* __restrict__ partials,
                       Finalize finalize) {
  const int s = static_cast<int>(blockIdx.x);
  const int64_t first = table.first[s];
  const int blocks = table.blocks[s];
  double acc[C];
#pragma unroll
  for (int c = 0; c < C; ++c) acc[c] = 0.0;
  for (int j = static_cast<int>(threadIdx.x); j < blocks; j += kThreads) {
#pragma unroll
    for (int c = 0; c < C; ++c) acc[c] += partials[(first + j) * C + c];
  }
  block_sum<C>(acc);
  if (threadIdx.x == 0) finalize(static_cast<int64_t>(table.row[s]), blocks, acc);
}

// The plain finalize: out[row * C + c] = sum of column c.
template <int C>
struct StoreSums {
  double* out;
  __device__ __forceinline__ void operator()(int64_t row, int /*blocks*/, const double (&sums)[C]) const {
#pragma unroll
    for (int c = 0; c < C; ++c) out[row * C + c] = sums[c];
  }
};

// Launches segment_sum_kernel over every row of seg (in launches of SegmentTable::kMax rows).
// partials: float64 [seg.total * C] on the device.
template <int C, typename Finalize>
void launch_segment_sums(const at::Tensor& partials, const Segments& seg, const Finalize& finalize,
                         cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(seg.first.size());
  const double* data = partials.numel() > 0 ? partials.data_ptr<double>() : nullptr;
  for (int64_t r0 = 0; r0 < n; r0 += SegmentTable::kMax) {
    SegmentTable table;
    std::memset(&table, 0, sizeof(table));
    table.count = static_cast<int32_t>(std::min<int64_t>(SegmentTable::kMax, n - r0));
    for (int k = 0; k < table.count; ++k) {
      table.first[k] = seg.first[r0 + k];
      table.blocks[k] = seg.blocks[r0 + k];
      table.row[k] = static_cast<int32_t>(r0 + k);
    }
    segment_sum_kernel<C, Finalize><<<table.count, kThreads, 0, stream>>>(table, data, finalize);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Options for a float64 result on the current CUDA device (for calls with empty lists).
inline at::TensorOptions current_device_doubles() {
  return at::TensorOptions().dtype(at::kDouble).device(at::kCUDA, c10::cuda::current_device());
}

}  // namespace rose_kernels::cuda::mt
