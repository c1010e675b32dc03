#include "cpu/cpu_isa.h"

#include <atomic>

#include "cpu/isa_kernels.h"

namespace titans::cpu {
namespace {

constexpr const char* kNames[kCpuIsaCount] = {"default", "avx2", "avx512"};

// Compiled into this build and runnable here. GCC's __builtin_cpu_supports also checks that the
// OS saves the vector registers (XGETBV), not only CPUID.
bool runnable(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kDefault:
      return true;
#if TITANS_CPU_X86_VARIANTS
    case CpuIsa::kAvx2:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case CpuIsa::kAvx512:
      __builtin_cpu_init();
      return __builtin_cpu_supports("avx512f");
#endif
    default:
      return false;
  }
}

std::atomic<int>& current() {
  static std::atomic<int> isa{int(native_cpu_isa())};
  return isa;
}

}  // namespace

const char* cpu_isa_name(CpuIsa isa) { return kNames[int(isa)]; }

bool parse_cpu_isa(std::string_view name, CpuIsa& isa) {
  if (name == "native") {
    isa = native_cpu_isa();
    return true;
  }
  for (int i = 0; i < kCpuIsaCount; ++i)
    if (name == kNames[i]) {
      isa = CpuIsa(i);
      return true;
    }
  return false;
}

bool cpu_isa_supported(CpuIsa isa) { return runnable(isa); }

std::vector<CpuIsa> supported_cpu_isas() {
  std::vector<CpuIsa> isas;
  for (int i = 0; i < kCpuIsaCount; ++i)
    if (runnable(CpuIsa(i))) isas.push_back(CpuIsa(i));
  return isas;
}

CpuIsa native_cpu_isa() { return supported_cpu_isas().back(); }

CpuIsa cpu_isa() { return CpuIsa(current().load(std::memory_order_relaxed)); }

void set_cpu_isa(CpuIsa isa) { current().store(int(isa), std::memory_order_relaxed); }

const IsaKernels& isa_kernels() {
  switch (cpu_isa()) {
#if TITANS_CPU_X86_VARIANTS
    case CpuIsa::kAvx2:
      return kIsaKernelsAvx2;
    case CpuIsa::kAvx512:
      return kIsaKernelsAvx512;
#endif
    default:
      return kIsaKernelsDefault;
  }
}

}  // namespace titans::cpu
