// The AVX2 variant of the per-variant kernels (isa_kernels.h): x86-64-v3, AVX2 and FMA.
#include "cpu/isa_kernels.h"

#if TITANS_CPU_X86_VARIANTS
#define TITANS_ISA_TARGET __attribute__((target("avx2,fma")))
#include "cpu/activation_kernel.h"
#include "cpu/matmul_kernel.h"
#include "cpu/step_kernel.h"

namespace titans::cpu {

const IsaKernels kIsaKernelsAvx2 = {
    &matmul_tiled<GeometryTile<kAvx2Tile>, float>, &matmul_tiled<GeometryTile<kAvx2Tile>, double>,
    &activation_variant<float>, &activation_variant<double>,
    step_kernels_variant<float>(), step_kernels_variant<double>()};

}  // namespace titans::cpu
#endif
