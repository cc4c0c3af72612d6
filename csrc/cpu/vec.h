// Helpers of the CPU kernels: work chunks, opmath loads and stores, dtype dispatch, mask bits.
//
// Compiled once per CPU capability (kernels_{default,avx2,avx512}.cpp, flags in setup.py) inside
// namespace CPU_CAPABILITY; the per-element math is ../rose_math.h, shared with the CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common.h"
#include "dtype_dispatch.h"
#include "cpu/dispatch.h"
#include "rose_math.h"

namespace rose_kernels::cpu {
namespace CPU_CAPABILITY {

using at::vec::Vectorized;

// Work is split into chunks of this many elements across all tensors of a call. A multiple of 64
// so that chunks of a 1-bit mask start on whole 64-bit words; 64 Ki elements (256 KiB of fp32)
// keeps per-chunk overhead under 1% while giving 2 threads ~350 chunks on a 22.7M-param model.
constexpr int64_t kChunk = 1 << 16;

template <typename T>
struct OpMath { using type = float; };
template <>
struct OpMath<double> { using type = double; };

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

inline std::vector<Chunk> make_chunks(const TensorList& xs) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(xs.size()); ++t) {
    const int64_t n = xs[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({t, b, std::min(n, b + kChunk)});
  }
  return chunks;
}

// Loads `count` (<= Vec::size()) scalar_t values as opmath values, zero-filling the rest.
template <typename opmath_t, typename scalar_t>
inline Vectorized<opmath_t> load_as(const scalar_t* ptr, int64_t count = Vectorized<opmath_t>::size()) {
  using Vec = Vectorized<opmath_t>;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    if (count == Vec::size()) return Vec::loadu(ptr);
    __at_align__ opmath_t tmp[Vec::size()] = {};
    std::memcpy(tmp, ptr, count * sizeof(opmath_t));
    return Vec::loadu(tmp);
  } else {
    __at_align__ opmath_t tmp[Vec::size()] = {};
    for (int64_t k = 0; k < count; ++k) tmp[k] = static_cast<opmath_t>(ptr[k]);
    return Vec::loadu(tmp);
  }
}

// Stores `count` lanes, rounding to scalar_t (round-to-nearest-even for bf16/fp16, as c10 does).
template <typename scalar_t, typename opmath_t>
inline void store_as(scalar_t* ptr, const Vectorized<opmath_t>& v,
                     int64_t count = Vectorized<opmath_t>::size()) {
  using Vec = Vectorized<opmath_t>;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    v.store(ptr, count);
  } else {
    __at_align__ opmath_t tmp[Vec::size()];
    v.store(tmp);
    for (int64_t k = 0; k < count; ++k) ptr[k] = static_cast<scalar_t>(tmp[k]);
  }
}

template <typename opmath_t>
inline double sum_lanes(const Vectorized<opmath_t>& v) {
  __at_align__ opmath_t tmp[Vectorized<opmath_t>::size()];
  v.store(tmp);
  double s = 0;
  for (int64_t k = 0; k < Vectorized<opmath_t>::size(); ++k) s += static_cast<double>(tmp[k]);
  return s;
}

using rose_kernels::dispatch_float_type;  // dtype_dispatch.h, shared with the CUDA host code

// ------------------------------------------------------------------------------------------------
// Mask helpers shared by the first-order mask writer and the update
// ------------------------------------------------------------------------------------------------

using math::inward_bounds;  // float64 thresholds as opmath bounds (rose_math.h)

// 0/1 lanes from consecutive mask bits, via a byte -> 8 floats table (no per-lane shifts).
template <typename opmath_t>
struct BitTable {
  __at_align__ opmath_t lanes[256][8];
  BitTable() {
    for (int byte = 0; byte < 256; ++byte)
      for (int k = 0; k < 8; ++k) lanes[byte][k] = ((byte >> k) & 1) ? opmath_t(1) : opmath_t(0);
  }
};

template <typename opmath_t>
inline Vectorized<opmath_t> bits_to_lanes(const uint8_t* bits, int64_t i, int64_t count) {
  using Vec = Vectorized<opmath_t>;
  static const BitTable<opmath_t> table;
  __at_align__ opmath_t tmp[Vec::size() + 8];
  if ((i & 7) == 0 && count == Vec::size() && Vec::size() % 8 == 0) {
    for (int64_t k = 0; k < Vec::size(); k += 8)
      std::memcpy(tmp + k, table.lanes[bits[(i + k) >> 3]], 8 * sizeof(opmath_t));
  } else {
    for (int64_t k = 0; k < Vec::size(); ++k)
      tmp[k] = k < count && ((bits[(i + k) >> 3] >> ((i + k) & 7)) & 1) ? opmath_t(1) : opmath_t(0);
  }
  return Vec::loadu(tmp);
}

}  // namespace CPU_CAPABILITY
}  // namespace rose_kernels::cpu
