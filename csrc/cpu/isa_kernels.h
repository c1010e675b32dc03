// The kernels compiled once per instruction-set variant (cpu_isa.h), as one table of function
// pointers per variant (isa_<variant>.cpp), and the table of the variant in use (torch-free).
//
// Only the vector-heavy inner kernels are per variant: the matrix product (matmul_kernel.h), the
// MLP's activations (activation_kernel.h) and the decode steps' vector loops (step_kernel.h). The
// rest of the chunk algebra (gate tables, row scalings, reductions) is compiled once: compiled for
// AVX2, its helpers flattened into per-variant entry points, it ran 4-6 % fewer instructions in
// all (callgrind, 2026-12-07), for about 2.5 min of compiler time per x86 variant: not worth it.
#pragma once

#include "cpu/cpu_isa.h"
#include "cpu/matmul.h"
#include "titans_params.h"

// The x86 variants are compiled with per-function target attributes (matmul_kernel.h), so one
// build holds all of them. Only GCC builds them (clang would accept the attributes too, but is
// not tested); other compilers and architectures build the default variant only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TITANS_CPU_X86_VARIANTS 1
#else
#define TITANS_CPU_X86_VARIANTS 0
#endif

namespace titans::cpu {

// matmul (matmul.h) for M, N, K > 0.
template <typename T>
using MatmulFn = void (*)(bool trans_a, bool trans_b, int M, int N, int K, T alpha, const T* A, index_t lda,
                          const T* B, index_t ldb, T beta, T* C, index_t ldc, Triangular tri);
// activation (activation.h).
template <typename T>
using ActivationFn = void (*)(MlpActivation kind, index_t n, const T* x, T* value, T* first, T* second);

// One weight's update in a decode step (memory_step.cpp), over a [rows, cols] matrix:
// S' = eta S - theta x y^T and W' = beta W + S' (s == nullptr: S = 0; w == nullptr: W = w_default
// everywhere), and with read_vec given, read_out [rows] = read_scale W' read_vec.
template <typename T>
struct StepUpdate {
  index_t rows, cols;
  const T* w;
  const T* s;
  T w_default;
  const T* x;
  const T* y;
  T theta, eta, beta;
  T* w_out;
  T* s_out;
  const T* read_vec;
  T read_scale;
  T* read_out;
};

// The decode steps' vector loops (step_kernel.h), for row-major W [rows, cols]:
//   matvec             out [rows] = scale W x
//   matvec_transposed  out [cols] = (W^T x) .* slope
//   update             a StepUpdate
template <typename T>
struct StepKernels {
  void (*matvec)(const T* W, index_t rows, index_t cols, const T* x, T scale, T* out);
  void (*matvec_transposed)(const T* W, index_t rows, index_t cols, const T* x, const T* slope, T* out);
  void (*update)(const StepUpdate<T>& update);
};

struct IsaKernels {
  MatmulFn<float> matmul_f32;
  MatmulFn<double> matmul_f64;
  ActivationFn<float> activation_f32;
  ActivationFn<double> activation_f64;
  StepKernels<float> step_f32;
  StepKernels<double> step_f64;

  template <typename T>
  MatmulFn<T> matmul() const {
    if constexpr (sizeof(T) == sizeof(float)) return matmul_f32;
    else return matmul_f64;
  }
  template <typename T>
  ActivationFn<T> activation() const {
    if constexpr (sizeof(T) == sizeof(float)) return activation_f32;
    else return activation_f64;
  }
  template <typename T>
  const StepKernels<T>& step() const {
    if constexpr (sizeof(T) == sizeof(float)) return step_f32;
    else return step_f64;
  }
};

extern const IsaKernels kIsaKernelsDefault;
#if TITANS_CPU_X86_VARIANTS
extern const IsaKernels kIsaKernelsAvx2;
extern const IsaKernels kIsaKernelsAvx512;
#endif

// The kernels of the variant in use (cpu_isa()).
const IsaKernels& isa_kernels();

}  // namespace titans::cpu
