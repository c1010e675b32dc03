// The MLP memory's activations, exact GELU (erf) and SiLU, with their first derivative, one value at
// a time; torch-free and usable from host and device code (the decode step's CPU and CUDA kernels).
// The chunked CPU kernels evaluate the same functions over whole tiles with vectorized
// approximations in fp32 (csrc/cpu/mlp_memory.cpp); in fp64 both are libm's erf and exp.
#pragma once

#include <cmath>

#include "objectives.h"  // TITANS_HOST_DEVICE
#include "titans_params.h"

namespace titans {

template <typename T>
struct ActivationValue {
  T value, slope;  // act(x), act'(x)
};

//   gelu: x Phi(x);  Phi(x) + x phi(x)       (Phi, phi: the standard normal cdf and pdf)
//   silu: x s;       s (1 + x (1 - s))       (s = sigmoid(x))
template <typename T>
TITANS_HOST_DEVICE inline ActivationValue<T> activation_value(MlpActivation kind, T x) {
  using std::erf;
  using std::exp;
  if (kind == MlpActivation::kGelu) {
    const T cdf = T(0.5) * (T(1) + erf(x * T(0.70710678118654752440)));
    const T pdf = T(0.39894228040143267794) * exp(T(-0.5) * x * x);
    return {x * cdf, cdf + x * pdf};
  }
  const T s = T(1) / (T(1) + exp(-x));
  return {x * s, s * (T(1) + x * (T(1) - s))};
}

}  // namespace titans
