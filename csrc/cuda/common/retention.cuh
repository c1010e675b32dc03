// Elementwise math by argument type and the "lq" retention's scale (docs/miras.md §2.3), shared by
// the linear and the deep memory's CUDA kernels.
#pragma once

#include <cmath>

#include "device/device.h"
#include "objectives.h"
#include "titans_params.h"

namespace titans {

// The C math functions by argument type (CUDA's device overloads under nvcc, libm in the emulation).
namespace fmath {
__device__ __forceinline__ float exp(float x) { return ::expf(x); }
__device__ __forceinline__ double exp(double x) { return ::exp(x); }
__device__ __forceinline__ float log(float x) { return ::logf(x); }
__device__ __forceinline__ double log(double x) { return ::log(x); }
__device__ __forceinline__ float erfc(float x) { return ::erfcf(x); }
__device__ __forceinline__ double erfc(double x) { return ::erfc(x); }
__device__ __forceinline__ float sqrt(float x) { return ::sqrtf(x); }
__device__ __forceinline__ double sqrt(double x) { return ::sqrt(x); }
__device__ __forceinline__ float pow(float x, float y) { return ::powf(x, y); }
__device__ __forceinline__ double pow(double x, double y) { return ::pow(x, y); }
__device__ __forceinline__ float abs(float x) { return ::fabsf(x); }
__device__ __forceinline__ double abs(double x) { return ::fabs(x); }
}  // namespace fmath

namespace kernel {

// "lq": the carried weights are accumulators A; a chunk learns and reads with rho A, rho =
// ||A||_q^(2-q) (entrywise), fixed at the chunk start; rho = 1 for A = 0, where it has no limit.
template <typename T>
__device__ __forceinline__ T lq_power(T a, T q) {
  return fmath::pow(fmath::abs(a), q);
}
// rho from the power sum sum |A|^q.
template <typename T>
__device__ __forceinline__ T lq_rho(T sum, T q) {
  return sum == T(0) ? T(1) : fmath::pow(sum, (T(2) - q) / q);
}
// d_rho drho/dA = coef sign(A) |A|^(q-1) with coef = lq_rho_slope(sum, q, d_rho) (0 where sum = 0:
// rho is constant there).
template <typename T>
__device__ __forceinline__ T lq_rho_slope(T sum, T q, T d_rho) {
  return sum == T(0) ? T(0) : d_rho * (T(2) - q) * fmath::pow(sum, (T(2) - T(2) * q) / q);
}
template <typename T>
__device__ __forceinline__ T lq_rho_grad(T a, T q, T coef) {
  return coef * sign_of(a) * fmath::pow(fmath::abs(a), q - T(1));
}

// dA += d_rho drho/dA over the n entries of one weight matrix A with power sum `sum`, block-strided.
template <typename T, typename S>
__device__ __forceinline__ void lq_scale_backward(const S* A, index_t n, T q, T sum, T d_rho, T* dA) {
  const T coef = lq_rho_slope(sum, q, d_rho);
  if (coef == T(0)) return;
  for (index_t i = threadIdx.x; i < n; i += blockDim.x) dA[i] += lq_rho_grad(device::cast<T>(A[i]), q, coef);
}

}  // namespace kernel
}  // namespace titans
