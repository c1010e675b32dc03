// The default variant of the per-variant kernels (isa_kernels.h): the compiler's baseline for
// the target architecture.
#define TITANS_ISA_TARGET
#include "cpu/activation_kernel.h"
#include "cpu/isa_kernels.h"
#include "cpu/matmul_kernel.h"
#include "cpu/step_kernel.h"

namespace titans::cpu {
namespace {

#if defined(__aarch64__)
// NEON: 32 registers of 16 bytes with fused multiply-add: 8 x 2 accumulators.
struct DefaultTile {
  static constexpr int kBytes = 16, kRows = 8, kVecs = 2;
};
#else
// SSE2 on x86-64 (16 registers of 16 bytes, no fused multiply-add, so each product needs a
// temporary) and other targets: 4 x 2 accumulators.
struct DefaultTile {
  static constexpr int kBytes = 16, kRows = 4, kVecs = 2;
};
#endif

}  // namespace

const IsaKernels kIsaKernelsDefault = {&matmul_tiled<DefaultTile, float>, &matmul_tiled<DefaultTile, double>,
                                       &activation_variant<float>, &activation_variant<double>,
                                       step_kernels_variant<float>(), step_kernels_variant<double>()};

}  // namespace titans::cpu
