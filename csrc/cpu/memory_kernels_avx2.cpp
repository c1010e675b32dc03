// The AVX2 variant of the chunked memory kernels (memory_kernels.h): x86-64-v3, AVX2 and FMA.
#include "cpu/memory_kernels.h"

#if TITANS_CPU_X86_VARIANTS
#define TITANS_ISA_TARGET TITANS_AVX2_TARGET
#define TITANS_ISA_FLATTEN [[gnu::flatten]]
#include "cpu/linear_memory_kernel.h"
#include "cpu/mlp_memory_kernel.h"

namespace titans::cpu {

const MemoryKernelTable kMemoryKernelsAvx2 = {
    linear_kernel::kernels_variant<float>(), linear_kernel::kernels_variant<double>(),
    mlp_kernel::kernels_variant<float>(), mlp_kernel::kernels_variant<double>()};

}  // namespace titans::cpu
#endif
