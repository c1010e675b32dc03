// The default variant of the per-variant kernels (isa_kernels.h): the compiler's baseline for
// the target architecture.
#define TITANS_ISA_TARGET
#include "cpu/activation_kernel.h"
#include "cpu/isa_kernels.h"
#include "cpu/matmul_kernel.h"
#include "cpu/step_kernel.h"

namespace titans::cpu {

const IsaKernels kIsaKernelsDefault = {
    &matmul_tiled<GeometryTile<kDefaultTile>, float>, &matmul_tiled<GeometryTile<kDefaultTile>, double>,
    &activation_variant<float>, &activation_variant<double>,
    step_kernels_variant<float>(), step_kernels_variant<double>()};

}  // namespace titans::cpu
