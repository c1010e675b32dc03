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

// 1 / k! for k = 0 .. 13 (exp_vectorizable's fp64 polynomial).
inline constexpr double kInverseFactorials[14] = {
    1.0,           1.0,            1.0 / 2,         1.0 / 6,          1.0 / 24,          1.0 / 120,
    1.0 / 720,     1.0 / 5040,     1.0 / 40320,     1.0 / 362880,     1.0 / 3628800,     1.0 / 39916800,
    1.0 / 479001600, 1.0 / 6227020800};

// Monomial coefficients c_0 .. c_17 (sum_k c_k u^k, u in [-1, 1]) of normal_cdf_pdf's fp64
// interpolants: erf(z) / z in w = z^2 on [0, 4] (u = w / 2 - 1), and z exp(z^2) erfc(z) in
// t = 1 / z on [1/6, 1/2] (u = 6 (t - 1/3)). Interpolated at 18 Chebyshev nodes in 40-digit
// mpmath and converted to monomials there (the Chebyshev coefficients fall off fast enough that
// the monomial form loses nothing in fp64: checked on a grid, both within 4.4e-16 of mpmath).
inline constexpr double kErfOverZ[18] = {
    0.674933236039655,      -0.2611118609312454,    0.11947913860985163,    -0.04866277744915509,
    0.017128344571823145,   -0.005234875836158027,  0.0014050914235853634,  -0.0003351435335293146,
    7.180100878143417e-05,  -1.3946273727597251e-05, 2.475801058763217e-06, -4.045094947367635e-07,
    6.11973590542225e-08,   -8.617665144205791e-09, 1.1331611787961273e-09, -1.401554063331593e-10,
    1.7218858155484183e-11, -1.8874163743967482e-12};
inline constexpr double kErfcScaled[18] = {
    0.5370034535441699,     -0.023826556739807003,  -0.003204801317103491,  0.00090592689851217,
    -7.918369001490492e-05, -1.2430256387533318e-05, 5.915637519080394e-06, -1.0172708695541244e-06,
    1.1239651193242593e-08, 4.793996199263566e-08,  -1.5838922112173207e-08, 2.5350189427015752e-09,
    7.039317324142703e-11,  -1.858731080254106e-10, 6.7785379407995e-11,    -1.2786182551439328e-11,
    -1.3573567750910027e-12, 1.1209568295562327e-12};

// sum_k c[k] u^k by Estrin's scheme, with powers[i] = u^(2^i): the two halves are independent,
// so the chain of dependent multiply-adds is log2(kTerms) long instead of Horner's kTerms. The
// activation loops are otherwise bound by that latency, not by the arithmetic. The fp64 helpers
// are always inlined: called out of line, they keep the loops over them from vectorizing.
template <int kTerms>
TITANS_ISA_TARGET [[gnu::always_inline]] inline double estrin(const double* c, const double* powers) {
  if constexpr (kTerms == 1) {
    return c[0];
  } else if constexpr (kTerms == 2) {
    return c[0] + powers[0] * c[1];
  } else {
    constexpr int half = int(std::bit_floor(unsigned(kTerms - 1)));
    return estrin<half>(c, powers) + powers[std::countr_zero(unsigned(half))] * estrin<kTerms - half>(c + half, powers);
  }
}

template <int kTerms>
TITANS_ISA_TARGET [[gnu::always_inline]] inline double polynomial(const double (&c)[kTerms], double u) {
  double powers[5] = {u};
  for (int i = 1; i < 5; ++i) powers[i] = powers[i - 1] * powers[i - 1];
  return estrin<kTerms>(c, powers);
}

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
// exp(x) in fp64, vectorizable in the same way (libm's exp and erf, scalar calls, were a tenth of
// the fp64 MLP memory's time): degree-13 Taylor polynomial (Estrin's scheme, polynomial()) on |r| <= ln2 / 2 (truncation error
// < 1e-17), ln2 split in a high part whose product with n is exact and a low part, and n read
// from the low mantissa bits of x log2(e) + 1.5 * 2^52, since AVX2 has no fp64 -> int64
// conversion. Inputs are clamped to [-708, 709], where the result is a normal double.
TITANS_ISA_TARGET [[gnu::always_inline]] inline double exp_vectorizable(double x) {
  x = std::min(std::max(x, -708.0), 709.0);
  const double round_magic = 6755399441055744.0;  // 1.5 * 2^52
  const double shifted = x * 1.4426950408889634 + round_magic;
  const double n = shifted - round_magic;
  const double r = (x - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
  const double p = polynomial(kInverseFactorials, r);
  const int64_t exponent = std::bit_cast<int64_t>(shifted) - std::bit_cast<int64_t>(round_magic) + 1023;
  return p * std::bit_cast<double>(exponent << 52);
}

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
// In fp64, with z = |x| / sqrt(2): erf(z) = z F(z^2) for z < 2, erfc(z) = exp(-z^2) G(1 / z) / z
// for z >= 2, F and G polynomial interpolants of degree 17 (kErfOverZ, kErfcScaled; beyond
// z = 6, erfc < 3e-17 and G is held at its end). Both branches are computed and one is
// selected, so that the loop vectorizes.
TITANS_ISA_TARGET [[gnu::always_inline]] inline void normal_cdf_pdf(double x, double& cdf, double& pdf) {
  const double e = exp_vectorizable(-0.5 * x * x);  // exp(-z^2)
  const double z = std::abs(x) * 0.70710678118654752440;
  const double erf_small = z * polynomial(kErfOverZ, std::min(z * z, 4.0) * 0.5 - 1.0);
  const double t = std::max(1.0 / std::max(z, 2.0), 1.0 / 6);
  const double erfc_large = e * t * polynomial(kErfcScaled, (t - 1.0 / 3) * 6.0);
  const double erfc_z = z < 2.0 ? 1.0 - erf_small : erfc_large;
  cdf = x >= 0 ? 1.0 - 0.5 * erfc_z : 0.5 * erfc_z;
  pdf = 0.39894228040143267794 * e;
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
