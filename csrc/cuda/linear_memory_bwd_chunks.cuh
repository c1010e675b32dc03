// The chunk kernel of the linear memory's backward: every gradient, chunk by chunk, from the
// checkpoints and the cotangent of each chunk's end state (docs/backward_linear.md §1-2).
//
// One block per (group of consecutive chunks, head, batch), covering all of Dv: per chunk it walks
// the value features in slices of kSlice rows (as flash-linear-attention's chunk_bwd_dqkwg loops
// over value blocks), and everything that contracts over Dv, dQ, dK, dW = dO E^T and the row-wise
// gate cotangents, accumulates on chip across the slices (dQ, dK, dW in registers), so no partial
// sum ever goes through global memory; the chunk's tail then finishes dQ and dK with the dG terms
// and runs the gate adjoint. The block walks its chunks in reverse and carries the cotangent from
// one to the next on chip (the carry update is value-local, so each slice updates its own rows),
// so only the end cotangent of each group comes from memory: the final state's, or the reverse
// scan's (linear_memory_bwd_scan.cuh). With one group per sequence there is no scan and nothing but
// the inputs, checkpoints and gradients moves; with one chunk per group every chunk runs in
// parallel.
//
// Per chunk of L tokens (token read; for the chunk_start read U, W, dW, dG and the a, g factors are
// absent):
//   setup:   gate tables c, sig, a, g, P; G = Q K^T (kept in registers); W = G .* c
//   a slice: R = K M0^T - V, E = f(R), X | Y = K [dM; dS]^T, Q M0^T | Q S0^T, U = W^T dO
//            dE = diag(m) X + diag(s) Y + U,  dR = dE .* f'(R),  dV = -dR,  d delta = dE .* df/d delta
//            row cotangents <e, x>, <e, y>, <dO, Q M0^T>, <dO, Q S0^T> (summed over the slices)
//            dW += dO E^T, dQ += [diag(a) dO | diag(g) dO] [M0; S0],
//            dK += [diag(m) E | diag(s) E | dR] [dM; dS; M0]
//            the carry: dM0 = a_L dM + dR^T K + (diag(a) dO)^T Q, dS0 = g_L dM + p dS + (diag(g) dO)^T Q
//   tail:    d_c = dW .* G, dG = dW .* c;  dQ += dG K,  dK += dG^T Q;  the gate adjoint
// f is the objective's elementwise error map (2r, f' = 2 for l2; ChunkObjective, docs/miras.md
// §2.1). Its R is per element, so the slices stay independent; but the reverse scan carries the
// cotangent through R's linear l2 map only, so a non-l2 objective runs one group per sequence.
// The stacks let one product serve several terms: [dM; dS; M0; S0] is one tile, and dK reads its
// first three quarters, dQ its last two, X | Y and E its quarters transposed.
//
// With 16-bit inputs the forward checkpoints every other chunk (Types::kCheckpointStride): an odd
// chunk's start state is recomputed per slice, one chunk step from the checkpoint of the chunk
// before it (its keys and gates are staged one chunk ahead, which the reverse walk needs next
// anyway, and its values' slice beside the chunk's):
//   E' = f(K' M0'^T - V'),  M0 = a'_L M0' + g'_L S0' + (diag(m') E')^T K',  S0 = p' S0' + (diag(s') E')^T K'.
#pragma once

#include "cuda/common/smem.cuh"
#include "cuda/common/staging.cuh"
#include "cuda/common/tile_loops.cuh"
#include "cuda/linear_memory_bwd.h"
#include "cuda/linear_memory_chunk.cuh"
#include "cuda/linear_memory_gates.cuh"
#include "cuda/linear_memory_launch.cuh"

namespace titans {
namespace lm {

constexpr int kChunkThreads = 256;
// Register strips per warp of the accumulators kept across a chunk's slices: [C, C] (G, dW) and
// [C, Dk] (dQ, dK) in 16 x 16 strips over 8 warps, for C <= 64 and Dk <= 128.
constexpr int kSquareStripsPerWarp = 2, kKeyStripsPerWarp = 4;

// The four row-wise cotangents a slice sums over its value features, per token.
enum RowCotangent { kErrX = 0, kErrY = 1, kOutM = 2, kOutS = 3 };

// The setup of kl with yaad (the chunk's token norms at the lagged memory, over all of Dv): per warp,
// the squared residuals of the value rows it walks, per token ([warps, C16]), and one lagged memory
// row ([warps, dk16]); then the lag token's own residual norm at the memory before it.
template <typename compute_t>
struct KlYaadNorms {
  device::SharedPtr<compute_t> base;
  int chunk16, dk16;
  __host__ __device__ static constexpr int size(int chunk16, int dk16) {
    return kChunkThreads / device::kWarpSize * (chunk16 + dk16) + 1;
  }
  __device__ __forceinline__ compute_t& squares(int warp, int t) const { return base[warp * chunk16 + t]; }
  __device__ __forceinline__ compute_t& row(int warp, int d) const {
    return base[kChunkThreads / device::kWarpSize * chunk16 + warp * dk16 + d];
  }
  __device__ __forceinline__ compute_t& lag_norm() const { return base[size(chunk16, dk16) - 1]; }
};

// Shared memory of the chunk kernel (byte offsets; tiles are PaddedTiles).
template <typename input_t, int kSlice>
struct ChunksLayout {
  using T = Types<input_t>;
  kernel::SmemLayout smem;
  int chunk16, dk16;
  int carry;                // compute_t [2 Dv, dk16]: [dM; dS] of every value feature (carry only)
  kernel::TileSlot q;       // 2 x input_t [C, Dk]: the chunk's, and the next chunk's while it loads
  kernel::TileSlot k;       // kChunkBuffers x input_t [C, Dk]: the keys of the chunk, the next ...
  int gates;                // kChunkBuffers x ChunkGates: ... and with recompute the one after
  int rows, prev_rows;      // ChunkGateRows: the chunk's, and with recompute the chunk before's
  int c, sig, P;            // compute_t [C, C], [C, C], [C]: the full tables, then the adjoint's products
  int d_c, d_a, d_g, d_s, dc_last, d_p, prod;  // the coefficient cotangents; prod: 3 x [C]
  int scratch;              // compute_t [kBlockSums warps]: block sums
  int norm;                 // compute_t [C]: yaad's residual norms of the chunk's tokens over Dv
  int lag;                  // compute_t [5 kSlice + dk16]: kl's lag token, LagRows
  int lag_norms;            // compute_t [warps (C16 + dk16) + 1]: kl with yaad, KlYaadNorms
  int partials;             // compute_t [4][C][kSlice / 8]: a slice's row cotangents per 8 columns
  kernel::TileSlot w;       // operand_t [C, C]: W, then dG
  kernel::TileSlot v, d_o;  // 2 x input_t [C, kSlice]: a slice's values and output cotangent
  kernel::TileSlot v_prev;  // 2 x input_t [C, kSlice]: with recompute, the chunk before's values
  kernel::TileSlot stack;   // 2 x operand_t [4 kSlice, Dk]: [dM; dS; M0; S0] of a slice
  kernel::TileSlot err, dk_lhs, dq_lhs;  // operand_t [C, kSlice], [C, 3 kSlice], [C, 2 kSlice]
  // The block sums of a chunk: <dM, M0>, <dM, S0>, <dS, S0> and lq's two parts of d rho0.
  static constexpr int kBlockSums = 5;
  bool recompute;           // odd chunks' start states are recomputed (checkpoint stride 2)
  int chunk_buffers;
  __host__ __device__ ChunksLayout(int dk, int dv, int chunk, bool token_read, bool with_carry,
                                   const MirasParams& miras)
      : chunk16(kernel::round_up(chunk, kernel::kTileGranule)), dk16(kernel::round_up(dk, kernel::kTileGranule)),
        recompute(T::checkpoint_stride(miras) > 1), chunk_buffers(recompute ? 3 : 2) {
    using compute_t = typename T::compute_t;
    using operand_t = typename T::operand_t;
    const int C16 = chunk16;
    carry = smem.array<compute_t>(with_carry ? 2 * dv * dk16 : 0);
    q = smem.tiles<input_t>(2, chunk, dk);
    k = smem.tiles<input_t>(chunk_buffers, chunk, dk);
    gates = smem.array<compute_t>(chunk_buffers * ChunkGates<compute_t>::size(C16));
    rows = smem.array<compute_t>(ChunkGateRows<compute_t>::size(C16));
    prev_rows = smem.array<compute_t>(recompute ? ChunkGateRows<compute_t>::size(C16) : 0);
    c = smem.array<compute_t>(C16 * C16);
    sig = smem.array<compute_t>(C16 * C16);
    P = smem.array<compute_t>(C16);
    d_c = smem.array<compute_t>(C16 * C16);
    d_a = smem.array<compute_t>(C16), d_g = smem.array<compute_t>(C16), d_s = smem.array<compute_t>(C16);
    dc_last = smem.array<compute_t>(C16), d_p = smem.array<compute_t>(1), prod = smem.array<compute_t>(3 * C16);
    scratch = smem.array<compute_t>(kBlockSums * kChunkThreads / device::kWarpSize);
    norm = smem.array<compute_t>(miras.objective == ObjectiveKind::yaad ? C16 : 0);
    lag = smem.array<compute_t>(miras.retention == RetentionKind::kl ? 5 * kSlice + dk16 : 0);
    const bool kl_yaad = miras.retention == RetentionKind::kl && miras.objective == ObjectiveKind::yaad;
    lag_norms = smem.array<compute_t>(kl_yaad ? KlYaadNorms<compute_t>::size(C16, dk16) : 0);
    partials = smem.array<compute_t>(4 * C16 * (kSlice / 8));
    w = smem.tile<operand_t>(token_read ? chunk : 0, token_read ? chunk : 0);
    v = smem.tiles<input_t>(2, chunk, kSlice);
    d_o = smem.tiles<input_t>(2, chunk, kSlice);
    v_prev = smem.tiles<input_t>(2, recompute ? chunk : 0, recompute ? kSlice : 0);
    stack = smem.tiles<operand_t>(2, 4 * kSlice, dk);
    err = smem.tile<operand_t>(chunk, kSlice);
    dk_lhs = smem.tile<operand_t>(chunk, 3 * kSlice);
    dq_lhs = smem.tile<operand_t>(chunk, 2 * kSlice);
  }
};

// The cotangent [dM; dS] of all Dv that the chunk kernel carries across its chunks: in shared
// memory ([2 Dv, dk16]), or, where that does not fit beside the chunk's tiles (a non-l2
// objective's whole-sequence group at large Dv and Dk, docs/kernels.md §6.1.12), in the block's own
// rows of dm0 and ds0, the outputs it ends as ([Dv, Dk] each). Either way an element is read and
// written by the threads that own it between the block's barriers; columns past Dk are not kept.
template <typename compute_t>
struct CarriedCotangent {
  device::SharedPtr<compute_t> shared;
  compute_t *global_m, *global_s;  // null: in shared memory
  int dv, dk, dk16;
  __device__ __forceinline__ compute_t& operator()(int which, int row, int d) const {
    if (global_m) return (which == 0 ? global_m : global_s)[index_t(row) * dk + d];
    return shared[(which * dv + row) * dk16 + d];
  }
};

// rows x dk elements of a [.., Dk] state at src into tile (rows 0 .. rows), in the tile's type:
// by cp.async when the types agree (the checkpoints of bf16, fp32, fp64 inputs), else converted
// by plain loads (fp16 checkpoints, fp32 cotangents into bf16 or fp32 operands). A null source
// gives zeros.
template <typename src_t, typename dst_t>
__device__ __forceinline__ void stage_state_rows(const src_t* src, int rows, int dk,
                                                 const kernel::PaddedTile<dst_t>& tile) {
  if constexpr (std::is_same<src_t, dst_t>::value) {
    if (src) return kernel::stage_matrix(src, dk, rows, dk, tile.ld, tile.data);
  }
  for (int idx = threadIdx.x; idx < rows * dk; idx += blockDim.x)
    tile(idx / dk, idx % dk) = device::cast<dst_t>(src ? device::cast<float>(src[idx]) : 0.f);
}

// kl's lag token at a slice's rows: its residual, threshold, error and error cotangent, its
// residual's cotangent, and the key's cotangent summed over the slices.
template <typename compute_t, int kSlice>
struct LagRows {
  device::SharedPtr<compute_t> r, delta, e, de, dr, dk0;
  __device__ __forceinline__ explicit LagRows(const device::SharedPtr<compute_t>& base)
      : r(base), delta(base + kSlice), e(base + 2 * kSlice), de(base + 3 * kSlice), dr(base + 4 * kSlice),
        dk0(base + 5 * kSlice) {}
};

template <typename input_t, int kSlice>
__global__ void __launch_bounds__(kChunkThreads, 1)
    linear_memory_bwd_chunks_kernel(LinearMemoryBwdParams launch, LinearMemoryBwdWorkspace workspace, int group,
                                    bool with_carry, bool global_carry) {
  using T = Types<input_t>;
  using compute_t = typename T::compute_t;
  using operand_t = typename T::operand_t;
  using checkpoint_t = typename T::checkpoint_t;
  using Policy = typename T::Policy;
  using acc_t = typename Policy::acc_t;
  using kernel::PaddedTile;
  static_assert(!std::is_same<input_t, device::fp16>::value || !std::is_same<checkpoint_t, operand_t>::value,
                "fp16 checkpoints are converted to fp32 operands");

  // Block (x, z) runs group x of batch row z. With cu_seqlens the grid has one x per entry of
  // sequence_units(launch, group) (sequences.h: no host sync sizes it), and block x runs group
  // x - first_unit(z) of the sequence z that holds entry x, in its view; blocks past the
  // sequence's groups (one of an empty sequence's runs, for dM0) have nothing to do.
  const int z = launch.cu_seqlens ? kernel::sequence_of_unit(launch, blockIdx.x, group) : int(blockIdx.z);
  const int group_index =
      launch.cu_seqlens ? int(index_t(blockIdx.x) - kernel::first_unit(launch, z, group)) : int(blockIdx.x);
  const int kStride = T::checkpoint_stride(launch.miras);
  const LinearMemoryBwdParams params = sequence_view<input_t>(launch, z, kStride);
  const index_t checkpoint_slots = sequence_units(launch, kStride);
  const int h = blockIdx.y, b = kernel::batch_row(launch, z);
  const int dk = params.dk, dv = params.dv, C = params.chunk_size, n_chunks = params.n_chunks;
  if (group_index < 0 || (group_index > 0 && group_index * group >= n_chunks)) return;
  const bool token_read = params.read_token;
  const ChunksLayout<input_t, kSlice> at(dk, dv, C, token_read, with_carry && !global_carry, params.miras);
  const int C16 = at.chunk16, dk16 = at.dk16;
  const int g0 = group_index * group, g1 = g0 + group < n_chunks ? g0 + group : n_chunks;
  const int n_groups = (n_chunks + group - 1) / group;
  const bool last_group = group_index + 1 >= n_groups;
  const int n_slices = (dv + kSlice - 1) / kSlice, steps = (g1 - g0) * n_slices;
  const auto chunk_of = [&](int i) { return g1 - 1 - i / n_slices; };
  const auto slice_rows = [&](int v0) { return dv - v0 < kSlice ? dv - v0 : kSlice; };

  const int kChunkBuffers = at.chunk_buffers;
  // Buffers by the chunk's place in the block's walk, ci: q alternates, and with recompute the
  // keys and gates run one chunk ahead in a ring of three (chunk ci + 1 is the one before chunk ci).
  const auto q_tile = [&](int ci) { return PaddedTile<input_t>(at.q, ci % 2); };
  const auto k_tile = [&](int ci) { return PaddedTile<input_t>(at.k, ci % kChunkBuffers); };
  const auto v_tile = [&](int i) { return PaddedTile<input_t>(at.v, i); };
  const auto v_prev_tile = [&](int i) { return PaddedTile<input_t>(at.v_prev, i); };
  const auto do_tile = [&](int i) { return PaddedTile<input_t>(at.d_o, i); };
  const auto stack_tile = [&](int i) { return PaddedTile<operand_t>(at.stack, i); };
  const auto gates = [&](int ci) {
    return ChunkGates<compute_t>(
        kernel::shared_array<compute_t>(at.gates) + ci % kChunkBuffers * ChunkGates<compute_t>::size(C16), C16);
  };
  const ChunkGateRows<compute_t> g_rows(kernel::shared_array<compute_t>(at.rows), C16);
  const ChunkGateRows<compute_t> prev_rows(kernel::shared_array<compute_t>(at.prev_rows), C16);
  const ChunkGateTables<compute_t> tables{kernel::shared_array<compute_t>(at.c), kernel::shared_array<compute_t>(at.sig),
                                          kernel::shared_array<compute_t>(at.P), C16, true};
  const auto prod = kernel::shared_array<compute_t>(at.prod);
  const GateCotangents<compute_t> cot{kernel::shared_array<compute_t>(at.d_c),
                                      C16,
                                      kernel::shared_array<compute_t>(at.d_a),
                                      kernel::shared_array<compute_t>(at.d_g),
                                      kernel::shared_array<compute_t>(at.d_s),
                                      kernel::shared_array<compute_t>(at.d_p),
                                      prod,
                                      prod + C16,
                                      prod + 2 * C16};
  const auto dc_last = kernel::shared_array<compute_t>(at.dc_last);
  const auto scratch = kernel::shared_array<compute_t>(at.scratch);
  const auto partials = kernel::shared_array<compute_t>(at.partials);
  const auto partial = [&](int which, int t, int part) { return (which * C16 + t) * (kSlice / 8) + part; };
  const PaddedTile<operand_t> w(at.w), err(at.err), dk_lhs(at.dk_lhs), dq_lhs(at.dq_lhs);
  const ChunkObjective<compute_t> objective(params);
  auto* d_delta_out = static_cast<compute_t*>(params.d_delta_ptr);
  // The whole-state options (checkpoint stride 1, so no chunk is recomputed): yaad's token norms
  // and lq's rho0 come at the chunk's setup from its checkpoint over all of Dv.
  const bool yaad = objective.f.uses_norm(), lq = params.miras.retention == RetentionKind::lq;
  const bool kl = params.miras.retention == RetentionKind::kl;
  const auto norm = kernel::shared_array<compute_t>(at.norm);
  const LagRows<compute_t, kSlice> lag(kernel::shared_array<compute_t>(at.lag));
  const KlYaadNorms<compute_t> lag_norms{kernel::shared_array<compute_t>(at.lag_norms), C16, dk16};
  // kl with read "chunk_start": every token reads the memory before the lag token, so dQ and the
  // reads' share of the start cotangent belong to the checkpoint's state, not the lagged one.
  const bool reads_before_lag = kl && !token_read;
  compute_t lag_gate_partials[3] = {};  // this thread's share of the lag token's d theta, d eta, d beta
  const compute_t lq_q = compute_t(params.miras.q);
  compute_t rho = compute_t(1), lq_sum = compute_t(0);

  for (int i = 0; i < kChunkBuffers; ++i) k_tile(i).zero_all();
  for (int i = 0; i < 2; ++i) {
    q_tile(i).zero_all();
    v_tile(i).zero_all();
    do_tile(i).zero_all();
    if (at.recompute) v_prev_tile(i).zero_all();
    stack_tile(i).zero_all();
  }
  // The cotangent of the end of the block's last chunk: the final state's, or the scan's store.
  const index_t bh = index_t(b) * params.heads + h;
  const auto* d_final_m = static_cast<const compute_t*>(params.d_m_final_ptr);
  const auto* d_final_s = static_cast<const compute_t*>(params.d_s_final_ptr);
  const checkpoint_t* group_end =
      last_group ? nullptr
                 : group_cotangent<checkpoint_t>(launch, workspace.group_cotangents, z, bh, group_index, group);
  // The carry in global memory: the block's rows of dm0, ds0 in its view (its sequence's with
  // cu_seqlens).
  auto* dm0 = static_cast<compute_t*>(params.dm0_ptr);
  auto* ds0 = static_cast<compute_t*>(params.ds0_ptr);
  const CarriedCotangent<compute_t> carry{kernel::shared_array<compute_t>(at.carry),
                                          global_carry ? dm0 + bh * index_t(dv) * dk : nullptr,
                                          global_carry ? ds0 + bh * index_t(dv) * dk : nullptr, dv, dk, dk16};
  if (with_carry)
    for (int idx = threadIdx.x; idx < 2 * dv * dk; idx += blockDim.x) {
      const int r = idx / dk, d = idx % dk, which = r / dv, j = r % dv;
      const index_t at_row = index_t(j) * dk + d;
      compute_t value = compute_t(0);
      if (!last_group)
        value = device::cast<compute_t>(group_end[which * index_t(dv) * dk + at_row]);
      else if (const compute_t* src = which == 0 ? d_final_m : d_final_s)
        value = src[bh * index_t(dv) * dk + at_row];
      carry(which, j, d) = value;
    }
  __syncthreads();

  const auto* checkpoints = static_cast<const checkpoint_t*>(params.chunk_states_ptr);
  auto* dq_out = static_cast<input_t*>(params.dq_ptr);
  auto* dk_out = static_cast<input_t*>(params.dk_ptr);
  auto* dv_out = static_cast<input_t*>(params.dv_ptr);

  // The keys and gates of chunk m, for the walk's chunk ci.
  const auto stage_keys = [&](int ci, int m) {
    const int L = chunk_length(params, m);
    const PaddedTile<input_t> k = k_tile(ci);
    kernel::stage_token_rows<input_t>(params.k, b, h, m * C, L, 0, dk, k.ld, k.data);
    if (L < C) k.zero_outside(L, k.cols);
    gates(ci).stage(params, b, h, m * C, L);
  };
  const auto stage = [&](int i) {
    const int n = chunk_of(i), slice = i % n_slices, L = chunk_length(params, n), v0 = slice * kSlice;
    const int w_rows = slice_rows(v0), buffer = i & 1, ci = i / n_slices;
    const bool recompute = n % kStride != 0;
    if (slice == 0) {
      const PaddedTile<input_t> q = q_tile(ci);
      kernel::stage_token_rows<input_t>(params.q, b, h, n * C, L, 0, dk, q.ld, q.data);
      if (L < C) q.zero_outside(L, q.cols);
      if (at.recompute) {
        if (ci == 0) stage_keys(0, n);
        if (n > g0 || recompute) stage_keys(ci + 1, n - 1);
      } else {
        stage_keys(ci, n);
      }
    }
    if (recompute) {  // the chunk before's values, for its step to this chunk's start
      const PaddedTile<input_t> v_prev = v_prev_tile(buffer);
      kernel::stage_token_rows<input_t>(params.v, b, h, (n - 1) * C, C, v0, w_rows, v_prev.ld, v_prev.data);
      if (w_rows < kSlice) v_prev.zero_outside(C, w_rows);
    }
    const PaddedTile<input_t> v = v_tile(buffer), d_o = do_tile(buffer);
    kernel::stage_token_rows<input_t>(params.v, b, h, n * C, L, v0, w_rows, v.ld, v.data);
    kernel::stage_token_rows<input_t>(params.d_o, b, h, n * C, L, v0, w_rows, d_o.ld, d_o.data);
    if (L < C || w_rows < kSlice) {
      v.zero_outside(L, w_rows);
      d_o.zero_outside(L, w_rows);
    }
    // The slice's rows of the checkpoint (the chunk's start, or the chunk before's): M0, S0 into
    // the stack's last two quarters.
    const PaddedTile<operand_t> stack = stack_tile(buffer);
    const checkpoint_t* at_chunk =
        checkpoints + checkpoint_offset(params, checkpoint_slots, bh, n, kStride) + index_t(v0) * dk;
    stage_state_rows(at_chunk, w_rows, dk, stack.rows_from(2 * kSlice));
    stage_state_rows(at_chunk + index_t(dv) * dk, w_rows, dk, stack.rows_from(3 * kSlice));
    // Without a carry (one chunk per block), the end cotangent's slice into the first two.
    if (!with_carry) {
      const index_t at_final = bh * index_t(dv) * dk + index_t(v0) * dk;
      if (last_group) {
        stage_state_rows(d_final_m ? d_final_m + at_final : nullptr, w_rows, dk, stack);
        stage_state_rows(d_final_s ? d_final_s + at_final : nullptr, w_rows, dk, stack.rows_from(kSlice));
      } else {
        const checkpoint_t* at_group = group_end + index_t(v0) * dk;
        stage_state_rows(at_group, w_rows, dk, stack);
        stage_state_rows(at_group + index_t(dv) * dk, w_rows, dk, stack.rows_from(kSlice));
      }
    }
    if (w_rows < kSlice)  // a partial last slice: the rows past it in each quarter
      for (int quarter = 0; quarter < 4; ++quarter) stack.part(quarter * kSlice, kSlice).zero_outside(w_rows, stack.cols);
  };

  const auto chunk_start = [&](int n) {
    return checkpoints + checkpoint_offset(params, checkpoint_slots, bh, n, kStride);
  };
  // kl with yaad, at chunk n's setup: the lag token's residual norm at the checkpoint's memory, then
  // the chunk's token norms at the lagged memory, which the slices only reach for their own rows. A
  // warp per value row recomputes the row's lag step into its row of lag_norms, then a lane per
  // token takes the residuals (the squares summed per warp, then over the warps in a fixed order:
  // deterministic). Plain loads of the checkpoint (M and S) and of v; C Dv Dk FMAs, as yaad's setup.
  const auto kl_yaad_setup = [&](int n, int L, int ci) {
    const checkpoint_t* m0 = chunk_start(n);
    const PaddedTile<input_t> keys = k_tile(ci);
    const ChunkGates<compute_t> g = gates(ci);
    const int warp = device::warp_id(), lane = device::lane_id(), warps = kernel::warp_count();
    const auto value = [&](int t, int j) {
      const input_t* v_row = static_cast<const input_t*>(params.v.ptr) + kernel::token_offset(params.v, b, n * C + t, h);
      return device::cast<compute_t>(v_row[j]);
    };
    const auto memory = [&](int which) {
      return [&, which](int j, int d) { return device::cast<compute_t>(m0[(which * index_t(dv) + j) * dk + d]); };
    };
    const auto k0 = [&](int d) { return device::cast<compute_t>(keys(0, d)); };
    const auto lag_residual = [&](int j) {  // warp-wide
      compute_t dot = 0;
      for (int d = lane; d < dk; d += device::kWarpSize) dot += memory(0)(j, d) * k0(d);
      return device::warp_reduce_sum(dot) - value(0, j);
    };
    compute_t squares = 0;
    for (int j = warp; j < dv; j += warps) {
      const compute_t r = lag_residual(j);
      squares += r * r;
    }
    if (lane == 0) lag_norms.squares(warp, 0) = squares;
    __syncthreads();
    if (threadIdx.x == 0) {
      compute_t total = 0;
      for (int w_index = 0; w_index < warps; ++w_index) total += lag_norms.squares(w_index, 0);
      lag_norms.lag_norm() = fmath::sqrt(total);
    }
    __syncthreads();
    const compute_t lag_norm = lag_norms.lag_norm();
    for (int t = lane; t < C16; t += device::kWarpSize) lag_norms.squares(warp, t) = 0;
    for (int j = warp; j < dv; j += warps) {
      const compute_t r = lag_residual(j);
      const compute_t e = objective.error(r, objective.threshold(true, b, n * C, h, j), lag_norm);
      kernel::kl_softmax_row<compute_t>(
          j, dk, g.theta[0], g.eta[0], compute_t(1) - g.alpha[0], memory(0), memory(1), [&](int) { return e; }, k0,
          [&](int, int d, compute_t m, compute_t) { lag_norms.row(warp, d) = m; });
      __syncwarp();
      for (int t = lane; t < L; t += device::kWarpSize) {
        compute_t dot = 0;
        for (int d = 0; d < dk; ++d) dot += lag_norms.row(warp, d) * device::cast<compute_t>(keys(t, d));
        const compute_t residual = dot - value(t, j);
        lag_norms.squares(warp, t) += residual * residual;
      }
      __syncwarp();
    }
    __syncthreads();
    for (int t = threadIdx.x; t < C16; t += blockDim.x) {
      compute_t total = 0;
      for (int w_index = 0; w_index < warps; ++w_index) total += lag_norms.squares(w_index, t);
      norm[t] = fmath::sqrt(total);
    }
    __syncthreads();
  };
  // At chunk n's setup (L tokens, walk position ci; its keys staged), from its checkpoint over all
  // of Dv: lq's power sum and rho0, then yaad's residual norms, a warp per token, a lane per value
  // row (plain loads of the checkpoint and v: one more read of the chunk's state and values).
  const auto whole_state_setup = [&](int n, int L, int ci) {
    const checkpoint_t* m0 = chunk_start(n);
    if (lq) {
      compute_t sum[1] = {compute_t(0)};
      for (int idx = threadIdx.x; idx < dv * dk; idx += blockDim.x)
        sum[0] += kernel::lq_power(device::cast<compute_t>(m0[idx]), lq_q);
      kernel::block_sum(sum, scratch);
      lq_sum = sum[0];
      rho = kernel::lq_rho(lq_sum, lq_q);
    }
    if (yaad && kl) {
      kl_yaad_setup(n, L, ci);
    } else if (yaad) {
      const PaddedTile<input_t> keys = k_tile(ci);
      for (int t = device::warp_id(); t < C16; t += kernel::warp_count()) {
        compute_t sum = 0;
        if (t < L)
          for (int j = device::lane_id(); j < dv; j += device::kWarpSize) {
            compute_t km = 0;
            for (int d = 0; d < dk; ++d)
              km += device::cast<compute_t>(keys(t, d)) * device::cast<compute_t>(m0[index_t(j) * dk + d]);
            const input_t* v_row = static_cast<const input_t*>(params.v.ptr) + kernel::token_offset(params.v, b, n * C + t, h);
            const compute_t r = rho * km - device::cast<compute_t>(v_row[j]);
            sum += r * r;
          }
        sum = device::warp_reduce_sum(sum);
        if (device::lane_id() == 0) norm[t] = fmath::sqrt(sum);
      }
      __syncthreads();
    }
  };
  // lq: adds d_rho drho0/dM0 to chunk n's start cotangent (the carry, or dM0 for the group's first
  // chunk), d_rho being the chunk's block-summed cotangent of rho0.
  const auto lq_start_cotangent = [&](int n, int g0, compute_t d_rho) {
    const compute_t coef = kernel::lq_rho_slope(lq_sum, lq_q, d_rho);
    const checkpoint_t* m0 = chunk_start(n);
    for (int idx = threadIdx.x; idx < dv * dk; idx += blockDim.x) {
      const int j = idx / dk, d = idx % dk;
      const compute_t grad = kernel::lq_rho_grad(device::cast<compute_t>(m0[idx]), lq_q, coef);
      if (n > g0)
        carry(0, j, d) += grad;
      else
        dm0[(bh * dv + j) * index_t(dk) + d] += grad;
    }
  };

  // kl: the backward of the lag token at a slice's rows (rows j < w_rows, feature v0 + j), once the
  // slice's start cotangent (of the lagged state: the carry's rows, or dM0 / dS0 for the group's
  // first chunk) is complete: the softmax step's (into the cotangent of the checkpoint's state), then
  // the lag error's, dR = dE f'(R) at the checkpoint's M: dV, d delta, dM += dR k0^T, dk0 += dR^T M.
  const auto lag_backward = [&](int n, int g0, int v0, int w_rows, const auto& k0, const ChunkGates<compute_t>& g,
                                const auto& lagged, compute_t(&gate_partials)[3]) {
    __syncthreads();  // the slice's start cotangent is complete
    const checkpoint_t* prev = chunk_start(n) + index_t(v0) * dk;
    const auto m_prev = [&](int r, int d) { return device::cast<compute_t>(prev[index_t(r) * dk + d]); };
    const auto start_cot = [&](int which) {
      return [&, which](int r, int d) -> compute_t& {
        if (n > g0) return carry(which, v0 + r, d);
        return (which == 0 ? dm0 : ds0)[(bh * dv + v0 + r) * index_t(dk) + d];
      };
    };
    kernel::kl_softmax_rows_backward<compute_t>(
        w_rows, dk, g.theta[0], g.eta[0], compute_t(1) - g.alpha[0], m_prev,
        [&](int r, int d) { return device::cast<compute_t>(prev[index_t(dv) * dk + index_t(r) * dk + d]); }, lagged,
        start_cot(0), start_cot(1), [&](int r) { return lag.e[r]; }, k0, lag.de, lag.dk0, gate_partials);
    const int t0 = n * C;
    const compute_t lag_norm = yaad ? lag_norms.lag_norm() : compute_t(0);
    for (int j = threadIdx.x; j < w_rows; j += blockDim.x) {
      const compute_t dr = lag.de[j] * objective.slope(lag.r[j], lag.delta[j], lag_norm);
      lag.dr[j] = dr;
      dv_out[kernel::contiguous_token_offset(b, t0, h, params.seqlen, params.heads, dv) + v0 + j] =
          device::cast<input_t>(-dr);
      if (objective.has_delta())
        d_delta_out[objective.at(b, t0, h, v0 + j)] =
            lag.de[j] * objective.delta_slope(lag.r[j], lag.delta[j], lag_norm);
    }
    __syncthreads();
    const auto dm = start_cot(0);
    for (int idx = threadIdx.x; idx < w_rows * dk; idx += blockDim.x)
      dm(idx / dk, idx % dk) += lag.dr[idx / dk] * k0(idx % dk);
    for (int d = threadIdx.x; d < dk; d += blockDim.x) {
      compute_t sum = 0;
      for (int j = 0; j < w_rows; ++j) sum += lag.dr[j] * m_prev(j, d);
      lag.dk0[d] += sum;
    }
  };

  // Kept across a chunk's slices, in registers.
  kernel::WarpStrips<acc_t, kSquareStripsPerWarp, 2> g_acc(C16, C16), dw_acc(C16, C16);
  kernel::WarpStrips<acc_t, kKeyStripsPerWarp, 2> dq_acc(C16, dk16), dk_acc(C16, dk16);
  // This thread's part of <dM, M0>, <dM, S0>, <dS, S0>, and under lq of d rho0's two parts: the
  // unscaled <dR, K M0^T> + <dW, W> and rho0 (<(diag(a) dO)^T Q, M0> + <(diag(g) dO)^T Q, S0>).
  compute_t dots[ChunksLayout<input_t, kSlice>::kBlockSums] = {};

  kernel::pipelined_steps(steps, stage, [&](int i) {
    const int n = chunk_of(i), slice = i % n_slices, L = chunk_length(params, n), v0 = slice * kSlice;
    const int w_rows = slice_rows(v0), buffer = i & 1, ci = i / n_slices, t0 = n * C;
    const bool recompute = n % kStride != 0;
    const auto Q = q_tile(ci).matrix();
    const auto K = k_tile(ci).matrix();
    const PaddedTile<operand_t> stack = stack_tile(buffer);
    const PaddedTile<input_t> V = v_tile(buffer), dO = do_tile(buffer);
    const bool updates_carry = n > g0 || g0 == 0;  // the start cotangent is needed by a chunk or is dM0

    if (slice == 0) {  // the chunk's setup
      build_gate_tables(L, C16, gates(ci), g_rows, &tables, kl);
      if (recompute) build_gate_tables<compute_t>(C, C16, gates(ci + 1), prev_rows, nullptr);
      if (token_read)
        g_acc.for_each([&](acc_t(&acc)[2][4], int r0, int c0) {
          kernel::zero(acc);
          kernel::strip_mma<Policy>(Q, r0, c0, dk, kernel::times(acc, K.t()));
        });
      dw_acc.zero();
      dq_acc.zero();
      dk_acc.zero();
      for (int t = threadIdx.x; t < C16; t += blockDim.x) cot.d_a[t] = cot.d_g[t] = cot.d_s[t] = dc_last[t] = 0;
      for (compute_t& dot : dots) dot = 0;
      if (kl) {
        for (int d = threadIdx.x; d < dk16; d += blockDim.x) lag.dk0[d] = 0;
        for (compute_t& partial : lag_gate_partials) partial = 0;
      }
      __syncthreads();
      if (lq || yaad) whole_state_setup(n, L, ci);
      if (token_read)
        g_acc.for_each([&](acc_t(&acc)[2][4], int r0, int c0) {
          kernel::for_each_strip_element<2>(r0, c0, [&](int t, int col, int n8, int e) {
            w(t, col) = device::cast<operand_t>(col <= t && t < L ? tables.c[t * C16 + col] * compute_t(acc[n8][e])
                                                                  : compute_t(0));
          });
        });
    }
    if (with_carry)  // the slice's rows of the carried cotangent of chunk n's end
      for (int idx = threadIdx.x; idx < 2 * kSlice * dk16; idx += blockDim.x) {
        const int r = idx / dk16, d = idx % dk16, which = r / kSlice, j = r % kSlice;
        stack(r, d) = device::cast<operand_t>(j < w_rows && d < dk ? carry(which, v0 + j, d) : compute_t(0));
      }
    __syncthreads();

    // kl: the lag token's step at the slice's rows of the checkpoint (row-local), in place: the
    // chunk proper starts from its result.
    const PaddedTile<input_t> keys = k_tile(ci);
    const auto k0 = [&](int d) { return device::cast<compute_t>(keys(0, d)); };
    const ChunkGates<compute_t> chunk_gates = gates(ci);
    const auto stack_value = [&](int quarter) {
      return [&, quarter](int r, int d) { return device::cast<compute_t>(stack(quarter * kSlice + r, d)); };
    };
    if (kl) {
      if (reads_before_lag) {  // dQ = dO M0 at the checkpoint's rows, before the step overwrites them
        for (int idx = threadIdx.x; idx < C16 * kSlice; idx += blockDim.x)
          dq_lhs(idx / kSlice, idx % kSlice) = device::cast<operand_t>(device::cast<compute_t>(dO(idx / kSlice, idx % kSlice)));
        __syncthreads();
        dq_acc.for_each([&](acc_t(&acc)[2][4], int r0, int c0) {
          kernel::strip_mma<Policy>(dq_lhs.matrix(), r0, c0, kSlice,
                                    kernel::times(acc, stack.rows_from(2 * kSlice).matrix()));
        });
      }
      lag_errors(
          objective, w_rows, dk, stack_value(2), k0, [&](int j) { return device::cast<compute_t>(V(0, j)); }, b, t0, h,
          v0,
          [&](int j, compute_t r, compute_t delta, compute_t e) {
            lag.r[j] = r, lag.delta[j] = delta, lag.e[j] = e, lag.de[j] = 0;
          },
          yaad ? lag_norms.lag_norm() : compute_t(0));
      __syncthreads();
      kernel::kl_softmax_rows<compute_t>(
          w_rows, dk, chunk_gates.theta[0], chunk_gates.eta[0], compute_t(1) - chunk_gates.alpha[0], stack_value(2),
          stack_value(3), [&](int r) { return lag.e[r]; }, k0, [&](int r, int d, compute_t m, compute_t s) {
            stack(2 * kSlice + r, d) = device::cast<operand_t>(m);
            stack(3 * kSlice + r, d) = device::cast<operand_t>(s);
          });
      __syncthreads();
    }

    if (recompute) {  // the chunk's start state, one step from the checkpoint of the chunk before
      const auto K_prev = k_tile(ci + 1).matrix();
      const PaddedTile<input_t> V_prev = v_prev_tile(buffer);
      const auto M_prev_t = stack.rows_from(2 * kSlice).transposed();
      kernel::for_each_strip<2>(C16, kSlice, [&](int r0, int c0) {
        acc_t acc[2][4];
        kernel::zero(acc);
        kernel::strip_mma<Policy>(K_prev, r0, c0, dk, kernel::times(acc, M_prev_t));
        kernel::for_each_strip_element<2>(r0, c0, [&](int t, int j, int s, int e) {
          const compute_t value =
              objective.error(compute_t(acc[s][e]) - device::cast<compute_t>(V_prev(t, j)),
                              objective.threshold(t < C && j < w_rows, b, t0 - C + t, h, v0 + j));
          dk_lhs(t, j) = device::cast<operand_t>(prev_rows.m_end[t] * value);
          dk_lhs(t, kSlice + j) = device::cast<operand_t>(prev_rows.s_end[t] * value);
        });
      });
      __syncthreads();
      const compute_t a_L = prev_rows.a_end(), g_L = prev_rows.g_end(), p_L = prev_rows.p_end();
      kernel::for_each_strip<2>(kSlice, dk16, [&](int r0, int c0) {
        acc_t am[2][4], as[2][4];
        kernel::zero(am);
        kernel::zero(as);
        kernel::strip_mma_shared_b<Policy, 2>(K_prev, r0, c0, C16, kernel::product<Policy>(am, dk_lhs.transposed()),
                                              kernel::product<Policy>(as, dk_lhs.cols_from(kSlice).transposed()));
        kernel::for_each_strip_element<2>(r0, c0, [&](int j, int d, int s, int e) {
          const compute_t m_prev = device::cast<compute_t>(stack(2 * kSlice + j, d));
          const compute_t s_prev = device::cast<compute_t>(stack(3 * kSlice + j, d));
          stack(2 * kSlice + j, d) = device::cast<operand_t>(a_L * m_prev + g_L * s_prev + compute_t(am[s][e]));
          stack(3 * kSlice + j, d) = device::cast<operand_t>(p_L * s_prev + compute_t(as[s][e]));
        });
      });
      __syncthreads();
    }

    // Phase 1: per 16 x 8 strip of the slice, everything with a row of tokens.
    const auto dMt = stack.transposed(), dSt = stack.rows_from(kSlice).transposed();
    const auto M0t = stack.rows_from(2 * kSlice).transposed(), S0t = stack.rows_from(3 * kSlice).transposed();
    kernel::for_each_strip<1>(C16, kSlice, [&](int r0, int c0) {
      acc_t e_acc[1][4], x[1][4], y[1][4], qm[1][4], qs[1][4], u[1][4];
      kernel::zero(e_acc);
      kernel::zero(x);
      kernel::zero(y);
      kernel::zero(qm);
      kernel::zero(qs);
      kernel::zero(u);
      kernel::strip_mma<Policy>(K, r0, c0, dk, kernel::times(e_acc, M0t), kernel::times(x, dMt), kernel::times(y, dSt));
      if (token_read) {
        kernel::strip_mma<Policy>(Q, r0, c0, dk, kernel::times(qm, M0t), kernel::times(qs, S0t));
        kernel::strip_mma<Policy>(w.transposed(), r0, c0, C16, kernel::times(u, dO.matrix()));
      }
      compute_t sums[2][4] = {};  // [row half][RowCotangent]
      kernel::for_each_strip_element<1>(r0, c0, [&](int t, int j, int, int e) {
        const compute_t x_te = compute_t(x[0][e]), y_te = compute_t(y[0][e]);
        const bool inside = t < L && j < w_rows;
        // Under lq the errors and reads see rho0 M0 (rho0 = 1 otherwise): R = rho0 K M0^T - V and
        // the reads' cotangent is rho0 dO.
        const compute_t r = rho * compute_t(e_acc[0][e]) - device::cast<compute_t>(V(t, j));
        const compute_t delta = objective.threshold(inside, b, t0 + t, h, v0 + j);
        const compute_t token_norm = yaad ? norm[t] : compute_t(0);
        const compute_t e_te = objective.error(r, delta, token_norm);
        const compute_t d_e = g_rows.m_end[t] * x_te + g_rows.s_end[t] * y_te + rho * compute_t(u[0][e]);
        const compute_t d_r = d_e * objective.slope(r, delta, token_norm);
        const compute_t d_o = rho * device::cast<compute_t>(dO(t, j));
        err(t, j) = device::cast<operand_t>(e_te);
        dk_lhs(t, j) = device::cast<operand_t>(g_rows.m_end[t] * e_te);
        dk_lhs(t, kSlice + j) = device::cast<operand_t>(g_rows.s_end[t] * e_te);
        dk_lhs(t, 2 * kSlice + j) = device::cast<operand_t>(rho * d_r);
        dq_lhs(t, j) = device::cast<operand_t>(token_read ? g_rows.a[t] * d_o : d_o);
        dq_lhs(t, kSlice + j) = device::cast<operand_t>(token_read ? g_rows.g[t] * d_o : compute_t(0));
        if (inside) {
          dv_out[kernel::contiguous_token_offset(b, t0 + t, h, params.seqlen, params.heads, dv) + v0 + j] =
              device::cast<input_t>(-d_r);
          if (objective.has_delta())
            d_delta_out[objective.at(b, t0 + t, h, v0 + j)] = d_e * objective.delta_slope(r, delta, token_norm);
        }
        if (lq) dots[3] += d_r * compute_t(e_acc[0][e]);
        compute_t(&row)[4] = sums[e / 2];
        row[kErrX] += e_te * x_te;
        row[kErrY] += e_te * y_te;
        row[kOutM] += d_o * compute_t(qm[0][e]);
        row[kOutS] += d_o * compute_t(qs[0][e]);
      });
      // The quad of lanes holding a row adds its columns; its first lane stores the strip's sum.
      for (int half = 0; half < 2; ++half)
        for (int which = 0; which < 4; ++which) {
          const compute_t total = kernel::quad_sum(sums[half][which]);
          if (device::lane_id() % 4 == 0)
            partials[partial(which, r0 + device::lane_id() / 4 + 8 * half, c0 / 8)] = total;
        }
    });
    __syncthreads();

    // Phase 2: the slice's share of dW, dQ, dK and of the row cotangents; the carry's rows.
    if (token_read)
      dw_acc.for_each([&](acc_t(&acc)[2][4], int r0, int c0) {
        kernel::strip_mma<Policy>(dO.matrix(), r0, c0, kSlice, kernel::times(acc, err.transposed()));
      });
    if (!reads_before_lag)
      dq_acc.for_each([&](acc_t(&acc)[2][4], int r0, int c0) {
        kernel::strip_mma<Policy>(dq_lhs.matrix(), r0, c0, 2 * kSlice,
                                  kernel::times(acc, stack.rows_from(2 * kSlice).matrix()));
      });
    dk_acc.for_each([&](acc_t(&acc)[2][4], int r0, int c0) {
      kernel::strip_mma<Policy>(dk_lhs.matrix(), r0, c0, 3 * kSlice, kernel::times(acc, stack.matrix()));
    });
    if (updates_carry) {
      const compute_t a_L = g_rows.a_end(), g_L = g_rows.g_end(), p_L = g_rows.p_end();
      kernel::for_each_strip<2>(kSlice, dk16, [&](int r0, int c0) {
        acc_t am[2][4], aq[2][4], as[2][4];
        kernel::zero(am);
        kernel::zero(aq);
        kernel::zero(as);
        kernel::strip_mma_shared_b<Policy, 2>(K, r0, c0, C16,
                                              kernel::product<Policy>(am, dk_lhs.cols_from(2 * kSlice).transposed()));
        if (!reads_before_lag)  // else the reads' share goes to the lag step's input, below
          kernel::strip_mma_shared_b<Policy, 2>(Q, r0, c0, C16, kernel::product<Policy>(aq, dq_lhs.transposed()),
                                                kernel::product<Policy>(as, dq_lhs.cols_from(kSlice).transposed()));
        kernel::for_each_strip_element<2>(r0, c0, [&](int j, int d, int s, int e) {
          if (j >= w_rows || d >= dk) return;
          const compute_t dm_old =
              with_carry ? carry(0, v0 + j, d) : compute_t(device::cast<compute_t>(stack(j, d)));
          const compute_t ds_old =
              with_carry ? carry(1, v0 + j, d) : compute_t(device::cast<compute_t>(stack(kSlice + j, d)));
          const compute_t dm_new = a_L * dm_old + compute_t(am[s][e]) + compute_t(aq[s][e]);
          const compute_t ds_new = g_L * dm_old + p_L * ds_old + compute_t(as[s][e]);
          if (lq)
            dots[4] += compute_t(aq[s][e]) * device::cast<compute_t>(stack(2 * kSlice + j, d)) +
                       compute_t(as[s][e]) * device::cast<compute_t>(stack(3 * kSlice + j, d));
          if (n > g0) {
            carry(0, v0 + j, d) = dm_new;
            carry(1, v0 + j, d) = ds_new;
          } else {
            const index_t out = (bh * dv + v0 + j) * index_t(dk) + d;
            dm0[out] = dm_new;
            ds0[out] = ds_new;
          }
        });
      });
    }
    if (kl) lag_backward(n, g0, v0, w_rows, k0, chunk_gates, stack_value(2), lag_gate_partials);
    if (reads_before_lag) {  // the reads' share of the start cotangent, dO^T Q, to the checkpoint's M
      __syncthreads();
      kernel::for_each_strip<2>(kSlice, dk16, [&](int r0, int c0) {
        acc_t aq[2][4];
        kernel::zero(aq);
        kernel::strip_mma_shared_b<Policy, 2>(Q, r0, c0, C16, kernel::product<Policy>(aq, dq_lhs.transposed()));
        kernel::for_each_strip_element<2>(r0, c0, [&](int j, int d, int s, int e) {
          if (j >= w_rows || d >= dk) return;
          if (n > g0)
            carry(0, v0 + j, d) += compute_t(aq[s][e]);
          else
            dm0[(bh * dv + v0 + j) * index_t(dk) + d] += compute_t(aq[s][e]);
        });
      });
    }
    for (int t = threadIdx.x; t < C16; t += blockDim.x)
      for (int part = 0; part < kSlice / 8; ++part) {
        dc_last[t] += partials[partial(kErrX, t, part)];
        cot.d_s[t] += partials[partial(kErrY, t, part)];
        if (token_read) {
          cot.d_a[t] += partials[partial(kOutM, t, part)];
          cot.d_g[t] += partials[partial(kOutS, t, part)];
        }
      }
    for (int idx = threadIdx.x; idx < w_rows * dk; idx += blockDim.x) {
      const int j = idx / dk, d = idx % dk;
      const compute_t dm = device::cast<compute_t>(stack(j, d)), ds = device::cast<compute_t>(stack(kSlice + j, d));
      const compute_t m0 = device::cast<compute_t>(stack(2 * kSlice + j, d));
      const compute_t s0 = device::cast<compute_t>(stack(3 * kSlice + j, d));
      dots[0] += dm * m0;
      dots[1] += dm * s0;
      dots[2] += ds * s0;
    }
    if (slice < n_slices - 1) return;

    // The chunk's tail: d_c = rho0 dW .* G and dG = rho0 dW .* c (into W's tile), lq's <dW, W>;
    // then the row L - 1 terms of the end state.
    __syncthreads();
    if (token_read) {
#pragma unroll
      for (int s = 0; s < kSquareStripsPerWarp; ++s) {
        const int strip = device::warp_id() + s * kernel::warp_count();
        if (strip >= g_acc.strips) break;
        const int r0 = strip / g_acc.per_row * kernel::kStripRows, c0 = strip % g_acc.per_row * 16;
        kernel::for_each_strip_element<2>(r0, c0, [&](int t, int col, int n8, int e) {
          const bool inside = col <= t && t < L;
          const compute_t dw = compute_t(dw_acc.acc[s][n8][e]), g = compute_t(g_acc.acc[s][n8][e]);
          cot.d_c[t * C16 + col] = inside ? rho * dw * g : compute_t(0);
          w(t, col) = device::cast<operand_t>(inside ? rho * dw * tables.c[t * C16 + col] : compute_t(0));
          if (lq && inside) dots[3] += dw * g * tables.c[t * C16 + col];
        });
      }
    } else {
      for (int idx = threadIdx.x; idx < C16 * C16; idx += blockDim.x) cot.d_c[idx] = 0;
    }
    kernel::block_sum(dots, scratch);  // its barriers also publish d_c and W's tile
    if (lq) lq_start_cotangent(n, g0, dots[3] + dots[4] / rho);
    for (int col = threadIdx.x; col < L; col += blockDim.x) cot.d_c[(L - 1) * C16 + col] += dc_last[col];
    if (threadIdx.x == 0) {
      cot.d_a[L - 1] += dots[0];
      cot.d_g[L - 1] += dots[1];
      cot.d_p[0] = dots[2];
    }
    if (token_read) {
      dq_acc.for_each([&](acc_t(&acc)[2][4], int r0, int c0) {
        kernel::strip_mma<Policy>(w.matrix(), r0, c0, C16, kernel::times(acc, K));
      });
      dk_acc.for_each([&](acc_t(&acc)[2][4], int r0, int c0) {
        kernel::strip_mma<Policy>(w.transposed(), r0, c0, C16, kernel::times(acc, Q));
      });
    }
    if (kl) kernel::block_sum(lag_gate_partials, scratch);
    // dk of token 0 adds kl's lag token's.
    const auto write_grad = [&](input_t* out, bool with_lag) {
      return [&, out, with_lag](acc_t(&acc)[2][4], int r0, int c0) {
        kernel::for_each_strip_element<2>(r0, c0, [&](int t, int d, int n8, int e) {
          if (t < L && d < dk)
            out[kernel::contiguous_token_offset(b, t0 + t, h, params.seqlen, params.heads, dk) + d] =
                device::cast<input_t>(compute_t(acc[n8][e]) + (with_lag && t == 0 ? lag.dk0[d] : compute_t(0)));
        });
      };
    };
    dq_acc.for_each(write_grad(dq_out, false));
    dk_acc.for_each(write_grad(dk_out, kl));
    __syncthreads();
    const auto gate_at = [&](int t) { return (index_t(b) * params.seqlen + t0 + t) * params.heads + h; };
    auto* dtheta = static_cast<compute_t*>(params.dtheta_ptr);
    auto* deta = static_cast<compute_t*>(params.deta_ptr);
    auto* dalpha = static_cast<compute_t*>(params.dalpha_ptr);
    // kl: token 0's gates are the lag step's (the lag tables do not read them).
    const bool lag_token = kl;
    gate_adjoint(
        L, gates(ci), g_rows, tables, cot,
        [&](int t, compute_t value) { dtheta[gate_at(t)] = lag_token && t == 0 ? lag_gate_partials[0] : value; },
        [&](int t, compute_t d_eta, compute_t d_alpha) {
          deta[gate_at(t)] = lag_token && t == 0 ? lag_gate_partials[1] : d_eta;
          dalpha[gate_at(t)] = lag_token && t == 0 ? -lag_gate_partials[2] : d_alpha;
        });
  });

  // An empty sequence: the initial state's cotangent is the final state's.
  if (n_chunks == 0 && group_index == 0)
    for (int idx = threadIdx.x; idx < dv * dk; idx += blockDim.x) {
      const index_t at_row = bh * index_t(dv) * dk + idx;
      static_cast<compute_t*>(params.dm0_ptr)[at_row] = d_final_m ? d_final_m[at_row] : compute_t(0);
      static_cast<compute_t*>(params.ds0_ptr)[at_row] = d_final_s ? d_final_s[at_row] : compute_t(0);
    }
}

// The value slices of the chunk kernel for input_t: 16 or 32 rows (fp64, a testing dtype whose
// tiles take twice the shared memory, only 16).
template <typename input_t>
constexpr bool has_wide_slice() {
  return !std::is_same<input_t, double>::value;
}

// Calls f(std::integral_constant<int, slice>{}) for a chunk kernel's value slice.
template <typename input_t, class F>
auto dispatch_slice(int slice, const F& f) {
  if constexpr (has_wide_slice<input_t>())
    if (slice == 32) return f(std::integral_constant<int, 32>{});
  return f(std::integral_constant<int, 16>{});
}

inline size_t chunks_smem_bytes(const LinearMemoryParams& p, InputType type, int slice, bool with_carry) {
  return kernel::dispatch_input_type(type, [&](auto input) {
    return dispatch_slice<decltype(input)>(slice, [&](auto s) {
      return size_t(
          ChunksLayout<decltype(input), decltype(s)::value>(p.dk, p.dv, p.chunk_size, p.read_token, with_carry,
                                                            p.miras)
              .smem.bytes);
    });
  });
}

}  // namespace lm
}  // namespace titans
