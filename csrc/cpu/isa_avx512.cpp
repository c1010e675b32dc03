// The AVX-512 variant of the per-variant kernels (isa_kernels.h): AVX-512F.
#include "cpu/isa_kernels.h"

#if TITANS_CPU_X86_VARIANTS
#define TITANS_ISA_TARGET __attribute__((target("avx512f")))
#include "cpu/activation_kernel.h"
#include "cpu/matmul_kernel.h"
#include "cpu/step_kernel.h"

namespace titans::cpu {

const IsaKernels kIsaKernelsAvx512 = {
    &matmul_tiled<GeometryTile<kAvx512Tile>, float>, &matmul_tiled<GeometryTile<kAvx512Tile>, double>,
    &activation_variant<float>, &activation_variant<double>,
    step_kernels_variant<float>(), step_kernels_variant<double>()};

}  // namespace titans::cpu
#endif
