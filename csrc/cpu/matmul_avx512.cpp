// The AVX-512 variant of matmul (AVX-512F).
#include "cpu/matmul_variants.h"

#if TITANS_CPU_X86_VARIANTS
#define TITANS_MATMUL_TARGET __attribute__((target("avx512f")))
#include "cpu/matmul_kernel.h"

namespace titans::cpu {
namespace {

// 32 registers of 64 bytes: 8 x 2 accumulators (8 rows divide the usual chunk sizes), the 2
// vectors of B and one broadcast of A, with registers to spare.
struct Avx512Tile {
  static constexpr int kBytes = 64, kRows = 8, kVecs = 2;
};

}  // namespace

const MatmulVariant kMatmulAvx512 = {&matmul_tiled<Avx512Tile, float>, &matmul_tiled<Avx512Tile, double>};

}  // namespace titans::cpu
#endif
