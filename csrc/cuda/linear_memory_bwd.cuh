// CUDA backward of the linear memory, written only against the device layer, so the emulation runs
// this exact source in CI. Included by exactly one TU per build. Formulas: docs/backward_linear.md
// §1 (steps A-E), §2 (gate gradients), §3 (reverse pass, Dv split).
//
// The forward's decomposition, mirrored (docs/kernels.md §1.2, §6.1): the reverse sequential pass does
// only what carries the state cotangent from chunk to chunk; everything else runs in parallel
// before it (what does not depend on the cotangent) or after it.
// 0. linear_memory_gate_rows (linear_memory_common.cuh) and linear_memory_bwd_local_kernel, in
//    parallel over chunks: the gate rows the reverse pass needs, and U = (Q K^T .* c)^T dO, the
//    read-out's share of dE (token read), one block per (chunk, value tile, head, batch).
// 1. linear_memory_bwd_state_kernel, one block per (value tile, head, batch), walks the chunks in
//    reverse carrying this tile's rows of the cotangent (dM, dS) of the chunk-end state in shared
//    memory (the transposed chunk map multiplies on the right, so value tiles are independent).
//    Per chunk it writes the carried (dM, dS) for kernel 2 and steps it to the chunk start:
//      dE  = diag(m) K dM^T + diag(s) K dS^T + U
//      dM0 = a_L dM + 2 dE^T K + (diag(a) dO)^T Q ,  dS0 = g_L dM + p dS + (diag(g) dO)^T Q
//    (chunk_start read: U = 0, dM0 = a_L dM + 2 dE^T K + dO^T Q, dS0 = g_L dM + p dS). Neither
//    M0 nor E is needed on this path.
// 2. linear_memory_bwd_chunk_kernel, one block per (chunk, value tile, head, batch), in parallel:
//    from the saved chunk-start state and the carried cotangent it produces everything
//    value-local exactly (dV) and the value tile's partial sums of what contracts over Dv (dQ, dK
//    and the gate-coefficient cotangents d_c, d_a, d_g, d_s, d_p).
// 3. linear_memory_bwd_gates_kernel, one block per (chunk, head, batch), adds the tiles' partial
//    sums in tile order (deterministic, no atomics), writes dQ and dK, and turns the coefficient
//    cotangents into dtheta, deta, dalpha by the reverse column recurrence (one thread per column,
//    then row sums in a fixed order).
// All products run on tensor cores through the operand policy of linear_memory_common.cuh (bf16
// inputs read their fragments with ldmatrix, mma_bf16_tiles); cotangents, the carried (dM, dS)
// and every reduction stay in the compute dtype. Kernel 1 loads chunk n - 1 while it computes
// chunk n (pipelined_chunk_loop).
#pragma once

#include "cuda/linear_memory_bwd.h"
#include "cuda/linear_memory_common.cuh"

namespace titans {

// dE = diag(m) X + diag(s) Y + U for the block's value tile, from X | Y = K [dM; dS]^T (xy,
// [L, 2 tile_v]) and U = (Q K^T .* c)^T dO (token read; zero for the chunk_start read): calls
// emit(t, j, dE[t, j]) for t < L, j < rows.
template <typename T, class Ptr, class Emit>
__device__ __forceinline__ void errors_cotangent(int L, int rows, int tile_v, bool token_read, const Ptr& m_end,
                                                 const Ptr& s_end, const Ptr& xy, const Ptr& u, const Emit& emit) {
  for (int idx = threadIdx.x; idx < L * rows; idx += blockDim.x) {
    const int t = idx / rows, j = idx % rows;
    emit(t, j, m_end[t] * xy[t * 2 * tile_v + j] + s_end[t] * xy[t * 2 * tile_v + tile_v + j] +
                   (token_read ? u[t * tile_v + j] : T(0)));
  }
}

// Shared memory of the kernel of the read-out's share of dE.
template <typename Ktraits>
struct LinearMemoryBwdLocalSmem {
  using input_t = typename Ktraits::input_t;
  lm::SmemCarver carver;
  lm::GateTablesSmem tables;
  int ldk, ldc, ldv;        // leading dimensions of the staged q, k, dO and of the bf16 W^T
  int scores;               // [C, C]: G = Q K^T (causal)
  int q, k, d_o;            // input region: [C, ldk], [C, ldk], [C, ldv]
  int wt_bf;                // input region, with fragments: [C, ldc], W^T = (G .* c)^T in bf16
  __host__ __device__ LinearMemoryBwdLocalSmem(int dk, int chunk)
      : tables(carver, chunk), ldk(lm::padded<input_t>(dk)), ldc(lm::padded<input_t>(chunk)),
        ldv(lm::padded<input_t>(Ktraits::kTileV)) {
    scores = carver.compute(chunk * chunk);
    q = carver.input(chunk * ldk), k = carver.input(chunk * ldk), d_o = carver.input(chunk * ldv);
    wt_bf = carver.input(lm::uses_fragments<Ktraits>(dk, chunk) ? chunk * ldc : 0);
  }
};

// U = (Q K^T .* c)^T dO, the part of dE that the read-out contributes (token read), which does not
// depend on the carried cotangent: computed in parallel before the reverse pass, which then only
// adds it.
template <typename Ktraits>
__global__ void __launch_bounds__(Ktraits::kNThreads, Ktraits::kMinBlocksPerSm)
    linear_memory_bwd_local_kernel(LinearMemoryBwdParams params, LinearMemoryBwdWorkspace workspace) {
  using input_t = typename Ktraits::input_t;
  using compute_t = typename Ktraits::compute_t;
  using Policy = typename Ktraits::Policy;
  constexpr int kTileV = Ktraits::kTileV;

  const int dk = params.dk, dv = params.dv, C = params.chunk_size;
  const lm::ChunkTileBlock block(params, kTileV);
  const int v0 = block.v0, rows = block.rows, t0 = block.t0, L = block.L, h = blockIdx.y, b = blockIdx.z;
  const bool fragments = lm::uses_fragments<Ktraits>(dk, C);

  const LinearMemoryBwdLocalSmem<Ktraits> layout(dk, C);
  const int ldk = layout.ldk, ldc = layout.ldc, ldv = layout.ldv;
  const lm::SmemBase<compute_t, input_t> smem(layout.carver);
  const auto scores = smem.compute(layout.scores);
  const lm::GateTables<compute_t> tables(smem, layout.tables);
  const auto q_s = smem.input(layout.q);
  const auto k_s = smem.input(layout.k);
  const auto do_s = smem.input(layout.d_o);
  const auto wt_bf = smem.input(layout.wt_bf);
  const auto Q = [&](int t, int d) { return device::cast<compute_t>(q_s[t * ldk + d]); };
  const auto K = [&](int t, int d) { return device::cast<compute_t>(k_s[t * ldk + d]); };
  const auto dO = [&](int t, int j) { return device::cast<compute_t>(do_s[t * ldv + j]); };
  const lm::Bf16Tile<decltype(q_s)> q_tile{q_s, ldk}, k_tile{k_s, ldk}, wt_tile{wt_bf, ldc}, do_tile{do_s, ldv};

  lm::stage_token_rows<input_t>(params.k, b, h, t0, L, 0, dk, ldk, k_s);
  lm::stage_token_rows<input_t>(params.q, b, h, t0, L, 0, dk, ldk, q_s);
  lm::stage_token_rows<input_t>(params.d_o, b, h, t0, L, v0, rows, ldv, do_s);
  tables.stage(params, b, h, t0, L);
  // The fragments' contraction over the chunk runs to a multiple of 16: dO's rows past L are zeros.
  if (fragments)
    for (int idx = L * ldv + threadIdx.x; idx < C * ldv; idx += blockDim.x) do_s[idx] = device::cast<input_t>(0.f);
  lm::finish_staging();
  __syncthreads();

  tables.build(L, C);
  lm::causal_scores<Policy, compute_t>(L, C, dk, Q, K, scores, fragments, q_tile, k_tile);
  __syncthreads();

  // W^T in bf16 for the fragments: row t holds W[i, t] = c[i, t] G[i, t] for t <= i < L, else 0.
  if (fragments) {
    for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x) {
      const int t = idx / C, i = idx % C;
      wt_bf[t * ldc + i] =
          device::cast<input_t>(i < L && t <= i ? scores[i * C + t] * tables.c[i * C + t] : compute_t(0));
    }
    __syncthreads();
  }

  auto* u = static_cast<compute_t*>(workspace.errors_local);
  lm::for_each_tile(L, rows, [&](int r0, int c0) {
    typename Policy::acc_t acc[4] = {};
    lm::tile_product<Policy, true>(acc, r0, c0, L, rows, L,
                                   [&](int t, int i) { return scores[i * C + t] * tables.c[i * C + t]; }, dO,
                                   fragments, wt_tile, do_tile);
    lm::for_each_element(r0, c0, L, rows, [&](int t, int j, int e) {
      u[lm::contiguous_token_offset(b, t0 + t, h, params.seqlen, params.heads, dv) + v0 + j] = compute_t(acc[e]);
    });
  });
}

// Shared memory of the reverse sequential kernel (offsets in elements of each region's type). The
// staged tiles are double-buffered: chunk n - 1's load overlaps chunk n's products.
template <typename Ktraits>
struct LinearMemoryBwdStateSmem {
  using input_t = typename Ktraits::input_t;
  lm::SmemCarver carver;
  int ldk, ldc;             // leading dimensions of the staged queries and keys, and of the A tiles
  int dm, ds;               // [kTileV, Dk]: the carried cotangent
  int d_e;                  // [C, kTileV]
  int xy;                   // [C, 2 kTileV]: X = K dM^T | Y = K dS^T
  int u;                    // 2 x [C, kTileV]: the read-out's share of dE (token read)
  int gate_rows;            // 2 x [linear_memory_gate_rows_size(C)]
  int q, k, d_o;            // input region: 2 x [C, ldk], 2 x [C, ldk], 2 x [C, kTileV]
  int dmds_bf;              // input region, with fragments: [2 kTileV, ldk] bf16 copy of [dM; dS]
  int de_t, ado_t, gdo_t;   // input region, with fragments: [kTileV, ldc] each, the update's A
                            // operands 2 dE^T, (diag(a) dO)^T (chunk_start: dO^T), (diag(g) dO)^T
  int u_size, gate_rows_size, qk_size, d_o_size;  // one buffer of each
  __host__ __device__ LinearMemoryBwdStateSmem(int dk, int chunk)
      : ldk(lm::padded<input_t>(dk)), ldc(lm::padded<input_t>(chunk)), u_size(chunk * Ktraits::kTileV),
        gate_rows_size(linear_memory_gate_rows_size(chunk)), qk_size(chunk * ldk), d_o_size(chunk * Ktraits::kTileV) {
    constexpr int tile_v = Ktraits::kTileV;
    dm = carver.compute(tile_v * dk), ds = carver.compute(tile_v * dk);
    d_e = carver.compute(chunk * tile_v), xy = carver.compute(chunk * 2 * tile_v);
    u = carver.compute(2 * u_size), gate_rows = carver.compute(2 * gate_rows_size);
    q = carver.input(2 * qk_size), k = carver.input(2 * qk_size), d_o = carver.input(2 * d_o_size);
    const bool fragments = lm::uses_fragments<Ktraits>(dk, chunk);
    dmds_bf = carver.input(fragments ? 2 * tile_v * ldk : 0);
    de_t = carver.input(fragments ? tile_v * ldc : 0), ado_t = carver.input(fragments ? tile_v * ldc : 0);
    gdo_t = carver.input(fragments ? tile_v * ldc : 0);
  }
};

template <typename Ktraits>
__global__ void __launch_bounds__(Ktraits::kNThreads, Ktraits::kMinBlocksPerSm)
    linear_memory_bwd_state_kernel(LinearMemoryBwdParams params, LinearMemoryBwdWorkspace workspace) {
  using input_t = typename Ktraits::input_t;
  using compute_t = typename Ktraits::compute_t;
  using Policy = typename Ktraits::Policy;
  using acc_t = typename Policy::acc_t;
  constexpr int kTileV = Ktraits::kTileV;

  const int v0 = blockIdx.x * kTileV, h = blockIdx.y, b = blockIdx.z;
  const int rows = lm::tile_rows(params, v0, kTileV);
  const int dk = params.dk, dv = params.dv, C = params.chunk_size;
  const bool token_read = params.read_token;
  // bf16 inputs read their fragments with ldmatrix, as in the forward's state kernel.
  const bool fragments = lm::uses_fragments<Ktraits>(dk, C);

  const LinearMemoryBwdStateSmem<Ktraits> layout(dk, C);
  const int ldk = layout.ldk, ldc = layout.ldc;
  const lm::SmemBase<compute_t, input_t> smem(layout.carver);
  const auto dm = smem.compute(layout.dm);
  const auto ds = smem.compute(layout.ds);
  const auto d_e = smem.compute(layout.d_e);
  const auto xy = smem.compute(layout.xy);
  const auto u_s = smem.compute(layout.u);
  const auto gate_rows = smem.compute(layout.gate_rows);
  const auto q_s = smem.input(layout.q);
  const auto k_s = smem.input(layout.k);
  const auto do_s = smem.input(layout.d_o);
  const auto dmds_bf = smem.input(layout.dmds_bf);
  const auto de_t = smem.input(layout.de_t);
  const auto ado_t = smem.input(layout.ado_t);
  const auto gdo_t = smem.input(layout.gdo_t);

  // The cotangent of the final state (zero when the final state is not used), this tile's rows.
  const index_t bh = index_t(b) * params.heads + h;
  const index_t state_offset = (bh * dv + v0) * dk;
  lm::load_state_pair(static_cast<const compute_t*>(params.d_m_final_ptr),
                      static_cast<const compute_t*>(params.d_s_final_ptr), state_offset, rows * dk, dm, ds);
  // dM in rows 0..rows-1 of the bf16 stack, dS in rows kTileV.. (a partial tile's other rows
  // stay unused).
  const auto set_stacked = [&](int j, int d, compute_t dm_value, compute_t ds_value) {
    dmds_bf[j * ldk + d] = device::cast<input_t>(dm_value);
    dmds_bf[(kTileV + j) * ldk + d] = device::cast<input_t>(ds_value);
  };
  if (fragments)  // each thread converts the elements it loaded
    for (int i = threadIdx.x; i < rows * dk; i += blockDim.x) set_stacked(i / dk, i % dk, dm[i], ds[i]);
  auto* cotangents = static_cast<compute_t*>(workspace.chunk_cotangents);

  const auto stage = [&](int n, int buffer) {
    const int t0 = n * C, L = lm::chunk_length(params, n);
    const auto k_buffer = k_s + buffer * layout.qk_size, q_buffer = q_s + buffer * layout.qk_size;
    lm::stage_token_rows<input_t>(params.k, b, h, t0, L, 0, dk, ldk, k_buffer);
    lm::stage_token_rows<input_t>(params.q, b, h, t0, L, 0, dk, ldk, q_buffer);
    // The fragments' contraction over the chunk runs to C: the rows past a short chunk are zeros.
    if (fragments)
      for (int i = L * ldk + threadIdx.x; i < C * ldk; i += blockDim.x) {
        k_buffer[i] = device::cast<input_t>(0.f);
        q_buffer[i] = device::cast<input_t>(0.f);
      }
    lm::stage_token_rows<input_t>(params.d_o, b, h, t0, L, v0, rows, kTileV, do_s + buffer * layout.d_o_size);
    if (token_read)
      lm::stage_contiguous_token_rows(static_cast<const compute_t*>(workspace.errors_local), params, dv, b, h, t0, L,
                                      v0, rows, kTileV, u_s + buffer * layout.u_size);
    lm::stage_gate_rows<compute_t>(workspace.gate_rows, params, bh, n, gate_rows + buffer * layout.gate_rows_size);
  };
  lm::pipelined_chunk_loop(params.n_chunks, true, stage, [&](int n, int buffer) {
    const int L = lm::chunk_length(params, n);
    const auto q_chunk = q_s + buffer * layout.qk_size;
    const auto k_chunk = k_s + buffer * layout.qk_size;
    const auto do_chunk = do_s + buffer * layout.d_o_size;
    const lm::GateRows<decltype(gate_rows)> gates(gate_rows + buffer * layout.gate_rows_size, C);
    const auto Q = [&](int t, int d) { return device::cast<compute_t>(q_chunk[t * ldk + d]); };
    const auto K = [&](int t, int d) { return device::cast<compute_t>(k_chunk[t * ldk + d]); };
    const auto dO = [&](int t, int j) { return device::cast<compute_t>(do_chunk[t * kTileV + j]); };
    // The update's dO operands: diag(a) dO and diag(g) dO (token read), dO (chunk_start read).
    const auto dO_a = [&](int t, int j) { return token_read ? gates.a[t] * dO(t, j) : dO(t, j); };
    const auto dO_g = [&](int t, int j) { return gates.g[t] * dO(t, j); };
    const lm::Bf16Tile<decltype(q_chunk)> q_tile{q_chunk, ldk}, k_tile{k_chunk, ldk}, dmds_tile{dmds_bf, ldk},
        de_tile{de_t, ldc}, ado_tile{ado_t, ldc}, gdo_tile{gdo_t, ldc};

    // X | Y = K [dM; dS]^T. With fragments, the dO operands of the update in bf16, transposed,
    // zeros past L.
    lm::stacked_state_product<Policy, compute_t>(L, rows, dk, kTileV, K, dm, ds, xy, fragments,
                                                 k_tile, dmds_tile);
    if (fragments)
      for (int i = threadIdx.x; i < kTileV * C; i += blockDim.x) {
        const int j = i / C, t = i % C;
        const bool in = t < L && j < rows;
        ado_t[j * ldc + t] = device::cast<input_t>(in ? dO_a(t, j) : compute_t(0));
        gdo_t[j * ldc + t] = device::cast<input_t>(in && token_read ? dO_g(t, j) : compute_t(0));
        if (t >= L) de_t[j * ldc + t] = device::cast<input_t>(0.f);
      }
    const index_t chunk_offset = lm::chunk_state_offset(params, bh, n);
    lm::store_state_pair(dm, ds, index_t(v0) * dk, rows * dk, cotangents + chunk_offset,
                         cotangents + chunk_offset + index_t(dv) * dk);
    __syncthreads();

    errors_cotangent<compute_t>(L, rows, kTileV, token_read, gates.m_end, gates.s_end, xy,
                                u_s + buffer * layout.u_size, [&](int t, int j, compute_t value) {
                                  d_e[t * kTileV + j] = value;
                                  if (fragments) de_t[j * ldc + t] = device::cast<input_t>(compute_t(2) * value);
                                });
    __syncthreads();

    // The lane owning (j, d) of both products reads the old dM, dS there and writes the new ones.
    const compute_t a_L = gates.ends[0], g_L = gates.ends[1], p_L = gates.ends[2];
    lm::for_each_tile(rows, dk, [&](int r0, int c0) {
      acc_t am[4] = {}, as[4] = {};
      lm::tile_product<Policy, true>(am, r0, c0, rows, dk, L,
                                     [&](int j, int t) { return compute_t(2) * d_e[t * kTileV + j]; }, K,
                                     fragments, de_tile, k_tile);
      lm::tile_product<Policy, true>(am, r0, c0, rows, dk, L, [&](int j, int t) { return dO_a(t, j); }, Q,
                                     fragments, ado_tile, q_tile);
      if (token_read)
        lm::tile_product<Policy, true>(as, r0, c0, rows, dk, L, [&](int j, int t) { return dO_g(t, j); }, Q,
                                       fragments, gdo_tile, q_tile);
      lm::for_each_element(r0, c0, rows, dk, [&](int j, int d, int i) {
        const int idx = j * dk + d;
        const compute_t dm_old = dm[idx], ds_old = ds[idx];
        dm[idx] = a_L * dm_old + compute_t(am[i]);
        ds[idx] = g_L * dm_old + p_L * ds_old + compute_t(as[i]);
        if (fragments) set_stacked(j, d, dm[idx], ds[idx]);
      });
    });
  });

  lm::store_state_pair(dm, ds, state_offset, rows * dk, static_cast<compute_t*>(params.dm0_ptr),
                       static_cast<compute_t*>(params.ds0_ptr));
}

// Shared memory of the parallel chunk kernel.
template <typename Ktraits>
struct LinearMemoryBwdChunkSmem {
  using input_t = typename Ktraits::input_t;
  lm::SmemCarver carver;
  lm::GateTablesSmem tables;
  int ldk, ldc, ldv;        // leading dimensions of the staged q, k, v, dO and of the bf16 tiles
  int m0, s0;               // [kTileV, Dk]: the chunk-start state's rows
  int dm, ds;               // [kTileV, Dk]: the cotangent of the chunk-end state
  int err;                  // [C, kTileV]: E
  int d_e;                  // [C, kTileV]: dE
  int u;                    // [C, kTileV]: the read-out's share of dE (token read)
  int xy;                   // [C, 2 kTileV]: X = K dM^T | Y = K dS^T
  int qms;                  // [C, 2 kTileV]: Q M0^T | Q S0^T (token read)
  int scores;               // [C, C]: G = Q K^T (causal)
  int dw;                   // [C, C]: dW = tril(dO E^T), then dG = dW .* c
  int d_a, d_g, d_s, dc_last;  // [C]: row-wise coefficient cotangents of this tile
  int scratch;              // [3 * warps]: block sums
  int q, k, v, d_o;         // input region: [C, ldk], [C, ldk], [C, kTileV], [C, ldv]
  // Input region, with fragments (bf16): the stacks [M0; S0] and [dM; dS] ([2 kTileV, ldk], rows
  // past a partial tile zero), E and 2 dE ([C, ldv]), dG and dG^T ([C, ldc]).
  int states_bf, cotangents_bf, e_bf, de2_bf, dg_bf, dgt_bf;
  __host__ __device__ LinearMemoryBwdChunkSmem(int dk, int chunk)
      : tables(carver, chunk), ldk(lm::padded<input_t>(dk)), ldc(lm::padded<input_t>(chunk)),
        ldv(lm::padded<input_t>(Ktraits::kTileV)) {
    constexpr int tile_v = Ktraits::kTileV;
    m0 = carver.compute(tile_v * dk), s0 = carver.compute(tile_v * dk);
    dm = carver.compute(tile_v * dk), ds = carver.compute(tile_v * dk);
    err = carver.compute(chunk * tile_v), d_e = carver.compute(chunk * tile_v), u = carver.compute(chunk * tile_v);
    xy = carver.compute(chunk * 2 * tile_v), qms = carver.compute(chunk * 2 * tile_v);
    scores = carver.compute(chunk * chunk), dw = carver.compute(chunk * chunk);
    d_a = carver.compute(chunk), d_g = carver.compute(chunk), d_s = carver.compute(chunk);
    dc_last = carver.compute(chunk);
    scratch = carver.compute(3 * Ktraits::kWarps);
    q = carver.input(chunk * ldk), k = carver.input(chunk * ldk);
    v = carver.input(chunk * tile_v), d_o = carver.input(chunk * ldv);
    const bool fragments = lm::uses_fragments<Ktraits>(dk, chunk);
    states_bf = carver.input(fragments ? 2 * tile_v * ldk : 0);
    cotangents_bf = carver.input(fragments ? 2 * tile_v * ldk : 0);
    e_bf = carver.input(fragments ? chunk * ldv : 0), de2_bf = carver.input(fragments ? chunk * ldv : 0);
    dg_bf = carver.input(fragments ? chunk * ldc : 0), dgt_bf = carver.input(fragments ? chunk * ldc : 0);
  }
};

template <typename Ktraits>
__global__ void __launch_bounds__(Ktraits::kNThreads, Ktraits::kMinBlocksPerSm)
    linear_memory_bwd_chunk_kernel(LinearMemoryBwdParams params, LinearMemoryBwdWorkspace workspace) {
  using input_t = typename Ktraits::input_t;
  using compute_t = typename Ktraits::compute_t;
  using Policy = typename Ktraits::Policy;
  using acc_t = typename Policy::acc_t;
  constexpr int kTileV = Ktraits::kTileV;

  const int tid = threadIdx.x;
  const int dk = params.dk, dv = params.dv, C = params.chunk_size;
  const int n_tiles = (dv + kTileV - 1) / kTileV;
  const lm::ChunkTileBlock block(params, kTileV);
  const int n = block.n, tile = block.tile, v0 = block.v0, rows = block.rows, t0 = block.t0, L = block.L;
  const int h = blockIdx.y, b = blockIdx.z;
  const bool token_read = params.read_token;
  // bf16 inputs read their fragments with ldmatrix, from bf16 copies of the operands that are
  // not staged in bf16 (rounded as the scalar path rounds them).
  const bool fragments = lm::uses_fragments<Ktraits>(dk, C);

  const LinearMemoryBwdChunkSmem<Ktraits> layout(dk, C);
  const int ldk = layout.ldk, ldc = layout.ldc, ldv = layout.ldv;
  const lm::SmemBase<compute_t, input_t> smem(layout.carver);
  const auto m0 = smem.compute(layout.m0);
  const auto s0 = smem.compute(layout.s0);
  const auto dm = smem.compute(layout.dm);
  const auto ds = smem.compute(layout.ds);
  const auto err = smem.compute(layout.err);
  const auto d_e = smem.compute(layout.d_e);
  const auto u = smem.compute(layout.u);
  const auto xy = smem.compute(layout.xy);
  const auto qms = smem.compute(layout.qms);
  const auto scores = smem.compute(layout.scores);
  const auto dw = smem.compute(layout.dw);
  const lm::GateTables<compute_t> tables(smem, layout.tables);
  const auto d_a = smem.compute(layout.d_a);
  const auto d_g = smem.compute(layout.d_g);
  const auto d_s = smem.compute(layout.d_s);
  const auto dc_last = smem.compute(layout.dc_last);
  const auto scratch = smem.compute(layout.scratch);
  const auto q_s = smem.input(layout.q);
  const auto k_s = smem.input(layout.k);
  const auto v_s = smem.input(layout.v);
  const auto do_s = smem.input(layout.d_o);
  const auto states_bf = smem.input(layout.states_bf);
  const auto cotangents_bf = smem.input(layout.cotangents_bf);
  const auto e_bf = smem.input(layout.e_bf);
  const auto de2_bf = smem.input(layout.de2_bf);
  const auto dg_bf = smem.input(layout.dg_bf);
  const auto dgt_bf = smem.input(layout.dgt_bf);

  auto* dv_out = static_cast<input_t*>(params.dv_ptr);
  // dQ and dK: final when Dv is one tile, else this tile's slice of the partial sums.
  const index_t part_offset = index_t(tile) * params.batch * params.seqlen * params.heads * dk;
  auto* dq_part = static_cast<compute_t*>(workspace.dq_part);
  auto* dk_part = static_cast<compute_t*>(workspace.dk_part);
  const auto write_qk_grad = [&](void* final_ptr, compute_t* part, index_t offset, compute_t value) {
    if (n_tiles == 1) static_cast<input_t*>(final_ptr)[offset] = device::cast<input_t>(value);
    else part[part_offset + offset] = value;
  };

  const auto Q = [&](int t, int d) { return device::cast<compute_t>(q_s[t * ldk + d]); };
  const auto K = [&](int t, int d) { return device::cast<compute_t>(k_s[t * ldk + d]); };
  const auto dO = [&](int t, int j) { return device::cast<compute_t>(do_s[t * ldv + j]); };
  const auto E = [&](int t, int j) { return err[t * kTileV + j]; };
  const auto M0 = [&](int j, int d) { return m0[j * dk + d]; };
  const auto S0 = [&](int j, int d) { return s0[j * dk + d]; };
  using Tile = lm::Bf16Tile<decltype(q_s)>;
  const int second_half = fragments ? kTileV * ldk : 0;  // the stacks are empty without fragments
  const Tile q_tile{q_s, ldk}, k_tile{k_s, ldk}, do_tile{do_s, ldv}, states_tile{states_bf, ldk},
      s0_tile{states_bf + second_half, ldk}, cotangents_tile{cotangents_bf, ldk},
      ds_tile{cotangents_bf + second_half, ldk}, e_tile{e_bf, ldv}, de2_tile{de2_bf, ldv}, dg_tile{dg_bf, ldc},
      dgt_tile{dgt_bf, ldc};

  // A. Stage the chunk, its saved start state and the cotangent of its end state.
  const index_t bh = index_t(b) * params.heads + h;
  const index_t chunk_offset = lm::chunk_state_offset(params, bh, n) + index_t(v0) * dk;
  const index_t s_offset = chunk_offset + index_t(dv) * dk;
  const auto* chunk_states = static_cast<const compute_t*>(params.chunk_states_ptr);
  const auto* cotangents = static_cast<const compute_t*>(workspace.chunk_cotangents);
  lm::stage_token_rows<input_t>(params.k, b, h, t0, L, 0, dk, ldk, k_s);
  lm::stage_token_rows<input_t>(params.q, b, h, t0, L, 0, dk, ldk, q_s);
  lm::stage_token_rows<input_t>(params.v, b, h, t0, L, v0, rows, kTileV, v_s);
  lm::stage_token_rows<input_t>(params.d_o, b, h, t0, L, v0, rows, ldv, do_s);
  if (token_read)
    lm::stage_contiguous_token_rows(static_cast<const compute_t*>(workspace.errors_local), params, dv, b, h, t0, L, v0,
                                    rows, kTileV, u);
  lm::stage_span(chunk_states + chunk_offset, rows * dk, m0);
  lm::stage_span(chunk_states + s_offset, rows * dk, s0);
  lm::stage_span(cotangents + chunk_offset, rows * dk, dm);
  lm::stage_span(cotangents + s_offset, rows * dk, ds);
  tables.stage(params, b, h, t0, L);
  // The fragments' contractions run to multiples of 16 (over tokens and over value rows): what
  // lies past L tokens or past the tile's rows is zero in every bf16 operand.
  if (fragments) {
    const input_t zero = device::cast<input_t>(0.f);
    for (int idx = L * ldk + tid; idx < C * ldk; idx += blockDim.x) {
      k_s[idx] = zero;
      q_s[idx] = zero;
    }
    for (int idx = tid; idx < C * (kTileV - rows); idx += blockDim.x) {
      const int at = idx / (kTileV - rows) * ldv + rows + idx % (kTileV - rows);
      do_s[at] = zero;
      e_bf[at] = zero;
      de2_bf[at] = zero;
    }
    for (int idx = rows * ldk + tid; idx < kTileV * ldk; idx += blockDim.x)
      for (const auto& stack : {states_bf, cotangents_bf}) {
        stack[idx] = zero;
        stack[kTileV * ldk + idx] = zero;
      }
  }
  lm::finish_staging();
  __syncthreads();

  tables.build(L, C);
  if (fragments)
    for (int i = tid; i < rows * dk; i += blockDim.x) {
      const int at = i / dk * ldk + i % dk;
      states_bf[at] = device::cast<input_t>(m0[i]);
      states_bf[kTileV * ldk + at] = device::cast<input_t>(s0[i]);
      cotangents_bf[at] = device::cast<input_t>(dm[i]);
      cotangents_bf[kTileV * ldk + at] = device::cast<input_t>(ds[i]);
    }
  __syncthreads();

  // A. E; the products of the cotangent and of the chunk-start state with K and Q.
  lm::chunk_errors<Policy, compute_t>(
      L, rows, dk, K, [&](int t, int j) { return device::cast<compute_t>(v_s[t * kTileV + j]); }, m0, fragments,
      k_tile, states_tile, [&](int t, int j, compute_t e) {
        err[t * kTileV + j] = e;
        if (fragments) e_bf[t * ldv + j] = device::cast<input_t>(e);
      });
  lm::stacked_state_product<Policy, compute_t>(L, rows, dk, kTileV, K, dm, ds, xy, fragments, k_tile, cotangents_tile);
  if (token_read) {
    lm::causal_scores<Policy, compute_t>(L, C, dk, Q, K, scores, fragments, q_tile, k_tile);
    lm::stacked_state_product<Policy, compute_t>(L, rows, dk, kTileV, Q, m0, s0, qms, fragments, q_tile, states_tile);
  }
  __syncthreads();

  // B, C. dE, the row-wise coefficient cotangents <e_t, x_t>, <e_t, y_t>, <dO_t, (Q M0^T)_t>,
  //    <dO_t, (Q S0^T)_t> and dW.
  errors_cotangent<compute_t>(L, rows, kTileV, token_read, tables.m_end, tables.s_end, xy, u,
                              [&](int t, int j, compute_t value) {
                                d_e[t * kTileV + j] = value;
                                if (fragments) de2_bf[t * ldv + j] = device::cast<input_t>(compute_t(2) * value);
                              });
  for (int t = tid; t < L; t += blockDim.x) {
    compute_t ex = 0, ey = 0, oqm = 0, oqs = 0;
    for (int j = 0; j < rows; ++j) {
      ex += E(t, j) * xy[t * 2 * kTileV + j];
      ey += E(t, j) * xy[t * 2 * kTileV + kTileV + j];
      if (token_read) {
        oqm += dO(t, j) * qms[t * 2 * kTileV + j];
        oqs += dO(t, j) * qms[t * 2 * kTileV + kTileV + j];
      }
    }
    dc_last[t] = ex, d_s[t] = ey, d_a[t] = oqm, d_g[t] = oqs;
  }
  if (token_read) {
    lm::for_each_tile(L, L, [&](int r0, int c0) {
      acc_t acc[4] = {};
      lm::tile_product<Policy, false>(acc, r0, c0, L, L, rows, dO, [&](int j, int i) { return E(i, j); },
                                      fragments, do_tile, e_tile);
      lm::for_each_element(r0, c0, L, L, [&](int t, int i, int e) {
        dw[t * C + i] = i <= t ? compute_t(acc[e]) : compute_t(0);
      });
    });
  }
  // Whole-state dot products <dM, M0>, <dM, S0>, <dS, S0> (the barrier of this step).
  compute_t sums[3] = {};
  for (int idx = tid; idx < rows * dk; idx += blockDim.x) {
    sums[0] += dm[idx] * m0[idx];
    sums[1] += dm[idx] * s0[idx];
    sums[2] += ds[idx] * s0[idx];
  }
  lm::block_sum(sums, scratch);

  // C. This tile's coefficient cotangents: d_c = dW .* G (+ row L-1: <e_i, x_i>), d_a, d_g
  //    (+ row L-1: <dM, M0>, <dM, S0>), d_s, d_p; then dG = dW .* c in place (and in bf16, with
  //    its transpose, for the fragments).
  const int coef_size = linear_memory_coef_size(C);
  compute_t* coef_out = static_cast<compute_t*>(workspace.coef_part) +
                        (((index_t(tile) * params.batch + b) * params.heads + h) * params.n_chunks + n) * coef_size;
  for (int idx = tid; idx < C * C; idx += blockDim.x) {
    const int t = idx / C, i = idx % C;
    compute_t value = 0;
    if (t < L && i <= t) {
      if (token_read) {
        value = dw[idx] * scores[idx];
        dw[idx] *= tables.c[idx];
      }
      if (t == L - 1) value += dc_last[i];
    }
    coef_out[idx] = value;
    if (fragments && token_read) {
      const input_t d_g_ti = device::cast<input_t>(t < L && i <= t ? dw[idx] : compute_t(0));
      dg_bf[t * ldc + i] = d_g_ti;
      dgt_bf[i * ldc + t] = d_g_ti;
    }
  }
  for (int t = tid; t < C; t += blockDim.x) {
    const bool last = t == L - 1;
    coef_out[C * C + t] = t < L ? d_a[t] + (last ? sums[0] : compute_t(0)) : compute_t(0);
    coef_out[C * C + C + t] = t < L ? d_g[t] + (last ? sums[1] : compute_t(0)) : compute_t(0);
    coef_out[C * C + 2 * C + t] = t < L ? d_s[t] : compute_t(0);
  }
  if (tid == 0) coef_out[C * C + 3 * C] = sums[2];
  __syncthreads();

  // D. dV = -2 dE; this tile's parts of
  //    dQ = dG K + diag(a) dO M0 + diag(g) dO S0              (chunk_start: dO M0)
  //    dK = diag(m) E dM + diag(s) E dS + dG^T Q + 2 dE M0    (chunk_start: no dG^T Q)
  for (int idx = tid; idx < L * rows; idx += blockDim.x) {
    const int t = idx / rows, j = idx % rows;
    dv_out[lm::contiguous_token_offset(b, t0 + t, h, params.seqlen, params.heads, dv) + v0 + j] =
        device::cast<input_t>(compute_t(-2) * d_e[t * kTileV + j]);
  }
  lm::for_each_tile(L, dk, [&](int r0, int c0) {
    acc_t r[4] = {}, u[4] = {}, gk[4] = {};
    lm::tile_product<Policy, true>(r, r0, c0, L, dk, rows, dO, M0, fragments, do_tile, states_tile);
    if (token_read) {
      lm::tile_product<Policy, true>(u, r0, c0, L, dk, rows, dO, S0, fragments, do_tile, s0_tile);
      lm::tile_product<Policy, true>(gk, r0, c0, L, dk, L, [&](int t, int i) { return dw[t * C + i]; }, K,
                                     fragments, dg_tile, k_tile);
    }
    lm::for_each_element(r0, c0, L, dk, [&](int t, int d, int i) {
      const compute_t value = token_read
                                  ? tables.a[t] * compute_t(r[i]) + tables.g[t] * compute_t(u[i]) + compute_t(gk[i])
                                  : compute_t(r[i]);
      write_qk_grad(params.dq_ptr, dq_part,
                    lm::contiguous_token_offset(b, t0 + t, h, params.seqlen, params.heads, dk) + d, value);
    });
  });
  lm::for_each_tile(L, dk, [&](int r0, int c0) {
    acc_t x[4] = {}, y[4] = {}, rest[4] = {};
    lm::tile_product<Policy, true>(x, r0, c0, L, dk, rows, E, [&](int j, int d) { return dm[j * dk + d]; },
                                   fragments, e_tile, cotangents_tile);
    lm::tile_product<Policy, true>(y, r0, c0, L, dk, rows, E, [&](int j, int d) { return ds[j * dk + d]; },
                                   fragments, e_tile, ds_tile);
    lm::tile_product<Policy, true>(rest, r0, c0, L, dk, rows,
                                   [&](int t, int j) { return compute_t(2) * d_e[t * kTileV + j]; }, M0,
                                   fragments, de2_tile, states_tile);
    if (token_read)
      lm::tile_product<Policy, true>(rest, r0, c0, L, dk, L, [&](int t, int i) { return dw[i * C + t]; }, Q,
                                     fragments, dgt_tile, q_tile);
    lm::for_each_element(r0, c0, L, dk, [&](int t, int d, int i) {
      const compute_t value =
          tables.m_end[t] * compute_t(x[i]) + tables.s_end[t] * compute_t(y[i]) + compute_t(rest[i]);
      write_qk_grad(params.dk_ptr, dk_part,
                    lm::contiguous_token_offset(b, t0 + t, h, params.seqlen, params.heads, dk) + d, value);
    });
  });
}

// Shared memory of the gate kernel.
struct LinearMemoryGatesSmem {
  lm::SmemCarver carver;
  int d_c;                  // [C, C]: summed coefficient cotangent of c
  int c, sig;               // [C, C]: gate tables, then (in place) the per-row products of the adjoint
  int d_a, d_g, d_s;        // [C]
  int a, g, P;              // [C]
  int theta, eta, beta;     // [C]
  int prod_a, prod_gb, prod_ge;  // [C]: the a and g columns' products
  int d_p;                  // [1]
  __host__ __device__ explicit LinearMemoryGatesSmem(int chunk) {
    d_c = carver.compute(chunk * chunk), c = carver.compute(chunk * chunk), sig = carver.compute(chunk * chunk);
    d_a = carver.compute(chunk), d_g = carver.compute(chunk), d_s = carver.compute(chunk);
    a = carver.compute(chunk), g = carver.compute(chunk), P = carver.compute(chunk);
    theta = carver.compute(chunk), eta = carver.compute(chunk), beta = carver.compute(chunk);
    prod_a = carver.compute(chunk), prod_gb = carver.compute(chunk), prod_ge = carver.compute(chunk);
    d_p = carver.compute(1);
  }
};

template <typename Ktraits>
__global__ void __launch_bounds__(Ktraits::kNThreads, Ktraits::kMinBlocksPerSm)
    linear_memory_bwd_gates_kernel(LinearMemoryBwdParams params, LinearMemoryBwdWorkspace workspace, int n_tiles) {
  using input_t = typename Ktraits::input_t;
  using compute_t = typename Ktraits::compute_t;

  const int tid = threadIdx.x;
  const int n = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int C = params.chunk_size, dk = params.dk, t0 = n * C;
  const int L = lm::chunk_length(params, n);

  const LinearMemoryGatesSmem layout(C);
  const lm::SmemBase<compute_t, input_t> smem(layout.carver);
  const auto d_c = smem.compute(layout.d_c);
  const auto c = smem.compute(layout.c);
  const auto sig = smem.compute(layout.sig);
  const auto d_a = smem.compute(layout.d_a);
  const auto d_g = smem.compute(layout.d_g);
  const auto d_s = smem.compute(layout.d_s);
  const auto a = smem.compute(layout.a);
  const auto g = smem.compute(layout.g);
  const auto P = smem.compute(layout.P);
  const auto theta = smem.compute(layout.theta);
  const auto eta = smem.compute(layout.eta);
  const auto beta = smem.compute(layout.beta);
  const auto prod_a = smem.compute(layout.prod_a);
  const auto prod_gb = smem.compute(layout.prod_gb);
  const auto prod_ge = smem.compute(layout.prod_ge);
  const auto d_p = smem.compute(layout.d_p);

  // 1. Add the value tiles' partial sums, in tile order.
  const int coef_size = linear_memory_coef_size(C);
  const auto* coef_part = static_cast<const compute_t*>(workspace.coef_part);
  const index_t tile_stride = index_t(params.batch) * params.heads * params.n_chunks * coef_size;
  const index_t coef_offset = ((index_t(b) * params.heads + h) * params.n_chunks + n) * coef_size;
  for (int idx = tid; idx < coef_size; idx += blockDim.x) {
    compute_t sum = 0;
    for (int tile = 0; tile < n_tiles; ++tile) sum += coef_part[tile * tile_stride + coef_offset + idx];
    if (idx < C * C) d_c[idx] = sum;
    else if (idx < C * C + C) d_a[idx - C * C] = sum;
    else if (idx < C * C + 2 * C) d_g[idx - C * C - C] = sum;
    else if (idx < C * C + 3 * C) d_s[idx - C * C - 2 * C] = sum;
    else d_p[0] = sum;
  }
  if (n_tiles > 1) {
    const auto* dq_part = static_cast<const compute_t*>(workspace.dq_part);
    const auto* dk_part = static_cast<const compute_t*>(workspace.dk_part);
    auto* dq = static_cast<input_t*>(params.dq_ptr);
    auto* dk_out = static_cast<input_t*>(params.dk_ptr);
    const index_t part_stride = index_t(params.batch) * params.seqlen * params.heads * dk;
    for (int idx = tid; idx < L * dk; idx += blockDim.x) {
      const int t = idx / dk, d = idx % dk;
      const index_t at = lm::contiguous_token_offset(b, t0 + t, h, params.seqlen, params.heads, dk) + d;
      compute_t sum_q = 0, sum_k = 0;
      for (int tile = 0; tile < n_tiles; ++tile) {
        sum_q += dq_part[tile * part_stride + at];
        sum_k += dk_part[tile * part_stride + at];
      }
      dq[at] = device::cast<input_t>(sum_q);
      dk_out[at] = device::cast<input_t>(sum_k);
    }
  }
  lm::stage_gates<compute_t>(params, b, h, t0, L, theta, eta, beta);
  __syncthreads();

  // 2. The gate gradients, by the reverse column recurrence.
  auto* dtheta = static_cast<compute_t*>(params.dtheta_ptr);
  auto* deta = static_cast<compute_t*>(params.deta_ptr);
  auto* dalpha = static_cast<compute_t*>(params.dalpha_ptr);
  const auto gate_offset = [&](int t) { return (index_t(b) * params.seqlen + t0 + t) * params.heads + h; };
  lm::chunk_gate_adjoint<compute_t>(
      L, C, theta, eta, beta, c, sig, a, g, P, d_a, d_g, d_c, d_s, d_p[0], prod_a, prod_gb, prod_ge,
      [&](int t, compute_t value) { dtheta[gate_offset(t)] = value; },
      [&](int t, compute_t d_eta, compute_t d_alpha) {
        deta[gate_offset(t)] = d_eta;
        dalpha[gate_offset(t)] = d_alpha;
      });
}

// Dynamic shared memory of the sequential kernel and the largest of the parallel ones for a tile.
inline size_t linear_memory_bwd_state_smem(const LinearMemoryParams& params, InputType input_type, int tile) {
  return lm::dispatch<lm::kSequentialThreads>(input_type, tile, [&](auto ktraits) {
    return lm::smem_bytes<decltype(ktraits)>(LinearMemoryBwdStateSmem<decltype(ktraits)>(params.dk, params.chunk_size));
  });
}
inline size_t linear_memory_bwd_parallel_smem(const LinearMemoryParams& params, InputType input_type, int tile) {
  const int dk = params.dk, C = params.chunk_size;
  return lm::dispatch<lm::kParallelThreads>(input_type, tile, [&](auto ktraits) {
    using Ktraits = decltype(ktraits);
    size_t largest = lm::smem_bytes<Ktraits>(LinearMemoryGatesSmem(C));
    for (const size_t bytes : {lm::smem_bytes<Ktraits>(LinearMemoryBwdLocalSmem<Ktraits>(dk, C)),
                               lm::smem_bytes<Ktraits>(LinearMemoryBwdChunkSmem<Ktraits>(dk, C))})
      largest = bytes > largest ? bytes : largest;
    return largest;
  });
}

ValueTiles linear_memory_bwd_tiles(const LinearMemoryParams& params, InputType input_type, const DeviceLimits& device) {
  return lm::choose_tiles(
      params, input_type, device, [&](int tile) { return linear_memory_bwd_state_smem(params, input_type, tile); },
      [&](int tile) { return linear_memory_bwd_parallel_smem(params, input_type, tile); });
}

int linear_memory_bwd_launch(const LinearMemoryBwdParams& params, const LinearMemoryBwdWorkspace& workspace,
                             InputType input_type, const ValueTiles& tiles, CUstream_st* stream) {
  if (params.batch == 0 || params.heads == 0 || params.dv == 0) return device::kSuccess;
  const int dk = params.dk, C = params.chunk_size;
  const auto parallel = [&](auto launch) {
    return static_cast<int>(lm::dispatch<lm::kParallelThreads>(input_type, tiles.parallel, launch));
  };
  // The parallel kernels' grid: (chunk, value tile) pairs x heads x batch.
  const auto chunk_tiles = [&](auto ktraits) {
    return dim3(params.n_chunks * lm::value_tiles<decltype(ktraits)>(params), params.heads, params.batch);
  };
  int err = 0;
  if (params.n_chunks > 0) {
    err = parallel([&](auto ktraits) {
      device::Error e = lm::launch_gate_rows<decltype(ktraits)>(params, workspace.gate_rows, stream);
      if (e != device::kSuccess || !params.read_token) return e;
      using Ktraits = decltype(ktraits);
      return device::launch("linear_memory_bwd_local", linear_memory_bwd_local_kernel<Ktraits>, chunk_tiles(ktraits),
                            dim3(Ktraits::kNThreads), lm::smem_bytes<Ktraits>(LinearMemoryBwdLocalSmem<Ktraits>(dk, C)),
                            stream, params, workspace);
    });
    if (err != 0) return err;
  }
  err = static_cast<int>(lm::dispatch<lm::kSequentialThreads>(input_type, tiles.state, [&](auto ktraits) {
    using Ktraits = decltype(ktraits);
    return device::launch("linear_memory_bwd_state", linear_memory_bwd_state_kernel<Ktraits>,
                          dim3(lm::value_tiles<Ktraits>(params), params.heads, params.batch),
                          dim3(Ktraits::kNThreads), lm::smem_bytes<Ktraits>(LinearMemoryBwdStateSmem<Ktraits>(dk, C)),
                          stream, params, workspace);
  }));
  if (err != 0 || params.n_chunks == 0) return err;
  return parallel([&](auto ktraits) {
    using Ktraits = decltype(ktraits);
    const dim3 threads(Ktraits::kNThreads);
    device::Error e = device::launch("linear_memory_bwd_chunk", linear_memory_bwd_chunk_kernel<Ktraits>,
                                     chunk_tiles(ktraits), threads,
                                     lm::smem_bytes<Ktraits>(LinearMemoryBwdChunkSmem<Ktraits>(dk, C)), stream, params,
                                     workspace);
    if (e != device::kSuccess) return e;
    return device::launch("linear_memory_bwd_gates", linear_memory_bwd_gates_kernel<Ktraits>,
                          dim3(params.n_chunks, params.heads, params.batch), threads,
                          lm::smem_bytes<Ktraits>(LinearMemoryGatesSmem(C)), stream, params, workspace,
                          lm::value_tiles<Ktraits>(params));
  });
}

size_t linear_memory_bwd_smem_bytes(const LinearMemoryParams& params, InputType input_type, const ValueTiles& tiles) {
  const size_t state = linear_memory_bwd_state_smem(params, input_type, tiles.state);
  const size_t parallel = linear_memory_bwd_parallel_smem(params, input_type, tiles.parallel);
  return state > parallel ? state : parallel;
}

}  // namespace titans
