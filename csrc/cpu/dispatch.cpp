#include "cpu/dispatch.h"

#include <c10/util/Exception.h>
#include <cstdlib>
#include <mutex>

namespace rose_kernels::cpu {
namespace {

bool cpu_has(const std::string& name) {
#if defined(__x86_64__) || defined(_M_X64)
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (name == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
  return name == "default";
}

const Kernels* table_for(const std::string& name) {
#if defined(__x86_64__) || defined(_M_X64)
  static const Kernels avx512 = AVX512::make_kernels();
  static const Kernels avx2 = AVX2::make_kernels();
  if (name == "avx512") return &avx512;
  if (name == "avx2") return &avx2;
#endif
  static const Kernels fallback = DEFAULT::make_kernels();
  if (name == "default") return &fallback;
  return nullptr;
}

const Kernels* best() {
  if (const char* env = std::getenv("ROSE_KERNELS_CPU_CAPABILITY")) {
    std::string want(env);
    TORCH_CHECK(table_for(want) != nullptr, "ROSE_KERNELS_CPU_CAPABILITY=", want,
                " is not one of default, avx2, avx512 (or not built for this architecture)");
    TORCH_CHECK(cpu_has(want), "ROSE_KERNELS_CPU_CAPABILITY=", want, " but this CPU lacks it");
    return table_for(want);
  }
  for (const char* name : {"avx512", "avx2"})
    if (table_for(name) != nullptr && cpu_has(name)) return table_for(name);
  return table_for("default");
}

std::mutex mutex;
const Kernels* current = nullptr;

}  // namespace

const Kernels& kernels() {
  std::lock_guard<std::mutex> lock(mutex);
  if (current == nullptr) current = best();
  return *current;
}

std::string set_capability(const std::string& name) {
  std::lock_guard<std::mutex> lock(mutex);
  if (name == "auto") {
    current = best();
  } else {
    const Kernels* table = table_for(name);
    TORCH_CHECK(table != nullptr, "unknown CPU capability '", name,
                "': expected auto, default, avx2 or avx512");
    TORCH_CHECK(cpu_has(name), "this CPU does not support ", name);
    current = table;
  }
  return current->name;
}

}  // namespace rose_kernels::cpu
