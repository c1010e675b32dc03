// The AVX-512 variant of the chunked memory kernels (memory_kernels.h): AVX-512F.
#include "cpu/memory_kernels.h"

#if TITANS_CPU_X86_VARIANTS
#define TITANS_ISA_TARGET TITANS_AVX512_TARGET
#define TITANS_ISA_FLATTEN [[gnu::flatten]]
#include "cpu/linear_memory_kernel.h"
#include "cpu/mlp_memory_kernel.h"

namespace titans::cpu {

const MemoryKernelTable kMemoryKernelsAvx512 = {
    linear_kernel::kernels_variant<float>(), linear_kernel::kernels_variant<double>(),
    mlp_kernel::kernels_variant<float>(), mlp_kernel::kernels_variant<double>()};

}  // namespace titans::cpu
#endif
