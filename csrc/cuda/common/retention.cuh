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

// Retention "kl": Memora's step on row `row` of one weight matrix W [rows, cols] with momentum S,
// whose inner gradient is x y^T (cpu/miras_rows.h kl_step), by the calling warp:
//   S' = eta S - theta x y^T,   W' = rowsoftmax(beta log max(W, kKlLogFloor) + S'),
// reading w(r, c), s(r, c) and calling out(r, c, W'_rc, S'_rc), which may overwrite what w and s
// read (each element is read and written by the same lane). Each of the three sweeps (max, sum,
// write) recomputes the logits, so nothing else is stored (in a bf16 copy they would lose their
// precision).
template <typename T, class W, class S, class X, class Y, class Out>
__device__ __forceinline__ void kl_softmax_row(int row, int cols, T theta, T eta, T beta, const W& w, const S& s,
                                               const X& x, const Y& y, const Out& out) {
  const auto momentum = [&](int col) { return eta * s(row, col) - theta * x(row) * y(col); };
  const auto logit = [&](int col, T momentum_new) {
    const T m = w(row, col);
    return beta * fmath::log(m > T(kKlLogFloor) ? m : T(kKlLogFloor)) + momentum_new;
  };
  T row_max = T(-INFINITY);
  for (int col = device::lane_id(); col < cols; col += device::kWarpSize) {
    const T l = logit(col, momentum(col));
    row_max = l > row_max ? l : row_max;
  }
  row_max = device::warp_reduce_max(row_max);
  T total = 0;
  for (int col = device::lane_id(); col < cols; col += device::kWarpSize)
    total += fmath::exp(logit(col, momentum(col)) - row_max);
  total = device::warp_reduce_sum(total);
  for (int col = device::lane_id(); col < cols; col += device::kWarpSize) {
    const T momentum_new = momentum(col);
    out(row, col, fmath::exp(logit(col, momentum_new) - row_max) / total, momentum_new);
  }
}

// The same step on rows [0, rows), a warp per row.
template <typename T, class W, class S, class X, class Y, class Out>
__device__ __forceinline__ void kl_softmax_rows(int rows, int cols, T theta, T eta, T beta, const W& w, const S& s,
                                                const X& x, const Y& y, const Out& out) {
  const int n_warps = static_cast<int>(blockDim.x) / device::kWarpSize;
  for (int row = device::warp_id(); row < rows; row += n_warps)
    kl_softmax_row<T>(row, cols, theta, eta, beta, w, s, x, y, out);
}

// Backward of kl_softmax_rows (cpu/miras_rows.h kl_step_backward): w, s: its inputs; w1(r, c): its
// output W'; dw(r, c), ds(r, c): references to the cotangents of its outputs, turned in place into
// those of its inputs; dx [rows], dy [cols]: the cotangents of x and y (added to); gate_partials[3]:
// this thread's shares of the cotangents of theta, eta and beta (added to). A warp per row, then a
// thread per column for the sums over rows (dy, and eta dS once dy has read dS). Contains barriers.
template <typename T, class W, class S, class W1, class DW, class DS, class X, class Y, class DX, class DY>
__device__ __forceinline__ void kl_softmax_rows_backward(int rows, int cols, T theta, T eta, T beta, const W& w,
                                                         const S& s, const W1& w1, const DW& dw, const DS& ds,
                                                         const X& x, const Y& y, const DX& dx, const DY& dy,
                                                         T (&gate_partials)[3]) {
  const int n_warps = static_cast<int>(blockDim.x) / device::kWarpSize;
  for (int row = device::warp_id(); row < rows; row += n_warps) {
    T row_dot = 0;
    for (int col = device::lane_id(); col < cols; col += device::kWarpSize) row_dot += dw(row, col) * w1(row, col);
    row_dot = device::warp_reduce_sum(row_dot);
    T ds_y = 0;  // (dS_total y)_row
    for (int col = device::lane_id(); col < cols; col += device::kWarpSize) {
      const T m_prev = w(row, col);
      const T d_logit = w1(row, col) * (dw(row, col) - row_dot);  // softmax backward
      const T d_s = ds(row, col) + d_logit;                      // the logits contain the new S
      gate_partials[2] += d_logit * fmath::log(m_prev > T(kKlLogFloor) ? m_prev : T(kKlLogFloor));
      gate_partials[1] += d_s * s(row, col);
      dw(row, col) = m_prev >= T(kKlLogFloor) ? beta * d_logit / m_prev : T(0);
      ds(row, col) = d_s;  // scaled by eta below, once dy has read it
      ds_y += d_s * y(col);
    }
    ds_y = device::warp_reduce_sum(ds_y);
    if (device::lane_id() == 0) {
      gate_partials[0] -= x(row) * ds_y;
      dx[row] -= theta * ds_y;
    }
  }
  __syncthreads();
  for (int col = threadIdx.x; col < cols; col += blockDim.x) {
    T sum = 0;
    for (int row = 0; row < rows; ++row) {
      sum += ds(row, col) * x(row);
      ds(row, col) *= eta;
    }
    dy[col] -= theta * sum;
  }
  __syncthreads();
}

}  // namespace kernel
}  // namespace titans
