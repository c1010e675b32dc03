#include "cpu/memory_kernels.h"

namespace titans::cpu {

const MemoryKernelTable& memory_kernels() {
  switch (cpu_isa()) {
#if TITANS_CPU_X86_VARIANTS
    case CpuIsa::kAvx2:
      return kMemoryKernelsAvx2;
    case CpuIsa::kAvx512:
      return kMemoryKernelsAvx512;
#endif
    default:
      return kMemoryKernelsDefault;
  }
}

}  // namespace titans::cpu
