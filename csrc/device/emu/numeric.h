// bf16 / fp16 / tf32 for the emulation, bit-exact with the GPU's conversion instructions:
// fp32 -> bf16/fp16 round to nearest even (cvt.rn), fp32 -> tf32 rounds ties away (cvt.rna).
// NaN becomes the canonical NaN 0x7fff, as the GPU's cvt.rn does (torch keeps a quiet NaN with the
// input's sign, so NaNs are compared with isnan).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace titans {
namespace device {

// Storage-only types: arithmetic happens in float, as in our kernels. No conversion operators,
// like CUDA's types under torch's __CUDA_NO_*_CONVERSIONS__: kernels convert with device::cast.
struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

inline uint32_t bits_of(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
inline float float_from_bits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}
inline uint16_t bits_of(bf16 x) { return x.bits; }
inline uint16_t bits_of(fp16 x) { return x.bits; }
inline bf16 bf16_from_bits(uint16_t u) { return bf16{u}; }
inline fp16 fp16_from_bits(uint16_t u) { return fp16{u}; }

inline float bf16_to_float(bf16 x) { return float_from_bits(static_cast<uint32_t>(x.bits) << 16); }

inline bf16 float_to_bf16_rn(float x) {
  const uint32_t u = bits_of(x);
  if (std::isnan(x)) return bf16{0x7fff};
  // Adding 0x7fff plus the lowest kept bit rounds to nearest, ties to even; carries into the
  // exponent give the next binade or infinity, as they should.
  return bf16{static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

inline float fp16_to_float(fp16 x) {
  const uint32_t sign = static_cast<uint32_t>(x.bits & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1fu;
  const uint32_t mantissa = x.bits & 0x3ffu;
  if (exponent == 0x1f) return float_from_bits(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  return float_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline fp16 float_to_fp16_rn(float x) {
  const uint32_t u = bits_of(x);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t magnitude = u & 0x7fffffffu;
  if (std::isnan(x)) return fp16{0x7fff};
  if (magnitude >= 0x477ff000u) return fp16{static_cast<uint16_t>(sign | 0x7c00u)};  // >= 65520: rounds to inf
  if (magnitude < 0x38800000u) {  // below 2^-14: an fp16 subnormal, in units of 2^-24
    // Scaling by a power of two is exact and nearbyint rounds to nearest even (default mode).
    const float units = std::nearbyint(std::ldexp(float_from_bits(magnitude), 24));
    return fp16{static_cast<uint16_t>(sign | static_cast<uint16_t>(units))};
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even.
  const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
  return fp16{static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13))};
}

inline uint32_t float_to_tf32_rna(float x) {
  const uint32_t u = bits_of(x);
  if (!std::isfinite(x)) return u;
  return (u + 0x1000u) & 0xffffe000u;  // half of the dropped 13 bits, then truncate: ties away from zero
}

}  // namespace device
}  // namespace titans
