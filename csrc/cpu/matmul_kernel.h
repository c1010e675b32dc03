// The register-tiled matrix product behind matmul.h, compiled once per instruction-set variant
// (torch-free).
//
// Included only by the variant files isa_<variant>.cpp (and the C++ check of the product). Each
// defines TITANS_ISA_TARGET (its target attribute, empty for the default variant) before the
// include and instantiates matmul_tiled<GeometryTile<its tile>, T> (isa_tiles.h): the Tile type
// lives in this header's anonymous namespace, so every function here has internal linkage and the
// variants' copies can never be merged at link time (a COMDAT merge could run AVX2 code on a CPU
// without it). The standard library's inline functions keep the baseline
// target; GCC inlines them into the variant code.
//
// A Tile gives the vector width in bytes (kBytes) and the micro-tile of C held in registers:
// kRows rows of kVecs vectors. Per k the micro-tile loads kVecs vectors of row k of B and
// broadcasts kRows entries of column k of A into kRows * kVecs multiply-adds, so the accumulators,
// the B vectors and one broadcast must fit the register file (checked in the disassembly: no
// stack traffic in the k loop). A is read in place (its entries are broadcast, so either
// layout works); B is packed one panel (kVecs vectors wide) at a time into a contiguous block.
//
// The products of the chunk kernels are small (tens to a few hundred rows, columns and depth)
// and live in L1/L2, so there is no cache blocking: one B panel at a time, all row blocks of A.
#pragma once

#include <algorithm>
#include <vector>

#include "cpu/isa_tiles.h"
#include "cpu/matmul.h"

#ifndef TITANS_ISA_TARGET
#error "define TITANS_ISA_TARGET (the variant's target attribute) before including matmul_kernel.h"
#endif

namespace titans::cpu {
namespace {

// The Tile of the geometry G (isa_tiles.h).
template <TileGeometry G>
struct GeometryTile {
  static constexpr int kBytes = G.bytes, kRows = G.rows, kVecs = G.vecs;
};

template <class Tile, typename T>
struct TileShape {
  static constexpr int kLanes = Tile::kBytes / int(sizeof(T));
  static constexpr int kRows = Tile::kRows;
  static constexpr int kVecs = Tile::kVecs;
  static constexpr int kCols = kLanes * kVecs;  // panel width
  typedef T Vec __attribute__((vector_size(Tile::kBytes)));
  // The same vector at the element type's alignment: loads and stores of rows at any offset.
  typedef T UnalignedVec __attribute__((vector_size(Tile::kBytes), aligned(sizeof(T))));
};

// Transposes of square blocks for the packing of a transposed B: dst row i (row stride
// dst_stride) = column i of the block at src (row stride src_stride), with one vector load and
// store per row and log2(size) shuffles per row instead of one scalar move per entry. 16-byte
// rows (4 x 4 floats, 2 x 2 doubles) in every variant; 32-byte rows (8 x 8 floats: unpacks,
// in-lane shuffles and 128-bit lane permutes under AVX; 4 x 4 doubles) where the variant has them.
// (The vector types are spelled out, not template parameters: a template parameter would drop
// their aligned(...) attribute, and with it the unaligned loads.)
typedef float Float4 __attribute__((vector_size(16), aligned(4)));
typedef float Float8 __attribute__((vector_size(32), aligned(4)));
typedef double Double2 __attribute__((vector_size(16), aligned(8)));
typedef double Double4 __attribute__((vector_size(32), aligned(8)));

TITANS_ISA_TARGET inline void transpose_4x4(const float* src, index_t src_stride, float* dst, index_t dst_stride) {
  Float4 r[4];
  for (int i = 0; i < 4; ++i) r[i] = *reinterpret_cast<const Float4*>(src + i * src_stride);
  const Float4 t0 = __builtin_shufflevector(r[0], r[1], 0, 4, 1, 5);
  const Float4 t1 = __builtin_shufflevector(r[0], r[1], 2, 6, 3, 7);
  const Float4 t2 = __builtin_shufflevector(r[2], r[3], 0, 4, 1, 5);
  const Float4 t3 = __builtin_shufflevector(r[2], r[3], 2, 6, 3, 7);
  *reinterpret_cast<Float4*>(dst) = __builtin_shufflevector(t0, t2, 0, 1, 4, 5);
  *reinterpret_cast<Float4*>(dst + dst_stride) = __builtin_shufflevector(t0, t2, 2, 3, 6, 7);
  *reinterpret_cast<Float4*>(dst + 2 * dst_stride) = __builtin_shufflevector(t1, t3, 0, 1, 4, 5);
  *reinterpret_cast<Float4*>(dst + 3 * dst_stride) = __builtin_shufflevector(t1, t3, 2, 3, 6, 7);
}

TITANS_ISA_TARGET inline void transpose_8x8(const float* src, index_t src_stride, float* dst, index_t dst_stride) {
  Float8 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = *reinterpret_cast<const Float8*>(src + i * src_stride);
  for (int i = 0; i < 8; i += 2) {  // rows a, b -> a0 b0 a1 b1 | a4 b4 a5 b5 and a2 b2 a3 b3 | a6 b6 a7 b7
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {  // u[i + c] = column c | column c + 4 of rows i .. i + 3
    u[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int c = 0; c < 4; ++c) {
    *reinterpret_cast<Float8*>(dst + c * dst_stride) = __builtin_shufflevector(u[c], u[c + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    *reinterpret_cast<Float8*>(dst + (c + 4) * dst_stride) =
        __builtin_shufflevector(u[c], u[c + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}

TITANS_ISA_TARGET inline void transpose_2x2(const double* src, index_t src_stride, double* dst,
                                               index_t dst_stride) {
  Double2 r[2];
  for (int i = 0; i < 2; ++i) r[i] = *reinterpret_cast<const Double2*>(src + i * src_stride);
  *reinterpret_cast<Double2*>(dst) = __builtin_shufflevector(r[0], r[1], 0, 2);
  *reinterpret_cast<Double2*>(dst + dst_stride) = __builtin_shufflevector(r[0], r[1], 1, 3);
}

TITANS_ISA_TARGET inline void transpose_4x4(const double* src, index_t src_stride, double* dst,
                                               index_t dst_stride) {
  Double4 r[4];
  for (int i = 0; i < 4; ++i) r[i] = *reinterpret_cast<const Double4*>(src + i * src_stride);
  const Double4 t0 = __builtin_shufflevector(r[0], r[1], 0, 4, 2, 6);  // a0 b0 a2 b2
  const Double4 t1 = __builtin_shufflevector(r[0], r[1], 1, 5, 3, 7);  // a1 b1 a3 b3
  const Double4 t2 = __builtin_shufflevector(r[2], r[3], 0, 4, 2, 6);
  const Double4 t3 = __builtin_shufflevector(r[2], r[3], 1, 5, 3, 7);
  *reinterpret_cast<Double4*>(dst) = __builtin_shufflevector(t0, t2, 0, 1, 4, 5);
  *reinterpret_cast<Double4*>(dst + dst_stride) = __builtin_shufflevector(t1, t3, 0, 1, 4, 5);
  *reinterpret_cast<Double4*>(dst + 2 * dst_stride) = __builtin_shufflevector(t0, t2, 2, 3, 6, 7);
  *reinterpret_cast<Double4*>(dst + 3 * dst_stride) = __builtin_shufflevector(t1, t3, 2, 3, 6, 7);
}

// The transpose of an S x S block, S = kBlockBytes / sizeof(T).
template <int kBlockBytes, typename T>
TITANS_ISA_TARGET inline void transpose_block(const T* src, index_t src_stride, T* dst, index_t dst_stride) {
  if constexpr (kBlockBytes == 32 && sizeof(T) == 4) transpose_8x8(src, src_stride, dst, dst_stride);
  else if constexpr (kBlockBytes == 32) transpose_4x4(src, src_stride, dst, dst_stride);
  else if constexpr (sizeof(T) == 4) transpose_4x4(src, src_stride, dst, dst_stride);
  else transpose_2x2(src, src_stride, dst, dst_stride);
}

// The panel of B's columns j0 .. j0 + cols - 1 (cols <= the panel width P) as a K x P row-major
// block, columns past cols zero. trans_b: B is stored N x K (column j of op(B) is row j of B).
// Every panel is packed, even when B's rows could be read in place: the block is contiguous, so
// its rows never collide in the cache sets, whatever B's row stride (the token rows of a
// [B, T, H, D] tensor are H * D apart, often a power of two).
template <class Tile, typename T>
TITANS_ISA_TARGET void pack_panel(bool trans_b, int K, int cols, const T* B, index_t ldb, int j0, T* panel) {
  using Shape = TileShape<Tile, T>;
  using UnalignedVec = typename Shape::UnalignedVec;
  constexpr int P = Shape::kCols, V = Shape::kVecs, L = Shape::kLanes;
  if (!trans_b) {
    for (int k = 0; k < K; ++k) {
      const T* src = B + k * ldb + j0;
      T* row = panel + index_t(k) * P;
      if (cols == P) {
        for (int v = 0; v < V; ++v)
          *reinterpret_cast<UnalignedVec*>(row + v * L) = *reinterpret_cast<const UnalignedVec*>(src + v * L);
      } else {
        for (int j = 0; j < cols; ++j) row[j] = src[j];
        for (int j = cols; j < P; ++j) row[j] = T(0);
      }
    }
    return;
  }
  // Transpose blocks of up to 32 bytes a row (wider ones would need cross-lane shuffles).
  constexpr int kBlockBytes = std::min(Tile::kBytes, 32);
  constexpr int S = kBlockBytes / int(sizeof(T));
  const T* src = B + index_t(j0) * ldb;
  int j = 0;
  for (; j + S <= cols; j += S) {
    int k = 0;
    for (; k + S <= K; k += S)
      transpose_block<kBlockBytes>(src + j * ldb + k, ldb, panel + index_t(k) * P + j, P);
    for (; k < K; ++k)
      for (int i = 0; i < S; ++i) panel[index_t(k) * P + j + i] = src[(j + i) * ldb + k];
  }
  // The columns left over by the blocks, and the zero padding of a partial panel. Most panels
  // have neither: the loop over K is skipped, not run empty (it was ~20 % of the packing time).
  if (j == cols && cols == P) return;
  for (int k = 0; k < K; ++k) {
    T* row = panel + index_t(k) * P;
    for (int i = j; i < cols; ++i) row[i] = src[i * ldb + k];
    std::fill(row + cols, row + P, T(0));
  }
}

// Starts loading the part of B that pack_panel reads for the panel at column j0, into the
// cache: issued one panel ahead, it overlaps with the products of the current panel. A panel's
// rows of B are a row stride apart (or, transposed, K elements long), and often cold: the
// backward reads the chunk-start states it saved in the forward from memory, and the hardware
// prefetchers do not follow one cache line per row far enough ahead.
template <class Tile, typename T>
TITANS_ISA_TARGET void prefetch_panel(bool trans_b, int K, int cols, const T* B, index_t ldb, int j0) {
  constexpr int kLine = 64 / int(sizeof(T));
  if (!trans_b) {
    for (int k = 0; k < K; ++k) {
      const T* row = B + k * ldb + j0;
      __builtin_prefetch(row);
      __builtin_prefetch(row + cols - 1);  // the row's part may straddle two lines
      asm volatile("" : : "r"(row));      // keeps the loop (prefetch_rows, kernel_utils.h)
    }
    return;
  }
  for (int j = 0; j < cols; ++j) {
    const T* row = B + index_t(j0 + j) * ldb;
    for (int k = 0; k < K; k += kLine) {
      __builtin_prefetch(row + k);
      asm volatile("" : : "r"(row + k));
    }
    __builtin_prefetch(row + K - 1);
  }
}

// C[0:R, 0:cols] = beta C + alpha A[0:R, :] B_panel (beta == 0: C is not read), with A's element
// (r, k) at A[k * lda + r] (kTransA) or A[r * lda + k], and the panel's row k at B + k * ldb.
template <class Tile, typename T, int R, bool kTransA>
TITANS_ISA_TARGET void micro_tile(int K, const T* A, index_t lda, const T* B, index_t ldb, T alpha, T beta, T* C,
                                     index_t ldc, int cols) {
  using Shape = TileShape<Tile, T>;
  using Vec = typename Shape::Vec;
  using UnalignedVec = typename Shape::UnalignedVec;
  constexpr int V = Shape::kVecs, L = Shape::kLanes;
  Vec acc[R][V];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[r][v] = Vec{};
  for (int k = 0; k < K; ++k) {
    Vec b[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) b[v] = *reinterpret_cast<const UnalignedVec*>(B + k * ldb + v * L);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const T a = kTransA ? A[k * lda + r] : A[r * lda + k];
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] += a * b[v];
    }
  }
  if (cols == Shape::kCols) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        UnalignedVec* c = reinterpret_cast<UnalignedVec*>(C + r * ldc + v * L);
        *c = beta == T(0) ? alpha * acc[r][v] : beta * *c + alpha * acc[r][v];
      }
    return;
  }
  // Unrolled, as above: an accumulator indexed at run time would live in memory, not registers.
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    T out[Shape::kCols];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) *reinterpret_cast<UnalignedVec*>(out + v * L) = acc[r][v];
    T* c = C + r * ldc;
    for (int j = 0; j < cols; ++j) c[j] = beta == T(0) ? alpha * out[j] : beta * c[j] + alpha * out[j];
  }
}

// The last rows = M mod kRows (1 .. kRows - 1) rows: micro_tile<rows>.
template <class Tile, typename T, bool kTransA, int R = Tile::kRows - 1>
TITANS_ISA_TARGET void last_rows_tile(int rows, int K, const T* A, index_t lda, const T* B, index_t ldb, T alpha,
                                         T beta, T* C, index_t ldc, int cols) {
  if constexpr (R >= 1) {
    if (rows == R) micro_tile<Tile, T, R, kTransA>(K, A, lda, B, ldb, alpha, beta, C, ldc, cols);
    else last_rows_tile<Tile, T, kTransA, R - 1>(rows, K, A, lda, B, ldb, alpha, beta, C, ldc, cols);
  }
}

// Every row block of C against the panel of B's columns j0 .. j0 + cols - 1 (packed, or B itself:
// rows ldp apart; C points at column j0), skipping what the triangular structure tri says is zero or not wanted: row blocks wholly
// above the diagonal (kLowerC) and the zero part of the depth (kLowerA, kUpperA).
template <class Tile, typename T, bool kTransA>
TITANS_ISA_TARGET void panel_product(Triangular tri, int M, int K, T alpha, const T* A, index_t lda,
                                        const T* panel, index_t ldp, T beta, T* C, index_t ldc, int j0, int cols) {
  constexpr int MR = Tile::kRows;
  // Steps in A of one row and one unit of depth.
  const index_t row_step = kTransA ? 1 : lda, depth_step = kTransA ? lda : 1;
  for (int i0 = tri == Triangular::kLowerC ? j0 / MR * MR : 0; i0 < M; i0 += MR) {
    const int rows = std::min(MR, M - i0);
    int k0 = 0, k1 = K;
    if (tri == Triangular::kLowerA) k1 = std::min(K, i0 + rows);
    if (tri == Triangular::kUpperA) k0 = std::min(K, i0);
    const T* a = A + i0 * row_step + k0 * depth_step;
    const T* b = panel + index_t(k0) * ldp;
    if (rows == MR) micro_tile<Tile, T, MR, kTransA>(k1 - k0, a, lda, b, ldp, alpha, beta, C + i0 * ldc, ldc, cols);
    else last_rows_tile<Tile, T, kTransA>(rows, k1 - k0, a, lda, b, ldp, alpha, beta, C + i0 * ldc, ldc, cols);
  }
}

template <class Tile, typename T>
TITANS_ISA_TARGET void matmul_tiled(bool trans_a, bool trans_b, int M, int N, int K, T alpha, const T* A,
                                       index_t lda, const T* B, index_t ldb, T beta, T* C, index_t ldc,
                                       Triangular tri) {
  constexpr int P = TileShape<Tile, T>::kCols;
  // Per thread: the kernels call this from several workers at once.
  thread_local std::vector<T> panel;
  panel.resize(size_t(K) * P);
  // With one row block (the chunk's rows at small chunk sizes) a packed panel would be read once:
  // the copy costs about what the product does, so whole panels of an untransposed B are read in
  // place, rows ldb apart (a partial panel is packed: the micro-tile reads whole vectors).
  const bool in_place = !trans_b && M <= Tile::kRows;
  for (int j0 = 0; j0 < N; j0 += P) {
    const int cols = std::min(P, N - j0);
    const T* b = B + j0;
    index_t ldp = ldb;
    if (!in_place || cols < P) {
      pack_panel<Tile, T>(trans_b, K, cols, B, ldb, j0, panel.data());
      if (j0 + P < N) prefetch_panel<Tile, T>(trans_b, K, std::min(P, N - j0 - P), B, ldb, j0 + P);
      b = panel.data();
      ldp = P;
    }
    if (trans_a) panel_product<Tile, T, true>(tri, M, K, alpha, A, lda, b, ldp, beta, C + j0, ldc, j0, cols);
    else panel_product<Tile, T, false>(tri, M, K, alpha, A, lda, b, ldp, beta, C + j0, ldc, j0, cols);
  }
}

}  // namespace
}  // namespace titans::cpu
