// The CPU kernel table of one capability: the three kernel families (score.h, select.h, update.h)
// compiled with that capability's flags (kernels_{default,avx2,avx512}.cpp, flags in setup.py).
// The semantics are ../../docs/semantics.md; rose_kernels/reference.py is the oracle.
#pragma once

#include "cpu/score.h"
#include "cpu/select.h"
#include "cpu/update.h"

namespace rose_kernels::cpu {
namespace CPU_CAPABILITY {

// NOLINTNEXTLINE(misc-definitions-in-headers): one definition per capability namespace
Kernels make_kernels() {
  Kernels k;
#define ROSE_STR2(x) #x
#define ROSE_STR(x) ROSE_STR2(x)
  k.name = ROSE_STR(CPU_CAPABILITY);
  k.sumsq = &sumsq;
  k.nonfinite_chunks = &nonfinite_chunks;
  k.element_thresholds = &element_thresholds;
  k.first_order_mask = &first_order_mask;
  k.masked_adamw = &masked_adamw;
  return k;
}

}  // namespace CPU_CAPABILITY
}  // namespace rose_kernels::cpu

