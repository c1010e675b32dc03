// CUDA forward of the linear memory, written only against the device layer (device/device.h), so
// the emulation runs this exact source in CI. Included by exactly one TU per build.
//
// One block per (value tile, head, batch): the block keeps its kTileV rows of the memory M and the
// momentum S in shared memory (fp32; fp64 for fp64 inputs) and walks the chunks in order. Value
// tiles never communicate: row j of M and S evolves from row j of E only (kernels.md §5.4). Per
// chunk of L tokens (shared/design README §2, backward_linear.md §0), all products on tensor cores
// through the operand policy of linear_memory_common.cuh:
//   E = 2 (K M0^T - V)                                  errors at the chunk-start memory
//   a, g, c, m = c[L-1], s, p                           gate tables by column chains
//   O = diag(a) Q M0^T + diag(g) Q S0^T + (Q K^T .* c) E        (read_token)
//   O = Q M0^T                                                   (chunk_start read)
//   M_L = a_L M0 + g_L S0 + E^T diag(m) K ,   S_L = p S0 + E^T diag(s) K
// The chunk-start states are written for the backward. Every block recomputes the gate tables
// and Q K^T of its chunk (O(L^2 Dk), small next to the state products).
#pragma once

#include "cuda/linear_memory_common.cuh"
#include "cuda/linear_memory_fwd.h"

namespace titans {

// The block's dynamic shared memory (offsets in elements of each region's type).
struct LinearMemoryFwdSmem {
  lm::SmemCarver carver;
  int m, s;                 // [kTileV, Dk]: the block's rows of M and S
  int err;                  // [C, kTileV]: V's tile, then E in place
  int coef;                 // [C, C]: c, then W = c .* (Q K^T) in place (token read)
  int a, g, m_end, s_end;   // [C] each
  int theta, eta, beta;     // [C] each: the chunk's gates, beta = 1 - alpha
  int p;                    // [1]
  int q, k;                 // input region, [C, Dk]: the chunk's queries and keys
  __host__ __device__ LinearMemoryFwdSmem(int dk, int chunk, int tile_v) {
    m = carver.compute(tile_v * dk), s = carver.compute(tile_v * dk);
    err = carver.compute(chunk * tile_v);
    coef = carver.compute(chunk * chunk);
    a = carver.compute(chunk), g = carver.compute(chunk), m_end = carver.compute(chunk), s_end = carver.compute(chunk);
    theta = carver.compute(chunk), eta = carver.compute(chunk), beta = carver.compute(chunk);
    p = carver.compute(2);  // even, so the input region stays aligned for any pair of dtypes
    q = carver.input(chunk * dk), k = carver.input(chunk * dk);
  }
};

template <typename Ktraits>
__global__ void __launch_bounds__(Ktraits::kNThreads) linear_memory_fwd_kernel(LinearMemoryParams params) {
  using input_t = typename Ktraits::input_t;
  using compute_t = typename Ktraits::compute_t;
  using Policy = typename Ktraits::Policy;
  using acc_t = typename Policy::acc_t;
  constexpr int kTileV = Ktraits::kTileV;

  const int v0 = blockIdx.x * kTileV, h = blockIdx.y, b = blockIdx.z;
  const int rows = params.dv - v0 < kTileV ? params.dv - v0 : kTileV;
  const int dk = params.dk, dv = params.dv, C = params.chunk_size;

  const LinearMemoryFwdSmem layout(dk, C, kTileV);
  const lm::SmemBase<compute_t, input_t> smem(layout.carver);
  const auto m = smem.compute(layout.m);
  const auto s = smem.compute(layout.s);
  const auto err = smem.compute(layout.err);
  const auto coef = smem.compute(layout.coef);
  const auto a = smem.compute(layout.a);
  const auto g = smem.compute(layout.g);
  const auto m_end = smem.compute(layout.m_end);
  const auto s_end = smem.compute(layout.s_end);
  const auto theta = smem.compute(layout.theta);
  const auto eta = smem.compute(layout.eta);
  const auto beta = smem.compute(layout.beta);
  const auto p = smem.compute(layout.p);
  const auto q_s = smem.input(layout.q);
  const auto k_s = smem.input(layout.k);

  // This block's rows [v0, v0 + rows) of the contiguous [B, H, Dv, Dk] states.
  const index_t bh = index_t(b) * params.heads + h;
  const index_t state_offset = (bh * dv + v0) * dk;
  const auto* m0 = static_cast<const compute_t*>(params.m0_ptr);
  const auto* s0 = static_cast<const compute_t*>(params.s0_ptr);
  lm::load_state_pair(m0, s0, state_offset, rows * dk, m, s);

  auto* o_out = static_cast<input_t*>(params.o_ptr);
  auto* chunk_states = static_cast<compute_t*>(params.chunk_states_ptr);

  // Operand views of the staged tiles (row-major, converted to compute_t on read).
  const auto Q = [&](int t, int d) { return device::cast<compute_t>(q_s[t * dk + d]); };
  const auto K = [&](int t, int d) { return device::cast<compute_t>(k_s[t * dk + d]); };
  const auto Mt = [&](int d, int j) { return m[j * dk + d]; };  // M0^T: [Dk, rows]
  const auto St = [&](int d, int j) { return s[j * dk + d]; };

  for (int n = 0; n < params.n_chunks; ++n) {
    const int t0 = n * C;
    const int L = params.seqlen - t0 < C ? params.seqlen - t0 : C;

    // 1. Stage the chunk: K and Q rows, V's tile (into err), the gates.
    lm::stage_rows<input_t>(params.k, b, h, t0, L, 0, dk, dk, k_s);
    lm::stage_rows<input_t>(params.q, b, h, t0, L, 0, dk, dk, q_s);
    lm::stage_gates_and_values<input_t, compute_t>(params, b, h, t0, L, v0, rows, kTileV, theta, eta, beta, err);
    __syncthreads();

    // 2. Gate tables, and E = 2 (K M0^T - V) in place over V's tile (each element is read and
    //    written by the lane that owns its accumulator).
    lm::chunk_gate_tables<compute_t>(L, C, theta, eta, beta, coef, a, g, m_end, s_end, p);
    lm::for_each_tile(L, rows, [&](int r0, int c0) {
      acc_t acc[4] = {};
      lm::mma_accumulate<Policy>(acc, r0, c0, L, rows, dk, K, Mt);
      lm::for_each_element(r0, c0, L, rows, [&](int t, int j, int i) {
        err[t * kTileV + j] = compute_t(2) * (compute_t(acc[i]) - err[t * kTileV + j]);
      });
    });
    __syncthreads();

    // 3. W = c .* (Q K^T), causal (token read); save the chunk-start state for the backward.
    if (params.read_token) {
      lm::for_each_tile(L, L, [&](int r0, int c0) {
        acc_t acc[4] = {};
        lm::mma_accumulate<Policy>(acc, r0, c0, L, L, dk, Q, [&](int d, int i) { return K(i, d); });
        lm::for_each_element(r0, c0, L, L, [&](int t, int i, int e) {
          coef[t * C + i] = i <= t ? compute_t(acc[e]) * coef[t * C + i] : compute_t(0);
        });
      });
    }
    if (chunk_states) {
      const index_t chunk_offset = ((bh * params.n_chunks + n) * 2) * dv * dk;
      lm::store_state_pair(m, s, index_t(v0) * dk, rows * dk, chunk_states + chunk_offset,
                           chunk_states + chunk_offset + index_t(dv) * dk);
    }
    __syncthreads();

    // 4. Outputs, from the chunk-start state. The gate rows scale separate accumulators, so
    //    a and g never round into the MMA operands.
    lm::for_each_tile(L, rows, [&](int r0, int c0) {
      acc_t qm[4] = {}, qs[4] = {}, we[4] = {};
      lm::mma_accumulate<Policy>(qm, r0, c0, L, rows, dk, Q, Mt);
      if (params.read_token) {
        lm::mma_accumulate<Policy>(qs, r0, c0, L, rows, dk, Q, St);
        lm::mma_accumulate<Policy>(we, r0, c0, L, rows, L, [&](int t, int i) { return coef[t * C + i]; },
                                   [&](int i, int j) { return err[i * kTileV + j]; });
      }
      lm::for_each_element(r0, c0, L, rows, [&](int t, int j, int i) {
        const compute_t out = params.read_token
                                  ? a[t] * compute_t(qm[i]) + g[t] * compute_t(qs[i]) + compute_t(we[i])
                                  : compute_t(qm[i]);
        o_out[lm::contiguous_token_offset(b, t0 + t, h, params.seqlen, params.heads, dv) + v0 + j] =
            device::cast<input_t>(out);
      });
    });
    // 4 reads M0 and S0, which 5 overwrites.
    __syncthreads();

    // 5. Step to the chunk end: the lane owning (j, d) of both products updates M and S there.
    const compute_t a_L = a[L - 1], g_L = g[L - 1], p_L = p[0];
    lm::for_each_tile(rows, dk, [&](int r0, int c0) {
      acc_t em[4] = {}, es[4] = {};
      lm::mma_accumulate<Policy>(em, r0, c0, rows, dk, L, [&](int j, int t) { return m_end[t] * err[t * kTileV + j]; },
                                 K);
      lm::mma_accumulate<Policy>(es, r0, c0, rows, dk, L, [&](int j, int t) { return s_end[t] * err[t * kTileV + j]; },
                                 K);
      lm::for_each_element(r0, c0, rows, dk, [&](int j, int d, int i) {
        const int idx = j * dk + d;
        const compute_t m_old = m[idx], s_old = s[idx];
        m[idx] = a_L * m_old + g_L * s_old + compute_t(em[i]);
        s[idx] = p_L * s_old + compute_t(es[i]);
      });
    });
    // The next chunk's staging overwrites what 5 reads.
    __syncthreads();
  }

  auto* m_final = static_cast<compute_t*>(params.m_final_ptr);
  auto* s_final = static_cast<compute_t*>(params.s_final_ptr);
  lm::store_state_pair(m, s, state_offset, rows * dk, m_final, s_final);
}

int linear_memory_fwd_launch(const LinearMemoryParams& params, InputType input_type, CUstream_st* stream) {
  if (params.batch == 0 || params.heads == 0 || params.dv == 0) return device::kSuccess;
  return static_cast<int>(lm::dispatch(
      input_type, linear_memory_value_tile(params.dk, input_type), [&](auto input_tag, auto tile_v) {
        using Ktraits = lm::Traits<decltype(input_tag), decltype(tile_v)::value>;
        const LinearMemoryFwdSmem layout(params.dk, params.chunk_size, Ktraits::kTileV);
        const dim3 grid((params.dv + Ktraits::kTileV - 1) / Ktraits::kTileV, params.heads, params.batch);
        return device::launch("linear_memory_fwd", linear_memory_fwd_kernel<Ktraits>, grid, dim3(Ktraits::kNThreads),
                              layout.carver.bytes<typename Ktraits::compute_t, typename Ktraits::input_t>(), stream,
                              params);
      }));
}

size_t linear_memory_fwd_smem_bytes(const LinearMemoryParams& params, InputType input_type) {
  return lm::dispatch(input_type, linear_memory_value_tile(params.dk, input_type), [&](auto input_tag, auto tile_v) {
    using Ktraits = lm::Traits<decltype(input_tag), decltype(tile_v)::value>;
    return LinearMemoryFwdSmem(params.dk, params.chunk_size, Ktraits::kTileV)
        .carver.bytes<typename Ktraits::compute_t, typename Ktraits::input_t>();
  });
}

}  // namespace titans
