// The vector loops of the CPU decode steps (memory_step.cpp), compiled once per instruction-set
// variant (torch-free; see matmul_kernel.h for how the variant files include this header and why
// everything here has internal linkage).
//
// A step streams each weight matrix of a head through a few matrix-vector products and one
// elementwise update, O(state) work with no reuse: compiled for the baseline (SSE2 on x86-64,
// no fused multiply-add) these loops were most of a step's instructions, so they are per variant
// like the chunk kernels' products. Results equal the baseline's up to the rounding of fused
// multiply-adds. The functions are flattened: kernel_utils.h's dot, compiled for the baseline where
// it is called out of line, is inlined into each and so compiled for the variant.
#pragma once

#include "cpu/isa_kernels.h"
#include "cpu/kernel_utils.h"

#ifndef TITANS_ISA_TARGET
#error "define TITANS_ISA_TARGET (the variant's target attribute) before including step_kernel.h"
#endif

namespace titans::cpu {
namespace {

template <typename T>
TITANS_ISA_TARGET [[gnu::flatten]] void step_matvec_variant(const T* W, index_t rows, index_t cols, const T* x, T scale,
                                                            T* out) {
  for (index_t i = 0; i < rows; ++i) out[i] = scale * dot(W + i * cols, x, cols);
}

template <typename T>
TITANS_ISA_TARGET [[gnu::flatten]] void step_matvec_transposed_variant(const T* W, index_t rows, index_t cols,
                                                                       const T* x, const T* slope, T* out) {
  T* __restrict acc = out;
  for (index_t j = 0; j < cols; ++j) acc[j] = T(0);
  for (index_t i = 0; i < rows; ++i) {
    const T* __restrict row = W + i * cols;
    const T x_i = x[i];
    for (index_t j = 0; j < cols; ++j) acc[j] += row[j] * x_i;
  }
  for (index_t j = 0; j < cols; ++j) acc[j] *= slope[j];
}

template <typename T>
TITANS_ISA_TARGET [[gnu::flatten]] void step_update_variant(const StepUpdate<T>& u) {
  // Row by row with the branches outside the inner loops, which the compiler then vectorizes; the
  // read takes each new row while it is in L1. In place (s_out == s, w_out == w: the in-place step)
  // each element is read before it is written, in the same iteration, so no iteration depends on
  // another (ivdep; __restrict would be false there).
  for (index_t i = 0; i < u.rows; ++i) {
    const T step = u.theta * u.x[i];
    T* s_row = u.s_out + i * u.cols;
    T* w_row = u.w_out + i * u.cols;
    if (u.s) {
      const T* s_in = u.s + i * u.cols;
#pragma GCC ivdep
      for (index_t j = 0; j < u.cols; ++j) s_row[j] = u.eta * s_in[j] - step * u.y[j];
    } else {
#pragma GCC ivdep
      for (index_t j = 0; j < u.cols; ++j) s_row[j] = -step * u.y[j];
    }
    if (u.w) {
      const T* w_in = u.w + i * u.cols;
#pragma GCC ivdep
      for (index_t j = 0; j < u.cols; ++j) w_row[j] = u.beta * w_in[j] + s_row[j];
    } else {
#pragma GCC ivdep
      for (index_t j = 0; j < u.cols; ++j) w_row[j] = u.beta * u.w_default + s_row[j];
    }
    if (u.read_vec) u.read_out[i] = u.read_scale * dot(w_row, u.read_vec, u.cols);
  }
}

template <typename T>
constexpr StepKernels<T> step_kernels_variant() {
  return {&step_matvec_variant<T>, &step_matvec_transposed_variant<T>, &step_update_variant<T>};
}

}  // namespace
}  // namespace titans::cpu
