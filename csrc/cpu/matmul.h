// Small dense matrix products for the CPU kernels (torch-free).
//
// The chunk algebra is made of products of at most a few hundred rows and columns (chunk,
// head dim, hidden width), too small for a BLAS call to pay off per (batch, head) and thread,
// so the kernels use this one routine: operands are packed into row-major panels, then a
// register-blocked micro-kernel written with GCC vector extensions runs over them. The
// micro-kernel is compiled for several x86-64 levels and picked at load time (ifunc), so a
// wheel built on any machine still uses AVX2/AVX-512 where the CPU has them.
#pragma once

#include <cstdint>

namespace titans::cpu {

using index_t = int64_t;

// C = beta * C + alpha * op(A) op(B), with op(A): M x K, op(B): K x N, C: M x N, all row-major
// with leading dimensions lda, ldb, ldc (elements). trans_a / trans_b: the stored matrix is the
// transpose (A stored K x M, B stored N x K). beta == 0 overwrites C without reading it.
void matmul(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, index_t lda,
            const float* B, index_t ldb, float beta, float* C, index_t ldc);
void matmul(bool trans_a, bool trans_b, int M, int N, int K, double alpha, const double* A, index_t lda,
            const double* B, index_t ldb, double beta, double* C, index_t ldc);

}  // namespace titans::cpu
