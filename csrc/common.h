// The layout of the op family's small tables, shared by ops.cpp, the CPU kernels (csrc/cpu) and the
// CUDA kernels (csrc/cuda). rose_kernels/ops.py names the same columns; keep them in step.
#pragma once
#include <cstdint>

namespace rose_kernels {

// Columns of masked_adamw_'s `hyper` table (float64 [n, kNumHyperColumns], one row per tensor,
// on the tensors' device).
enum HyperColumn : int64_t {
  kLr = 0,
  kBeta1,
  kBeta2,
  kEps,
  kWeightDecay,
  kCorrectBias,   // != 0: step_size = lr * sqrt(1 - beta2^t) / (1 - beta1^t); 0: step_size = lr
  kWarmupSteps,   // the mask is 1 while the incremented step t <= warmup_steps
  kWeightFirst,   // w1: mu = w1 * mu1 + w2 * mu2
  kWeightSecond,  // w2
  kElementSecond, // != 0: mu2_j = (m_j == 0) || lo <= |c g_j / m_j - 1| <= hi, computed inline
  kScale,         // c of the second-order score
  kNumHyperColumns
};

// Columns of masked_adamw_'s `masks` table (float64 [n, kNumMaskColumns]): the values a step's
// SCORE and SELECT produce on the device.
enum MaskColumn : int64_t {
  kMaskFirst = 0,  // mu1 when the tensor has no 1-bit first-order mask
  kMaskSecond,     // mu2 when the tensor has no inline element mask
  kLower,          // lo (float64) of the inline element mask
  kUpper,          // hi (float64)
  kNumMaskColumns
};

// Columns of element_thresholds' result (float64 [pools, kNumThresholdColumns]).
enum ThresholdColumn : int64_t {
  kThrLower = 0,   // quantile(pool, q_lo); NaN for an empty pool
  kThrUpper,       // quantile(pool, q_hi)
  kThrCount,       // number of defined scores in the pool
  kThrNonFinite,   // 1 if any input element (every a; b of pooled tensors) is not finite; every row
  kThrFullReads,   // passes of this call that read the pool's inputs (a, b) in full
  kNumThresholdColumns
};

// Columns of element_thresholds' guesses (int64 [pools, kGuessRanks]): speed hints the caller keeps
// between calls; each implementation defines what it stores there (cuda/select.cu, cpu/select.h).
constexpr int64_t kGuessRanks = 4;

// How element_thresholds finds the order statistics.
enum SelectStrategy : int64_t {
  kSelectAuto = 0,   // the implementation's fastest exact route
  kSelectRadix = 1,  // radix refinement only (the always-exact fallback; no sample, no guesses)
};

}  // namespace rose_kernels
