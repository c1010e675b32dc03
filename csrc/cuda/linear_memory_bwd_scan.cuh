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

#include "cuda/common/tile_loops.cuh"
#include "cuda/linear_memory_bwd.h"
#include "cuda/linear_memory_walk.cuh"

namespace titans {
namespace lm {

constexpr int kScanThreads = 128;

// Shared memory of the scan (byte offsets; tiles are PaddedTiles): the walk's front (the stack is the
// carry [dM; dS], the per-value-row input dO), then the chunk's working tiles.
template <typename input_t, int kTileV>
struct ScanLayout : WalkLayout<input_t, kTileV> {
  kernel::TileSlot w_t;            // operand_t [C, C]: W^T, each warp's own rows (token read)
  kernel::TileSlot de2, ado, gdo;  // operand_t [C, kTileV]: 2 dE, diag(a) dO, diag(g) dO
  __host__ __device__ ScanLayout(int dk, int chunk, bool token_read) : WalkLayout<input_t, kTileV>(dk, chunk) {
    using operand_t = typename Types<input_t>::operand_t;
    kernel::SmemLayout& smem = this->smem;
    w_t = smem.tile<operand_t>(token_read ? chunk : 0, token_read ? chunk : 0);
    de2 = smem.tile<operand_t>(chunk, kTileV);
    ado = smem.tile<operand_t>(chunk, kTileV);
    gdo = smem.tile<operand_t>(chunk, kTileV);
  }
};

template <typename input_t, int kTileV>
__global__ void __launch_bounds__(kScanThreads, 2)
    linear_memory_bwd_scan_kernel(LinearMemoryBwdParams launch, LinearMemoryBwdWorkspace workspace, int group) {
  using T = Types<input_t>;
  using compute_t = typename T::compute_t;
  using operand_t = typename T::operand_t;
  using checkpoint_t = typename T::checkpoint_t;
  using Policy = typename T::Policy;
  using acc_t = typename Policy::acc_t;
  using kernel::PaddedTile;

  // Block z walks batch row z, or with cu_seqlens sequence z (its view, sequences.cuh).
  const LinearMemoryBwdParams params = sequence_view<input_t>(launch, blockIdx.z, T::checkpoint_stride(launch.miras));
  const int v0 = blockIdx.x * kTileV, h = blockIdx.y, b = kernel::batch_row(launch, blockIdx.z);
  const int rows = tile_rows(params, v0, kTileV);
  const int dk = params.dk, dv = params.dv, C = params.chunk_size, n_chunks = params.n_chunks;
  const bool token_read = params.read_token;
  const ScanLayout<input_t, kTileV> at(dk, C, token_read);
  const Walk<input_t, kTileV> walk(at);
  const int C16 = at.chunk16, dk16 = at.dk16;
  const ChunkGateTables<compute_t>& tables = walk.tables;
  // Step i walks chunk n_chunks - 1 - i, down to the first chunk of the second group.
  const int steps = n_chunks - group;
  const auto chunk_of = [&](int i) { return n_chunks - 1 - i; };
  const PaddedTile<operand_t> w_t(at.w_t), de2(at.de2), ado(at.ado), gdo(at.gdo);

  walk.zero_staged();
  // The cotangent of the final state (zero when the final state is not used), this tile's rows.
  const index_t bh = index_t(b) * params.heads + h;
  const index_t state_offset = (bh * dv + v0) * dk;
  walk.load_stack(params.d_m_final_ptr, params.d_s_final_ptr, state_offset, rows, dk);
  __syncthreads();

  const auto stage = [&](int i) {
    const int n = chunk_of(i);
    walk.stage_tiles(params, params.d_o, i & 1, b, h, n, v0, rows);
    if (i == 0) walk.gates(0).stage(params, b, h, n * C, chunk_length(params, n));
    if (i + 1 < steps) walk.gates(i + 1).stage(params, b, h, (n - 1) * C, chunk_length(params, n - 1));
  };

  kernel::pipelined_steps(steps, stage, [&](int i) {
    const int n = chunk_of(i), L = chunk_length(params, n), cur = i & 1, nxt = cur ^ 1;
    if (i == 0) {
      build_gate_tables(L, C16, walk.gates(0), walk.gate_rows(0), &tables);
      __syncthreads();
    }
    const ChunkGateRows<compute_t> g_rows = walk.gate_rows(i);
    const auto Q = walk.q(cur).matrix();
    const auto K = walk.k(cur).matrix();
    const PaddedTile<input_t> dO = walk.row_input(cur);
    const PaddedTile<operand_t> carry0 = walk.stack(cur), carry1 = walk.stack(nxt);
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
        n % group == 0
            ? group_cotangent<checkpoint_t>(launch, workspace.group_cotangents, blockIdx.z, bh, n / group - 1, group)
            : nullptr;
    kernel::for_each_strip<2>(kTileV, dk16, [&](int r0, int c0) {
      acc_t am[2][4], aq[2][4], as[2][4];
      kernel::zero(am);
      kernel::zero(aq);
      kernel::zero(as);
      kernel::strip_mma_shared_b<Policy, 2>(K, r0, c0, C16, kernel::product<Policy>(am, de2.transposed()));
      kernel::strip_mma_shared_b<Policy, 2>(Q, r0, c0, C16, kernel::product<Policy>(aq, ado.transposed()),
                                            kernel::product<Policy>(as, gdo.transposed()));
      kernel::for_each_strip_element<2>(r0, c0, [&](int j, int d, int s, int e) {
        const compute_t dm_old = walk.value(carry0, j, d), ds_old = walk.value(carry0, kTileV + j, d);
        const compute_t dm_new = a_L * dm_old + compute_t(am[s][e]) + compute_t(aq[s][e]);
        const compute_t ds_new = g_L * dm_old + p_L * ds_old + compute_t(as[s][e]);
        walk.set(carry1, j, d, dm_new);
        walk.set(carry1, kTileV + j, d, ds_new);
        if (group_end && j < rows && d < dk) {
          const index_t at_row = index_t(v0 + j) * dk + d;
          group_end[at_row] = device::cast<checkpoint_t>(dm_new);
          group_end[index_t(dv) * dk + at_row] = device::cast<checkpoint_t>(ds_new);
        }
      });
    });
    if (i + 1 < steps)
      build_gate_tables(chunk_length(params, n - 1), C16, walk.gates(i + 1), walk.gate_rows(i + 1), &tables);
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
