// Where a linear_memory kernel's block works in the sequence and in the state, shared by the
// kernels.
#pragma once

#include "cuda/common/objective.cuh"
#include "cuda/common/operands.cuh"
#include "cuda/common/retention.cuh"
#include "cuda/common/sequences.cuh"
#include "cuda/common/smem.cuh"
#include "cuda/common/staging.cuh"
#include "cuda/common/tile_loops.cuh"
#include "device/device.h"
#include "titans_params.h"

namespace titans {
namespace lm {

// Offset of the checkpoint that holds chunk n's start state, or, when n is not a multiple of the
// stride, the one before it, in [B, H, slots, 2, Dv, Dk], slots = sequence_units(params, stride)
// of the launch's params (ceil(n_chunks / stride) without cu_seqlens).
__device__ __forceinline__ index_t checkpoint_offset(const LinearMemoryParams& p, index_t slots, index_t bh, int n,
                                                     int stride) {
  return (bh * slots + n / stride) * 2 * index_t(p.dv) * p.dk;
}

// The params block z works with (sequences.cuh): the launch's, or with cu_seqlens those of
// sequence z's view, its state rows and its checkpoints (every `stride`-th chunk's) included.
template <typename input_t>
__device__ __forceinline__ LinearMemoryParams sequence_view(const LinearMemoryParams& launch, int z, int stride) {
  using compute_t = kernel::compute_type<input_t>;
  if (!launch.cu_seqlens) return launch;
  LinearMemoryParams p = launch;
  const kernel::SequenceSpan s = kernel::view_sequence<input_t, compute_t>(p, z, p.dv);
  kernel::advance_all<compute_t>(index_t(z) * p.heads * p.dv * p.dk, p.m0_ptr, p.s0_ptr, p.m_final_ptr,
                                 p.s_final_ptr);
  kernel::advance_all<input_t>(index_t(s.begin) * p.heads * p.dv, p.o_ptr);
  kernel::advance_all<input_t>(kernel::first_unit(launch, z, stride) * 2 * p.dv * p.dk, p.chunk_states_ptr);
  return p;
}

// The same for the backward: the forward's fields, dO, the gradients, the final state's
// cotangents and dm0, ds0.
template <typename input_t>
__device__ __forceinline__ LinearMemoryBwdParams sequence_view(const LinearMemoryBwdParams& launch, int z,
                                                               int stride) {
  using compute_t = kernel::compute_type<input_t>;
  if (!launch.cu_seqlens) return launch;
  LinearMemoryBwdParams p = launch;
  static_cast<LinearMemoryParams&>(p) = sequence_view<input_t>(static_cast<const LinearMemoryParams&>(launch), z,
                                                               stride);
  kernel::view_sequence_grads<input_t, compute_t>(p, kernel::packed_sequence(launch, z), p.heads, p.dk, p.dv);
  kernel::advance_all<compute_t>(index_t(z) * p.heads * p.dv * p.dk, p.d_m_final_ptr, p.d_s_final_ptr, p.dm0_ptr,
                                 p.ds0_ptr);
  return p;
}

// The store of the cotangent of group g's end state (g below the sequence's groups - 1, written by
// the reverse scan, read by the chunk kernel's block of group g) for the block of sequence (or
// batch row) z at bh in its view: [B, H, n_groups - 1, 2, Dv, Dk], or with cu_seqlens
// [1, H, sequence_units(launch, group), 2, Dv, Dk] from sequence z's first unit on.
template <typename checkpoint_t>
__device__ __forceinline__ checkpoint_t* group_cotangent(const LinearMemoryParams& launch, void* store, int z,
                                                         index_t bh, int g, int group) {
  const index_t per_head =
      launch.cu_seqlens ? sequence_units(launch, group) : (launch.n_chunks + group - 1) / group - 1;
  const index_t first = launch.cu_seqlens ? kernel::first_unit(launch, z, group) : 0;
  return static_cast<checkpoint_t*>(store) + (bh * per_head + first + g) * 2 * index_t(launch.dv) * launch.dk;
}

using kernel::chunk_length;

// Value features in the tile starting at v0 (the last tile may be partial).
__device__ __forceinline__ int tile_rows(const LinearMemoryParams& p, int v0, int tile_v) {
  return p.dv - v0 < tile_v ? p.dv - v0 : tile_v;
}

// The stack [X; Y] of a block's rows [v0, v0 + rows) of two states of a [B, H, Dv, Dk] layout
// (M and S, or their cotangents), each half kTileV rows: loaded from contiguous compute_t states at
// `offset` (null: first_fill for X, zeros for Y) into the compute_t master (when kMaster;
// [2 kTileV, dk16]) and the operand tile, zero past the rows and past Dk.
template <int kTileV, bool kMaster, typename compute_t, typename operand_t>
__device__ __forceinline__ void load_state_stack(const compute_t* first, const compute_t* second, index_t offset,
                                                 int rows, int dk, int dk16,
                                                 const device::SharedPtr<compute_t>& master,
                                                 const kernel::PaddedTile<operand_t>& tile, compute_t first_fill) {
  for (int idx = threadIdx.x; idx < 2 * kTileV * dk16; idx += blockDim.x) {
    const int r = idx / dk16, d = idx % dk16, j = r % kTileV;
    const compute_t* src = r < kTileV ? first : second;
    const compute_t fill = r < kTileV ? first_fill : compute_t(0);
    const compute_t value = j < rows && d < dk ? (src ? src[offset + index_t(j) * dk + d] : fill) : compute_t(0);
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
// own rows, except for yaad's switch, which also reads the token's residual norm over all of Dv
// (`norm`; the kernels compute it over one tile of all of Dv, or across the slices).
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
  __device__ __forceinline__ compute_t error(compute_t r, compute_t threshold, compute_t norm = 0) const {
    return f.error(r, threshold, norm);
  }
  __device__ __forceinline__ compute_t slope(compute_t r, compute_t threshold, compute_t norm = 0) const {
    return f.slope(r, threshold, norm);
  }
  __device__ __forceinline__ compute_t delta_slope(compute_t r, compute_t threshold, compute_t norm = 0) const {
    return f.delta_slope(r, threshold, norm);
  }
};

// Retention kl's lag token (token 0 of the chunk at t0, docs/miras.md §2.3): its residuals and errors
// at the memory before it, r_j = M_j . k0 - v0_j, e_j = f(r_j), for a block's value rows j < rows
// (feature v_base + j), a warp per row: m(j, d), k0(d), v0(j); out(j, r_j, threshold_j, e_j); `norm`:
// yaad's, the lag residual's norm over all of Dv.
template <typename compute_t, class M, class K0, class V0, class Out>
__device__ __forceinline__ void lag_errors(const ChunkObjective<compute_t>& objective, int rows, int dk, const M& m,
                                           const K0& k0, const V0& v0, int b, int t0, int h, int v_base,
                                           const Out& out, compute_t norm = compute_t(0)) {
  for (int j = device::warp_id(); j < rows; j += kernel::warp_count()) {
    compute_t dot = 0;
    for (int d = device::lane_id(); d < dk; d += device::kWarpSize) dot += m(j, d) * k0(d);
    dot = device::warp_reduce_sum(dot);
    if (device::lane_id() != 0) continue;
    const compute_t r = dot - v0(j), delta = objective.threshold(true, b, t0, h, v_base + j);
    out(j, r, delta, objective.error(r, delta, norm));
  }
}

// norm[t] = ||resid[t, :]|| for the rows t < rows of a [rows, width] compute_t array: a warp per row.
template <typename compute_t>
__device__ __forceinline__ void row_norms(int rows, int width, const device::SharedPtr<compute_t>& resid,
                                          const device::SharedPtr<compute_t>& norm) {
  for (int t = device::warp_id(); t < rows; t += kernel::warp_count()) {
    compute_t sum = 0;
    for (int j = device::lane_id(); j < width; j += device::kWarpSize) sum += resid[t * width + j] * resid[t * width + j];
    sum = device::warp_reduce_sum(sum);
    if (device::lane_id() == 0) norm[t] = fmath::sqrt(sum);
  }
}

}  // namespace lm
}  // namespace titans
