// Warp-level tensor-core MMA wrappers: D = A B + C with fp32 accumulators.
//
// Under nvcc each wrapper is one mma.sync instruction (sm_80+). In the emulation the warp's 32
// lanes exchange their fragments, rebuild A and B through the same layout tables, and each lane
// computes its own accumulators, so kernel code that builds fragments lane by lane is tested
// exactly as the hardware will read it.
//
// Fragment layouts, from the PTX ISA sections "Matrix Fragments for mma.m16n8k16" (.f16/.bf16)
// and "Matrix Fragments for mma.m16n8k8" (.tf32), with groupID = lane / 4 and
// threadID_in_group = lane % 4. A is row-major M x K, B is column-major K x N (".row.col").
// 16-bit elements pack two per 32-bit register, the lower-indexed element in the low half.
#pragma once

#include <cstdint>

namespace titans {
namespace device {

struct FragmentCoord {
  int row;
  int col;
};

// m16n8k16, .f16/.bf16: A 16x16 holds a0..a7 per lane, B 16x8 holds b0..b3.
__host__ __device__ constexpr FragmentCoord mma_m16n8k16_a_coord(int lane, int i) {
  return {lane / 4 + 8 * ((i / 2) % 2), (lane % 4) * 2 + (i % 2) + 8 * (i / 4)};
}
__host__ __device__ constexpr FragmentCoord mma_m16n8k16_b_coord(int lane, int i) {
  return {(lane % 4) * 2 + (i % 2) + 8 * (i / 2), lane / 4};
}
// m16n8k8, .tf32: A 16x8 holds a0..a3 per lane, B 8x8 holds b0..b1.
__host__ __device__ constexpr FragmentCoord mma_m16n8k8_tf32_a_coord(int lane, int i) {
  return {lane / 4 + 8 * (i % 2), lane % 4 + 4 * (i / 2)};
}
__host__ __device__ constexpr FragmentCoord mma_m16n8k8_tf32_b_coord(int lane, int i) {
  return {lane % 4 + 4 * i, lane / 4};
}
// C and D (fp32, 16x8) of both shapes: c0..c3 per lane.
__host__ __device__ constexpr FragmentCoord mma_m16n8_c_coord(int lane, int i) {
  return {lane / 4 + 8 * (i / 2), (lane % 4) * 2 + (i % 2)};
}

#if defined(__CUDACC__)

__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                  const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

__device__ __forceinline__ void mma_m16n8k16_fp16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                  const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 const float (&c)[4]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
}

#else  // emulation

namespace emu {

// The operand formats of the emulated shapes: element i of a fragment as a float.
struct MmaM16N8K16Bf16 {
  static constexpr int kK = 16, kAElems = 8, kBElems = 4;
  static float element(const uint32_t* regs, int i) {
    return bf16_to_float(bf16_from_bits(static_cast<uint16_t>(regs[i / 2] >> (16 * (i % 2)))));
  }
  static constexpr FragmentCoord a_coord(int lane, int i) { return mma_m16n8k16_a_coord(lane, i); }
  static constexpr FragmentCoord b_coord(int lane, int i) { return mma_m16n8k16_b_coord(lane, i); }
};
struct MmaM16N8K16Fp16 : MmaM16N8K16Bf16 {
  static float element(const uint32_t* regs, int i) {
    return fp16_to_float(fp16_from_bits(static_cast<uint16_t>(regs[i / 2] >> (16 * (i % 2)))));
  }
};
struct MmaM16N8K8Tf32 {
  static constexpr int kK = 8, kAElems = 4, kBElems = 2;
  // The tensor core reads only the 19 tf32 bits of each register (sign, exponent, 10 mantissa bits).
  static float element(const uint32_t* regs, int i) { return float_from_bits(regs[i] & 0xffffe000u); }
  static constexpr FragmentCoord a_coord(int lane, int i) { return mma_m16n8k8_tf32_a_coord(lane, i); }
  static constexpr FragmentCoord b_coord(int lane, int i) { return mma_m16n8k8_tf32_b_coord(lane, i); }
};

// A warp collective over the full warp, like mma.sync.aligned: every lane must call it.
template <typename Shape>
void mma_sync(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  struct Fragments {
    uint32_t a[4];
    uint32_t b[2];
  };
  const Fragments mine = {{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  const unsigned char* slots = warp_exchange(kFullWarpMask, &mine, sizeof(mine));
  float A[16][Shape::kK];
  float B[Shape::kK][8];
  for (int lane = 0; lane < kWarpSize; ++lane) {
    Fragments frag;
    std::memcpy(&frag, slots + lane * kWarpSlotBytes, sizeof(frag));
    for (int i = 0; i < Shape::kAElems; ++i) {
      const FragmentCoord at = Shape::a_coord(lane, i);
      A[at.row][at.col] = Shape::element(frag.a, i);
    }
    for (int i = 0; i < Shape::kBElems; ++i) {
      const FragmentCoord at = Shape::b_coord(lane, i);
      B[at.row][at.col] = Shape::element(frag.b, i);
    }
  }
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const FragmentCoord at = mma_m16n8_c_coord(lane_id(), i);
    float acc = c[i];
    for (int k = 0; k < Shape::kK; ++k) acc += A[at.row][k] * B[k][at.col];
    out[i] = acc;
  }
  for (int i = 0; i < 4; ++i) d[i] = out[i];  // d may alias c
}

}  // namespace emu

inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  emu::mma_sync<emu::MmaM16N8K16Bf16>(d, a, b, c);
}
inline void mma_m16n8k16_fp16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  emu::mma_sync<emu::MmaM16N8K16Fp16>(d, a, b, c);
}
inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  emu::mma_sync<emu::MmaM16N8K8Tf32>(d, a, b, c);
}

#endif

}  // namespace device
}  // namespace titans
