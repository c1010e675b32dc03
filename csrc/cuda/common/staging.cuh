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

// Tokens in chunk n of a sequence (the last chunk may be short).
__device__ __forceinline__ int chunk_length(const SequenceParams& p, int n) {
  const int left = p.seqlen - n * p.chunk_size;
  return left < p.chunk_size ? left : p.chunk_size;
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

// rows x width elements of a row-major matrix (leading dimension src_ld) into dst (leading
// dimension dst_ld), in 16-byte pieces where every row start allows it.
template <typename T, class Dst>
__device__ __forceinline__ void stage_matrix(const T* src, int src_ld, int rows, int width, int dst_ld, const Dst& dst) {
  constexpr int kPiece = 16 / sizeof(T);
  const bool vectors = aligned16(src) && src_ld % kPiece == 0 && width % kPiece == 0 && dst_ld % kPiece == 0;
  stage_rows_async(src, [&](int r) { return index_t(r) * src_ld; }, rows, width, dst_ld, vectors, dst);
}

// The software pipeline of a sequential kernel: step i + 1's copies are issued while step i
// computes. At the top of step i every thread waits for its copies (step i's), a barrier publishes
// them and guarantees that every thread is done with step i - 1, so stage(i + 1) may overwrite the
// buffers step i - 1 read; then body(i) runs. Buffers alternate between even and odd steps. body
// must not leave copies of its own pending; a barrier must follow the loop before its buffers are
// reused.
template <class Stage, class Body>
__device__ __forceinline__ void pipelined_steps(int steps, const Stage& stage, const Body& body) {
  if (steps > 0) stage(0);
  device::cp_async_commit();
  for (int i = 0; i < steps; ++i) {
    device::cp_async_wait<0>();
    __syncthreads();
    if (i + 1 < steps) stage(i + 1);
    device::cp_async_commit();
    body(i);
  }
  device::cp_async_wait<0>();
}

// Completes this thread's staging at once; a __syncthreads must still follow before other threads
// read the tiles.
__device__ __forceinline__ void finish_staging() {
  device::cp_async_commit();
  device::cp_async_wait<0>();
}

// Tokens t0..t0+L-1 of a [B, T, H] per-token scalar (a gate) into dst[0 .. L): element copies,
// since consecutive tokens lie H elements apart.
template <typename T, class Dst>
__device__ __forceinline__ void stage_token_scalars(const TokenTensor& x, int b, int h, int t0, int L, const Dst& dst) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "gates are fp32 or fp64");
  const T* src = static_cast<const T*>(x.ptr);
  for (int t = threadIdx.x; t < L; t += blockDim.x) {
    if constexpr (sizeof(T) == 4)
      device::cp_async_4(dst + t, src + token_offset(x, b, t0 + t, h));
    else
      device::cp_async_8(dst + t, src + token_offset(x, b, t0 + t, h));
  }
}

}  // namespace kernel
}  // namespace titans
