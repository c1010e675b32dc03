#include "cpu/matmul.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace titans::cpu {
namespace {

// One micro-kernel source, compiled per x86-64 level and selected at load time. Functions it
// inlines (always_inline below) are compiled for the clone's level too.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TITANS_ISA_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define TITANS_ISA_CLONES
#endif
#define TITANS_ALWAYS_INLINE inline __attribute__((always_inline))

// 64-byte vectors: one AVX-512 register, two AVX2 registers, four SSE registers.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
  static constexpr int kWidth = 16;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
  static constexpr int kWidth = 8;
};

// Rows of C per micro-tile: 6 x 2 AVX2 accumulators + 2 for B fit the 16 ymm registers, and
// give the FMA units six independent chains.
constexpr int kTileRows = 6;

// acc[r] = sum_k A[r, k] * B[k, 0:width] for R rows of A (element (r, k) at r * a_row + k * a_col,
// so a transposed A needs no packing: it is read as scalars anyway) and one vector-wide column
// block of B (row stride ldb).
template <typename T, int R>
TITANS_ALWAYS_INLINE void micro_tile(int K, const T* A, index_t a_row, index_t a_col, const T* B, index_t ldb,
                                     typename Vec<T>::type* acc) {
  using V = typename Vec<T>::type;
  for (int r = 0; r < R; ++r) acc[r] = V{};
  for (int k = 0; k < K; ++k) {
    V b;
    std::memcpy(&b, B + k * ldb, sizeof(V));
    const T* a = A + k * a_col;
    for (int r = 0; r < R; ++r) acc[r] += a[r * a_row] * b;
  }
}

// C = beta C + alpha A B with A: M x K (strides a_row, a_col), B: K x N whose rows can be read
// vector-wide up to the next multiple of the vector width (row stride ldb).
template <typename T>
TITANS_ALWAYS_INLINE void matmul_padded_b(int M, int N, int K, T alpha, const T* A, index_t a_row, index_t a_col,
                                          const T* B, index_t ldb, T beta, T* C, index_t ldc) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::kWidth;
  V acc[kTileRows];
  for (int j0 = 0; j0 < N; j0 += W) {
    const int cols = std::min(W, N - j0);
    for (int i0 = 0; i0 < M; i0 += kTileRows) {
      const int rows = std::min(kTileRows, M - i0);
      const T* a = A + i0 * a_row;
      const T* b = B + j0;
      switch (rows) {
        case 6: micro_tile<T, 6>(K, a, a_row, a_col, b, ldb, acc); break;
        case 5: micro_tile<T, 5>(K, a, a_row, a_col, b, ldb, acc); break;
        case 4: micro_tile<T, 4>(K, a, a_row, a_col, b, ldb, acc); break;
        case 3: micro_tile<T, 3>(K, a, a_row, a_col, b, ldb, acc); break;
        case 2: micro_tile<T, 2>(K, a, a_row, a_col, b, ldb, acc); break;
        default: micro_tile<T, 1>(K, a, a_row, a_col, b, ldb, acc); break;
      }
      for (int r = 0; r < rows; ++r) {
        T out[W];
        std::memcpy(out, &acc[r], sizeof(V));
        T* c = C + (i0 + r) * ldc + j0;
        if (beta == T(0)) {
          for (int j = 0; j < cols; ++j) c[j] = alpha * out[j];
        } else {
          for (int j = 0; j < cols; ++j) c[j] = beta * c[j] + alpha * out[j];
        }
      }
    }
  }
}

// Overloads, not a template: target_clones applies to plain functions.
TITANS_ISA_CLONES void matmul_padded_b_isa(int M, int N, int K, float alpha, const float* A, index_t a_row,
                                           index_t a_col, const float* B, index_t ldb, float beta, float* C,
                                           index_t ldc) {
  matmul_padded_b<float>(M, N, K, alpha, A, a_row, a_col, B, ldb, beta, C, ldc);
}

TITANS_ISA_CLONES void matmul_padded_b_isa(int M, int N, int K, double alpha, const double* A, index_t a_row,
                                           index_t a_col, const double* B, index_t ldb, double beta, double* C,
                                           index_t ldc) {
  matmul_padded_b<double>(M, N, K, alpha, A, a_row, a_col, B, ldb, beta, C, ldc);
}

template <typename T>
void matmul_impl(bool trans_a, bool trans_b, int M, int N, int K, T alpha, const T* A, index_t lda, const T* B,
                 index_t ldb, T beta, T* C, index_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
    return;
  }
  // The micro-kernel reads B rows vector-wide: pack B when it is transposed or its width is not
  // a whole number of vectors (padding columns are zero: computed, never stored). Per-thread
  // panel: the kernels call this from at::parallel_for workers.
  constexpr int W = Vec<T>::kWidth;
  if (trans_b || N % W != 0) {
    thread_local std::vector<T> b_panel;
    const int padded = (N + W - 1) / W * W;
    b_panel.resize(static_cast<size_t>(K) * padded);
    for (int k = 0; k < K; ++k) {
      T* row = b_panel.data() + static_cast<size_t>(k) * padded;
      if (trans_b) {
        for (int j = 0; j < N; ++j) row[j] = B[j * ldb + k];
      } else {
        std::memcpy(row, B + k * ldb, sizeof(T) * N);
      }
      std::fill(row + N, row + padded, T(0));
    }
    B = b_panel.data();
    ldb = padded;
  }
  const index_t a_row = trans_a ? 1 : lda, a_col = trans_a ? lda : 1;
  matmul_padded_b_isa(M, N, K, alpha, A, a_row, a_col, B, ldb, beta, C, ldc);
}

}  // namespace

void matmul(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, index_t lda,
            const float* B, index_t ldb, float beta, float* C, index_t ldc) {
  matmul_impl<float>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void matmul(bool trans_a, bool trans_b, int M, int N, int K, double alpha, const double* A, index_t lda,
            const double* B, index_t ldb, double beta, double* C, index_t ldc) {
  matmul_impl<double>(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace titans::cpu
