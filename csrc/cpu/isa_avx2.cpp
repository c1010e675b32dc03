// The AVX2 variant of the per-variant kernels (isa_kernels.h): x86-64-v3, AVX2 and FMA.
#include "cpu/isa_kernels.h"

#if TITANS_CPU_X86_VARIANTS
#define TITANS_ISA_TARGET __attribute__((target("avx2,fma")))
#include "cpu/activation_kernel.h"
#include "cpu/matmul_kernel.h"
#include "cpu/step_kernel.h"

namespace titans::cpu {
namespace {

// 16 registers of 32 bytes: 6 x 2 accumulators, the 2 vectors of B and one broadcast of A.
struct Avx2Tile {
  static constexpr int kBytes = 32, kRows = 6, kVecs = 2;
};

}  // namespace

const IsaKernels kIsaKernelsAvx2 = {&matmul_tiled<Avx2Tile, float>, &matmul_tiled<Avx2Tile, double>,
                                    &activation_variant<float>, &activation_variant<double>,
                                    step_kernels_variant<float>(), step_kernels_variant<double>()};

}  // namespace titans::cpu
#endif
