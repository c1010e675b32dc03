// The AVX2 variant of matmul (x86-64-v3: AVX2 and FMA).
#include "cpu/matmul_variants.h"

#if TITANS_CPU_X86_VARIANTS
#define TITANS_MATMUL_TARGET __attribute__((target("avx2,fma")))
#include "cpu/matmul_kernel.h"

namespace titans::cpu {
namespace {

// 16 registers of 32 bytes: 6 x 2 accumulators, the 2 vectors of B and one broadcast of A.
struct Avx2Tile {
  static constexpr int kBytes = 32, kRows = 6, kVecs = 2;
};

}  // namespace

const MatmulVariant kMatmulAvx2 = {&matmul_tiled<Avx2Tile, float>, &matmul_tiled<Avx2Tile, double>};

}  // namespace titans::cpu
#endif
