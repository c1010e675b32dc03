// Operand policies: how a 16x8 output tile's k-step runs on the tensor cores for each input dtype
// (docs/kernels.md §5.1, §6.1.8-9). Memory-type agnostic: every kernel on the device layer takes its
// products through them (tile_loops.cuh).
//     bf16 -> mma.m16n8k16 bf16, fp32 accumulate, fragments read with ldmatrix from bf16 tiles.
//             The bf16 inputs are exact; fp32 operands (states, errors, coefficient-weighted
//             terms) are rounded to bf16 where they are written into their operand tile (what fla
//             and FlashQLA do).
//     fp16 -> mma.m16n8k8 tf32, fp32 accumulate. Every fp16 value is exact in tf32 (same 10-bit
//             mantissa), and fp32 operands keep fp32's range, so cotangents and states cannot
//             overflow as they could in fp16 operands.
//     fp32 -> 3xTF32: x = hi + lo (both tf32), hi*hi + hi*lo + lo*hi on mma.m16n8k8: about fp32
//             accuracy (plain tf32 would cost ~3e-4 relative error) at 3 MMAs per k-step.
//     fp64 -> scalar fp64 FMAs with the same fragment ownership (no fp64 tensor-core path).
// A policy loads the A fragment of rows r0..r0+15 and the B fragment of columns c0..c0+7 for one
// k-step from operands in shared memory (SmemMatrix) and multiplies them into a 16x8 accumulator;
// the tile loops share a loaded fragment between every product that reads it.
#pragma once

#include <cstdint>
#include <type_traits>

#include "device/device.h"

namespace titans {
namespace kernel {

// A matrix operand in shared memory: element (r, c) at data[r * ld + c], or at data[c * ld + r]
// for the transposed view, which is how a product reads X^T from X's storage without a copy (an
// A operand [M, K] stored as [K, M] is "k-major", a B operand [K, N] stored as [N, K] "n-major";
// ldmatrix reads either layout, .trans giving the transpose).
template <typename T, bool kTransposed = false>
struct SmemMatrix {
  device::SharedPtr<T> data;
  int ld;
  __device__ __forceinline__ T operator()(int r, int c) const {
    return kTransposed ? data[c * ld + r] : data[r * ld + c];
  }
  __device__ __forceinline__ SmemMatrix<T, !kTransposed> t() const { return {data, ld}; }
  // The matrix whose element (0, 0) is this one's (r, c).
  __device__ __forceinline__ SmemMatrix shifted(int r, int c) const {
    return {data + (kTransposed ? c * ld + r : r * ld + c), ld};
  }
};

template <class M>
struct is_smem_matrix : std::false_type {};
template <typename T, bool kTransposed>
struct is_smem_matrix<SmemMatrix<T, kTransposed>> : std::true_type {};

// bf16 operands: fragments by ldmatrix (layouts in mma.h and ldmatrix.h). Rows must be 16-byte
// aligned (ld a multiple of 8, r0, c0, k0 multiples of 8), and the contraction runs in whole
// 16-element k-steps, so the operand tiles hold zeros past the logical extent (PaddedTile).
struct Bf16Mma {
  using acc_t = float;
  static constexpr int kK = 16;
  struct AFragment {
    uint32_t r[4];
  };
  struct BFragment {
    uint32_t r[2];
  };

  // Registers a0..a3: rows 0-7 | 8-15 of k 0-7, then of k 8-15; lane l gives a row address of
  // matrix l / 8. A k-major A is the same four 8x8 blocks of its storage, transposed on the way.
  template <bool kTransposed>
  __device__ __forceinline__ static AFragment load_a(const SmemMatrix<device::bf16, kTransposed>& a, int r0, int k0) {
    const int lane = device::lane_id(), matrix = lane / 8, row = lane % 8;
    AFragment f;
    if constexpr (kTransposed)
      device::ldmatrix_x4_trans(f.r, a.data + ((k0 + matrix / 2 * 8 + row) * a.ld + r0 + matrix % 2 * 8));
    else
      device::ldmatrix_x4(f.r, a.data + ((r0 + matrix % 2 * 8 + row) * a.ld + k0 + matrix / 2 * 8));
    return f;
  }
  // Registers b0, b1: k 0-7, k 8-15 (lanes 16-31 repeat the addresses of lanes 0-15).
  template <bool kTransposed>
  __device__ __forceinline__ static BFragment load_b(const SmemMatrix<device::bf16, kTransposed>& b, int k0, int c0) {
    const int lane = device::lane_id(), matrix = lane / 8, row = lane % 8;
    BFragment f;
    if constexpr (kTransposed)
      device::ldmatrix_x2(f.r, b.data + ((c0 + row) * b.ld + k0 + matrix % 2 * 8));
    else
      device::ldmatrix_x2_trans(f.r, b.data + ((k0 + matrix % 2 * 8 + row) * b.ld + c0));
    return f;
  }
  __device__ __forceinline__ static void mma(float (&acc)[4], const AFragment& a, const BFragment& b) {
    device::mma_m16n8k16_bf16(acc, a.r, b.r, acc);
  }
};

// tf32 operands read element by element from any float-convertible operand type (fp16 inputs,
// fp32 inputs and fp32 computed tiles); kSplit: 3xTF32.
template <bool kSplit>
struct Tf32Mma {
  using acc_t = float;
  static constexpr int kK = 8;
  static constexpr int kParts = kSplit ? 2 : 1;  // hi, and lo when split
  struct AFragment {
    uint32_t r[kParts][4];
  };
  struct BFragment {
    uint32_t r[kParts][2];
  };

  template <int kN>
  __device__ __forceinline__ static void split(const float (&x)[kN], uint32_t (&out)[kParts][kN]) {
    for (int i = 0; i < kN; ++i) {
      out[0][i] = device::float_to_tf32_rna(x[i]);
      if constexpr (kSplit) out[kParts - 1][i] = device::float_to_tf32_rna(x[i] - device::tf32_to_float(out[0][i]));
    }
  }
  template <class A>
  __device__ __forceinline__ static AFragment load_a(const A& a, int r0, int k0) {
    const int lane = device::lane_id();
    float x[4];
    for (int i = 0; i < 4; ++i) {
      const device::FragmentCoord at = device::mma_m16n8k8_tf32_a_coord(lane, i);
      x[i] = device::cast<float>(a(r0 + at.row, k0 + at.col));
    }
    AFragment f;
    split(x, f.r);
    return f;
  }
  template <class B>
  __device__ __forceinline__ static BFragment load_b(const B& b, int k0, int c0) {
    const int lane = device::lane_id();
    float x[2];
    for (int i = 0; i < 2; ++i) {
      const device::FragmentCoord at = device::mma_m16n8k8_tf32_b_coord(lane, i);
      x[i] = device::cast<float>(b(k0 + at.row, c0 + at.col));
    }
    BFragment f;
    split(x, f.r);
    return f;
  }
  __device__ __forceinline__ static void mma(float (&acc)[4], const AFragment& a, const BFragment& b) {
    if constexpr (kSplit) {
      // The small cross terms first, so the big product is added to an accumulator that already
      // holds them (the usual 3xTF32 order).
      device::mma_m16n8k8_tf32(acc, a.r[1], b.r[0], acc);
      device::mma_m16n8k8_tf32(acc, a.r[0], b.r[1], acc);
    }
    device::mma_m16n8k8_tf32(acc, a.r[0], b.r[0], acc);
  }
};

// fp64: each lane multiplies the rows and columns of its own accumulator elements (the C layout of
// mma.h: rows lane / 4 and lane / 4 + 8, columns 2 (lane % 4) and 2 (lane % 4) + 1), four k at a
// time (its fragments are registers of doubles).
struct Fp64Fma {
  using acc_t = double;
  static constexpr int kK = 4;
  struct AFragment {
    double x[2][kK];  // [row half][k]
  };
  struct BFragment {
    double x[2][kK];  // [column][k]
  };
  template <class A>
  __device__ __forceinline__ static AFragment load_a(const A& a, int r0, int k0) {
    const int row = r0 + device::lane_id() / 4;
    AFragment f;
    for (int k = 0; k < kK; ++k) {
      f.x[0][k] = a(row, k0 + k);
      f.x[1][k] = a(row + 8, k0 + k);
    }
    return f;
  }
  template <class B>
  __device__ __forceinline__ static BFragment load_b(const B& b, int k0, int c0) {
    const int col = c0 + device::lane_id() % 4 * 2;
    BFragment f;
    for (int k = 0; k < kK; ++k) {
      f.x[0][k] = b(k0 + k, col);
      f.x[1][k] = b(k0 + k, col + 1);
    }
    return f;
  }
  __device__ __forceinline__ static void mma(double (&acc)[4], const AFragment& a, const BFragment& b) {
    for (int i = 0; i < 4; ++i)
      for (int k = 0; k < kK; ++k) acc[i] += a.x[i / 2][k] * b.x[i % 2][k];
  }
};

// The policy of each input dtype.
template <typename input_t>
struct OperandPolicy;
template <>
struct OperandPolicy<device::bf16> {
  using type = Bf16Mma;
};
template <>
struct OperandPolicy<device::fp16> {
  using type = Tf32Mma<false>;
};
template <>
struct OperandPolicy<float> {
  using type = Tf32Mma<true>;
};
template <>
struct OperandPolicy<double> {
  using type = Fp64Fma;
};

// The type a kernel computes in for input_t: fp64 inputs in fp64, all others in fp32.
template <typename input_t>
using compute_type = std::conditional_t<std::is_same<input_t, double>::value, double, float>;

// The element type of the operand tiles a kernel writes (rounded states, errors, coefficient-
// weighted terms): bf16 where the policy reads bf16 fragments, else the compute type.
template <typename input_t>
using operand_type = std::conditional_t<std::is_same<input_t, device::bf16>::value, device::bf16,
                                        compute_type<input_t>>;

}  // namespace kernel
}  // namespace titans
