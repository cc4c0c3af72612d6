// Shared between the op layer (ops.cpp) and the per-capability CPU kernels.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <cstdint>
#include <vector>

namespace rose_kernels {

// Columns of the per-tensor table that masked_adamw_ reads (float64, one row per tensor).
// Python builds it in rose_kernels/backends/cpu.py (UPDATE_COLUMNS); keep the two in step.
enum UpdateColumn : int64_t {
  kLr = 0,
  kBeta1,
  kBeta2,
  kEps,
  kWeightDecay,
  kCorrectBias,   // 1: step_size = lr * sqrt(1 - beta2^t) / (1 - beta1^t); 0: step_size = lr
  kWarmupSteps,   // mask is 1 while the incremented step t <= warmup_steps
  kWeightFirst,   // w1: mu = w1 * mu1 + w2 * mu2
  kMaskFirst,     // mu1 when the tensor has no 1-bit first-order mask
  kWeightSecond,  // w2
  kMaskSecond,    // mu2 when the tensor has no inline element mask
  kElementSecond, // 1: mu2_j = (m_j == 0) || lo <= |c g_j / m_j - 1| <= hi, computed inline
  kLower,         // lo (float64) for the inline element mask
  kUpper,         // hi (float64)
  kScale,         // c of the second-order score
  kNumUpdateColumns
};

// Columns of element_thresholds' result (float64, one row per pool).
enum ThresholdColumn : int64_t {
  kThrLower = 0,   // quantile(pool, q_lo), NaN for an empty pool
  kThrUpper,       // quantile(pool, q_hi)
  kThrCount,       // number of defined scores in the pool
  kThrNonFinite,   // number of non-finite input elements seen (a or b)
  kNumThresholdColumns
};

// How element_thresholds finds the order statistics.
enum SelectStrategy : int64_t {
  kSelectAuto = 0,   // sample-bracketed counting pass, radix refinement when the bracket misses
  kSelectRadix = 1,  // radix histogram refinement only (the always-exact fallback)
};

}  // namespace rose_kernels
