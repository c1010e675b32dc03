// The matrix product of each compiled instruction-set variant (matmul_<variant>.cpp), which
// matmul.cpp dispatches to (torch-free).
#pragma once

#include "cpu/cpu_isa.h"
#include "cpu/matmul.h"

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

struct MatmulVariant {
  MatmulFn<float> f32;
  MatmulFn<double> f64;
};

extern const MatmulVariant kMatmulDefault;
#if TITANS_CPU_X86_VARIANTS
extern const MatmulVariant kMatmulAvx2;
extern const MatmulVariant kMatmulAvx512;
#endif

}  // namespace titans::cpu
