// The CPU kernel table: one implementation per CPU capability, chosen once at load time.
#pragma once
#include <string>
#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "common.h"

namespace rose_kernels::cpu {

using TensorList = std::vector<at::Tensor>;
using OptionalTensorList = std::vector<std::optional<at::Tensor>>;

struct Kernels {
  const char* name;
  // out[i] = sum of squares of xs[i] (float64 accumulation of short fp32 blocks).
  void (*sumsq)(const TensorList& xs, double* out);
  // out[i] = number of chunks of xs[i] with a non-finite element (0: every element is finite).
  void (*nonfinite_chunks)(const TensorList& xs, double* out);
  // Exact linear-interpolated quantile thresholds of the pools of every tensor given (ops.cpp
  // passes only the pooled ones); out is [n_pools, kNumThresholdColumns]. guesses: empty, or one
  // row of kGuessColumns windows per pool, read and rewritten (speed only; see select.h).
  void (*element_thresholds)(const TensorList& a, const TensorList& b, const std::vector<double>& scales,
                             double q_lo, double q_hi, bool global_pool, int64_t strategy, double* out,
                             const std::vector<int64_t*>& guesses);
  // masks[i] bit j = lo_i <= |g_ij| <= hi_i; kept[i] = number of set bits.
  void (*first_order_mask)(const TensorList& g, const double* thresholds, TensorList& masks,
                           double* kept);
  // The masked AdamW update; hyper and masks are the [n, kNumHyperColumns] and [n, kNumMaskColumns]
  // tables (common.h), steps[i] the already incremented step of tensor i.
  // out[i] = (sum of mask values, sum of squares of the new exp_avg).
  void (*masked_adamw)(const TensorList& params, const TensorList& grads, const TensorList& exp_avgs,
                       const TensorList& exp_avg_sqs, const OptionalTensorList& first_masks,
                       const double* hyper, const double* masks, const double* steps, double* out);
};

namespace DEFAULT { Kernels make_kernels(); }
namespace AVX2 { Kernels make_kernels(); }
namespace AVX512 { Kernels make_kernels(); }

// The table in use: ROSE_KERNELS_CPU_CAPABILITY (default|avx2|avx512) or the best the CPU has.
const Kernels& kernels();
// Switches the table (for tests and benchmarks); returns the name now in use.
std::string set_capability(const std::string& name);

}  // namespace rose_kernels::cpu
