// Staging and the pipelined chunk loop. Tiles go from global to shared memory through cp.async,
// so that a sequential kernel can load chunk n + 1 while it computes on chunk n. Memory-type
// agnostic: per-token tensors are the [B, T, H, D] TokenTensors of titans_params.h.
#pragma once

#include <cstdint>

#include "device/device.h"
#include "titans_params.h"

namespace titans {
namespace kernel {

// Offset of (b, t, h, feature 0) in a per-token tensor.
__device__ __forceinline__ index_t token_offset(const TokenTensor& x, int b, int t, int h) {
  return index_t(b) * x.batch_stride + index_t(t) * x.seq_stride + index_t(h) * x.head_stride;
}

// Offset of (b, t, h, feature 0) in a contiguous [B, T, H, D] tensor.
__device__ __forceinline__ index_t contiguous_token_offset(int b, int t, int h, int seqlen, int heads, int d) {
  return ((index_t(b) * seqlen + t) * heads + h) * d;
}

// Staging. Tiles go from global to shared memory through cp.async, so that the sequential
// kernels can load chunk n + 1 while they compute on chunk n. A staging call only issues the
// copies: the caller commits them (device::cp_async_commit), waits for them
// (device::cp_async_wait) and then passes a __syncthreads before any thread reads the tile.
// Rows whose starts are not all 16-byte aligned (odd feature counts, strided views) are copied
// element by element instead, which is complete at once.

__device__ __forceinline__ bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Copies rows r < count of `width` elements, row r from src + row_offset(r), into
// dst + r * dst_stride: in 16-byte pieces when `vectors` (the caller has checked that every row
// start, in global and in shared memory, is 16-byte aligned and that width fills whole pieces).
template <typename T, class RowOffset, class Dst>
__device__ __forceinline__ void stage_rows_async(const T* src, const RowOffset& row_offset, int count, int width,
                                                 int dst_stride, bool vectors, const Dst& dst) {
  constexpr int kPiece = 16 / sizeof(T);
  if (vectors) {
    const int pieces = width / kPiece;
    for (int idx = threadIdx.x; idx < count * pieces; idx += blockDim.x) {
      const int r = idx / pieces, at = idx % pieces * kPiece;
      device::cp_async_16(dst + (r * dst_stride + at), src + (row_offset(r) + at));
    }
  } else {
    for (int idx = threadIdx.x; idx < count * width; idx += blockDim.x) {
      const int r = idx / width, col = idx % width;
      dst[r * dst_stride + col] = src[row_offset(r) + col];
    }
  }
}

// dst[0 .. n) = src[0 .. n) (dst 16-byte aligned, as every carved array is).
template <typename T, class Dst>
__device__ __forceinline__ void stage_span(const T* src, int n, const Dst& dst) {
  const bool vectors = aligned16(src) && n % (16 / sizeof(T)) == 0;
  stage_rows_async(src, [](int) { return index_t(0); }, 1, n, n, vectors, dst);
}

// Tokens t0..t0+L-1 of a token tensor, features [col0, col0 + width), into a [L, dst_stride]
// array of its own dtype.
template <typename T, class Dst>
__device__ __forceinline__ void stage_token_rows(const TokenTensor& x, int b, int h, int t0, int L, int col0,
                                                 int width, int dst_stride, const Dst& dst) {
  constexpr int kPiece = 16 / sizeof(T);
  const bool vectors = aligned16(x.ptr) && x.batch_stride % kPiece == 0 && x.seq_stride % kPiece == 0 &&
                       x.head_stride % kPiece == 0 && col0 % kPiece == 0 && width % kPiece == 0 &&
                       dst_stride % kPiece == 0;
  stage_rows_async(static_cast<const T*>(x.ptr), [&](int t) { return token_offset(x, b, t0 + t, h) + col0; }, L,
                   width, dst_stride, vectors, dst);
}

// The same for a contiguous [B, T, H, D] tensor (a workspace).
template <typename T, class Dst>
__device__ __forceinline__ void stage_contiguous_token_rows(const T* src, int seqlen, int heads, int d, int b, int h,
                                                            int t0, int L, int col0, int width, int dst_stride,
                                                            const Dst& dst) {
  constexpr int kPiece = 16 / sizeof(T);
  const bool vectors = aligned16(src) && d % kPiece == 0 && col0 % kPiece == 0 && width % kPiece == 0 &&
                       dst_stride % kPiece == 0;
  stage_rows_async(src, [&](int t) { return contiguous_token_offset(b, t0 + t, h, seqlen, heads, d) + col0; }, L,
                   width, dst_stride, vectors, dst);
}

// The chunk loop of a sequential kernel, software-pipelined over two buffers: chunk i + 1 (in walk
// order; reverse: from the last chunk down) is staged by stage(n, buffer) while body(n, buffer)
// computes on chunk i. body runs after a barrier that follows the wait for its chunk's copies, and
// a barrier follows it, so the next stage may overwrite the buffer it read.
template <class Stage, class Body>
__device__ __forceinline__ void pipelined_chunk_loop(int n_chunks, bool reverse, const Stage& stage, const Body& body) {
  const auto chunk = [&](int i) { return reverse ? n_chunks - 1 - i : i; };
  if (n_chunks > 0) stage(chunk(0), 0);
  device::cp_async_commit();
  for (int i = 0; i < n_chunks; ++i) {
    const int buffer = i & 1;
    if (i + 1 < n_chunks) stage(chunk(i + 1), buffer ^ 1);
    device::cp_async_commit();  // possibly an empty group, so that wait<1> always means "chunk i"
    device::cp_async_wait<1>();
    __syncthreads();
    body(chunk(i), buffer);
    __syncthreads();
  }
  device::cp_async_wait<0>();
}

// Completes this thread's staging at once (the parallel kernels, which stage once); a
// __syncthreads must still follow before other threads read the tiles.
__device__ __forceinline__ void finish_staging() {
  device::cp_async_commit();
  device::cp_async_wait<0>();
}

}  // namespace kernel
}  // namespace titans
