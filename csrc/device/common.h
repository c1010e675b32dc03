// Device-layer helpers written once against CUDA's names, so they run unchanged in both builds.
#pragma once

#include <cstdint>
#include <cstring>

namespace titans {
namespace device {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;

__device__ __forceinline__ int thread_rank() {
  return static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}
__device__ __forceinline__ int lane_id() { return thread_rank() % kWarpSize; }
__device__ __forceinline__ int warp_id() { return thread_rank() / kWarpSize; }

// Butterfly reductions: every lane of a full warp gets the result.
template <typename T>
__device__ __forceinline__ T warp_reduce_sum(T value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(kFullWarpMask, value, offset);
  return value;
}
template <typename T>
__device__ __forceinline__ T warp_reduce_max(T value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    T other = __shfl_xor_sync(kFullWarpMask, value, offset);
    value = other > value ? other : value;
  }
  return value;
}

// Conversions a kernel needs for templated input types: cast<To>(x). Narrowing to bf16/fp16
// rounds to nearest even; bf16/fp16 widen through float; the rest is a static_cast. Explicit,
// because torch builds CUDA code with __CUDA_NO_BFLOAT16_CONVERSIONS__ / __CUDA_NO_HALF_CONVERSIONS__
// (and the emulation's bf16/fp16 have no conversion operators either).
template <typename To>
struct Cast {
  template <typename From>
  __device__ __forceinline__ static To from(From x) { return static_cast<To>(x); }
  __device__ __forceinline__ static To from(bf16 x) { return static_cast<To>(bf16_to_float(x)); }
  __device__ __forceinline__ static To from(fp16 x) { return static_cast<To>(fp16_to_float(x)); }
};
template <>
struct Cast<bf16> {
  __device__ __forceinline__ static bf16 from(float x) { return float_to_bf16_rn(x); }
  __device__ __forceinline__ static bf16 from(bf16 x) { return x; }
};
template <>
struct Cast<fp16> {
  __device__ __forceinline__ static fp16 from(float x) { return float_to_fp16_rn(x); }
  __device__ __forceinline__ static fp16 from(fp16 x) { return x; }
};
template <typename To, typename From>
__device__ __forceinline__ To cast(From x) { return Cast<To>::from(x); }

// Two 16-bit values (bf16 or fp16) in one 32-bit MMA fragment register: the lower-indexed
// element in the low half.
template <typename Half>
__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
  return static_cast<uint32_t>(bits_of(cast<Half>(lo))) | (static_cast<uint32_t>(bits_of(cast<Half>(hi))) << 16);
}

// The float value of a tf32 held in a 32-bit register (float_to_tf32_rna's result), read as the
// tensor core reads it: the 19 tf32 bits, the low 13 mantissa bits cleared, so that the split of
// x into tf32 hi + lo parts does not depend on what the conversion leaves there.
__device__ __forceinline__ float tf32_to_float(uint32_t bits) {
  bits &= 0xffffe000u;
  float x;
  memcpy(&x, &bits, sizeof(x));
  return x;
}

}  // namespace device
}  // namespace titans
