// The reverse scan of the linear memory's backward: carries the cotangent (dM, dS) of the chunk-end
// state from the last chunk back to the first chunk of the second group, and stores it at the end
// of every group (docs/backward_linear.md §3), for the chunk kernel (linear_memory_bwd_chunks.cuh).
// It runs only when a sequence has more than one group.
//
// One block per (value tile, head, batch): the transposed chunk map multiplies on the right, so
// value tiles never communicate. Per chunk of L tokens (token read; chunk_start: U = 0, the dO
// terms without a and g, none in dS0):
//   X | Y = K [dM; dS]^T,   U = (Q K^T .* c)^T dO,   dE = diag(m) X + diag(s) Y + U
//   dM0 = a_L dM + (2 dE)^T K + (diag(a) dO)^T Q,   dS0 = g_L dM + p dS + (diag(g) dO)^T Q
// The chain is the two products on the carry (X | Y, then (2 dE)^T K). Everything else is
// carry-free and off the chain: each warp computes the rows of W^T = (Q K^T .* c)^T it then
// multiplies with dO into U (so W^T never needs a block barrier), in the same phase as X | Y; the
// dO terms of the step take their own accumulators in the step's phase; and the next chunk's gate
// tables are built while the step runs.
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

constexpr int kScanThreads = 128;

// Shared memory of the scan (byte offsets; tiles are PaddedTiles).
template <typename input_t, int kTileV>
struct ScanLayout {
  using T = Types<input_t>;
  kernel::SmemLayout smem;
  int chunk16, dk16;
  int master;                     // compute_t [2 kTileV, dk16]: [dM; dS] (kSeparateMaster only)
  kernel::TileSlot carry;         // 2 x operand_t [2 kTileV, Dk]: the stack [dM; dS], alternating
  kernel::TileSlot q, k, d_o;     // 2 x input_t [C, Dk], [C, Dk], [C, kTileV]: staged, alternating
  int gates;                      // 3 x ChunkGates: staged one chunk ahead of the tiles
  int rows;                       // 2 x ChunkGateRows
  int c;                          // compute_t [C, C]
  kernel::TileSlot w_t;           // operand_t [C, C]: W^T, each warp's own rows (token read)
  kernel::TileSlot de2, ado, gdo;  // operand_t [C, kTileV]: 2 dE, diag(a) dO, diag(g) dO
  __host__ __device__ ScanLayout(int dk, int chunk, bool token_read)
      : chunk16(kernel::round_up(chunk, kernel::kTileGranule)), dk16(kernel::round_up(dk, kernel::kTileGranule)) {
    using compute_t = typename T::compute_t;
    using operand_t = typename T::operand_t;
    master = smem.array<compute_t>(T::kSeparateMaster ? 2 * kTileV * dk16 : 0);
    carry = smem.tiles<operand_t>(2, 2 * kTileV, dk);
    q = smem.tiles<input_t>(2, chunk, dk);
    k = smem.tiles<input_t>(2, chunk, dk);
    d_o = smem.tiles<input_t>(2, chunk, kTileV);
    gates = smem.array<compute_t>(3 * ChunkGates<compute_t>::size(chunk16));
    rows = smem.array<compute_t>(2 * ChunkGateRows<compute_t>::size(chunk16));
    c = smem.array<compute_t>(chunk16 * chunk16);
    w_t = smem.tile<operand_t>(token_read ? chunk : 0, token_read ? chunk : 0);
    de2 = smem.tile<operand_t>(chunk, kTileV);
    ado = smem.tile<operand_t>(chunk, kTileV);
    gdo = smem.tile<operand_t>(chunk, kTileV);
  }
};

template <typename input_t, int kTileV>
__global__ void __launch_bounds__(kScanThreads, 2)
    linear_memory_bwd_scan_kernel(LinearMemoryBwdParams params, LinearMemoryBwdWorkspace workspace, int group) {
  using T = Types<input_t>;
  using compute_t = typename T::compute_t;
  using operand_t = typename T::operand_t;
  using checkpoint_t = typename T::checkpoint_t;
  using Policy = typename T::Policy;
  using acc_t = typename Policy::acc_t;
  using kernel::PaddedTile;

  const int v0 = blockIdx.x * kTileV, h = blockIdx.y, b = blockIdx.z;
  const int rows = tile_rows(params, v0, kTileV);
  const int dk = params.dk, dv = params.dv, C = params.chunk_size, n_chunks = params.n_chunks;
  const bool token_read = params.read_token;
  const ScanLayout<input_t, kTileV> at(dk, C, token_read);
  const int C16 = at.chunk16, dk16 = at.dk16;
  // Step i walks chunk n_chunks - 1 - i, down to the first chunk of the second group.
  const int steps = n_chunks - group;
  const auto chunk_of = [&](int i) { return n_chunks - 1 - i; };

  const auto master = kernel::shared_array<compute_t>(at.master);
  const auto carry = [&](int i) { return PaddedTile<operand_t>(at.carry, i); };
  const auto q_tile = [&](int i) { return PaddedTile<input_t>(at.q, i); };
  const auto k_tile = [&](int i) { return PaddedTile<input_t>(at.k, i); };
  const auto do_tile = [&](int i) { return PaddedTile<input_t>(at.d_o, i); };
  const auto gates = [&](int i) {
    return ChunkGates<compute_t>(
        kernel::shared_array<compute_t>(at.gates) + i % 3 * ChunkGates<compute_t>::size(C16), C16);
  };
  const auto gate_rows = [&](int i) {
    return ChunkGateRows<compute_t>(
        kernel::shared_array<compute_t>(at.rows) + i % 2 * ChunkGateRows<compute_t>::size(C16), C16);
  };
  const auto c_table = kernel::shared_array<compute_t>(at.c);
  const ChunkGateTables<compute_t> tables{c_table, c_table, c_table, C16, false};
  const PaddedTile<operand_t> w_t(at.w_t), de2(at.de2), ado(at.ado), gdo(at.gdo);

  for (int i = 0; i < 2; ++i) {
    q_tile(i).zero_all();
    k_tile(i).zero_all();
    do_tile(i).zero_all();
  }
  // The cotangent of the final state (zero when the final state is not used), this tile's rows.
  const index_t bh = index_t(b) * params.heads + h;
  const index_t state_offset = (bh * dv + v0) * dk;
  load_state_stack<kTileV, T::kSeparateMaster>(static_cast<const compute_t*>(params.d_m_final_ptr),
                                               static_cast<const compute_t*>(params.d_s_final_ptr), state_offset,
                                               rows, dk, dk16, master, carry(0));
  __syncthreads();
  const auto carry_value = [&](const PaddedTile<operand_t>& tile, int r, int d) -> compute_t {
    if constexpr (T::kSeparateMaster)
      return master[r * dk16 + d];
    else
      return tile(r, d);
  };
  auto* group_cotangents = static_cast<checkpoint_t*>(workspace.group_cotangents);
  const int n_groups = (n_chunks + group - 1) / group;

  const auto stage = [&](int i) {
    const int n = chunk_of(i), L = chunk_length(params, n), buffer = i & 1;
    const PaddedTile<input_t> q = q_tile(buffer), k = k_tile(buffer), d_o = do_tile(buffer);
    kernel::stage_token_rows<input_t>(params.k, b, h, n * C, L, 0, dk, k.ld, k.data);
    kernel::stage_token_rows<input_t>(params.q, b, h, n * C, L, 0, dk, q.ld, q.data);
    kernel::stage_token_rows<input_t>(params.d_o, b, h, n * C, L, v0, rows, d_o.ld, d_o.data);
    if (L < C) {  // the last chunk, walked first: its buffer's rows past L are zero from the start
      q.zero_outside(L, q.cols);
      k.zero_outside(L, k.cols);
      d_o.zero_outside(L, d_o.cols);
    }
    if (i == 0) gates(0).stage(params, b, h, n * C, L);
    if (i + 1 < steps) gates(i + 1).stage(params, b, h, (n - 1) * C, chunk_length(params, n - 1));
  };

  kernel::pipelined_steps(steps, stage, [&](int i) {
    const int n = chunk_of(i), L = chunk_length(params, n), cur = i & 1, nxt = cur ^ 1;
    if (i == 0) {
      build_gate_tables(L, C16, gates(0), gate_rows(0), &tables);
      __syncthreads();
    }
    const ChunkGateRows<compute_t> g_rows = gate_rows(i);
    const auto Q = q_tile(cur).matrix();
    const auto K = k_tile(cur).matrix();
    const PaddedTile<input_t> dO = do_tile(cur);
    const PaddedTile<operand_t> carry0 = carry(cur), carry1 = carry(nxt);
    const auto dMt = carry0.transposed(), dSt = carry0.rows_from(kTileV).transposed();

    // Phase A, one 16-token row block per warp at a time: W^T's rows, then X | Y and U of the same
    // rows, and from them 2 dE; the dO operands of the step.
    const int warps = kernel::warp_count();
    for (int r0 = device::warp_id() * kernel::kStripRows; r0 < C16; r0 += warps * kernel::kStripRows) {
      if (token_read) {
        for (int c0 = 0; c0 < C16; c0 += 16) {
          acc_t acc[2][4];
          kernel::zero(acc);
          kernel::strip_mma<Policy>(K, r0, c0, dk, kernel::times(acc, Q.t()));
          // W^T[i, t] = c[t, i] (K Q^T)[i, t] for i <= t < L.
          kernel::for_each_strip_element<2>(r0, c0, [&](int r, int t, int s, int e) {
            w_t(r, t) = device::cast<operand_t>(r <= t && t < L ? tables.c[t * C16 + r] * compute_t(acc[s][e])
                                                                 : compute_t(0));
          });
        }
        __syncwarp();
      }
      for (int c0 = 0; c0 < kTileV; c0 += 16) {
        acc_t x[2][4], y[2][4], u[2][4];
        kernel::zero(x);
        kernel::zero(y);
        kernel::zero(u);
        kernel::strip_mma<Policy>(K, r0, c0, dk, kernel::times(x, dMt), kernel::times(y, dSt));
        if (token_read) kernel::strip_mma<Policy>(w_t.matrix(), r0, c0, C16, kernel::times(u, dO.matrix()));
        kernel::for_each_strip_element<2>(r0, c0, [&](int t, int j, int s, int e) {
          const compute_t d_e = g_rows.m_end[t] * compute_t(x[s][e]) + g_rows.s_end[t] * compute_t(y[s][e]) +
                                compute_t(u[s][e]);
          const compute_t d_o = device::cast<compute_t>(dO(t, j));
          de2(t, j) = device::cast<operand_t>(compute_t(2) * d_e);
          ado(t, j) = device::cast<operand_t>(token_read ? g_rows.a[t] * d_o : d_o);
          gdo(t, j) = device::cast<operand_t>(token_read ? g_rows.g[t] * d_o : compute_t(0));
        });
      }
    }
    __syncthreads();

    // Phase B: the step into the other carry tile; the next chunk's tables (c was read in phase A).
    // The new carry is the cotangent of chunk n - 1's end: stored where that ends a group.
    const compute_t a_L = g_rows.a_end(), g_L = g_rows.g_end(), p_L = g_rows.p_end();
    checkpoint_t* group_end =
        n % group == 0 ? group_cotangents + (bh * (n_groups - 1) + n / group - 1) * 2 * index_t(dv) * dk : nullptr;
    kernel::for_each_strip<2>(kTileV, dk16, [&](int r0, int c0) {
      acc_t am[2][4], aq[2][4], as[2][4];
      kernel::zero(am);
      kernel::zero(aq);
      kernel::zero(as);
      kernel::strip_mma_shared_b<Policy, 2>(K, r0, c0, C16, kernel::product<Policy>(am, de2.transposed()));
      kernel::strip_mma_shared_b<Policy, 2>(Q, r0, c0, C16, kernel::product<Policy>(aq, ado.transposed()),
                                            kernel::product<Policy>(as, gdo.transposed()));
      kernel::for_each_strip_element<2>(r0, c0, [&](int j, int d, int s, int e) {
        const compute_t dm_old = carry_value(carry0, j, d), ds_old = carry_value(carry0, kTileV + j, d);
        const compute_t dm_new = a_L * dm_old + compute_t(am[s][e]) + compute_t(aq[s][e]);
        const compute_t ds_new = g_L * dm_old + p_L * ds_old + compute_t(as[s][e]);
        if constexpr (T::kSeparateMaster) master[j * dk16 + d] = dm_new, master[(kTileV + j) * dk16 + d] = ds_new;
        carry1(j, d) = device::cast<operand_t>(dm_new);
        carry1(kTileV + j, d) = device::cast<operand_t>(ds_new);
        if (group_end && j < rows && d < dk) {
          const index_t at_row = index_t(v0 + j) * dk + d;
          group_end[at_row] = device::cast<checkpoint_t>(dm_new);
          group_end[index_t(dv) * dk + at_row] = device::cast<checkpoint_t>(ds_new);
        }
      });
    });
    if (i + 1 < steps) build_gate_tables(chunk_length(params, n - 1), C16, gates(i + 1), gate_rows(i + 1), &tables);
  });
}

// Calls f(std::integral_constant<int, tile>{}) for a scan value tile (16 or 32 rows).
template <class F>
auto dispatch_scan_tile(int tile, const F& f) {
  if (tile == 32) return f(std::integral_constant<int, 32>{});
  return f(std::integral_constant<int, 16>{});
}

inline size_t scan_smem_bytes(const LinearMemoryParams& p, InputType type, int tile) {
  return kernel::dispatch_input_type(type, [&](auto input) {
    return dispatch_scan_tile(tile, [&](auto tile_v) {
      return size_t(ScanLayout<decltype(input), decltype(tile_v)::value>(p.dk, p.chunk_size, p.read_token).smem.bytes);
    });
  });
}

}  // namespace lm
}  // namespace titans
