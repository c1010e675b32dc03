// Where a linear_memory kernel's block works in the sequence and in the state, shared by the
// kernels.
#pragma once

#include "cuda/common/staging.cuh"
#include "device/device.h"
#include "titans_params.h"

namespace titans {
namespace lm {

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
