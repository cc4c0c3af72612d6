// The dtype switch of the CPU and CUDA host code: both dispatch the four parameter dtypes alike.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace rose_kernels {

// Calls f with a null pointer of the element type `type` names (float, double, BFloat16, Half).
template <typename F>
inline void dispatch_float_type(at::ScalarType type, F&& f) {
  switch (type) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kDouble: f(static_cast<double*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<c10::BFloat16*>(nullptr)); break;
    case at::kHalf: f(static_cast<c10::Half*>(nullptr)); break;
    default: TORCH_CHECK(false, "rose_kernels: unsupported dtype ", type);
  }
}

}  // namespace rose_kernels
