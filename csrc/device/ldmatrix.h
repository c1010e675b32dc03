// ldmatrix: a warp loads one, two or four 8x8 matrices of 16-bit elements from shared memory
// straight into MMA fragment registers (sm_75+).
//
// Each lane passes one row address: lanes 8i..8i+7 give rows 0..7 of matrix i (x1 reads lanes
// 0-7, x2 lanes 0-15; the other lanes' addresses are ignored). Each row is 8 contiguous elements
// (16 bytes) starting on a 16-byte boundary; rows may lie anywhere in shared memory. Register
// r[i] of lane l then holds elements (row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1) of matrix
// i, the lower column in the low half (PTX ISA, "Warp-level matrix load instruction: ldmatrix");
// .trans delivers the transpose: (rows 2 (l % 4) and 2 (l % 4) + 1, column l / 4). So x4 over
// the four 8x8 quarters of a row-major 16x16 tile yields the m16n8k16 A fragment, and x2.trans
// over a row-major 16x8 [K, N] tile the B fragment (see mma.h).
//
// Under nvcc each wrapper is one ldmatrix.sync.aligned instruction. In the emulation it is a
// warp collective: every lane checks its own row (bounds, alignment), the lanes exchange row
// addresses, and each lane reads its elements (as it sees shared memory: a collective orders no
// memory, so rows other lanes wrote need a __syncwarp or __syncthreads before it).
#pragma once

#include <cstdint>

namespace titans {
namespace device {

#if defined(__CUDACC__)

template <typename T>
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], SharedPtr<T> row) {
  static_assert(sizeof(T) == 2, "ldmatrix .b16 loads 16-bit elements");
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(shared_address(row)));
}
template <typename T>
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], SharedPtr<T> row) {
  static_assert(sizeof(T) == 2, "ldmatrix .b16 loads 16-bit elements");
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(shared_address(row)));
}
template <typename T>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], SharedPtr<T> row) {
  static_assert(sizeof(T) == 2, "ldmatrix .b16 loads 16-bit elements");
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}
template <typename T>
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t (&r)[1], SharedPtr<T> row) {
  static_assert(sizeof(T) == 2, "ldmatrix .b16 loads 16-bit elements");
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
               : "=r"(r[0])
               : "r"(shared_address(row)));
}
template <typename T>
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], SharedPtr<T> row) {
  static_assert(sizeof(T) == 2, "ldmatrix .b16 loads 16-bit elements");
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(shared_address(row)));
}
template <typename T>
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], SharedPtr<T> row) {
  static_assert(sizeof(T) == 2, "ldmatrix .b16 loads 16-bit elements");
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}

#else  // emulation

namespace emu {

// A warp collective over the full warp, like ldmatrix.sync.aligned: every lane must call it.
template <int kMatrices, bool kTrans, typename T>
void ldmatrix(uint32_t (&r)[kMatrices], SharedPtr<T> row) {
  static_assert(sizeof(T) == 2, "ldmatrix .b16 loads 16-bit elements");
  constexpr int kRowElems = 8;
  const int lane = current_thread().lane;
  const T* mine = nullptr;
  if (lane < 8 * kMatrices) {
    mine = row.span(kRowElems);
    require_aligned(mine, 16, "ldmatrix row address " + row.element_name(0));
  }
  const unsigned char* slots = warp_exchange(kFullWarpMask, &mine, sizeof(mine));
  for (int i = 0; i < kMatrices; ++i) {
    uint32_t packed = 0;
    for (int half = 0; half < 2; ++half) {
      const int pair = 2 * (lane % 4) + half;
      const int row_in_matrix = kTrans ? pair : lane / 4;
      const int col = kTrans ? lane / 4 : pair;
      const T* row_address;
      std::memcpy(&row_address, slots + (8 * i + row_in_matrix) * kWarpSlotBytes, sizeof(row_address));
      uint16_t bits;
      load_shared(&bits, row_address + col, sizeof(bits));
      packed |= static_cast<uint32_t>(bits) << (16 * half);
    }
    r[i] = packed;
  }
}

}  // namespace emu

template <typename T>
inline void ldmatrix_x1(uint32_t (&r)[1], SharedPtr<T> row) { emu::ldmatrix<1, false>(r, row); }
template <typename T>
inline void ldmatrix_x2(uint32_t (&r)[2], SharedPtr<T> row) { emu::ldmatrix<2, false>(r, row); }
template <typename T>
inline void ldmatrix_x4(uint32_t (&r)[4], SharedPtr<T> row) { emu::ldmatrix<4, false>(r, row); }
template <typename T>
inline void ldmatrix_x1_trans(uint32_t (&r)[1], SharedPtr<T> row) { emu::ldmatrix<1, true>(r, row); }
template <typename T>
inline void ldmatrix_x2_trans(uint32_t (&r)[2], SharedPtr<T> row) { emu::ldmatrix<2, true>(r, row); }
template <typename T>
inline void ldmatrix_x4_trans(uint32_t (&r)[4], SharedPtr<T> row) { emu::ldmatrix<4, true>(r, row); }

#endif

}  // namespace device
}  // namespace titans
