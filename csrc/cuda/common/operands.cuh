// Operand policies: how a 16x8 output tile's k-step runs on the tensor cores for each input
// dtype (docs/kernels.md §5.1, §6.1.8-9). Memory-type agnostic: any kernel on the device layer uses
// them through the tile loops (tile_loops.cuh).
//     bf16 -> mma.m16n8k16 bf16, fp32 accumulate. The bf16 inputs are exact; fp32 operands
//             (states, errors, coefficient-weighted terms) are rounded to bf16 (what fla and
//             FlashQLA do).
//     fp16 -> mma.m16n8k8 tf32, fp32 accumulate. Every fp16 value is exact in tf32 (same 10-bit
//             mantissa), and fp32 operands keep fp32's range, so cotangents and states cannot
//             overflow as they could in fp16 operands.
//     fp32 -> 3xTF32: x = hi + lo (both tf32), hi*hi + hi*lo + lo*hi on mma.m16n8k8: about fp32
//             accuracy (plain tf32 would cost ~3e-4 relative error) at 3 MMAs per k-step.
//     fp64 -> scalar fp64 FMAs with the same tile ownership (no fp64 tensor-core path).
// Each policy's step(acc, a, b, r0, c0, k0) reads its operands through callables a(r, k) and
// b(k, c) returning the compute type. With bf16 inputs, products may instead read their fragments
// with ldmatrix from bf16 tiles in shared memory (mma_bf16_tiles), which give the same values.
#pragma once

#include <cstdint>
#include <type_traits>

#include "device/device.h"

namespace titans {
namespace kernel {

struct Bf16Operands {
  using acc_t = float;
  static constexpr int kK = 16;
  template <class A, class B>
  __device__ __forceinline__ static void step(float (&acc)[4], const A& a, const B& b, int r0, int c0, int k0) {
    const int lane = device::lane_id();
    uint32_t af[4], bf[2];
    for (int i = 0; i < 4; ++i) {  // elements 2i and 2i+1 are neighbours along k
      const device::FragmentCoord at = device::mma_m16n8k16_a_coord(lane, 2 * i);
      af[i] = device::pack_half2<device::bf16>(a(r0 + at.row, k0 + at.col), a(r0 + at.row, k0 + at.col + 1));
    }
    for (int i = 0; i < 2; ++i) {
      const device::FragmentCoord at = device::mma_m16n8k16_b_coord(lane, 2 * i);
      bf[i] = device::pack_half2<device::bf16>(b(k0 + at.row, c0 + at.col), b(k0 + at.row + 1, c0 + at.col));
    }
    device::mma_m16n8k16_bf16(acc, af, bf, acc);
  }
};

template <bool kSplit>
struct Tf32Operands {
  using acc_t = float;
  static constexpr int kK = 8;
  template <class A, class B>
  __device__ __forceinline__ static void step(float (&acc)[4], const A& a, const B& b, int r0, int c0, int k0) {
    const int lane = device::lane_id();
    float av[4], bv[2];
    uint32_t ah[4], bh[2];
    for (int i = 0; i < 4; ++i) {
      const device::FragmentCoord at = device::mma_m16n8k8_tf32_a_coord(lane, i);
      av[i] = a(r0 + at.row, k0 + at.col);
      ah[i] = device::float_to_tf32_rna(av[i]);
    }
    for (int i = 0; i < 2; ++i) {
      const device::FragmentCoord at = device::mma_m16n8k8_tf32_b_coord(lane, i);
      bv[i] = b(k0 + at.row, c0 + at.col);
      bh[i] = device::float_to_tf32_rna(bv[i]);
    }
    if constexpr (kSplit) {
      // The small cross terms first, so the big product is added to an accumulator that already
      // holds them (the usual 3xTF32 order).
      uint32_t al[4], bl[2];
      for (int i = 0; i < 4; ++i) al[i] = device::float_to_tf32_rna(av[i] - device::tf32_to_float(ah[i]));
      for (int i = 0; i < 2; ++i) bl[i] = device::float_to_tf32_rna(bv[i] - device::tf32_to_float(bh[i]));
      device::mma_m16n8k8_tf32(acc, al, bh, acc);
      device::mma_m16n8k8_tf32(acc, ah, bl, acc);
    }
    device::mma_m16n8k8_tf32(acc, ah, bh, acc);
  }
};

struct Fp64Operands {
  using acc_t = double;
  static constexpr int kK = 8;
  template <class A, class B>
  __device__ __forceinline__ static void step(double (&acc)[4], const A& a, const B& b, int r0, int c0, int k0) {
    const int lane = device::lane_id();
    for (int i = 0; i < 4; ++i) {
      const device::FragmentCoord at = device::mma_m16n8_c_coord(lane, i);
      for (int k = k0; k < k0 + kK; ++k) acc[i] += a(r0 + at.row, k) * b(k, c0 + at.col);
    }
  }
};

// The operand policy of each input dtype.
template <typename input_t>
struct OperandPolicy;
template <>
struct OperandPolicy<device::bf16> { using type = Bf16Operands; };
template <>
struct OperandPolicy<device::fp16> { using type = Tf32Operands<false>; };
template <>
struct OperandPolicy<float> { using type = Tf32Operands<true>; };
template <>
struct OperandPolicy<double> { using type = Fp64Operands; };

// The type a kernel computes in for input_t: fp64 inputs in fp64, all others in fp32.
template <typename input_t>
using compute_type = std::conditional_t<std::is_same<input_t, double>::value, double, float>;

// bf16 products from ldmatrix fragments.
//
// Operands are bf16 tiles in shared memory, row-major with a leading dimension ld (a multiple of 8
// elements, so that every ldmatrix row is 16-byte aligned; ld = width + 8 keeps the 8 rows of a
// matrix in different banks): A [M, K] by its rows; B either by the rows of B^T ([N, K],
// "n-major", e.g. a state M0 read as M0^T) or by its own rows ([K, N], "k-major", loaded
// transposed). Nothing is bounds-checked: rows of A beyond M and of an n-major B beyond N only
// reach discarded outputs, but the contraction runs to K rounded up to 16, so entries beyond K
// must be zero in both operands (shared memory may hold NaN, and 0 * NaN is NaN).
template <class Ptr>
struct Bf16Tile {
  Ptr base;
  int ld;
};

// acc += A[r0:r0+16, 0:K] B[0:K, c0:c0+8] (fragment layouts: mma.h, ldmatrix.h).
template <bool kBKMajor, class Ptr>
__device__ __forceinline__ void mma_bf16_tiles(float (&acc)[4], int r0, int c0, int K, const Bf16Tile<Ptr>& a,
                                               const Bf16Tile<Ptr>& b) {
  const int lane = device::lane_id();
  const int matrix = lane / 8, row = lane % 8;
  for (int k0 = 0; k0 < K; k0 += 16) {
    uint32_t af[4], bf[2];
    // A's registers a0..a3: rows 0-7 | 8-15 of k 0-7, then of k 8-15.
    device::ldmatrix_x4(af, a.base + ((r0 + matrix % 2 * 8 + row) * a.ld + k0 + matrix / 2 * 8));
    // B's registers b0, b1: k 0-7, k 8-15 (lanes 16-31 repeat the addresses of lanes 0-15).
    if constexpr (kBKMajor)
      device::ldmatrix_x2_trans(bf, b.base + ((k0 + matrix % 2 * 8 + row) * b.ld + c0));
    else
      device::ldmatrix_x2(bf, b.base + ((c0 + row) * b.ld + k0 + matrix % 2 * 8));
    device::mma_m16n8k16_bf16(acc, af, bf, acc);
  }
}

}  // namespace kernel
}  // namespace titans
