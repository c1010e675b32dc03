// CUDA forward of the linear memory, written only against the device layer (device/device.h), so
// the emulation runs this exact source in CI. Included by exactly one TU per build.
//
// One kernel, linear_memory_fwd_kernel: one block per (value tile, head, batch) walks the chunks in
// order, keeping its rows of M and S on chip (value tiles never communicate: row j of M and S
// evolves from row j of E only, docs/kernels.md §5.4), and per chunk of L tokens computes
//   E   = f(K M0^T - V)                                        errors at the chunk-start memory
//   M_L = a_L M0 + g_L S0 + (diag(m) E)^T K,  S_L = p S0 + (diag(s) E)^T K     the chunk step
//   O   = diag(a) Q M0^T + diag(g) Q S0^T + (Q K^T .* c) E     (token read; O = Q M0^T for the
//                                                              chunk_start read)
// with the gate tables of docs/backward_linear.md §0 and f the objective's elementwise error map
// (2r for l2; ChunkObjective, docs/miras.md §2.1). The whole-state options (yaad's norms and lq's
// rho0 read all of Dv) take one block over all of Dv: one tile, or past 64 rows several tiles that
// the block walks in turn each chunk, the state in global memory between them (docs/kernels.md
// §6.1.12). Only the step carries a dependency from chunk
// to chunk (E, then the update); the outputs and Q K^T run in the same phases as independent
// products, and the next chunk's gate tables are built while the update runs, so neither sits on
// the chain. The outputs never leave the chip as states: without a gradient nothing but q, k, v,
// the gates and o moves (docs/design.md §3's bound), and with one the block also writes chunk
// start states in the input dtype, every other chunk's for 16-bit inputs (the checkpoints the
// backward reads, linear_memory_checkpoint_stride; for bf16 inputs exactly the bf16 operands the
// products used, so the outputs are the same with or without them).
//
// Per chunk: a barrier publishes the chunk's staged tiles (cp.async, issued while the previous
// chunk computed); phase A computes E (and diag(m) E, diag(s) E) and W = Q K^T .* c and writes the
// checkpoint; a barrier; phase B runs the update and the outputs and builds the next chunk's
// tables. The state's operand copy alternates between two tiles, so phase B reads M0 while it
// writes M_L.
#pragma once

#include "cuda/common/launch.cuh"
#include "cuda/common/tile_loops.cuh"
#include "cuda/linear_memory_fwd.h"
#include "cuda/linear_memory_walk.cuh"

namespace titans {
namespace lm {

constexpr int kForwardThreads = 256;

// Shared memory of the forward kernel (byte offsets; tiles are PaddedTiles): the walk's front (the
// stack is [M; S], the per-value-row input v), then the chunk's working tiles.
template <typename input_t, int kTileV>
struct FwdLayout : WalkLayout<input_t, kTileV> {
  kernel::TileSlot err, err_m, err_s;  // operand_t [C, kTileV]: E, diag(m) E, diag(s) E
  kernel::TileSlot err_lo;             // operand_t [C, 2 kTileV]: the rounding residues of err_m, err_s (split)
  kernel::TileSlot w;                  // operand_t [C, C]: W = Q K^T .* c (token read)
  int resid, norm;                     // compute_t [C16, kTileV tiles], [C16]: R and its row norms (yaad only)
  int scratch;                         // compute_t [warps]: the block sum of lq's rho0 (lq only)
  int lag_err;                         // compute_t [kTileV tiles]: kl's lag token errors (kl only)
  // tiles: the value tiles one block walks per chunk (the whole-state options past one tile).
  __host__ __device__ FwdLayout(int dk, int chunk, bool token_read, const MirasParams& miras, int tiles)
      : WalkLayout<input_t, kTileV>(dk, chunk) {
    using operand_t = typename Types<input_t>::operand_t;
    using compute_t = typename Types<input_t>::compute_t;
    kernel::SmemLayout& smem = this->smem;
    const bool yaad = miras.objective == ObjectiveKind::yaad, lq = miras.retention == RetentionKind::lq;
    err = smem.tile<operand_t>(chunk, kTileV);
    err_m = smem.tile<operand_t>(chunk, kTileV);
    err_s = smem.tile<operand_t>(chunk, kTileV);
    err_lo = smem.tile<operand_t>(split_update(miras) ? chunk : 0, split_update(miras) ? 2 * kTileV : 0);
    w = smem.tile<operand_t>(token_read ? chunk : 0, token_read ? chunk : 0);
    resid = smem.array<compute_t>(yaad ? this->chunk16 * kTileV * tiles : 0);
    norm = smem.array<compute_t>(yaad ? this->chunk16 : 0);
    scratch = smem.array<compute_t>(lq ? kForwardThreads / device::kWarpSize : 0);
    lag_err = smem.array<compute_t>(miras.retention == RetentionKind::kl ? kTileV * tiles : 0);
  }
  // kl in bf16 operands: the state update K^T diag(m) E (and diag(s) E) takes the row-scaled errors
  // as hi + lo, two bf16 tiles (the keys are exact in bf16, so two MMAs give about 16 bits of the
  // errors): the lag step's backward is ill-conditioned in the state it differentiates at (it
  // centres each row's cotangent and divides by the memory), and a state rounded through one bf16
  // copy of the errors puts the gradients 1-5 % off (docs/kernels.md §6.1.12).
  __host__ __device__ static bool split_update(const MirasParams& miras) {
    using operand_t = typename Types<input_t>::operand_t;
    return std::is_same<operand_t, device::bf16>::value && miras.retention == RetentionKind::kl;
  }
};

template <typename input_t, int kTileV>
__global__ void __launch_bounds__(kForwardThreads, 2)
    linear_memory_fwd_kernel(LinearMemoryParams launch, int block_tiles) {
  using T = Types<input_t>;
  using compute_t = typename T::compute_t;
  using operand_t = typename T::operand_t;
  using checkpoint_t = typename T::checkpoint_t;
  using Policy = typename T::Policy;
  using acc_t = typename Policy::acc_t;
  using kernel::PaddedTile;

  // Block z walks batch row z, or with cu_seqlens sequence z (its view, sequences.cuh).
  const int stride = T::checkpoint_stride(launch.miras);
  const LinearMemoryParams params = sequence_view<input_t>(launch, blockIdx.z, stride);
  const index_t checkpoint_slots = sequence_units(launch, stride);
  const int block_v0 = blockIdx.x * kTileV * block_tiles, h = blockIdx.y, b = kernel::batch_row(launch, blockIdx.z);
  const int dk = params.dk, dv = params.dv, C = params.chunk_size, n_chunks = params.n_chunks;
  const bool token_read = params.read_token;
  const FwdLayout<input_t, kTileV> at(dk, C, token_read, params.miras, block_tiles);
  const Walk<input_t, kTileV> walk(at);
  const int C16 = at.chunk16, dk16 = at.dk16;
  const ChunkGateTables<compute_t>& tables = walk.tables;
  const PaddedTile<operand_t> err(at.err), err_m(at.err_m), err_s(at.err_s), err_lo(at.err_lo), w(at.w);
  const bool split_update = FwdLayout<input_t, kTileV>::split_update(params.miras);
  const ChunkObjective<compute_t> objective(params);
  // The whole-state options run one block over all of Dv (the plan's rule): one tile, or with
  // block_tiles > 1 the block's tiles in turn, so the block's sums over its rows are the sums over Dv.
  const bool yaad = objective.f.uses_norm(), lq = params.miras.retention == RetentionKind::lq;
  const bool kl = params.miras.retention == RetentionKind::kl;
  const auto resid = kernel::shared_array<compute_t>(at.resid);
  const auto norm = kernel::shared_array<compute_t>(at.norm);
  const int resid_width = kTileV * block_tiles;  // resid: [C16, resid_width], the block's value rows
  const compute_t lq_q = compute_t(params.miras.q);

  walk.zero_staged();
  const index_t bh = index_t(b) * params.heads + h;
  const auto state_offset = [&](int v0) { return (bh * dv + v0) * dk; };
  const auto tile_start = [&](int tile) { return block_v0 + tile * kTileV; };
  // With one tile the state stays on chip. With several, the tiles take turns in the stack and the
  // state lives between them in the final state's outputs (its home, mostly in L2): the initial
  // state (without one zeros, and kl's uniform 1 / Dk memory) is copied there first.
  const bool on_chip = block_tiles == 1;
  auto* home_m = static_cast<compute_t*>(params.m_final_ptr);
  auto* home_s = static_cast<compute_t*>(params.s_final_ptr);
  const int rows0 = tile_rows(params, block_v0, kTileV);
  if (on_chip) {
    // The block's rows of the initial state into the state (and its operand copy), zero past the rows
    // and past Dk; kl's default memory is uniform, 1 / Dk.
    walk.load_stack(params.m0_ptr, params.s0_ptr, state_offset(block_v0), rows0, dk,
                    kl ? compute_t(1) / compute_t(dk) : 0);
  } else {
    const auto* m0 = static_cast<const compute_t*>(params.m0_ptr);
    const auto* s0 = static_cast<const compute_t*>(params.s0_ptr);
    for (index_t idx = threadIdx.x; idx < index_t(dv) * dk; idx += blockDim.x) {
      home_m[state_offset(0) + idx] = m0 ? m0[state_offset(0) + idx] : kl ? compute_t(1) / compute_t(dk) : compute_t(0);
      home_s[state_offset(0) + idx] = s0 ? s0[state_offset(0) + idx] : compute_t(0);
    }
  }
  __syncthreads();

  auto* checkpoints = static_cast<checkpoint_t*>(params.chunk_states_ptr);
  auto* o_out = static_cast<input_t*>(params.o_ptr);

  const auto stage = [&](int n) {
    // Several tiles stage their values with their state (load_tile).
    walk.stage_tiles(params, params.v, n & 1, b, h, n, block_v0, on_chip ? rows0 : 0);
    // The gates run one chunk ahead: chunk n + 1's tables are built while chunk n computes.
    if (n == 0) walk.gates(0).stage(params, b, h, 0, chunk_length(params, 0));
    if (n + 1 < n_chunks) walk.gates(n + 1).stage(params, b, h, (n + 1) * C, chunk_length(params, n + 1));
  };

  kernel::pipelined_steps(n_chunks, stage, [&](int n) {
    const int L = chunk_length(params, n), cur = n & 1, nxt = cur ^ 1;
    if (n == 0) {
      build_gate_tables(L, C16, walk.gates(0), walk.gate_rows(0), &tables, kl);
      __syncthreads();
    }
    const ChunkGateRows<compute_t> g_rows = walk.gate_rows(n);
    const auto Q = walk.q(cur).matrix();
    const auto K = walk.k(cur).matrix();
    const PaddedTile<input_t> V = walk.row_input(cur);
    const PaddedTile<operand_t> S0 = walk.stack(cur), S1 = walk.stack(nxt);
    const auto M0t = S0.transposed();                  // B operand M0^T: (d, j) -> M0[j, d]
    const auto S0t = S0.rows_from(kTileV).transposed();
    // Several tiles: tile `tile`'s rows of the chunk's start state from home into the stack (only M
    // with with_s false) and of its values (tokens [0, value_rows)), then a barrier.
    const auto load_tile = [&](int tile, bool with_s, int value_rows) {
      const int v0 = tile_start(tile), rows = tile_rows(params, v0, kTileV);
      load_state_stack<kTileV, T::kSeparateMaster>(home_m, with_s ? home_s : nullptr, state_offset(v0), rows, dk,
                                                   dk16, walk.master, S0, compute_t(0));
      kernel::stage_token_rows<input_t>(params.v, b, h, n * C, value_rows, v0, rows, V.ld, V.data);
      kernel::finish_staging();
      if (L < C || rows < kTileV) V.zero_outside(L, rows);
      __syncthreads();
    };

    // lq: the chunk learns and reads with rho0 M0 (M is the accumulator). rho0 comes from the
    // operand copy (on chip, or home's values rounded as the copy would be), which is what the
    // checkpoint holds, so the backward recomputes the same value.
    compute_t rho = compute_t(1);
    if (lq) {
      compute_t sum[1] = {compute_t(0)};
      if (on_chip)
        for (int idx = threadIdx.x; idx < rows0 * dk; idx += blockDim.x)
          sum[0] += kernel::lq_power(device::cast<compute_t>(S0(idx / dk, idx % dk)), lq_q);
      else
        for (index_t idx = threadIdx.x; idx < index_t(dv) * dk; idx += blockDim.x)
          sum[0] += kernel::lq_power(
              device::cast<compute_t>(device::cast<operand_t>(home_m[state_offset(0) + idx])), lq_q);
      kernel::block_sum(sum, kernel::shared_array<compute_t>(at.scratch));
      rho = kernel::lq_rho(sum[0], lq_q);
    }
    // R = rho0 K M0^T - V of the tile starting at v0 (rows), for each element: at(t, j, r).
    const auto residuals = [&](int rows, const auto& at_element) {
      kernel::for_each_strip<2>(C16, kTileV, [&](int r0, int c0) {
        acc_t acc[2][4];
        kernel::zero(acc);
        kernel::strip_mma<Policy>(K, r0, c0, dk, kernel::times(acc, M0t));
        kernel::for_each_strip_element<2>(r0, c0, [&](int t, int j, int s, int e) {
          at_element(t, j, rho * compute_t(acc[s][e]) - device::cast<compute_t>(V(t, j)), t < L && j < rows);
        });
      });
    };
    // The tile's outputs (rows from v0): the token reads diag(a) Q M0^T + diag(g) Q S0^T + W E, or
    // under read "chunk_start" Q M0^T, rho0 times (strips from first_strip's warp on).
    const auto write_outputs = [&](int v0, int rows, int first_strip) {
      kernel::for_each_strip<2>(
          C16, kTileV,
          [&](int r0, int c0) {
            acc_t qm[2][4], qs[2][4], we[2][4];
            kernel::zero(qm);
            kernel::zero(qs);
            kernel::zero(we);
            if (token_read) {
              kernel::strip_mma<Policy>(Q, r0, c0, dk, kernel::times(qm, M0t), kernel::times(qs, S0t));
              kernel::strip_mma<Policy>(w.matrix(), r0, c0, C16, kernel::times(we, err.matrix()));
            } else {
              kernel::strip_mma<Policy>(Q, r0, c0, dk, kernel::times(qm, M0t));
            }
            // The gate rows scale accumulators, so a and g never round into the MMA operands.
            kernel::for_each_strip_element<2>(r0, c0, [&](int t, int j, int s, int e) {
              if (t >= L || j >= rows) return;
              const compute_t out =
                  rho * (token_read ? g_rows.a[t] * compute_t(qm[s][e]) + g_rows.g[t] * compute_t(qs[s][e]) +
                                          compute_t(we[s][e])
                                    : compute_t(qm[s][e]));
              o_out[kernel::contiguous_token_offset(b, n * C + t, h, params.seqlen, params.heads, dv) + v0 + j] =
                  device::cast<input_t>(out);
            });
          },
          first_strip);
    };
    const auto store_checkpoint = [&](int v0, int rows) {
      if (!checkpoints || n % stride != 0) return;
      checkpoint_t* at_chunk = checkpoints + checkpoint_offset(params, checkpoint_slots, bh, n, stride);
      store_state_stack<kTileV>(at_chunk, at_chunk + index_t(dv) * dk, index_t(v0) * dk, rows, dk,
                                [&](int r, int d) { return S0(r, d); });
    };

    // kl: token 0 takes Memora's step on the state's rows (row-local), then the chunk runs from its
    // result with lag tables (token 0 the identity; its read is q0 M_lag). Under yaad the lag
    // token's switch reads its residual norm over all of Dv, so the lag residuals of every tile come
    // first; then per tile the checkpoint, the chunk_start reads (of the memory before the step) and
    // the step, its result home when there are several tiles.
    if (kl) {
      const auto lag_err = kernel::shared_array<compute_t>(at.lag_err);  // [kTileV tiles]
      const int lag_width = kTileV * block_tiles;
      const PaddedTile<input_t> keys = walk.k(cur);
      const auto k0 = [&](int d) { return device::cast<compute_t>(keys(0, d)); };
      for (int tile = 0; tile < block_tiles; ++tile) {
        const int v0 = tile_start(tile), rows = tile_rows(params, v0, kTileV);
        if (!on_chip) load_tile(tile, false, 1);
        for (int j = rows + threadIdx.x; j < kTileV; j += blockDim.x) lag_err[tile * kTileV + j] = 0;
        lag_errors(objective, rows, dk, [&](int j, int d) { return walk.value(S0, j, d); }, k0,
                   [&](int j) { return device::cast<compute_t>(V(0, j)); }, b, n * C, h, v0,
                   [&](int j, compute_t r, compute_t, compute_t e) { lag_err[tile * kTileV + j] = yaad ? r : e; });
        __syncthreads();  // before the next tile's load, or the norm
      }
      if (yaad) {
        row_norms(1, lag_width, lag_err, norm);
        __syncthreads();
        for (int idx = threadIdx.x; idx < lag_width; idx += blockDim.x)
          if (block_v0 + idx < dv)
            lag_err[idx] = objective.error(lag_err[idx], objective.threshold(true, b, n * C, h, block_v0 + idx),
                                           norm[0]);
        __syncthreads();
      }
      const ChunkGates<compute_t> lag_gates = walk.gates(n);
      for (int tile = 0; tile < block_tiles; ++tile) {
        const int v0 = tile_start(tile), rows = tile_rows(params, v0, kTileV);
        if (!on_chip) load_tile(tile, true, 0);
        store_checkpoint(v0, rows);
        if (!token_read) write_outputs(v0, rows, 0);
        __syncthreads();  // the checkpoint and the chunk_start reads have read the state
        kernel::kl_softmax_rows<compute_t>(
            rows, dk, lag_gates.theta[0], lag_gates.eta[0], compute_t(1) - lag_gates.alpha[0],
            [&](int r, int d) { return walk.value(S0, r, d); },
            [&](int r, int d) { return walk.value(S0, kTileV + r, d); },
            [&](int r) { return lag_err[tile * kTileV + r]; }, k0, [&](int r, int d, compute_t m, compute_t s) {
              walk.set(S0, r, d, m);
              walk.set(S0, kTileV + r, d, s);
            });
        __syncthreads();
        if (!on_chip) {
          store_state_stack<kTileV>(home_m, home_s, state_offset(v0), rows, dk,
                                    [&](int r, int d) { return walk.value(S0, r, d); });
          __syncthreads();
        }
      }
    }
    // yaad: R of every tile (at the lagged memory under kl), then the row norms.
    if (yaad) {
      for (int tile = 0; tile < block_tiles; ++tile) {
        if (!on_chip) load_tile(tile, false, L);
        residuals(tile_rows(params, tile_start(tile), kTileV), [&](int t, int j, compute_t r, bool inside) {
          resid[t * resid_width + tile * kTileV + j] = inside ? r : compute_t(0);
        });
        __syncthreads();  // before the next tile's load, or the norms
      }
      row_norms(C16, resid_width, resid, norm);
      __syncthreads();
    }

    for (int tile = 0; tile < block_tiles; ++tile) {
      const int v0 = tile_start(tile), rows = tile_rows(params, v0, kTileV);
      if (!on_chip) load_tile(tile, true, L);
      if (!kl) store_checkpoint(v0, rows);  // kl's came before its step

      // Phase A: E and its row-scaled copies; W (once per chunk). yaad's R and norms come first.
      const auto write_error = [&](int t, int j, compute_t r) {
        const compute_t value = objective.error(
            r, objective.threshold(t < L && j < rows, b, n * C + t, h, v0 + j), yaad ? norm[t] : 0);
        err(t, j) = device::cast<operand_t>(value);
        const compute_t value_m = g_rows.m_end[t] * value, value_s = g_rows.s_end[t] * value;
        err_m(t, j) = device::cast<operand_t>(value_m);
        err_s(t, j) = device::cast<operand_t>(value_s);
        if (split_update) {
          err_lo(t, j) = device::cast<operand_t>(value_m - device::cast<compute_t>(err_m(t, j)));
          err_lo(t, kTileV + j) = device::cast<operand_t>(value_s - device::cast<compute_t>(err_s(t, j)));
        }
      };
      if (yaad)
        for (int idx = threadIdx.x; idx < C16 * kTileV; idx += blockDim.x)
          write_error(idx / kTileV, idx % kTileV, resid[idx / kTileV * resid_width + tile * kTileV + idx % kTileV]);
      else
        residuals(rows, [&](int t, int j, compute_t r, bool) { write_error(t, j, r); });
      if (token_read && tile == 0)
        kernel::for_each_strip<2>(
            C16, C16,
            [&](int r0, int c0) {
              acc_t acc[2][4];
              kernel::zero(acc);
              kernel::strip_mma<Policy>(Q, r0, c0, dk, kernel::times(acc, K.t()));
              kernel::for_each_strip_element<2>(r0, c0, [&](int t, int i, int s, int e) {
                w(t, i) = device::cast<operand_t>(i <= t && t < L ? tables.c[t * C16 + i] * compute_t(acc[s][e])
                                                                  : compute_t(0));
              });
            },
            kernel::strip_count<2>(C16, kTileV));
      __syncthreads();

      // Phase B: the chunk step into the other state tile; the outputs; after the last tile the next
      // chunk's tables.
      const compute_t a_L = g_rows.a_end(), g_L = g_rows.g_end(), p_L = g_rows.p_end();
      kernel::for_each_strip<2>(kTileV, dk16, [&](int r0, int c0) {
        acc_t am[2][4], as[2][4];
        kernel::zero(am);
        kernel::zero(as);
        if (split_update)  // the small parts first
          kernel::strip_mma_shared_b<Policy, 2>(K, r0, c0, C16, kernel::product<Policy>(am, err_lo.transposed()),
                                                kernel::product<Policy>(as, err_lo.cols_from(kTileV).transposed()));
        kernel::strip_mma_shared_b<Policy, 2>(K, r0, c0, C16, kernel::product<Policy>(am, err_m.transposed()),
                                              kernel::product<Policy>(as, err_s.transposed()));
        kernel::for_each_strip_element<2>(r0, c0, [&](int j, int d, int s, int e) {
          const compute_t m_old = walk.value(S0, j, d), s_old = walk.value(S0, kTileV + j, d);
          walk.set(S1, j, d, a_L * m_old + g_L * s_old + compute_t(am[s][e]));
          walk.set(S1, kTileV + j, d, p_L * s_old + compute_t(as[s][e]));
        });
      });
      if (token_read || !kl) write_outputs(v0, rows, kernel::strip_count<2>(kTileV, dk16));
      // c was last read in phase A of tile 0; the next chunk's rows go to the other buffer.
      if (tile + 1 == block_tiles && n + 1 < n_chunks)
        build_gate_tables(chunk_length(params, n + 1), C16, walk.gates(n + 1), walk.gate_rows(n + 1), &tables, kl);
      if (!on_chip) {  // the tile's end state home, before the next tile's load takes the stack
        __syncthreads();
        store_state_stack<kTileV>(home_m, home_s, state_offset(v0), rows, dk,
                                  [&](int r, int d) { return walk.value(S1, r, d); });
        __syncthreads();
      }
    }
  });
  __syncthreads();

  if (on_chip) {
    const PaddedTile<operand_t> final_state = walk.stack(n_chunks & 1);
    store_state_stack<kTileV>(home_m, home_s, state_offset(block_v0), rows0, dk,
                              [&](int r, int d) { return walk.value(final_state, r, d); });
  }
}

// Calls f(std::integral_constant<int, tile>{}) for a forward value tile.
template <class F>
auto dispatch_fwd_tile(int tile, const F& f) {
  if (tile == 64) return f(std::integral_constant<int, 64>{});
  if (tile == 32) return f(std::integral_constant<int, 32>{});
  return f(std::integral_constant<int, 16>{});
}

inline size_t fwd_smem_bytes(const LinearMemoryParams& p, InputType type, int tile, int block_tiles) {
  return kernel::dispatch_input_type(type, [&](auto input) {
    return dispatch_fwd_tile(tile, [&](auto tile_v) {
      return size_t(FwdLayout<decltype(input), decltype(tile_v)::value>(p.dk, p.chunk_size, p.read_token, p.miras,
                                                                        block_tiles)
                        .smem.bytes);
    });
  });
}

}  // namespace lm

// The value tile: the candidate (16, 32 or 64 rows, not wider than Dv needs) whose grid takes the
// fewest cycles by the cost model of linear_memory_launch.cuh: waves of the grid times chunks times
// one chunk step, where the step is the larger of the SM's MMA work (redundant Q K^T per tile
// included, shared with the other resident blocks) and the chain's latency. At B * H = 128 and
// Dv = 64 on an H100 it takes whole-Dv tiles: 128 blocks, one wave, one Q K^T per chunk. The
// whole-state options take one block over all of Dv: the narrowest tile >= Dv, or past 64 rows
// tiles of 64 that the block walks in turn with the state in the final state's outputs
// (docs/kernels.md §6.1.12).
LinearMemoryFwdPlan linear_memory_fwd_plan(const LinearMemoryParams& p, InputType type, const DeviceLimits& device,
                                           bool save_states, bool has_initial_state) {
  LinearMemoryFwdPlan plan;
  plan.save_states = save_states;
  const int dv16 = kernel::round_up(p.dv, kernel::kTileGranule);
  double best = -1;
  size_t narrowest_smem = 0;
  const bool whole_state = linear_memory_whole_state(p.miras);
  for (const int tile : {16, 32, 64}) {
    if (tile > 16 && tile / 2 >= dv16) break;  // wider than Dv needs
    if (whole_state && tile < p.dv && tile < kWideTile) continue;  // one block over all of Dv
    const int block_tiles = whole_state ? (p.dv + tile - 1) / tile : 1;
    const size_t smem = lm::fwd_smem_bytes(p, type, tile, block_tiles);
    if (narrowest_smem == 0) narrowest_smem = smem;
    if (smem > device.max_shared_bytes) continue;
    const int64_t blocks = int64_t((p.dv + tile - 1) / tile / block_tiles) * p.heads * sequence_rows(p);
    const int64_t resident = kernel::resident_blocks_per_sm(smem, device, 2);
    const int64_t sms = device.sm_count > 0 ? device.sm_count : 1, per_sm = (blocks + sms - 1) / sms;
    const int C = p.chunk_size, dk = p.dk;
    double work = lm::mma_work(type, C, tile, dk) + 2 * lm::mma_work(type, tile, dk, C) +
                  lm::mma_work(type, C, tile, dk);
    if (p.read_token) work += lm::mma_work(type, C, C, dk) + lm::mma_work(type, C, tile, dk) + lm::mma_work(type, C, tile, C);
    const double chain = double(kernel::round_up(dk, 16) / 16 + kernel::round_up(C, 16) / 16);
    const double cost = double(kernel::waves(blocks, resident, device)) * p.n_chunks * block_tiles *
                        lm::step_cycles(work, per_sm < resident ? per_sm : resident, chain, 2);
    if (best < 0 || cost <= best) best = cost, plan.tile_v = tile, plan.block_tiles = block_tiles;
  }
  const int64_t tokens = int64_t(p.batch) * p.seqlen * p.heads;
  const int64_t state_elems = int64_t(sequence_rows(p)) * p.heads * p.dv * p.dk;
  const int in = input_type_bytes(type), cmp = compute_type_bytes(type);
  KernelPlan& k = plan.add_kernel("linear_memory_fwd");
  plan.fits = best >= 0;
  k.smem_bytes = plan.fits ? lm::fwd_smem_bytes(p, type, plan.tile_v, plan.block_tiles) : narrowest_smem;
  k.threads = lm::kForwardThreads;
  k.blocks = int64_t((p.dv + plan.tile_v - 1) / plan.tile_v / plan.block_tiles) * p.heads * sequence_rows(p);
  k.bytes_read = tokens * ((2 * p.dk + p.dv) * in + 3 * cmp) + (has_initial_state ? 2 * state_elems * cmp : 0) +
                 (objective_has_delta(p.miras.objective) ? tokens * p.dv * cmp : 0);
  const int64_t checkpoints =
      save_states ? int64_t(p.batch) * p.heads * linear_memory_checkpoints(p, type) * 2 * p.dv * p.dk * in : 0;
  k.bytes_written = tokens * p.dv * in + 2 * state_elems * cmp + checkpoints;
  if (plan.block_tiles > 1) {
    // The state's trips home, every chunk of every (sequence, head) (with cu_seqlens at most T / C + N
    // per head): [M; S] written once (and the initial copy), read once, and under yaad M once more
    // with the values (the residuals' pass) and under lq M once more (rho0's sum); kl's lag token
    // (with yaad) reads M with token 0's values, then [M; S] again, and writes the lagged [M; S].
    const int64_t chunk_states = (p.cu_seqlens ? sequence_units(p, 1) : int64_t(p.batch) * p.n_chunks) * p.heads *
                                 p.dv * p.dk;
    const bool yaad = p.miras.objective == ObjectiveKind::yaad, lq = p.miras.retention == RetentionKind::lq;
    const bool kl = p.miras.retention == RetentionKind::kl;
    k.bytes_written += (kl ? 4 : 2) * chunk_states * cmp;
    k.bytes_read += (2 + yaad + lq + (kl ? 3 : 0)) * chunk_states * cmp + (yaad ? tokens * p.dv * in : 0) +
                    (kl ? chunk_states / p.dk * in : 0);
  }
  if (save_states) plan.add_buffer("checkpoints", checkpoints);
  return plan;
}

int linear_memory_fwd_launch(const LinearMemoryParams& params, InputType input_type, const LinearMemoryFwdPlan& plan,
                             CUstream_st* stream) {
  if (sequence_rows(params) == 0 || params.heads == 0 || params.dv == 0) return device::kSuccess;
  const KernelPlan& k = plan.kernels[0];
  return static_cast<int>(kernel::dispatch_input_type(input_type, [&](auto input) {
    return lm::dispatch_fwd_tile(plan.tile_v, [&](auto tile_v) {
      using input_t = decltype(input);
      constexpr int kTileV = decltype(tile_v)::value;
      return device::launch("linear_memory_fwd", lm::linear_memory_fwd_kernel<input_t, kTileV>,
                            dim3((params.dv + kTileV - 1) / kTileV / plan.block_tiles, params.heads,
                                 sequence_rows(params)),
                            dim3(lm::kForwardThreads), k.smem_bytes, stream, params, plan.block_tiles);
    });
  }));
}

}  // namespace titans
