// UPDATE on the GPU: the masked AdamW step (semantics.md section 5) for many tensors per call.
//
// Three stages, all on the current stream, nothing read back by the host:
//  1. update_prologue_kernel (one thread per tensor) snapshots each step counter, computes the
//     tensor's float64 coefficients (step size, warm-up, uniform mask, kept-sum weights) into a
//     scratch table, and writes the incremented counter back unless `found` is set. Only this
//     kernel touches the counters, so no block of stage 2 can see a half-updated one.
//  2. masked_adamw_kernel (one block per chunk, per dtype group and launch table) moves p, m, v
//     with rose_math.h's formulas and writes three partials per block: the sum of mu1 (or the
//     chunk's length for a uniform mask), the sum of mu2, and the sum of squares of the new m.
//  3. segment_sum_kernel adds each tensor's partials in block order and finalizes the result
//     [kept, ||m||^2] (kept = A * sum1 + B * sum2 with the prologue's weights; NaN when skipped).
// A set `found` flag turns stages 1 and 2 into reads: no parameter, moment or counter changes.
#include <limits>

#include "common.h"
#include "cuda/multi_tensor.cuh"
#include "cuda/ops_cuda.h"
#include "rose_math.h"

namespace rose_kernels::cuda {
namespace {

// Columns of the per-tensor coefficient scratch (float64 [n, kNumCoefColumns]) the prologue
// writes and the update and finalize read.
enum CoefColumn : int {
  kCoefStepSize = 0,  // math::step_size at the incremented step
  kCoefMu,            // the uniform mask: 1 in warm-up, else w1 * mask_first + w2 * mask_second
  kCoefElement,       // 1: per-element mask (past warm-up, with a bit mask or an inline second order)
  kCoefKeptFirst,     // A of kept = A * sum1 + B * sum2: (opmath) mu if uniform, (opmath) w1 if not
  kCoefKeptSecond,    // B: 0 if uniform, (opmath) w2 if not
  kNumCoefColumns
};

// Per-tensor flags of the prologue table.
constexpr uint8_t kFlagHasBits = 1;  // the tensor has a 1-bit first-order mask
constexpr uint8_t kFlagWide = 2;     // its opmath type is float64

// Rows [first_row, first_row + count) of the op's lists: their step counters and flags.
struct StepTable {
  static constexpr int kMax = (mt::kTableBytes - 16) / 9;
  float* step[kMax];
  int64_t first_row;
  int32_t count;
  uint8_t flags[kMax];
};
static_assert(sizeof(StepTable) <= mt::kTableBytes, "step table too large for the kernel arguments");

// Partials per block: sum of mu1 (uniform: the chunk length), sum of mu2, sum of new m^2.
constexpr int kPartials = 3;

__global__ void __launch_bounds__(mt::kThreads)
    update_prologue_kernel(const __grid_constant__ StepTable table, const double* __restrict__ hyper,
                           const double* __restrict__ masks, const int32_t* __restrict__ found, bool inline_second,
                           double* __restrict__ coefs) {
  const int k = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (k >= table.count) return;
  const int64_t row = table.first_row + k;
  const double* h = hyper + row * kNumHyperColumns;
  const double* mk = masks + row * kNumMaskColumns;
  float* counter = table.step[k];
  // The counter is incremented in float32, as the CPU op does (++ on the float), and used in float64.
  const float next = *counter + 1.0f;
  const double step = static_cast<double>(next);
  const uint8_t flags = table.flags[k];
  const bool has_bits = (flags & kFlagHasBits) != 0;
  const bool wide = (flags & kFlagWide) != 0;
  const bool warm = step <= h[kWarmupSteps];
  const bool element = !warm && (has_bits || (inline_second && h[kElementSecond] != 0.0));
  const double mu = warm ? 1.0 : h[kWeightFirst] * mk[kMaskFirst] + h[kWeightSecond] * mk[kMaskSecond];
  // The kept-sum weights are the opmath values the update multiplies with, as float64.
  auto to_opmath = [wide](double x) { return wide ? x : static_cast<double>(static_cast<float>(x)); };
  double* cf = coefs + row * kNumCoefColumns;
  cf[kCoefStepSize] = math::step_size(h[kLr], h[kBeta1], h[kBeta2], step, h[kCorrectBias] != 0.0);
  cf[kCoefMu] = mu;
  cf[kCoefElement] = element ? 1.0 : 0.0;
  cf[kCoefKeptFirst] = element ? to_opmath(h[kWeightFirst]) : to_opmath(mu);
  cf[kCoefKeptSecond] = element ? to_opmath(h[kWeightSecond]) : 0.0;
  if (*found == 0) *counter = next;
}

// The finalize of stage 3: out[row] = (kept, ||m_new||^2), or (NaN, ||m||^2) when skipped.
struct UpdateFinalize {
  double* out;
  const double* coefs;
  const int32_t* found;
  __device__ __forceinline__ void operator()(int64_t row, int blocks, const double (&sums)[kPartials]) const {
    const double* cf = coefs + row * kNumCoefColumns;
    double kept;
    if (*found != 0) {
      kept = std::numeric_limits<double>::quiet_NaN();
    } else if (blocks == 0) {
      kept = 0.0;  // no elements
    } else {
      kept = cf[kCoefKeptFirst] * sums[0] + cf[kCoefKeptSecond] * sums[1];
    }
    out[2 * row] = kept;
    out[2 * row + 1] = sums[2];
  }
};

// The per-block state of masked_adamw_kernel: the chunk's pointers and length.
template <typename scalar_t>
struct Chunk {
  using O = mt::opmath_t<scalar_t>;
  scalar_t* p;
  const scalar_t* g;
  O* m;
  O* v;
  const uint8_t* bits;  // the chunk's first mask byte, or null
  int len;
};

// 16-byte vectors each thread keeps in flight per operand: two for fp32 and fp64, one for
// bf16/fp16 (already 8 elements, whose moments are two fp32 vectors each): 64 to 128 bytes of
// loads per thread, plenty at 2-4 resident blocks per SM, within ~80 registers (fp64: ~128).
template <typename scalar_t>
constexpr int kUpdateIlp = mt::kVecElems<scalar_t> >= 8 ? 1 : 2;

// Sum of squares of m over the chunk, nothing written (the skipped step).
template <typename scalar_t, bool kAligned>
__device__ __forceinline__ void pass_read_m(const Chunk<scalar_t>& ch, double& msq) {
  using O = mt::opmath_t<scalar_t>;
  constexpr int V = mt::kVecElems<scalar_t>;
  constexpr int kIlp = kUpdateIlp<scalar_t>;
  mt::for_each_group<V, kIlp>(ch.len, [&](auto full, int i0) {
    constexpr bool kFull = decltype(full)::value;
    O m[kIlp][V];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int i = i0 + k * mt::kUnitStride<scalar_t>;
      mt::load_frag<V, kAligned && kFull, !kFull>(ch.m + i, ch.len - i, m[k]);
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k)
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const double d = static_cast<double>(m[k][j]);  // 0 past the end
        msq += d * d;
      }
  });
}

// Uniform mu == 0: p and m stay as they are (not even rewritten) and g is not read; only
// v' = beta2 v + (1 - beta2) m^2 moves (masked_adam_move's v at mu = 0, where g' = m).
template <typename scalar_t, bool kAligned>
__device__ __forceinline__ void pass_frozen(const Chunk<scalar_t>& ch, const math::AdamCoefficients<mt::opmath_t<scalar_t>>& c,
                                            double& msq) {
  using O = mt::opmath_t<scalar_t>;
  constexpr int V = mt::kVecElems<scalar_t>;
  constexpr int kIlp = kUpdateIlp<scalar_t>;
  mt::for_each_group<V, kIlp>(ch.len, [&](auto full, int i0) {
    constexpr bool kFull = decltype(full)::value;
    constexpr bool kVector = kAligned && kFull;
    O m[kIlp][V], v[kIlp][V];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int i = i0 + k * mt::kUnitStride<scalar_t>;
      mt::load_frag<V, kVector, !kFull>(ch.m + i, ch.len - i, m[k]);
      mt::load_frag<V, kVector, !kFull>(ch.v + i, ch.len - i, v[k]);
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int i = i0 + k * mt::kUnitStride<scalar_t>;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        v[k][j] = c.beta2 * v[k][j] + c.one_minus_beta2 * (m[k][j] * m[k][j]);
        const double d = static_cast<double>(m[k][j]);
        msq += d * d;
      }
      mt::store_frag<V, kVector, !kFull>(ch.v + i, ch.len - i, v[k]);
    }
  });
}

// Uniform mu != 0: math::adam_move when mu == 1 (kPlain), math::masked_adam_move otherwise.
template <typename scalar_t, bool kAligned, bool kPlain>
__device__ __forceinline__ void pass_uniform(const Chunk<scalar_t>& ch, const math::AdamCoefficients<mt::opmath_t<scalar_t>>& c,
                                             mt::opmath_t<scalar_t> mu, double& msq) {
  using O = mt::opmath_t<scalar_t>;
  constexpr int V = mt::kVecElems<scalar_t>;
  constexpr int kIlp = kUpdateIlp<scalar_t>;
  const O one(1);
  mt::for_each_group<V, kIlp>(ch.len, [&](auto full, int i0) {
    constexpr bool kFull = decltype(full)::value;
    constexpr bool kVector = kAligned && kFull;
    O p[kIlp][V], g[kIlp][V], m[kIlp][V], v[kIlp][V];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int i = i0 + k * mt::kUnitStride<scalar_t>;
      const int rem = ch.len - i;
      mt::load_frag<V, kVector, !kFull>(ch.p + i, rem, p[k]);
      mt::load_frag<V, kVector, !kFull>(ch.g + i, rem, g[k]);
      mt::load_frag<V, kVector, !kFull>(ch.m + i, rem, m[k]);
      mt::load_frag<V, kVector, !kFull>(ch.v + i, rem, v[k]);
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int i = i0 + k * mt::kUnitStride<scalar_t>;
      const int rem = ch.len - i;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if constexpr (kPlain) {
          math::adam_move(c, g[k][j], p[k][j], m[k][j], v[k][j]);
        } else {
          math::masked_adam_move(c, mu, one, g[k][j], p[k][j], m[k][j], v[k][j]);
        }
        if (kFull || j < rem) {
          const double d = static_cast<double>(m[k][j]);
          msq += d * d;
        }
      }
      mt::store_frag<V, kVector, !kFull>(ch.p + i, rem, p[k]);
      mt::store_frag<V, kVector, !kFull>(ch.m + i, rem, m[k]);
      mt::store_frag<V, kVector, !kFull>(ch.v + i, rem, v[k]);
    }
  });
}

// The per-element mask values' inputs, rounded to opmath as the CPU rounds them.
template <typename O>
struct ElementMask {
  O w1, w2;              // mu = w1 * mu1 + w2 * mu2 (math::blended_mask)
  O mu1_uniform;         // mu1 without a bit mask
  O mu2_uniform;         // mu2 without the inline second-order mask
  O scale, lo, hi;       // c of the second-order score and its inward opmath bounds
  bool has_bits;         // mu1 from the chunk's bit mask
  bool element_second;   // mu2 = (m == 0) || lo <= |c g / m - 1| <= hi
};

// Per-element mask: always math::masked_adam_move (as the CPU's element path), and where mu == 0
// p and m keep their old values bit for bit while v moves. Partials: sum of mu1, sum of mu2 (0/1
// values, exact in float64), sum of the stored m squared.
template <typename scalar_t, bool kAligned>
__device__ __forceinline__ void pass_element(const Chunk<scalar_t>& ch, const math::AdamCoefficients<mt::opmath_t<scalar_t>>& c,
                                             const ElementMask<mt::opmath_t<scalar_t>>& em, double (&acc)[kPartials]) {
  using O = mt::opmath_t<scalar_t>;
  constexpr int V = mt::kVecElems<scalar_t>;
  constexpr int kIlp = kUpdateIlp<scalar_t>;
  const O one(1);
  const O zero(0);
  mt::for_each_group<V, kIlp>(ch.len, [&](auto full, int i0) {
    constexpr bool kFull = decltype(full)::value;
    constexpr bool kVector = kAligned && kFull;
    O p[kIlp][V], g[kIlp][V], m[kIlp][V], v[kIlp][V];
    unsigned byte[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int i = i0 + k * mt::kUnitStride<scalar_t>;
      const int rem = ch.len - i;
      mt::load_frag<V, kVector, !kFull>(ch.p + i, rem, p[k]);
      mt::load_frag<V, kVector, !kFull>(ch.g + i, rem, g[k]);
      mt::load_frag<V, kVector, !kFull>(ch.m + i, rem, m[k]);
      mt::load_frag<V, kVector, !kFull>(ch.v + i, rem, v[k]);
      // The unit's V bits: i is a multiple of V and V divides 8, so they sit in one byte.
      byte[k] = (em.has_bits && (kFull || rem > 0)) ? static_cast<unsigned>(ch.bits[i >> 3]) >> (i & 7) : 0u;
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int i = i0 + k * mt::kUnitStride<scalar_t>;
      const int rem = ch.len - i;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const O mu1 = em.has_bits ? static_cast<O>((byte[k] >> j) & 1u) : em.mu1_uniform;
        O mu2 = em.mu2_uniform;
        if (em.element_second) {
          const O s = math::second_order_score(em.scale, g[k][j], m[k][j], one);
          mu2 = (m[k][j] == zero || (em.lo <= s && s <= em.hi)) ? one : zero;
        }
        const O mu = math::blended_mask(em.w1, mu1, em.w2, mu2);
        O p_new = p[k][j];
        O m_new = m[k][j];
        math::masked_adam_move(c, mu, one, g[k][j], p_new, m_new, v[k][j]);
        if (mu != zero) {
          p[k][j] = p_new;
          m[k][j] = m_new;
        }
        if (kFull || j < rem) {  // padding past the end can get mu2 = 1 from m == 0: leave it out
          acc[0] += static_cast<double>(mu1);
          acc[1] += static_cast<double>(mu2);
          const double d = static_cast<double>(m[k][j]);
          acc[2] += d * d;
        }
      }
      mt::store_frag<V, kVector, !kFull>(ch.p + i, rem, p[k]);
      mt::store_frag<V, kVector, !kFull>(ch.m + i, rem, m[k]);
      mt::store_frag<V, kVector, !kFull>(ch.v + i, rem, v[k]);
    }
  });
}

// One chunk of one tensor. Table roles: 0 p, 1 g, 2 m, 3 v (16-byte tested), 4 bit mask or null.
// kElement: some tensor of the call may need a per-element mask (the op's `element` flag, or a bit
// mask present); without it every tensor takes a uniform path (fewer registers, no mask code).
// inline_second: the op's `element` flag; when false, kElementSecond is ignored (as the prologue
// ignores it), so only bit masks make a tensor's mask per-element.
template <typename scalar_t, bool kAligned, bool kElement>
__global__ void __launch_bounds__(mt::kThreads)
    masked_adamw_kernel(const __grid_constant__ mt::TensorTable<5> table, const double* __restrict__ hyper,
                        const double* __restrict__ masks, const double* __restrict__ coefs,
                        const int32_t* __restrict__ found, bool inline_second, double* __restrict__ partials) {
  using O = mt::opmath_t<scalar_t>;
  const mt::BlockWork w = mt::locate(table);
  const int s = w.slot;
  Chunk<scalar_t> ch;
  ch.p = static_cast<scalar_t*>(table.addr[0][s]) + w.start;
  ch.g = static_cast<const scalar_t*>(table.addr[1][s]) + w.start;
  ch.m = static_cast<O*>(table.addr[2][s]) + w.start;
  ch.v = static_cast<O*>(table.addr[3][s]) + w.start;
  const auto* bits = static_cast<const uint8_t*>(table.addr[4][s]);
  ch.bits = bits != nullptr ? bits + w.start / 8 : nullptr;
  ch.len = w.len;
  const int64_t row = table.row[s];

  double acc[kPartials] = {0.0, 0.0, 0.0};
  if (*found != 0) {
    pass_read_m<scalar_t, kAligned>(ch, acc[2]);
  } else {
    const double* h = hyper + row * kNumHyperColumns;
    const double* cf = coefs + row * kNumCoefColumns;
    math::AdamCoefficients<O> c;
    c.beta1 = static_cast<O>(h[kBeta1]);
    c.beta2 = static_cast<O>(h[kBeta2]);
    c.one_minus_beta1 = static_cast<O>(1.0 - h[kBeta1]);
    c.one_minus_beta2 = static_cast<O>(1.0 - h[kBeta2]);
    c.step_size = static_cast<O>(cf[kCoefStepSize]);
    c.eps = static_cast<O>(h[kEps]);
    c.lr_weight_decay = static_cast<O>(h[kLr] * h[kWeightDecay]);
    if (kElement && cf[kCoefElement] != 0.0) {
      const double* mk = masks + row * kNumMaskColumns;
      ElementMask<O> em;
      em.w1 = static_cast<O>(h[kWeightFirst]);
      em.w2 = static_cast<O>(h[kWeightSecond]);
      em.mu1_uniform = static_cast<O>(mk[kMaskFirst]);
      em.mu2_uniform = static_cast<O>(mk[kMaskSecond]);
      em.scale = static_cast<O>(h[kScale]);
      math::inward_bounds<O>(mk[kLower], mk[kUpper], em.lo, em.hi);
      em.has_bits = ch.bits != nullptr;
      em.element_second = inline_second && h[kElementSecond] != 0.0;
      pass_element<scalar_t, kAligned>(ch, c, em, acc);
    } else {
      const O mu = static_cast<O>(cf[kCoefMu]);
      if (threadIdx.x == 0) acc[0] = static_cast<double>(ch.len);  // sum1 = elements; kept = mu * numel
      if (mu == O(0)) {
        pass_frozen<scalar_t, kAligned>(ch, c, acc[2]);
      } else if (mu == O(1)) {
        pass_uniform<scalar_t, kAligned, true>(ch, c, mu, acc[2]);
      } else {
        pass_uniform<scalar_t, kAligned, false>(ch, c, mu, acc[2]);
      }
    }
  }
  mt::block_sum<kPartials>(acc);
  if (threadIdx.x == 0) {
    double* out = partials + (table.partial_base + blockIdx.x) * kPartials;
#pragma unroll
    for (int k = 0; k < kPartials; ++k) out[k] = acc[k];
  }
}

template <typename scalar_t, bool kAligned>
void launch_update(const mt::Launch<5>& l, bool any_element, bool inline_second, const double* hyper,
                   const double* masks, const double* coefs, const int32_t* found, double* partials,
                   cudaStream_t stream) {
  const auto grid = static_cast<unsigned>(l.blocks);
  if (any_element) {
    masked_adamw_kernel<scalar_t, kAligned, true>
        <<<grid, mt::kThreads, 0, stream>>>(l.table, hyper, masks, coefs, found, inline_second, partials);
  } else {
    masked_adamw_kernel<scalar_t, kAligned, false>
        <<<grid, mt::kThreads, 0, stream>>>(l.table, hyper, masks, coefs, found, inline_second, partials);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool has_mask(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

}  // namespace

at::Tensor masked_adamw_(const TensorList& params, const TensorList& grads, const TensorList& exp_avgs,
                         const TensorList& exp_avg_sqs, const TensorList& state_steps,
                         const OptionalTensorList& first_masks, const at::Tensor& hyper, const at::Tensor& masks,
                         const at::Tensor& found, bool element) {
  // Every argument was checked by ops.cpp (check_masked_adamw): list lengths, table shapes and
  // dtypes, float32 step counters on the device.
  const size_t n = params.size();
  if (n == 0) return at::empty({0, 2}, hyper.options().dtype(at::kDouble));
  const auto rows = static_cast<int64_t>(n);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto doubles = params[0].options().dtype(at::kDouble);
  auto out = at::empty({rows, 2}, doubles);
  auto coefs = at::empty({rows, int64_t(kNumCoefColumns)}, doubles);
  const double* hyper_data = hyper.data_ptr<double>();
  const double* mask_data = masks.data_ptr<double>();
  const int32_t* found_data = found.data_ptr<int32_t>();
  double* coef_data = coefs.data_ptr<double>();

  // `element` enables the inline second-order masks (kElementSecond; ignored when false); a bit
  // mask, visible here, always makes its tensor's mask per-element.
  bool any_element = element;
  for (size_t i = 0; i < n; ++i) any_element = any_element || has_mask(first_masks[i]);

  // Stage 1: coefficients and counters.
  for (int64_t r0 = 0; r0 < rows; r0 += StepTable::kMax) {
    StepTable table;
    std::memset(&table, 0, sizeof(table));
    table.first_row = r0;
    table.count = static_cast<int32_t>(std::min<int64_t>(StepTable::kMax, rows - r0));
    for (int k = 0; k < table.count; ++k) {
      const int64_t r = r0 + k;
      table.step[k] = state_steps[r].data_ptr<float>();
      table.flags[k] = static_cast<uint8_t>((has_mask(first_masks[r]) ? kFlagHasBits : 0) |
                                            (params[r].scalar_type() == at::kDouble ? kFlagWide : 0));
    }
    const int grid = (table.count + mt::kThreads - 1) / mt::kThreads;
    update_prologue_kernel<<<grid, mt::kThreads, 0, stream>>>(table, hyper_data, mask_data, found_data, element,
                                                               coef_data);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // Stage 2: plan every launch (the partial buffer's size is their total block count), then run.
  mt::Segments seg(n);
  struct Planned {
    at::ScalarType dtype;
    std::vector<mt::Launch<5>> launches;
  };
  std::vector<Planned> plans;
  for (const auto& group : mt::group_by_dtype(params)) {
    auto addr = [&](int64_t r) {
      return std::array<void*, 5>{params[r].data_ptr(), grads[r].data_ptr(), exp_avgs[r].data_ptr(),
                                  exp_avg_sqs[r].data_ptr(), has_mask(first_masks[r]) ? first_masks[r]->data_ptr() : nullptr};
    };
    plans.push_back({group.dtype, mt::plan_launches<5>(group.rows, params, addr, 0xFu, seg)});
  }
  auto partials = at::empty({seg.total * kPartials}, doubles);
  double* partial_data = seg.total > 0 ? partials.data_ptr<double>() : nullptr;
  for (const auto& plan : plans) {
    mt::dispatch_float_type(plan.dtype, [&](auto* tag) {
      using scalar_t = std::remove_pointer_t<decltype(tag)>;
      for (const auto& l : plan.launches) {
        if (l.aligned) {
          launch_update<scalar_t, true>(l, any_element, element, hyper_data, mask_data, coef_data, found_data,
                                        partial_data, stream);
        } else {
          launch_update<scalar_t, false>(l, any_element, element, hyper_data, mask_data, coef_data, found_data,
                                         partial_data, stream);
        }
      }
    });
  }

  // Stage 3: per-tensor sums and the result.
  mt::launch_segment_sums<kPartials>(partials, seg, UpdateFinalize{out.data_ptr<double>(), coef_data, found_data},
                                     stream);
  return out;
}

}  // namespace rose_kernels::cuda
