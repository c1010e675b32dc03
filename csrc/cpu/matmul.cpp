#include "cpu/matmul.h"

#include "cpu/cpu_isa.h"
#include "cpu/matmul_variants.h"

namespace titans::cpu {
namespace {

const MatmulVariant& variant_in_use() {
  switch (cpu_isa()) {
#if TITANS_CPU_X86_VARIANTS
    case CpuIsa::kAvx2:
      return kMatmulAvx2;
    case CpuIsa::kAvx512:
      return kMatmulAvx512;
#endif
    default:
      return kMatmulDefault;
  }
}

template <typename T>
MatmulFn<T> kernel_in_use() {
  if constexpr (sizeof(T) == sizeof(float)) return variant_in_use().f32;
  else return variant_in_use().f64;
}

template <typename T>
void matmul_impl(bool trans_a, bool trans_b, int M, int N, int K, T alpha, const T* A, index_t lda, const T* B,
                 index_t ldb, T beta, T* C, index_t ldc, Triangular tri) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  kernel_in_use<T>()(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, tri);
}

}  // namespace

void matmul(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, index_t lda,
            const float* B, index_t ldb, float beta, float* C, index_t ldc, Triangular tri) {
  matmul_impl<float>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, tri);
}

void matmul(bool trans_a, bool trans_b, int M, int N, int K, double alpha, const double* A, index_t lda,
            const double* B, index_t ldb, double beta, double* C, index_t ldc, Triangular tri) {
  matmul_impl<double>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, tri);
}

}  // namespace titans::cpu
