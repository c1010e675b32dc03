// Small dense matrix products for the CPU kernels (torch-free).
//
// The chunk algebra is made of products of tens to a few hundred rows, columns and depth (chunk,
// head dim, hidden width), issued one (batch, head) sequence at a time from each worker thread.
// This one routine serves them all: B is packed one column panel at a time, and a register-tiled
// micro-kernel sized for the instruction-set variant in use (cpu_isa.h, matmul_kernel.h) runs
// over the panels. On these shapes it runs at the rate torch.bmm reaches on batches of them
// (README, "CPU kernels"), without a call into torch per product or batching of the sequential
// chunk loop.
#pragma once

#include <cstdint>

namespace titans::cpu {

using index_t = int64_t;

// Triangular structure a product may declare, so that the part known to be zero or not wanted
// is skipped (the causal C x C products of the chunk read-outs: about half their work).
enum class Triangular {
  kNone,
  kLowerC,  // only the lower triangle of C (j <= i) is wanted; C above it may or may not be written
  kLowerA,  // op(A) is lower triangular: op(A)[i][k] == 0 for k > i
  kUpperA,  // op(A) is upper triangular: op(A)[i][k] == 0 for k < i
};

// C = beta * C + alpha * op(A) op(B), with op(A): M x K, op(B): K x N, C: M x N, all row-major
// with leading dimensions lda, ldb, ldc (elements). trans_a / trans_b: the stored matrix is the
// transpose (A stored K x M, B stored N x K). beta == 0 overwrites C without reading it.
void matmul(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, index_t lda,
            const float* B, index_t ldb, float beta, float* C, index_t ldc, Triangular tri = Triangular::kNone);
void matmul(bool trans_a, bool trans_b, int M, int N, int K, double alpha, const double* A, index_t lda,
            const double* B, index_t ldb, double beta, double* C, index_t ldc, Triangular tri = Triangular::kNone);

}  // namespace titans::cpu
