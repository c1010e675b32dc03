// CUDA forward of the linear memory, written only against the device layer (device/device.h), so
// the emulation runs this exact source in CI. Included by exactly one TU per build.
//
// The decomposition of docs/design.md §2 (docs/kernels.md §1.2, §6.1): only the chunk-to-chunk
// step is sequential, so it gets a kernel of its own that does nothing else, and the outputs,
// which need only each chunk's start state, are computed in parallel afterwards.
// 0. linear_memory_gate_rows (linear_memory_common.cuh), parallel over chunks, writes the rows of
//    the gate tables that kernel 1 needs, so that no gate recurrence sits on its chain.
// 1. linear_memory_fwd_state_kernel, one block per (value tile, head, batch), walks the chunks in
//    order keeping its kTileV rows of M and S in shared memory (value tiles never communicate:
//    row j of M and S evolves from row j of E only). Per chunk of L tokens:
//      E = 2 (K M0^T - V)                                     errors at the chunk-start memory
//      m = c[L-1], s, a_L, g_L, p                             chunk-end gate rows (kernel 0)
//      M_L = a_L M0 + g_L S0 + E^T diag(m) K ,  S_L = p S0 + E^T diag(s) K
//    and it writes every chunk-start state (M0, S0): the output kernel and the backward read them.
// 2. linear_memory_fwd_output_kernel, one block per (chunk, value tile, head, batch), all in
//    parallel: from the chunk's start state,
//      O = diag(a) Q M0^T + diag(g) Q S0^T + (Q K^T .* c) E      (token read)
//      O = Q M0^T                                                 (chunk_start read)
// All products run on tensor cores through the operand policy of linear_memory_common.cuh (bf16
// inputs read their fragments with ldmatrix, mma_bf16_tiles); tiles are staged with cp.async,
// and kernel 1 loads chunk n + 1 while it computes chunk n (pipelined_chunk_loop).
#pragma once

#include "cuda/linear_memory_common.cuh"
#include "cuda/linear_memory_fwd.h"

namespace titans {

// Shared memory of the sequential kernel (offsets in elements of each region's type). The staged
// tiles are double-buffered: chunk n + 1's load overlaps chunk n's products.
template <typename Ktraits>
struct LinearMemoryFwdStateSmem {
  using input_t = typename Ktraits::input_t;
  lm::SmemCarver carver;
  int ldk, ldc;             // leading dimensions of the staged keys and of em, es
  int m, s;                 // [kTileV, Dk]: the block's rows of M and S
  int err;                  // [C, kTileV]: E
  int gate_rows;            // 2 x [linear_memory_gate_rows_size(C)]
  int k, v;                 // input region, 2 x [C, ldk] and 2 x [C, kTileV]: keys, values' tile
  int m_bf, em, es;         // input region, with fragments: [kTileV, ldk] bf16 copy of M; [kTileV,
                            // ldc]: E^T diag(m) and E^T diag(s), the update's A operands
  int gate_rows_size, k_size, v_size;  // one buffer of each
  __host__ __device__ LinearMemoryFwdStateSmem(int dk, int chunk)
      : ldk(lm::padded<input_t>(dk)), ldc(lm::padded<input_t>(chunk)),
        gate_rows_size(linear_memory_gate_rows_size(chunk)), k_size(chunk * ldk), v_size(chunk * Ktraits::kTileV) {
    constexpr int tile_v = Ktraits::kTileV;
    m = carver.compute(tile_v * dk), s = carver.compute(tile_v * dk);
    err = carver.compute(chunk * tile_v);
    gate_rows = carver.compute(2 * gate_rows_size);
    k = carver.input(2 * k_size), v = carver.input(2 * v_size);
    const bool fragments = lm::uses_fragments<Ktraits>(dk, chunk);
    m_bf = carver.input(fragments ? tile_v * ldk : 0);
    em = carver.input(fragments ? tile_v * ldc : 0), es = carver.input(fragments ? tile_v * ldc : 0);
  }
};

template <typename Ktraits>
__global__ void __launch_bounds__(Ktraits::kNThreads, Ktraits::kMinBlocksPerSm)
    linear_memory_fwd_state_kernel(LinearMemoryParams params, LinearMemoryFwdWorkspace workspace) {
  using input_t = typename Ktraits::input_t;
  using compute_t = typename Ktraits::compute_t;
  using Policy = typename Ktraits::Policy;
  using acc_t = typename Policy::acc_t;
  constexpr int kTileV = Ktraits::kTileV;

  const int v0 = blockIdx.x * kTileV, h = blockIdx.y, b = blockIdx.z;
  const int rows = lm::tile_rows(params, v0, kTileV);
  const int dk = params.dk, dv = params.dv, C = params.chunk_size;
  // bf16 inputs read their fragments with ldmatrix from bf16 tiles: a copy of M beside the fp32
  // state, and the update's operands as E's epilogue rounds them. The scalar path rounds the same
  // values, so both give the same bits.
  const bool fragments = lm::uses_fragments<Ktraits>(dk, C);

  const LinearMemoryFwdStateSmem<Ktraits> layout(dk, C);
  const int ldk = layout.ldk, ldc = layout.ldc;
  const lm::SmemBase<compute_t, input_t> smem(layout.carver);
  const auto m = smem.compute(layout.m);
  const auto s = smem.compute(layout.s);
  const auto err = smem.compute(layout.err);
  const auto gate_rows = smem.compute(layout.gate_rows);
  const auto k_s = smem.input(layout.k);
  const auto v_s = smem.input(layout.v);
  const auto m_bf = smem.input(layout.m_bf);
  const auto em = smem.input(layout.em);
  const auto es = smem.input(layout.es);

  // This block's rows [v0, v0 + rows) of the contiguous [B, H, Dv, Dk] states.
  const index_t bh = index_t(b) * params.heads + h;
  const index_t state_offset = (bh * dv + v0) * dk;
  lm::load_state_pair(static_cast<const compute_t*>(params.m0_ptr), static_cast<const compute_t*>(params.s0_ptr),
                      state_offset, rows * dk, m, s);
  if (fragments)  // each thread converts the elements it loaded
    for (int i = threadIdx.x; i < rows * dk; i += blockDim.x) m_bf[i / dk * ldk + i % dk] = device::cast<input_t>(m[i]);
  auto* chunk_states = static_cast<compute_t*>(params.chunk_states_ptr);

  const auto stage = [&](int n, int buffer) {
    const int L = lm::chunk_length(params, n);
    const auto k_buffer = k_s + buffer * layout.k_size;
    lm::stage_token_rows<input_t>(params.k, b, h, n * C, L, 0, dk, ldk, k_buffer);
    // The fragments' contraction over the chunk runs to C: the keys past a short chunk are zeros.
    if (fragments)
      for (int i = L * ldk + threadIdx.x; i < C * ldk; i += blockDim.x) k_buffer[i] = device::cast<input_t>(0.f);
    lm::stage_token_rows<input_t>(params.v, b, h, n * C, L, v0, rows, kTileV, v_s + buffer * layout.v_size);
    lm::stage_gate_rows<compute_t>(workspace.gate_rows, params, bh, n, gate_rows + buffer * layout.gate_rows_size);
  };
  lm::pipelined_chunk_loop(params.n_chunks, false, stage, [&](int n, int buffer) {
    const int L = lm::chunk_length(params, n);
    const auto k_chunk = k_s + buffer * layout.k_size;
    const auto v_chunk = v_s + buffer * layout.v_size;
    const lm::GateRows<decltype(gate_rows)> gates(gate_rows + buffer * layout.gate_rows_size, C);
    const auto K = [&](int t, int d) { return device::cast<compute_t>(k_chunk[t * ldk + d]); };
    const auto V = [&](int t, int j) { return device::cast<compute_t>(v_chunk[t * kTileV + j]); };
    const lm::Bf16Tile<decltype(k_chunk)> k_tile{k_chunk, ldk}, m_tile{m_bf, ldk}, em_tile{em, ldc}, es_tile{es, ldc};

    // E = 2 (K M0^T - V), and with fragments E^T diag(m), E^T diag(s) in bf16 (zeros past L).
    lm::for_each_tile(L, rows, [&](int r0, int c0) {
      acc_t acc[4] = {};
      lm::tile_product<Policy, false>(acc, r0, c0, L, rows, dk, K, [&](int d, int j) { return m[j * dk + d]; },
                                      fragments, k_tile, m_tile);
      lm::for_each_element(r0, c0, L, rows, [&](int t, int j, int i) {
        const compute_t e = compute_t(2) * (compute_t(acc[i]) - V(t, j));
        err[t * kTileV + j] = e;
        if (fragments) {
          em[j * ldc + t] = device::cast<input_t>(gates.m_end[t] * e);
          es[j * ldc + t] = device::cast<input_t>(gates.s_end[t] * e);
        }
      });
    });
    if (fragments)
      for (int i = threadIdx.x; i < kTileV * (C - L); i += blockDim.x) {
        const int j = i / (C - L), t = L + i % (C - L);
        em[j * ldc + t] = es[j * ldc + t] = device::cast<input_t>(0.f);
      }
    const index_t chunk_offset = lm::chunk_state_offset(params, bh, n);
    lm::store_state_pair(m, s, index_t(v0) * dk, rows * dk, chunk_states + chunk_offset,
                         chunk_states + chunk_offset + index_t(dv) * dk);
    __syncthreads();

    // The lane owning (j, d) of both products updates M and S there.
    const compute_t a_L = gates.ends[0], g_L = gates.ends[1], p_L = gates.ends[2];
    lm::for_each_tile(rows, dk, [&](int r0, int c0) {
      acc_t am[4] = {}, as[4] = {};
      lm::tile_product<Policy, true>(am, r0, c0, rows, dk, L,
                                     [&](int j, int t) { return gates.m_end[t] * err[t * kTileV + j]; }, K,
                                     fragments, em_tile, k_tile);
      lm::tile_product<Policy, true>(as, r0, c0, rows, dk, L,
                                     [&](int j, int t) { return gates.s_end[t] * err[t * kTileV + j]; }, K,
                                     fragments, es_tile, k_tile);
      lm::for_each_element(r0, c0, rows, dk, [&](int j, int d, int i) {
        const int idx = j * dk + d;
        const compute_t m_old = m[idx], s_old = s[idx];
        m[idx] = a_L * m_old + g_L * s_old + compute_t(am[i]);
        s[idx] = p_L * s_old + compute_t(as[i]);
        if (fragments) m_bf[j * ldk + d] = device::cast<input_t>(m[idx]);
      });
    });
  });

  lm::store_state_pair(m, s, state_offset, rows * dk, static_cast<compute_t*>(params.m_final_ptr),
                       static_cast<compute_t*>(params.s_final_ptr));
}

// Shared memory of the output kernel.
template <typename Ktraits>
struct LinearMemoryFwdOutputSmem {
  using input_t = typename Ktraits::input_t;
  lm::SmemCarver carver;
  lm::GateTablesSmem tables;
  int ldk, ldc, ldv;        // leading dimensions of the staged q, k, and of the bf16 W and E
  int m, s;                 // [kTileV, Dk]: the chunk-start state's rows
  int err;                  // [C, kTileV]: E
  int scores;               // [C, C]: G = Q K^T (causal)
  int q, k, v;              // input region, [C, ldk], [C, ldk], [C, kTileV]
  int m_bf, s_bf;           // input region, with fragments: [kTileV, ldk], bf16 copies of M0, S0
  int w_bf, e_bf;           // input region, with fragments: [C, ldc] W = G .* c, [C, ldv] E
  __host__ __device__ LinearMemoryFwdOutputSmem(int dk, int chunk)
      : tables(carver, chunk), ldk(lm::padded<input_t>(dk)), ldc(lm::padded<input_t>(chunk)),
        ldv(lm::padded<input_t>(Ktraits::kTileV)) {
    constexpr int tile_v = Ktraits::kTileV;
    m = carver.compute(tile_v * dk), s = carver.compute(tile_v * dk);
    err = carver.compute(chunk * tile_v);
    scores = carver.compute(chunk * chunk);
    q = carver.input(chunk * ldk), k = carver.input(chunk * ldk), v = carver.input(chunk * tile_v);
    const bool fragments = lm::uses_fragments<Ktraits>(dk, chunk);
    m_bf = carver.input(fragments ? tile_v * ldk : 0), s_bf = carver.input(fragments ? tile_v * ldk : 0);
    w_bf = carver.input(fragments ? chunk * ldc : 0), e_bf = carver.input(fragments ? chunk * ldv : 0);
  }
};

template <typename Ktraits>
__global__ void __launch_bounds__(Ktraits::kNThreads, Ktraits::kMinBlocksPerSm)
    linear_memory_fwd_output_kernel(LinearMemoryParams params) {
  using input_t = typename Ktraits::input_t;
  using compute_t = typename Ktraits::compute_t;
  using Policy = typename Ktraits::Policy;
  using acc_t = typename Policy::acc_t;
  constexpr int kTileV = Ktraits::kTileV;

  const int dk = params.dk, dv = params.dv, C = params.chunk_size;
  const lm::ChunkTileBlock block(params, kTileV);
  const int n = block.n, v0 = block.v0, rows = block.rows, t0 = block.t0, L = block.L, h = blockIdx.y, b = blockIdx.z;
  const bool token_read = params.read_token;
  // bf16 inputs read their fragments with ldmatrix, from bf16 copies of the operands that are
  // not staged in bf16 (rounded as the scalar path rounds them).
  const bool fragments = lm::uses_fragments<Ktraits>(dk, C);

  const LinearMemoryFwdOutputSmem<Ktraits> layout(dk, C);
  const int ldk = layout.ldk, ldc = layout.ldc, ldv = layout.ldv;
  const lm::SmemBase<compute_t, input_t> smem(layout.carver);
  const auto m = smem.compute(layout.m);
  const auto s = smem.compute(layout.s);
  const auto err = smem.compute(layout.err);
  const auto scores = smem.compute(layout.scores);
  const lm::GateTables<compute_t> tables(smem, layout.tables);
  const auto q_s = smem.input(layout.q);
  const auto k_s = smem.input(layout.k);
  const auto v_s = smem.input(layout.v);
  const auto m_bf = smem.input(layout.m_bf);
  const auto s_bf = smem.input(layout.s_bf);
  const auto w_bf = smem.input(layout.w_bf);
  const auto e_bf = smem.input(layout.e_bf);

  const index_t bh = index_t(b) * params.heads + h;
  const auto* m0 = static_cast<const compute_t*>(params.chunk_states_ptr) + lm::chunk_state_offset(params, bh, n) +
                   index_t(v0) * dk;
  const auto Q = [&](int t, int d) { return device::cast<compute_t>(q_s[t * ldk + d]); };
  const auto K = [&](int t, int d) { return device::cast<compute_t>(k_s[t * ldk + d]); };
  const auto V = [&](int t, int j) { return device::cast<compute_t>(v_s[t * kTileV + j]); };
  const auto Mt = [&](int d, int j) { return m[j * dk + d]; };  // M0^T: [Dk, rows]
  const auto St = [&](int d, int j) { return s[j * dk + d]; };
  const lm::Bf16Tile<decltype(q_s)> q_tile{q_s, ldk}, k_tile{k_s, ldk}, m_tile{m_bf, ldk}, s_tile{s_bf, ldk},
      w_tile{w_bf, ldc}, e_tile{e_bf, ldv};

  lm::stage_token_rows<input_t>(params.q, b, h, t0, L, 0, dk, ldk, q_s);
  lm::stage_span(m0, rows * dk, m);
  if (token_read) {
    lm::stage_token_rows<input_t>(params.k, b, h, t0, L, 0, dk, ldk, k_s);
    lm::stage_token_rows<input_t>(params.v, b, h, t0, L, v0, rows, kTileV, v_s);
    lm::stage_span(m0 + index_t(dv) * dk, rows * dk, s);
    tables.stage(params, b, h, t0, L);
  }
  lm::finish_staging();
  __syncthreads();

  if (fragments)
    for (int i = threadIdx.x; i < rows * dk; i += blockDim.x) {
      m_bf[i / dk * ldk + i % dk] = device::cast<input_t>(m[i]);
      if (token_read) s_bf[i / dk * ldk + i % dk] = device::cast<input_t>(s[i]);
    }
  if (token_read) {
    tables.build(L, C);
    lm::causal_scores<Policy, compute_t>(L, C, dk, Q, K, scores, fragments, q_tile, k_tile);
  }
  __syncthreads();

  if (token_read) {
    lm::chunk_errors<Policy, compute_t>(L, rows, dk, K, V, m, fragments, k_tile, m_tile,
                                        [&](int t, int j, compute_t e) {
                                          err[t * kTileV + j] = e;
                                          if (fragments) e_bf[t * ldv + j] = device::cast<input_t>(e);
                                        });
    // With fragments, W and E in bf16 with zeros past L (the contraction over the chunk runs to
    // a multiple of 16) and above the diagonal.
    if (fragments) {
      for (int idx = threadIdx.x; idx < C * C; idx += blockDim.x) {
        const int t = idx / C, i = idx % C;
        w_bf[t * ldc + i] =
            device::cast<input_t>(t < L && i <= t ? tables.c[t * C + i] * scores[t * C + i] : compute_t(0));
      }
      for (int idx = L * ldv + threadIdx.x; idx < C * ldv; idx += blockDim.x) e_bf[idx] = device::cast<input_t>(0.f);
    }
    __syncthreads();
  }

  // The gate rows scale separate accumulators, so a and g never round into the MMA operands.
  auto* o_out = static_cast<input_t*>(params.o_ptr);
  lm::for_each_tile(L, rows, [&](int r0, int c0) {
    acc_t qm[4] = {}, qs[4] = {}, we[4] = {};
    lm::tile_product<Policy, false>(qm, r0, c0, L, rows, dk, Q, Mt, fragments, q_tile, m_tile);
    if (token_read) {
      lm::tile_product<Policy, false>(qs, r0, c0, L, rows, dk, Q, St, fragments, q_tile, s_tile);
      lm::tile_product<Policy, true>(
          we, r0, c0, L, rows, L, [&](int t, int i) { return tables.c[t * C + i] * scores[t * C + i]; },
          [&](int i, int j) { return err[i * kTileV + j]; }, fragments, w_tile, e_tile);
    }
    lm::for_each_element(r0, c0, L, rows, [&](int t, int j, int i) {
      const compute_t out = token_read ? tables.a[t] * compute_t(qm[i]) + tables.g[t] * compute_t(qs[i]) +
                                             compute_t(we[i])
                                       : compute_t(qm[i]);
      o_out[lm::contiguous_token_offset(b, t0 + t, h, params.seqlen, params.heads, dv) + v0 + j] =
          device::cast<input_t>(out);
    });
  });
}

// Dynamic shared memory of the sequential and of the output kernel for the given tiles.
inline size_t linear_memory_fwd_state_smem(const LinearMemoryParams& params, InputType input_type, int tile) {
  return lm::dispatch<lm::kSequentialThreads>(input_type, tile, [&](auto ktraits) {
    using Ktraits = decltype(ktraits);
    return lm::smem_bytes<Ktraits>(LinearMemoryFwdStateSmem<Ktraits>(params.dk, params.chunk_size));
  });
}
inline size_t linear_memory_fwd_output_smem(const LinearMemoryParams& params, InputType input_type, int tile) {
  return lm::dispatch<lm::kParallelThreads>(input_type, tile, [&](auto ktraits) {
    using Ktraits = decltype(ktraits);
    return lm::smem_bytes<Ktraits>(LinearMemoryFwdOutputSmem<Ktraits>(params.dk, params.chunk_size));
  });
}

ValueTiles linear_memory_fwd_tiles(const LinearMemoryParams& params, InputType input_type, const DeviceLimits& device) {
  return lm::choose_tiles(
      params, input_type, device, [&](int tile) { return linear_memory_fwd_state_smem(params, input_type, tile); },
      [&](int tile) { return linear_memory_fwd_output_smem(params, input_type, tile); });
}

int linear_memory_fwd_launch(const LinearMemoryParams& params, const LinearMemoryFwdWorkspace& workspace,
                             InputType input_type, const ValueTiles& tiles, CUstream_st* stream) {
  if (params.batch == 0 || params.heads == 0 || params.dv == 0) return device::kSuccess;
  const int dk = params.dk, C = params.chunk_size;
  device::Error err = device::kSuccess;
  if (params.n_chunks > 0) {
    err = lm::dispatch<lm::kParallelThreads>(input_type, tiles.parallel, [&](auto ktraits) {
      return lm::launch_gate_rows<decltype(ktraits)>(params, workspace.gate_rows, stream);
    });
    if (err != device::kSuccess) return static_cast<int>(err);
  }
  err = lm::dispatch<lm::kSequentialThreads>(input_type, tiles.state, [&](auto ktraits) {
    using Ktraits = decltype(ktraits);
    return device::launch("linear_memory_fwd_state", linear_memory_fwd_state_kernel<Ktraits>,
                          dim3(lm::value_tiles<Ktraits>(params), params.heads, params.batch),
                          dim3(Ktraits::kNThreads), lm::smem_bytes<Ktraits>(LinearMemoryFwdStateSmem<Ktraits>(dk, C)),
                          stream, params, workspace);
  });
  if (err != device::kSuccess || params.n_chunks == 0) return static_cast<int>(err);
  return static_cast<int>(lm::dispatch<lm::kParallelThreads>(input_type, tiles.parallel, [&](auto ktraits) {
    using Ktraits = decltype(ktraits);
    return device::launch("linear_memory_fwd_output", linear_memory_fwd_output_kernel<Ktraits>,
                          dim3(params.n_chunks * lm::value_tiles<Ktraits>(params), params.heads, params.batch),
                          dim3(Ktraits::kNThreads), lm::smem_bytes<Ktraits>(LinearMemoryFwdOutputSmem<Ktraits>(dk, C)),
                          stream, params);
  }));
}

size_t linear_memory_fwd_smem_bytes(const LinearMemoryParams& params, InputType input_type, const ValueTiles& tiles) {
  const size_t state = linear_memory_fwd_state_smem(params, input_type, tiles.state);
  const size_t output = linear_memory_fwd_output_smem(params, input_type, tiles.parallel);
  return state > output ? state : output;
}

}  // namespace titans
