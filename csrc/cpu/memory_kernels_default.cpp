// The default variant of the chunked memory kernels (memory_kernels.h): the compiler's baseline
// for the target architecture.
#define TITANS_ISA_TARGET
#define TITANS_ISA_FLATTEN
#include "cpu/linear_memory_kernel.h"
#include "cpu/memory_kernels.h"
#include "cpu/mlp_memory_kernel.h"

namespace titans::cpu {

const MemoryKernelTable kMemoryKernelsDefault = {
    linear_kernel::kernels_variant<float>(), linear_kernel::kernels_variant<double>(),
    mlp_kernel::kernels_variant<float>(), mlp_kernel::kernels_variant<double>()};

}  // namespace titans::cpu
