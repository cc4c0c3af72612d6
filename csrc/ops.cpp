// The op schema of rose_kernels (one namespace, one definition per op) and the CPU
// implementations' argument checks. Kernels live in cpu/kernels.h; fake (meta) implementations
// for torch.compile / opcheck live in rose_kernels/ops.py.
#include <Python.h>
#include <torch/library.h>

#include <ATen/ATen.h>

#include "common.h"
#include "cpu/dispatch.h"

namespace rose_kernels {
namespace {

using cpu::OptionalTensorList;
using cpu::TensorList;

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

at::ScalarType opmath_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_cpu_contiguous(const at::Tensor& t, const char* op, const char* what, size_t i) {
  TORCH_CHECK(t.defined(), op, ": ", what, "[", i, "] is undefined");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", what, "[", i, "] must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", what, "[", i, "] must be dense (strided), got ",
              t.layout());
  TORCH_CHECK(t.is_contiguous(), op, ": ", what, "[", i, "] must be contiguous");
}

void check_float_list(const TensorList& xs, const char* op, const char* what) {
  for (size_t i = 0; i < xs.size(); ++i) {
    check_cpu_contiguous(xs[i], op, what, i);
    TORCH_CHECK(is_supported_float(xs[i].scalar_type()), op, ": ", what, "[", i,
                "] must be float32, float64, bfloat16 or float16, got ", xs[i].scalar_type());
  }
}

void check_table(const at::Tensor& t, const char* op, const char* what, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kDouble && t.is_contiguous(), op, ": ",
              what, " must be a contiguous float64 CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, op, ": ", what, " must have shape [",
              rows, ", ", cols, "], got ", t.sizes());
}

void check_quantile(double q, const char* op, const char* what) {
  TORCH_CHECK(q >= 0.0 && q <= 1.0, op, ": ", what, " must be a quantile in [0, 1], got ", q);
}

at::Tensor sumsq_cpu(const TensorList& xs) {
  check_float_list(xs, "sumsq", "tensors");
  auto out = at::empty({static_cast<int64_t>(xs.size())}, at::TensorOptions().dtype(at::kDouble));
  cpu::kernels().sumsq(xs, out.data_ptr<double>());
  return out;
}

at::Tensor element_thresholds_cpu(const TensorList& a, const TensorList& b, at::ArrayRef<double> scales,
                                  double q_lo, double q_hi, bool global_pool, int64_t strategy) {
  const char* op = "element_thresholds";
  check_float_list(a, op, "a");
  check_quantile(q_lo, op, "q_lo");
  check_quantile(q_hi, op, "q_hi");
  TORCH_CHECK(q_lo <= q_hi, op, ": q_lo (", q_lo, ") must not exceed q_hi (", q_hi, ")");
  TORCH_CHECK(strategy == kSelectAuto || strategy == kSelectRadix, op, ": unknown strategy ", strategy);
  TORCH_CHECK(scales.size() == (b.empty() ? size_t(0) : a.size()), op,
              ": scales must have one entry per b tensor (", b.size(), "), got ", scales.size());
  for (double c : scales) TORCH_CHECK(std::isfinite(c), op, ": scales must be finite, got ", c);
  TORCH_CHECK(b.empty() || b.size() == a.size(), op, ": b must be empty or have one tensor per a (",
              a.size(), "), got ", b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    if (global_pool)
      TORCH_CHECK(opmath_of(a[i].scalar_type()) == opmath_of(a[0].scalar_type()), op,
                  ": a global pool cannot mix float64 with lower-precision tensors (a[", i, "] is ",
                  a[i].scalar_type(), ", a[0] is ", a[0].scalar_type(), ")");
    if (!b.empty()) {
      check_cpu_contiguous(b[i], op, "b", i);
      TORCH_CHECK(b[i].scalar_type() == opmath_of(a[i].scalar_type()), op, ": b[", i, "] must be ",
                  opmath_of(a[i].scalar_type()), " (the opmath type of a[", i, "]), got ", b[i].scalar_type());
      TORCH_CHECK(b[i].numel() == a[i].numel(), op, ": b[", i, "] has ", b[i].numel(),
                  " elements, a[", i, "] has ", a[i].numel());
    }
  }
  const int64_t pools = global_pool ? 1 : static_cast<int64_t>(a.size());
  auto out = at::empty({pools, kNumThresholdColumns}, at::TensorOptions().dtype(at::kDouble));
  const std::vector<double> scale_list(scales.begin(), scales.end());
  cpu::kernels().element_thresholds(a, b, scale_list, q_lo, q_hi, global_pool, strategy, out.data_ptr<double>());
  return out;
}

at::Tensor first_order_mask_cpu(const TensorList& grads, const at::Tensor& thresholds, TensorList masks) {
  const char* op = "first_order_mask_";
  check_float_list(grads, op, "grads");
  TORCH_CHECK(masks.size() == grads.size(), op, ": got ", grads.size(), " grads but ", masks.size(), " masks");
  check_table(thresholds, op, "thresholds", static_cast<int64_t>(grads.size()), 2);
  for (size_t i = 0; i < masks.size(); ++i) {
    check_cpu_contiguous(masks[i], op, "masks", i);
    TORCH_CHECK(masks[i].scalar_type() == at::kByte, op, ": masks[", i, "] must be uint8, got ",
                masks[i].scalar_type());
    TORCH_CHECK(masks[i].numel() == (grads[i].numel() + 7) / 8, op, ": masks[", i, "] must hold ",
                (grads[i].numel() + 7) / 8, " bytes (1 bit per element), got ", masks[i].numel());
  }
  auto kept = at::empty({static_cast<int64_t>(grads.size())}, at::TensorOptions().dtype(at::kDouble));
  cpu::kernels().first_order_mask(grads, thresholds.data_ptr<double>(), masks, kept.data_ptr<double>());
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

at::Tensor masked_adamw_cpu(TensorList params, const TensorList& grads, TensorList exp_avgs,
                            TensorList exp_avg_sqs, TensorList state_steps,
                            const OptionalTensorList& first_masks, const at::Tensor& table) {
  const char* op = "masked_adamw_";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  state_steps.size() == n && first_masks.size() == n,
              op, ": params, grads, exp_avgs, exp_avg_sqs, state_steps and first_masks must have one "
              "entry per parameter; got ", n, ", ", grads.size(), ", ", exp_avgs.size(), ", ",
              exp_avg_sqs.size(), ", ", state_steps.size(), ", ", first_masks.size());
  check_float_list(params, op, "params");
  check_table(table, op, "table", static_cast<int64_t>(n), kNumUpdateColumns);
  for (size_t i = 0; i < n; ++i) {
    const auto dtype = params[i].scalar_type();
    check_cpu_contiguous(grads[i], op, "grads", i);
    check_cpu_contiguous(exp_avgs[i], op, "exp_avgs", i);
    check_cpu_contiguous(exp_avg_sqs[i], op, "exp_avg_sqs", i);
    TORCH_CHECK(grads[i].scalar_type() == dtype, op, ": grads[", i, "] is ", grads[i].scalar_type(),
                " but params[", i, "] is ", dtype);
    TORCH_CHECK(exp_avgs[i].scalar_type() == opmath_of(dtype) && exp_avg_sqs[i].scalar_type() == opmath_of(dtype),
                op, ": exp_avgs[", i, "] and exp_avg_sqs[", i, "] must be ", opmath_of(dtype), " for ", dtype,
                " params");
    const int64_t numel = params[i].numel();
    TORCH_CHECK(grads[i].numel() == numel && exp_avgs[i].numel() == numel && exp_avg_sqs[i].numel() == numel,
                op, ": params[", i, "] has ", numel, " elements but grads/exp_avgs/exp_avg_sqs have ",
                grads[i].numel(), "/", exp_avgs[i].numel(), "/", exp_avg_sqs[i].numel());
    TORCH_CHECK(state_steps[i].device().is_cpu() && state_steps[i].numel() == 1 &&
                    state_steps[i].is_contiguous() && at::isFloatingType(state_steps[i].scalar_type()),
                op, ": state_steps[", i, "] must be a one-element floating-point CPU tensor");
    if (first_masks[i].has_value() && first_masks[i]->defined()) {
      const auto& m = *first_masks[i];
      check_cpu_contiguous(m, op, "first_masks", i);
      TORCH_CHECK(m.scalar_type() == at::kByte && m.numel() == (numel + 7) / 8, op, ": first_masks[", i,
                  "] must be a uint8 tensor of ", (numel + 7) / 8, " bytes");
    }
  }
  // Steps count every step, masked or not (semantics.md section 5); incremented here so that the
  // bias corrections use the new value, as torch's fused AdamW does.
  std::vector<double> steps(n);
  for (size_t i = 0; i < n; ++i) steps[i] = increment_step(state_steps[i]);
  auto out = at::empty({static_cast<int64_t>(n), 2}, at::TensorOptions().dtype(at::kDouble));
  cpu::kernels().masked_adamw(params, grads, exp_avgs, exp_avg_sqs, first_masks, table.data_ptr<double>(),
                              steps.data(), out.data_ptr<double>());
  return out;
}

std::string cpu_capability(const std::optional<std::string>& set) {
  if (set.has_value()) return cpu::set_capability(*set);
  return cpu::kernels().name;
}

}  // namespace

TORCH_LIBRARY(rose_kernels, m) {
  // SCORE, tensor granularity: per-tensor sums of squares (float64), non-finite values propagate.
  m.def("sumsq(Tensor[] tensors) -> Tensor");
  // SCORE + SELECT, element granularity: exact linear-interpolated quantiles of element scores,
  // |a| (b empty) or |scales[i] * a / b - 1| over b != 0, one pool per tensor or one global pool.
  // Returns [pools, 4]: lower, upper, defined-score count, non-finite input count.
  m.def("element_thresholds(Tensor[] a, Tensor[] b, float[] scales, float q_lo, float q_hi, "
        "bool global_pool, int strategy=0) -> Tensor");
  // SCORE, first order, element granularity: 1-bit masks lo_i <= |g| <= hi_i; returns kept counts.
  m.def("first_order_mask_(Tensor[] grads, Tensor thresholds, Tensor(a!)[] masks) -> Tensor");
  // UPDATE: the masked AdamW step over many tensors; increments state_steps. Returns [n, 2]:
  // sum of mask values and sum of squares of the new exp_avg per tensor.
  m.def("masked_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] state_steps, Tensor?[] first_masks, Tensor table) -> Tensor");
  // The CPU kernel variant in use (default, avx2, avx512); pass a name (or "auto") to switch.
  m.def("cpu_capability(str? set=None) -> str", &cpu_capability);
}

TORCH_LIBRARY_IMPL(rose_kernels, CPU, m) {
  m.impl("sumsq", &sumsq_cpu);
  m.impl("element_thresholds", &element_thresholds_cpu);
  m.impl("first_order_mask_", &first_order_mask_cpu);
  m.impl("masked_adamw_", &masked_adamw_cpu);
}

}  // namespace rose_kernels

// `import rose_kernels._C` runs the static registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
