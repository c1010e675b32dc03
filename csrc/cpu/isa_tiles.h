// The register tile of each instruction-set variant's matrix product (matmul_kernel.h), in one
// place (torch-free): the variant files build their Tile types from these, and
// python_tests/cpp/matmul_check.cpp builds the same tiles for the baseline target, so that the
// blocking, packing and ragged edges of every variant are checked on any machine (the AVX-512
// one's included, on machines that cannot run its instructions).
#pragma once

namespace titans::cpu {

// C's micro-tile held in registers: `rows` rows of `vecs` vectors of `bytes` bytes.
struct TileGeometry {
  int bytes, rows, vecs;
};

#if defined(__aarch64__)
// NEON: 32 registers of 16 bytes with fused multiply-add: 8 x 2 accumulators.
inline constexpr TileGeometry kDefaultTile{16, 8, 2};
#else
// SSE2 on x86-64 (16 registers of 16 bytes, no fused multiply-add, so each product needs a
// temporary) and other targets: 4 x 2 accumulators.
inline constexpr TileGeometry kDefaultTile{16, 4, 2};
#endif
// 16 registers of 32 bytes: 6 x 2 accumulators, the 2 vectors of B and one broadcast of A.
inline constexpr TileGeometry kAvx2Tile{32, 6, 2};
// 32 registers of 64 bytes: 8 x 2 accumulators (8 rows divide the usual chunk sizes), the 2
// vectors of B and one broadcast of A, with registers to spare.
inline constexpr TileGeometry kAvx512Tile{64, 8, 2};

}  // namespace titans::cpu
