// The CUDA implementations of the rose_kernels ops (schemas in ../ops.cpp, which checks every
// argument before calling these: same device, contiguous, supported dtypes, matching sizes).
//
// Every function only enqueues work on the current CUDA stream: no host synchronisation, no copy
// between host and device (tables travel as kernel arguments), allocations through the caching
// allocator. So a whole optimizer step can be captured in a CUDA graph, and per-step values (lr,
// step counters, thresholds, the non-finite flag) are read from device memory at run time.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace rose_kernels::cuda {

using TensorList = std::vector<at::Tensor>;
using OptionalTensorList = std::vector<std::optional<at::Tensor>>;

// score.cu
at::Tensor sumsq(const TensorList& tensors);
at::Tensor first_order_mask_(const TensorList& grads, const at::Tensor& bounds, const TensorList& masks);

// select.cu
at::Tensor element_thresholds(const TensorList& a, const TensorList& b, const at::Tensor& scales,
                              const at::Tensor& pooled, double q_lo, double q_hi, bool global_pool,
                              const std::optional<at::Tensor>& guesses, int64_t strategy);

// update.cu
at::Tensor masked_adamw_(const TensorList& params, const TensorList& grads, const TensorList& exp_avgs,
                         const TensorList& exp_avg_sqs, const TensorList& state_steps,
                         const OptionalTensorList& first_masks, const at::Tensor& hyper, const at::Tensor& masks,
                         const at::Tensor& found, bool element);

}  // namespace rose_kernels::cuda
