// SCORE on the GPU: per-tensor sums of squares and the 1-bit first-order element mask, for many
// tensors per call (semantics.md section 2). Each op is one launch per (dtype, table) over the
// chunks of every tensor, then one segment-sum launch that adds each tensor's block partials in
// block order (multi_tensor.cuh): deterministic, float64, no host synchronisation.
#include "cuda/multi_tensor.cuh"
#include "cuda/ops_cuda.h"
#include "rose_math.h"

namespace rose_kernels::cuda {
namespace {

// ---- Sums of squares -------------------------------------------------------------------------------

// One chunk's sum of squares. Every element is squared and added in float64: the square of a
// float32/bf16/fp16 value is exact in float64 and cannot overflow, so no block needs the CPU's
// resummation and a non-finite element makes its tensor's sum inf or NaN. (Float64 accumulation
// stays far below the memory time on every GPU with fast or slow float64: 3 float64 operations
// per element.) All of a thread's loads are issued before the adds (kIlp = every unit).
template <typename scalar_t, bool kAligned>
__global__ void __launch_bounds__(mt::kThreads)
    sumsq_kernel(const __grid_constant__ mt::TensorTable<1> table, double* __restrict__ partials) {
  using O = mt::opmath_t<scalar_t>;
  constexpr int V = mt::kVecElems<scalar_t>;
  constexpr int kIlp = mt::kUnitsPerThread<scalar_t>;
  const mt::BlockWork w = mt::locate(table);
  const scalar_t* x = static_cast<const scalar_t*>(table.addr[0][w.slot]) + w.start;
  double acc[1] = {0.0};
  mt::for_each_group<V, kIlp>(w.len, [&](auto full, int i0) {
    constexpr bool kFull = decltype(full)::value;
    O vals[kIlp][V];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int i = i0 + k * mt::kUnitStride<scalar_t>;
      mt::load_frag<V, kAligned && kFull, !kFull>(x + i, w.len - i, vals[k]);
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k)
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const double d = static_cast<double>(vals[k][j]);  // 0 past the end of a tail chunk
        acc[0] += d * d;
      }
  });
  mt::block_sum<1>(acc);
  if (threadIdx.x == 0) partials[table.partial_base + blockIdx.x] = acc[0];
}

// ---- First-order 1-bit mask ----------------------------------------------------------------------

// Bit (j % 8) of byte j / 8 is lo_f <= |g_j| <= hi_f (rose_math.h: inward_bounds turns the float64
// thresholds into opmath bounds, first_order_score is |g|; NaN g compares false). A thread builds
// the V bits of its unit; V = 8 (bf16/fp16) is one byte, and for V < 8 the 8 / V lanes holding a
// byte's units (consecutive lanes, since unit u belongs to thread u % kThreads) OR their shifted
// bits together with shuffles; the lowest of them writes the byte. So every byte, including the
// tensor's last (whose bits past numel are 0), has exactly one writer. The partial is the block's
// kept count.
template <typename scalar_t, bool kAligned>
__global__ void __launch_bounds__(mt::kThreads)
    first_order_mask_kernel(const __grid_constant__ mt::TensorTable<2> table, const double* __restrict__ bounds,
                            double* __restrict__ partials) {
  using O = mt::opmath_t<scalar_t>;
  constexpr int V = mt::kVecElems<scalar_t>;
  constexpr int kIlp = mt::kUnitsPerThread<scalar_t>;
  constexpr int kGroup = V >= 8 ? 1 : 8 / V;  // lanes whose units share one byte
  static_assert(V <= 8 && 8 % (V >= 8 ? 8 : V) == 0, "units must tile bytes");
  const mt::BlockWork w = mt::locate(table);
  const scalar_t* g = static_cast<const scalar_t*>(table.addr[0][w.slot]) + w.start;
  uint8_t* bits = static_cast<uint8_t*>(table.addr[1][w.slot]) + w.start / 8;
  const int64_t row = table.row[w.slot];
  O lo, hi;
  math::inward_bounds<O>(bounds[2 * row], bounds[2 * row + 1], lo, hi);
  const int lane = static_cast<int>(threadIdx.x) & 31;
  unsigned kept = 0;
  mt::for_each_group<V, kIlp>(w.len, [&](auto full, int i0) {
    constexpr bool kFull = decltype(full)::value;
    O vals[kIlp][V];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int i = i0 + k * mt::kUnitStride<scalar_t>;
      mt::load_frag<V, kAligned && kFull, !kFull>(g + i, w.len - i, vals[k]);
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int i = i0 + k * mt::kUnitStride<scalar_t>;
      const int rem = w.len - i;
      unsigned b = 0;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const O s = math::first_order_score(vals[k][j]);
        if ((kFull || j < rem) && lo <= s && s <= hi) b |= 1u << j;
      }
      kept += static_cast<unsigned>(__popc(b));
      if constexpr (kGroup > 1) {
        b <<= V * (lane % kGroup);
#pragma unroll
        for (int o = 1; o < kGroup; o <<= 1) b |= __shfl_down_sync(0xffffffffu, b, o);
      }
      // i is a multiple of 8 for the byte's first lane; rem > 0 keeps the byte inside the mask.
      if (lane % kGroup == 0 && (kFull || rem > 0)) bits[i >> 3] = static_cast<uint8_t>(b);
    }
  });
  double acc[1] = {static_cast<double>(kept)};
  mt::block_sum<1>(acc);
  if (threadIdx.x == 0) partials[table.partial_base + blockIdx.x] = acc[0];
}

}  // namespace

at::Tensor sumsq(const TensorList& tensors) {
  const size_t n = tensors.size();
  if (n == 0) return at::empty({0}, mt::current_device_doubles());
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  auto out = at::empty({static_cast<int64_t>(n)}, tensors[0].options().dtype(at::kDouble));

  // Plan every launch first: the partial buffer's size is their total block count.
  mt::Segments seg(n);
  struct Planned {
    at::ScalarType dtype;
    std::vector<mt::Launch<1>> launches;
  };
  std::vector<Planned> plans;
  for (const auto& group : mt::group_by_dtype(tensors)) {
    auto addr = [&](int64_t r) { return std::array<void*, 1>{tensors[r].data_ptr()}; };
    plans.push_back({group.dtype, mt::plan_launches<1>(group.rows, tensors, addr, 0x1u, seg)});
  }
  auto partials = at::empty({seg.total}, out.options());
  double* partial_data = seg.total > 0 ? partials.data_ptr<double>() : nullptr;

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (const auto& plan : plans) {
    mt::dispatch_float_type(plan.dtype, [&](auto* tag) {
      using scalar_t = std::remove_pointer_t<decltype(tag)>;
      for (const auto& l : plan.launches) {
        const auto grid = static_cast<unsigned>(l.blocks);
        if (l.aligned) {
          sumsq_kernel<scalar_t, true><<<grid, mt::kThreads, 0, stream>>>(l.table, partial_data);
        } else {
          sumsq_kernel<scalar_t, false><<<grid, mt::kThreads, 0, stream>>>(l.table, partial_data);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  mt::launch_segment_sums<1>(partials, seg, mt::StoreSums<1>{out.data_ptr<double>()}, stream);
  return out;
}

at::Tensor first_order_mask_(const TensorList& grads, const at::Tensor& bounds, const TensorList& masks) {
  // Every argument was checked by ops.cpp (check_first_order_mask).
  const size_t n = grads.size();
  if (n == 0) return at::empty({0}, bounds.options().dtype(at::kDouble));
  const c10::cuda::CUDAGuard guard(grads[0].device());
  auto out = at::empty({static_cast<int64_t>(n)}, grads[0].options().dtype(at::kDouble));

  mt::Segments seg(n);
  struct Planned {
    at::ScalarType dtype;
    std::vector<mt::Launch<2>> launches;
  };
  std::vector<Planned> plans;
  for (const auto& group : mt::group_by_dtype(grads)) {
    // Role 0: the gradient (vector loads when aligned); role 1: the mask, written byte by byte.
    auto addr = [&](int64_t r) { return std::array<void*, 2>{grads[r].data_ptr(), masks[r].data_ptr()}; };
    plans.push_back({group.dtype, mt::plan_launches<2>(group.rows, grads, addr, 0x1u, seg)});
  }
  auto partials = at::empty({seg.total}, out.options());
  double* partial_data = seg.total > 0 ? partials.data_ptr<double>() : nullptr;
  const double* bound_data = bounds.data_ptr<double>();

  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  for (const auto& plan : plans) {
    mt::dispatch_float_type(plan.dtype, [&](auto* tag) {
      using scalar_t = std::remove_pointer_t<decltype(tag)>;
      for (const auto& l : plan.launches) {
        const auto grid = static_cast<unsigned>(l.blocks);
        if (l.aligned) {
          first_order_mask_kernel<scalar_t, true>
              <<<grid, mt::kThreads, 0, stream>>>(l.table, bound_data, partial_data);
        } else {
          first_order_mask_kernel<scalar_t, false>
              <<<grid, mt::kThreads, 0, stream>>>(l.table, bound_data, partial_data);
        }
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  }
  mt::launch_segment_sums<1>(partials, seg, mt::StoreSums<1>{out.data_ptr<double>()}, stream);
  return out;
}

}  // namespace rose_kernels::cuda
