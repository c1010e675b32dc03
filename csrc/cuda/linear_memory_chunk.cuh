// Chunk-level pieces shared by the linear_memory kernels: where a block works in the sequence,
// the chunk products (each one tile loop, no barrier) and the state rows' loads and stores.
#pragma once

#include "cuda/common/operands.cuh"
#include "cuda/common/staging.cuh"
#include "cuda/common/tile_loops.cuh"
#include "device/device.h"
#include "titans_params.h"

namespace titans {
namespace lm {

using kernel::for_each_element;
using kernel::for_each_tile;
using kernel::tile_product;

// Offset of chunk n's start state in a contiguous [B, H, n_chunks, 2, Dv, Dk] buffer (M, then S
// at + Dv * Dk): the forward's chunk states and the backward's chunk cotangents.
__device__ __forceinline__ index_t chunk_state_offset(const LinearMemoryParams& p, index_t bh, int n) {
  return (bh * p.n_chunks + n) * 2 * index_t(p.dv) * p.dk;
}

// Tokens in chunk n (the last chunk may be short).
__device__ __forceinline__ int chunk_length(const LinearMemoryParams& p, int n) {
  const int left = p.seqlen - n * p.chunk_size;
  return left < p.chunk_size ? left : p.chunk_size;
}

// Value features in the tile starting at v0 (the last tile may be partial).
__device__ __forceinline__ int tile_rows(const LinearMemoryParams& p, int v0, int tile_v) {
  return p.dv - v0 < tile_v ? p.dv - v0 : tile_v;
}

// Where a block of a parallel kernel works: grid.x enumerates (chunk, value tile) with the tiles
// of one chunk adjacent (they read the same Q, K and gates), grid.y the head and grid.z the batch.
struct ChunkTileBlock {
  int n, tile, v0, rows;  // chunk, value tile, its first feature and its feature count
  int t0, L;              // the chunk's first token and its length
  __device__ ChunkTileBlock(const LinearMemoryParams& p, int tile_v)
      : n(blockIdx.x / ((p.dv + tile_v - 1) / tile_v)), tile(blockIdx.x % ((p.dv + tile_v - 1) / tile_v)),
        v0(tile * tile_v), rows(tile_rows(p, v0, tile_v)), t0(n * p.chunk_size), L(chunk_length(p, n)) {}
};

// E = 2 (K M0^T - V) for the block's value tile: calls emit(t, j, E[t, j]) for t < L, j < rows.
// With fragments, through ldmatrix from k_tile and m_tile (the keys and a bf16 copy of M0).
template <class Policy, typename T, class KOp, class VOp, class Ptr, class Tile, class Emit>
__device__ __forceinline__ void chunk_errors(int L, int rows, int dk, const KOp& K, const VOp& V, const Ptr& m0,
                                             bool fragments, const Tile& k_tile, const Tile& m_tile,
                                             const Emit& emit) {
  for_each_tile(L, rows, [&](int r0, int c0) {
    typename Policy::acc_t acc[4] = {};
    tile_product<Policy, false>(acc, r0, c0, L, rows, dk, K, [&](int d, int j) { return m0[j * dk + d]; }, fragments,
                                k_tile, m_tile);
    for_each_element(r0, c0, L, rows, [&](int t, int j, int i) { emit(t, j, T(2) * (T(acc[i]) - V(t, j))); });
  });
}

// G = Q K^T with the entries above the diagonal set to zero, into g [L, C]; with fragments,
// through ldmatrix from q_tile and k_tile.
template <class Policy, typename T, class QOp, class KOp, class Ptr, class Tile>
__device__ __forceinline__ void causal_scores(int L, int C, int dk, const QOp& Q, const KOp& K, const Ptr& g,
                                              bool fragments, const Tile& q_tile, const Tile& k_tile) {
  for_each_tile(L, L, [&](int r0, int c0) {
    typename Policy::acc_t acc[4] = {};
    tile_product<Policy, false>(acc, r0, c0, L, L, dk, Q, [&](int d, int i) { return K(i, d); }, fragments, q_tile,
                                k_tile);
    for_each_element(r0, c0, L, L, [&](int t, int i, int e) { g[t * C + i] = i <= t ? T(acc[e]) : T(0); });
  });
}

// X [L, 2 tile_v] = A [Z0; Z1]^T for two [rows, Dk] states stacked along the value index: X's
// column j holds A Z0[j]^T and column tile_v + j holds A Z1[j]^T (the columns of a partial
// tile's missing rows are not meaningful). With fragments, through ldmatrix from a_tile (A's rows)
// and z_tile (the bf16 stack [Z0; Z1] in rows 0.. and tile_v..).
template <class Policy, typename T, class AOp, class Ptr, class Tile>
__device__ __forceinline__ void stacked_state_product(int L, int rows, int dk, int tile_v, const AOp& A,
                                                      const Ptr& z0, const Ptr& z1, const Ptr& x, bool fragments,
                                                      const Tile& a_tile, const Tile& z_tile) {
  const auto stacked_t = [&](int d, int col) {
    const int j = col % tile_v;
    return j >= rows ? T(0) : col < tile_v ? z0[j * dk + d] : z1[j * dk + d];
  };
  for_each_tile(L, 2 * tile_v, [&](int r0, int c0) {
    typename Policy::acc_t acc[4] = {};
    tile_product<Policy, false>(acc, r0, c0, L, 2 * tile_v, dk, A, stacked_t, fragments, a_tile, z_tile);
    for_each_element(r0, c0, L, 2 * tile_v, [&](int t, int col, int i) { x[t * 2 * tile_v + col] = T(acc[i]); });
  });
}

// dst0[i], dst1[i] = src0[offset + i], src1[offset + i] for i < n; a null source gives zeros.
template <typename T, class Ptr>
__device__ __forceinline__ void load_state_pair(const T* src0, const T* src1, index_t offset, int n, const Ptr& dst0,
                                                const Ptr& dst1) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    dst0[i] = src0 ? src0[offset + i] : T(0);
    dst1[i] = src1 ? src1[offset + i] : T(0);
  }
}

// dst0[offset + i], dst1[offset + i] = src0[i], src1[i] for i < n.
template <typename T, class Ptr>
__device__ __forceinline__ void store_state_pair(const Ptr& src0, const Ptr& src1, index_t offset, int n, T* dst0,
                                                 T* dst1) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    dst0[offset + i] = src0[i];
    dst1[offset + i] = src1[i];
  }
}

}  // namespace lm
}  // namespace titans
