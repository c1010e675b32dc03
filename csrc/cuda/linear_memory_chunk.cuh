// Where a linear_memory kernel's block works in the sequence and in the state, shared by the
// kernels.
#pragma once

#include "cuda/common/objective.cuh"
#include "cuda/common/smem.cuh"
#include "cuda/common/staging.cuh"
#include "device/device.h"
#include "titans_params.h"

namespace titans {
namespace lm {

// Offset of the checkpoint that holds chunk n's start state, or, when n is not a multiple of the
// stride, the one before it, in [B, H, ceil(n_chunks / stride), 2, Dv, Dk].
__device__ __forceinline__ index_t checkpoint_offset(const LinearMemoryParams& p, index_t bh, int n, int stride) {
  return (bh * ((p.n_chunks + stride - 1) / stride) + n / stride) * 2 * index_t(p.dv) * p.dk;
}

using kernel::chunk_length;

// Value features in the tile starting at v0 (the last tile may be partial).
__device__ __forceinline__ int tile_rows(const LinearMemoryParams& p, int v0, int tile_v) {
  return p.dv - v0 < tile_v ? p.dv - v0 : tile_v;
}

// The stack [X; Y] of a block's rows [v0, v0 + rows) of two states of a [B, H, Dv, Dk] layout
// (M and S, or their cotangents), each half kTileV rows: loaded from contiguous compute_t states at
// `offset` (null: zeros) into the compute_t master (when kMaster; [2 kTileV, dk16]) and the operand
// tile, zero past the rows and past Dk.
template <int kTileV, bool kMaster, typename compute_t, typename operand_t>
__device__ __forceinline__ void load_state_stack(const compute_t* first, const compute_t* second, index_t offset,
                                                 int rows, int dk, int dk16,
                                                 const device::SharedPtr<compute_t>& master,
                                                 const kernel::PaddedTile<operand_t>& tile) {
  for (int idx = threadIdx.x; idx < 2 * kTileV * dk16; idx += blockDim.x) {
    const int r = idx / dk16, d = idx % dk16, j = r % kTileV;
    const compute_t* src = r < kTileV ? first : second;
    const compute_t value = j < rows && d < dk && src ? src[offset + index_t(j) * dk + d] : compute_t(0);
    if constexpr (kMaster) master[idx] = value;
    tile(r, d) = device::cast<operand_t>(value);
  }
}

// Stores rows [0, rows) of both halves of a stack, value(r, d) for stack row r, to two outputs of a
// [.., Dv, Dk] layout at `offset` (the block's first row).
template <int kTileV, typename out_t, class Value>
__device__ __forceinline__ void store_state_stack(out_t* first, out_t* second, index_t offset, int rows, int dk,
                                                  const Value& value) {
  for (int idx = threadIdx.x; idx < 2 * rows * dk; idx += blockDim.x) {
    const int which = idx / (rows * dk), j = idx % (rows * dk) / dk, d = idx % dk;
    (which == 0 ? first : second)[offset + index_t(j) * dk + d] = device::cast<out_t>(value(which * kTileV + j, d));
  }
}

// The error map of the MIRAS objective on a block's residuals (docs/miras.md §2.1): E = f(R) with
// R = K W0^T - V at the chunk-start weights, elementwise, so a value tile or slice needs only its
// own rows (yaad's switch reads the token's norm over all of Dv and does not run on these kernels).
// The thresholds delta are read, only when the objective has them, from the contiguous
// [B, T, H, Dv] tensor in compute_t (MirasParams::delta_ptr), where d_delta has the same layout.
template <typename compute_t>
struct ChunkObjective {
  kernel::Objective<compute_t> f;
  const compute_t* delta;
  int seqlen, heads, dv;

  __device__ __forceinline__ explicit ChunkObjective(const LinearMemoryParams& p)
      : f(p.miras), delta(static_cast<const compute_t*>(p.miras.delta_ptr)), seqlen(p.seqlen), heads(p.heads),
        dv(p.dv) {}

  __device__ __forceinline__ bool has_delta() const { return f.uses_delta(); }
  // Offset of token t's value feature j in the [B, T, H, Dv] layout of delta and d_delta.
  __device__ __forceinline__ index_t at(int b, int t, int h, int j) const {
    return kernel::contiguous_token_offset(b, t, h, seqlen, heads, dv) + j;
  }
  // Token t's threshold of feature j; padding (inside == false) gets 1, where r = 0.
  __device__ __forceinline__ compute_t threshold(bool inside, int b, int t, int h, int j) const {
    return has_delta() && inside ? delta[at(b, t, h, j)] : compute_t(1);
  }
  __device__ __forceinline__ compute_t error(compute_t r, compute_t threshold) const {
    return f.error(r, threshold, compute_t(0));
  }
  __device__ __forceinline__ compute_t slope(compute_t r, compute_t threshold) const {
    return f.slope(r, threshold, compute_t(0));
  }
  __device__ __forceinline__ compute_t delta_slope(compute_t r, compute_t threshold) const {
    return f.delta_slope(r, threshold, compute_t(0));
  }
};

}  // namespace lm
}  // namespace titans
