// The op family of rose_kernels: one schema per op (TORCH_LIBRARY below), the argument checks every
// implementation shares, and the registration of the CPU kernels (cpu/) and, in a CUDA build, the
// CUDA kernels (cuda/). The Triton kernels (rose_kernels/backends/triton) register the very same
// schemas under the rose_triton namespace; fake (meta) implementations live in rose_kernels/ops.py.
//
// Every per-step value an implementation on a GPU needs (thresholds, scales, pooled flags, step
// counters, the non-finite flag, lr) is a tensor on the tensors' device, so that a GPU step never
// waits for the host. The CPU implementations read those tensors directly.
#include <Python.h>
#include <torch/library.h>

#include <ATen/ATen.h>

#include <cmath>

#include "common.h"
#include "cpu/dispatch.h"
#ifdef ROSE_KERNELS_WITH_CUDA
#include "cuda/ops_cuda.h"
#endif

namespace rose_kernels {
namespace {

using cpu::OptionalTensorList;
using cpu::TensorList;


bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

at::ScalarType opmath_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The device every tensor of a call must be on: that of its first tensor, or for an empty list that
// of the call's table (`fallback`), so that an empty call with device tables is accepted.
at::Device device_of(const TensorList& xs, const at::Tensor& fallback = at::Tensor()) {
  if (!xs.empty()) return xs[0].device();
  return fallback.defined() ? fallback.device() : at::Device(at::kCPU);
}

void check_dense(const at::Tensor& t, const at::Device& device, const char* op, const char* what, size_t i) {
  TORCH_CHECK(t.defined(), op, ": ", what, "[", i, "] is undefined");
  TORCH_CHECK(t.device() == device, op, ": ", what, "[", i, "] is on ", t.device(), ", expected ", device,
              " (every tensor of one call must be on one device)");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", what, "[", i, "] must be dense (strided), got ", t.layout());
  TORCH_CHECK(t.is_contiguous(), op, ": ", what, "[", i, "] must be contiguous");
}

void check_float_list(const TensorList& xs, const at::Device& device, const char* op, const char* what) {
  for (size_t i = 0; i < xs.size(); ++i) {
    check_dense(xs[i], device, op, what, i);
    TORCH_CHECK(is_supported_float(xs[i].scalar_type()), op, ": ", what, "[", i,
                "] must be float32, float64, bfloat16 or float16, got ", xs[i].scalar_type());
  }
}

void check_small(const at::Tensor& t, const at::Device& device, at::ScalarType dtype, at::IntArrayRef shape,
                 const char* op, const char* what) {
  TORCH_CHECK(t.defined() && t.device() == device && t.scalar_type() == dtype && t.is_contiguous(), op, ": ",
              what, " must be a contiguous ", dtype, " tensor on ", device, ", got ",
              t.defined() ? toString(t.scalar_type()) : "undefined", " on ",
              t.defined() ? t.device().str() : "-");
  TORCH_CHECK(t.sizes() == shape, op, ": ", what, " must have shape ", shape, ", got ", t.sizes());
}

void check_quantile(double q, const char* op, const char* what) {
  TORCH_CHECK(q >= 0.0 && q <= 1.0, op, ": ", what, " must be a quantile in [0, 1], got ", q);
}

void check_bit_masks(const TensorList& values, const OptionalTensorList& masks, const at::Device& device,
                     const char* op, const char* what) {
  for (size_t i = 0; i < masks.size(); ++i) {
    if (!masks[i].has_value() || !masks[i]->defined()) continue;
    const at::Tensor& m = *masks[i];
    check_dense(m, device, op, what, i);
    const int64_t bytes = (values[i].numel() + 7) / 8;
    TORCH_CHECK(m.scalar_type() == at::kByte && m.numel() == bytes, op, ": ", what, "[", i,
                "] must be a uint8 tensor of ", bytes, " bytes (1 bit per element), got ", m.scalar_type(), " with ",
                m.numel(), " elements");
  }
}

// ---- argument checks (every implementation) ---------------------------------------------------

void check_sumsq(const TensorList& xs) { check_float_list(xs, device_of(xs), "sumsq", "tensors"); }

void check_element_thresholds(const TensorList& a, const TensorList& b, const at::Tensor& scales,
                              const at::Tensor& pooled, double q_lo, double q_hi, bool global_pool,
                              const std::optional<at::Tensor>& guesses, int64_t strategy) {
  const char* op = "element_thresholds";
  const at::Device device = device_of(a, scales);
  const int64_t n = static_cast<int64_t>(a.size());
  check_float_list(a, device, op, "a");
  check_quantile(q_lo, op, "q_lo");
  check_quantile(q_hi, op, "q_hi");
  TORCH_CHECK(q_lo <= q_hi, op, ": q_lo (", q_lo, ") must not exceed q_hi (", q_hi, ")");
  TORCH_CHECK(strategy == kSelectAuto || strategy == kSelectRadix, op, ": unknown strategy ", strategy);
  TORCH_CHECK(b.empty() || b.size() == a.size(), op, ": b must be empty or have one tensor per a (", a.size(),
              "), got ", b.size());
  check_small(scales, device, at::kDouble, {n}, op, "scales");
  check_small(pooled, device, at::kBool, {n}, op, "pooled");
  const int64_t pools = global_pool ? 1 : n;
  if (guesses.has_value() && guesses->defined())
    check_small(*guesses, device, at::kLong, {pools, kGuessRanks}, op, "guesses");
  for (size_t i = 0; i < a.size(); ++i) {
    if (global_pool)
      TORCH_CHECK(opmath_of(a[i].scalar_type()) == opmath_of(a[0].scalar_type()), op,
                  ": a global pool cannot mix float64 with lower-precision tensors (a[", i, "] is ",
                  a[i].scalar_type(), ", a[0] is ", a[0].scalar_type(), ")");
    if (!b.empty()) {
      check_dense(b[i], device, op, "b", i);
      TORCH_CHECK(b[i].scalar_type() == opmath_of(a[i].scalar_type()), op, ": b[", i, "] must be ",
                  opmath_of(a[i].scalar_type()), " (the opmath type of a[", i, "]), got ", b[i].scalar_type());
      TORCH_CHECK(b[i].numel() == a[i].numel(), op, ": b[", i, "] has ", b[i].numel(), " elements, a[", i,
                  "] has ", a[i].numel());
    }
  }
}

void check_first_order_mask(const TensorList& grads, const at::Tensor& bounds, const TensorList& masks) {
  const char* op = "first_order_mask_";
  const at::Device device = device_of(grads, bounds);
  check_float_list(grads, device, op, "grads");
  TORCH_CHECK(masks.size() == grads.size(), op, ": got ", grads.size(), " grads but ", masks.size(), " masks");
  check_small(bounds, device, at::kDouble, {static_cast<int64_t>(grads.size()), 2}, op, "bounds");
  for (size_t i = 0; i < masks.size(); ++i) {
    check_dense(masks[i], device, op, "masks", i);
    const int64_t bytes = (grads[i].numel() + 7) / 8;
    TORCH_CHECK(masks[i].scalar_type() == at::kByte && masks[i].numel() == bytes, op, ": masks[", i,
                "] must be a uint8 tensor of ", bytes, " bytes (1 bit per element), got ", masks[i].scalar_type(),
                " with ", masks[i].numel(), " elements");
  }
}

void check_masked_adamw(const TensorList& params, const TensorList& grads, const TensorList& exp_avgs,
                        const TensorList& exp_avg_sqs, const TensorList& state_steps,
                        const OptionalTensorList& first_masks, const at::Tensor& hyper, const at::Tensor& masks,
                        const at::Tensor& found) {
  const char* op = "masked_adamw_";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n && state_steps.size() == n &&
                  first_masks.size() == n,
              op, ": params, grads, exp_avgs, exp_avg_sqs, state_steps and first_masks must have one entry per "
              "parameter; got ", n, ", ", grads.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ",
              state_steps.size(), ", ", first_masks.size());
  const at::Device device = device_of(params, hyper);
  check_float_list(params, device, op, "params");
  const int64_t rows = static_cast<int64_t>(n);
  check_small(hyper, device, at::kDouble, {rows, kNumHyperColumns}, op, "hyper");
  check_small(masks, device, at::kDouble, {rows, kNumMaskColumns}, op, "masks");
  check_small(found, device, at::kInt, {1}, op, "found");
  for (size_t i = 0; i < n; ++i) {
    const auto dtype = params[i].scalar_type();
    check_dense(grads[i], device, op, "grads", i);
    check_dense(exp_avgs[i], device, op, "exp_avgs", i);
    check_dense(exp_avg_sqs[i], device, op, "exp_avg_sqs", i);
    TORCH_CHECK(grads[i].scalar_type() == dtype, op, ": grads[", i, "] is ", grads[i].scalar_type(),
                " but params[", i, "] is ", dtype);
    TORCH_CHECK(exp_avgs[i].scalar_type() == opmath_of(dtype) && exp_avg_sqs[i].scalar_type() == opmath_of(dtype),
                op, ": exp_avgs[", i, "] and exp_avg_sqs[", i, "] must be ", opmath_of(dtype), " for ", dtype,
                " params");
    const int64_t numel = params[i].numel();
    TORCH_CHECK(grads[i].numel() == numel && exp_avgs[i].numel() == numel && exp_avg_sqs[i].numel() == numel, op,
                ": params[", i, "] has ", numel, " elements but grads/exp_avgs/exp_avg_sqs have ", grads[i].numel(),
                "/", exp_avgs[i].numel(), "/", exp_avg_sqs[i].numel());
    const at::Tensor& s = state_steps[i];
    // The GPU kernels write the counter as float32 (torch's AdamW keeps float32 steps too).
    const bool step_dtype_ok = device.is_cpu() ? at::isFloatingType(s.scalar_type()) : s.scalar_type() == at::kFloat;
    TORCH_CHECK(s.defined() && s.device() == device && s.numel() == 1 && s.is_contiguous() && step_dtype_ok, op,
                ": state_steps[", i, "] must be a one-element ", device.is_cpu() ? "floating-point" : "float32",
                " tensor on ", device);
  }
  check_bit_masks(params, first_masks, device, op, "first_masks");
}

// ---- CPU implementations ----------------------------------------------------------------------

at::TensorOptions float64_on(const at::Device& device) { return at::TensorOptions().dtype(at::kDouble).device(device); }

at::Tensor sumsq_cpu(const TensorList& xs) {
  check_sumsq(xs);
  auto out = at::empty({static_cast<int64_t>(xs.size())}, float64_on(at::kCPU));
  cpu::kernels().sumsq(xs, out.data_ptr<double>());
  return out;
}

at::Tensor element_thresholds_cpu(const TensorList& a, const TensorList& b, const at::Tensor& scales,
                                  const at::Tensor& pooled, double q_lo, double q_hi, bool global_pool,
                                  const std::optional<at::Tensor>& guesses, int64_t strategy) {
  check_element_thresholds(a, b, scales, pooled, q_lo, q_hi, global_pool, guesses, strategy);
  const char* op = "element_thresholds";
  const double* scale = scales.data_ptr<double>();
  const bool* in_pool = pooled.data_ptr<bool>();
  TensorList pooled_a, pooled_b, others;
  std::vector<double> pooled_scales;
  std::vector<int64_t> pooled_index;
  for (size_t i = 0; i < a.size(); ++i) {
    if (in_pool[i]) {
      TORCH_CHECK(b.empty() || std::isfinite(scale[i]), op, ": scales must be finite, got ", scale[i]);
      pooled_a.push_back(a[i]);
      if (!b.empty()) pooled_b.push_back(b[i]);
      pooled_scales.push_back(b.empty() ? 1.0 : scale[i]);
      pooled_index.push_back(static_cast<int64_t>(i));
    } else if (a[i].numel() > 0) {
      others.push_back(a[i]);
    }
  }
  const int64_t pools = global_pool ? 1 : static_cast<int64_t>(a.size());
  const int64_t computed = global_pool ? 1 : static_cast<int64_t>(pooled_a.size());
  auto rows = at::empty({computed, kNumThresholdColumns}, float64_on(at::kCPU));
  // The previous call's windows of each computed pool (its row of guesses), rewritten for the next.
  std::vector<int64_t*> guess_rows;
  if (guesses.has_value() && guesses->defined() && strategy != kSelectRadix) {
    int64_t* g = guesses->data_ptr<int64_t>();
    for (int64_t j = 0; j < computed; ++j) guess_rows.push_back(g + (global_pool ? 0 : pooled_index[j]) * kGuessRanks);
  }
  if (computed > 0)
    cpu::kernels().element_thresholds(pooled_a, pooled_b, pooled_scales, q_lo, q_hi, global_pool, strategy,
                                      rows.data_ptr<double>(), guess_rows);
  bool nonfinite = false;
  const double* r = rows.data_ptr<double>();
  for (int64_t p = 0; p < computed; ++p) nonfinite = nonfinite || r[p * kNumThresholdColumns + kThrNonFinite] != 0;
  if (!others.empty()) {
    // Tensors outside every pool are only checked, element by element.
    std::vector<double> bad(others.size());
    cpu::kernels().nonfinite_chunks(others, bad.data());
    for (double count : bad) nonfinite = nonfinite || count != 0;
  }
  if (global_pool && pooled_a.empty()) rows.data_ptr<double>()[kThrFullReads] = 0;  // nothing was read
  at::Tensor out = rows;
  if (!global_pool && computed != pools) {
    const double nan = std::numeric_limits<double>::quiet_NaN();
    out = at::empty({pools, kNumThresholdColumns}, float64_on(at::kCPU));
    double* o = out.data_ptr<double>();
    for (int64_t p = 0; p < pools; ++p) {
      const double empty_row[kNumThresholdColumns] = {nan, nan, 0.0, 0.0, 0.0};
      std::copy(empty_row, empty_row + kNumThresholdColumns, o + p * kNumThresholdColumns);
    }
    for (int64_t j = 0; j < computed; ++j)
      std::copy(r + j * kNumThresholdColumns, r + (j + 1) * kNumThresholdColumns,
                o + pooled_index[j] * kNumThresholdColumns);
  }
  double* o = out.data_ptr<double>();
  for (int64_t p = 0; p < pools; ++p) o[p * kNumThresholdColumns + kThrNonFinite] = nonfinite ? 1.0 : 0.0;
  return out;
}

at::Tensor first_order_mask_cpu(const TensorList& grads, const at::Tensor& bounds, TensorList masks) {
  check_first_order_mask(grads, bounds, masks);
  auto kept = at::empty({static_cast<int64_t>(grads.size())}, float64_on(at::kCPU));
  cpu::kernels().first_order_mask(grads, bounds.data_ptr<double>(), masks, kept.data_ptr<double>());
  return kept;
}

// Increments a scalar step tensor in place and returns the new value, without an ATen call per
// tensor (a model has hundreds of them and this runs every step).
double increment_step(at::Tensor& s) {
  if (s.scalar_type() == at::kFloat) return ++*s.data_ptr<float>();
  if (s.scalar_type() == at::kDouble) return ++*s.data_ptr<double>();
  s.add_(1);
  return s.item<double>();
}

at::Tensor masked_adamw_cpu(TensorList params, const TensorList& grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                            TensorList state_steps, const OptionalTensorList& first_masks, const at::Tensor& hyper,
                            const at::Tensor& masks, const at::Tensor& found, bool element) {
  (void)element;  // the CPU kernels choose per tensor
  check_masked_adamw(params, grads, exp_avgs, exp_avg_sqs, state_steps, first_masks, hyper, masks, found);
  const size_t n = params.size();
  auto out = at::empty({static_cast<int64_t>(n), 2}, float64_on(at::kCPU));
  double* o = out.data_ptr<double>();
  if (*found.data_ptr<int32_t>() != 0) {
    // Skipped (a non-finite input): nothing changes, counters included; ||exp_avg||^2 as it is.
    std::vector<double> sums(n);
    cpu::kernels().sumsq(exp_avgs, sums.data());
    for (size_t i = 0; i < n; ++i) {
      o[2 * i] = std::numeric_limits<double>::quiet_NaN();
      o[2 * i + 1] = sums[i];
    }
    return out;
  }
  // Steps count every step, masked or not (semantics.md section 5); incremented here so that the
  // bias corrections use the new value, as torch's fused AdamW does.
  std::vector<double> steps(n);
  for (size_t i = 0; i < n; ++i) steps[i] = increment_step(state_steps[i]);
  cpu::kernels().masked_adamw(params, grads, exp_avgs, exp_avg_sqs, first_masks, hyper.data_ptr<double>(),
                              masks.data_ptr<double>(), steps.data(), o);
  return out;
}

std::string cpu_capability(const std::optional<std::string>& set) {
  if (set.has_value()) return cpu::set_capability(*set);
  return cpu::kernels().name;
}

// ---- CUDA implementations (cuda/*.cu) -----------------------------------------------------------

#ifdef ROSE_KERNELS_WITH_CUDA
at::Tensor sumsq_cuda(const TensorList& xs) {
  check_sumsq(xs);
  return cuda::sumsq(xs);
}

at::Tensor element_thresholds_cuda(const TensorList& a, const TensorList& b, const at::Tensor& scales,
                                   const at::Tensor& pooled, double q_lo, double q_hi, bool global_pool,
                                   const std::optional<at::Tensor>& guesses, int64_t strategy) {
  check_element_thresholds(a, b, scales, pooled, q_lo, q_hi, global_pool, guesses, strategy);
  return cuda::element_thresholds(a, b, scales, pooled, q_lo, q_hi, global_pool, guesses, strategy);
}

at::Tensor first_order_mask_cuda(const TensorList& grads, const at::Tensor& bounds, TensorList masks) {
  check_first_order_mask(grads, bounds, masks);
  return cuda::first_order_mask_(grads, bounds, masks);
}

at::Tensor masked_adamw_cuda(TensorList params, const TensorList& grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                             TensorList state_steps, const OptionalTensorList& first_masks, const at::Tensor& hyper,
                             const at::Tensor& masks, const at::Tensor& found, bool element) {
  check_masked_adamw(params, grads, exp_avgs, exp_avg_sqs, state_steps, first_masks, hyper, masks, found);
  return cuda::masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, state_steps, first_masks, hyper, masks, found,
                             element);
}
#endif

}  // namespace

TORCH_LIBRARY(rose_kernels, m) {
  // SCORE, tensor granularity: per-tensor sums of squares, float64 [n]; non-finite values propagate.
  m.def("sumsq(Tensor[] tensors) -> Tensor");
  // SCORE + SELECT, element granularity: exact linear-interpolated quantiles of element scores,
  // |a| (b empty) or |scales[i] * a / b - 1| over b != 0, of the tensors whose `pooled` flag is set:
  // one pool per tensor or one global pool. scales: float64 [n]; pooled: bool [n]; guesses: int64
  // [pools, 4], speed hints an implementation may keep between calls (never results). Returns
  // float64 [pools, 5]: lower, upper, defined-score count, non-finite flag (any a, or b of a pooled
  // tensor; every row), passes that read the pool's inputs in full. The CPU rejects non-finite
  // scales of pooled tensors; a GPU cannot look without a host read (its scores turn NaN/inf).
  m.def("element_thresholds(Tensor[] a, Tensor[] b, Tensor scales, Tensor pooled, float q_lo, float q_hi, "
        "bool global_pool, Tensor(a!)? guesses=None, int strategy=0) -> Tensor");
  // SCORE, first order, element granularity: 1-bit masks lo_i <= |g| <= hi_i (bounds: float64
  // [n, 2]); returns the kept count per tensor, float64 [n].
  m.def("first_order_mask_(Tensor[] grads, Tensor bounds, Tensor(a!)[] masks) -> Tensor");
  // UPDATE: the masked AdamW step over many tensors; increments state_steps. hyper: float64 [n, 11]
  // and masks: float64 [n, 4] (csrc/common.h); found: int32 [1], non-zero makes the call a no-op
  // (counters included); element: whether any tensor may have a per-element mask (a promise: with
  // element false the CUDA kernels skip the inline second-order test). Returns float64
  // [n, 2]: sum of mask values (NaN when skipped) and sum of squares of the new exp_avg per tensor.
  m.def("masked_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] state_steps, Tensor?[] first_masks, Tensor hyper, Tensor masks, Tensor found, bool element) "
        "-> Tensor");
  // The CPU kernel variant in use (default, avx2, avx512); pass a name (or "auto") to switch.
  m.def("cpu_capability(str? set=None) -> str", &cpu_capability);
  // Whether this build has the CUDA kernels.
  m.def("built_with_cuda() -> bool", []() {
#ifdef ROSE_KERNELS_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}

TORCH_LIBRARY_IMPL(rose_kernels, CPU, m) {
  m.impl("sumsq", &sumsq_cpu);
  m.impl("element_thresholds", &element_thresholds_cpu);
  m.impl("first_order_mask_", &first_order_mask_cpu);
  m.impl("masked_adamw_", &masked_adamw_cpu);
}

#ifdef ROSE_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(rose_kernels, CUDA, m) {
  m.impl("sumsq", &sumsq_cuda);
  m.impl("element_thresholds", &element_thresholds_cuda);
  m.impl("first_order_mask_", &first_order_mask_cuda);
  m.impl("masked_adamw_", &masked_adamw_cuda);
}
#endif

}  // namespace rose_kernels

// `import rose_kernels._C` runs the static registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
