// The MLP memory's activations and their derivatives, compiled once per instruction-set variant
// (torch-free; see matmul_kernel.h for how the variant files include this header).
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

#include "titans_params.h"

#ifndef TITANS_ISA_TARGET
#error "define TITANS_ISA_TARGET (the variant's target attribute) before including activation_kernel.h"
#endif

namespace titans::cpu {
namespace {

// exp(x) for the fp32 activations, written so that loops over it vectorize (libm's expf and
// erff are scalar calls, and were a fifth of the kernel's time): x = n ln2 + r with |r| <= ln2 / 2,
// exp(r) by its degree-6 Taylor polynomial (relative error < 2e-7), 2^n built in the exponent
// bits. Inputs are clamped to [-87, 88], where the result is a normal float.
TITANS_ISA_TARGET inline float exp_vectorizable(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // Round to nearest through the float mantissa (SSE2 has no vector round instruction).
  const float round_magic = 12582912.0f;  // 1.5 * 2^23
  const float n = (x * 1.44269504f + round_magic) - round_magic;
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  // ln2 split: hi part exact in n * hi
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}
// fp64 keeps libm: the fp64 tests compare with the references at 1e-10.
TITANS_ISA_TARGET inline double exp_vectorizable(double x) { return std::exp(x); }

// GELU's Phi(x) and phi(x). In fp32, erf by Abramowitz & Stegun 7.1.26 (absolute error
// <= 1.5e-7), which shares its exp(-x^2 / 2) with phi.
TITANS_ISA_TARGET inline void normal_cdf_pdf(float x, float& cdf, float& pdf) {
  const float e = exp_vectorizable(-0.5f * x * x);
  const float z = std::abs(x) * 0.707106781f;
  const float t = 1.0f / (1.0f + 0.3275911f * z);
  const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
  const float erf_abs = 1.0f - poly * e;
  cdf = 0.5f + 0.5f * std::copysign(erf_abs, x);
  pdf = 0.398942280f * e;
}
TITANS_ISA_TARGET inline void normal_cdf_pdf(double x, double& cdf, double& pdf) {
  cdf = 0.5 * (1.0 + std::erf(x * 0.70710678118654752440));
  pdf = 0.39894228040143267794 * std::exp(-0.5 * x * x);
}

// act and its first kOrder derivatives elementwise over n values (one loop per order, so
// that each vectorizes without per-element branches).
template <int kOrder, typename T>
TITANS_ISA_TARGET void activation_derivatives(MlpActivation kind, index_t n, const T* x, T* value, T* first,
                                              T* second) {
  if (kind == MlpActivation::kGelu) {
    for (index_t i = 0; i < n; ++i) {
      const T xi = x[i];
      T cdf, pdf;
      normal_cdf_pdf(xi, cdf, pdf);
      value[i] = xi * cdf;
      if constexpr (kOrder >= 1) first[i] = cdf + xi * pdf;
      if constexpr (kOrder >= 2) second[i] = pdf * (T(2) - xi * xi);
    }
  } else {
    for (index_t i = 0; i < n; ++i) {
      const T xi = x[i];
      const T s = T(1) / (T(1) + exp_vectorizable(-xi));
      value[i] = xi * s;
      if constexpr (kOrder >= 1) first[i] = s * (T(1) + xi * (T(1) - s));
      if constexpr (kOrder >= 2) second[i] = s * (T(1) - s) * (T(2) + xi * (T(1) - T(2) * s));
    }
  }
}

// activation (activation.h) of one variant.
template <typename T>
TITANS_ISA_TARGET void activation_variant(MlpActivation kind, index_t n, const T* x, T* value, T* first, T* second) {
  if (second) activation_derivatives<2>(kind, n, x, value, first, second);
  else if (first) activation_derivatives<1>(kind, n, x, value, first, second);
  else activation_derivatives<0>(kind, n, x, value, first, second);
}

}  // namespace
}  // namespace titans::cpu
