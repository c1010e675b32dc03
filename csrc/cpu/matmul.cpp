#include "cpu/matmul.h"

#include "cpu/isa_kernels.h"

namespace titans::cpu {
namespace {

template <typename T>
void matmul_impl(bool trans_a, bool trans_b, int M, int N, int K, T alpha, const T* A, index_t lda, const T* B,
                 index_t ldb, T beta, T* C, index_t ldc, Triangular tri) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  isa_kernels().matmul<T>()(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, tri);
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
