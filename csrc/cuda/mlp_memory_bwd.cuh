// CUDA backward of the deep memory M(x) = x + W2 act(W1 x) (docs/mlp_dual_form.md §4), written only
// against the device layer, so the emulation runs this exact source in CI. Included by exactly one
// TU per build.
//
// One kernel, one block per (head, batch), walks the chunks from the last to the first carrying the
// cotangent (dW1, dS1, dW2, dS2) of the chunk-end state in the fp32 gradient outputs (which end as
// the initial state's gradients). Each chunk is recomputed from its saved start state (in the
// inputs' dtype) and streamed in hidden blocks as in the forward (mlp_memory.h), in three passes,
// because the gradient dR of the residuals needs every block's share of dE first:
//   pass 1 (W1, W2):   Z, H, Y += H W2^T -> R = K + Y - V, E = f(R); then dA = dO E^T, Q K^T
//   pass 2 (W1, S1, W2, S2 and the carried dW1', dS1', dW2', dS2'), per block:
//     key path      Z, H, act', act''; G = E W2, DZ = G .* act'(Z)
//     token read    Zq = a Q W1^T + g Q S1^T + (Q K^T .* c) DZ, Hq = act(Zq)
//     end state     dDZ = m K dW1'^T + s K dS1'^T, dH = m E dW2' + s E dS2',
//                   dK += (m DZ) dW1' + (s DZ) dS1', dE += (m H) dW2'^T + (s H) dS2'^T
//     token read    dHq = a dO W2 + g dO S2 + (dA .* c) H, dZq = dHq .* act'(Zq), dH += (dA .* c)^T Hq,
//                   HH += Hq H^T, dB += dZq DZ^T, dDZ += (Q K^T .* c)^T dZq, dQ += a dZq W1 + g dZq S1
//     key path      dG = dDZ .* act'(Z), dE += dG W2^T; the part of dZ known so far,
//                   dDZ .* G .* act''(Z) + dH .* act'(Z), goes to a [C, N] scratch
//     cotangent     dW1 = a_L dW1' + (a dZq)^T Q, dS1 = g_L dW1' + p_L dS1' + (g dZq)^T Q,
//                   dW2 = a_L dW2' + (a dO)^T Hq + E^T dG, dS2 = g_L dW2' + p_L dS2' + (g dO)^T Hq
//   then              dE += (HH .* c)^T dO, dQ += (dB .* c) K, dK += (dB .* c)^T Q,
//                     dR = dE .* f'(R), dV = -dR, dK += dR
//   pass 3 (W1, W2):  dZ = scratch + (dR W2) .* act'(Z); dK += dZ W1, dW1 += dZ^T K, dW2 += dR^T H
// and the gate gradients from the cotangents of the gate tables by the reverse column recurrence
// (lm::gate_adjoint). The row sums the gate cotangents need (e.g. rowsum(DZ .* K dW1'^T)) are
// taken per 16 x 8 tile with warp shuffles and added in tile order: deterministic, without atomics.
// Retention "kl": the chunk proper starts after the lag token, from the lag step of the saved state
// (recomputed into a scratch state); the lag token's read, its softmax step and its key path are
// differentiated with matrix-vector products (kl_softmax_rows_backward and the key path's
// matrix-vector backward). Retention "lq": the products scale their sums by rho as in the forward;
// what reaches the scaled weights goes to the carried cotangent times rho and, through
// rho = ||A||_q^(2-q), to the accumulators (kernel::lq_scale_backward) with the masked products'
// direct terms.
#pragma once

#include "cuda/mlp_memory_common.cuh"

namespace titans {

// Shared memory of the backward kernel (byte offsets).
template <typename Ktraits>
struct MlpMemoryBwdSmem {
  using input_t = typename Ktraits::input_t;
  using compute_t = typename Ktraits::compute_t;
  mlp::SmemCarver<Ktraits> carver;
  int ld;                                              // leading dimension of the staged q, k, dO
  int gates, gate_rows;                                // lm::ChunkGates, lm::ChunkGateRows of the chunk
  int P, norms;                                        // [C]: the g column's sigma, yaad's norms
  int d_a, d_g, d_s, prod_a, prod_gb, prod_ge;         // [C]: gate-table cotangents; adjoint scratch
  int scalars;  // [4 + 3 x warps]: the cotangent of p_L, the lag token's residual norm, block sums
  int c, sig, hh, da, db;                              // [C, C]: c; sig (then Q K^T); Hq H^T; dO E^T; dZq DZ^T
  int resid, errors, d_err;                            // [C, D]: R (not for l2, f' = 2); E; dE, then dR
  int row_sums;                                        // [4, C, row_tiles]: per-tile row sums
  int h, a1, ga2, dz, aq1, hq, ddz, dh, dzq;           // [C, NB]
  int lag_hidden, lag_first, lag_second, lag_grad;     // kl: [N] h0, act'(z0), G0 .* act''(z0), dz0
  int lag_dx, lag_dy;                                  // kl: [N] dDZ0 / dH0
  int lag_resid, lag_err, lag_de;                      // kl: [D] r0, e0, dE0
  int q, k, d_o;                                       // input region: [C, ld]
  int blocks[2][4];                                    // input region: W1, S1 [NB, D], W2, S2 [D, NB]
  __host__ __device__ MlpMemoryBwdSmem(const MlpMemoryParams& p, int NB) : ld(kernel::padded<input_t>(p.dim)) {
    const int C = p.chunk_size, D = p.dim, N = p.hidden;
    const bool token = p.read_token, kl = p.miras.retention == RetentionKind::kl;
    gates = carver.compute(lm::ChunkGates<compute_t>::size(C));
    gate_rows = carver.compute(lm::ChunkGateRows<compute_t>::size(C));
    P = carver.compute(C), norms = carver.compute(C);
    d_a = carver.compute(C), d_g = carver.compute(C), d_s = carver.compute(C);
    prod_a = carver.compute(C), prod_gb = carver.compute(C), prod_ge = carver.compute(C);
    scalars = carver.compute(4 + 3 * mlp::kThreads / device::kWarpSize);
    c = carver.compute(C * C), sig = carver.compute(C * C);
    hh = carver.compute(token ? C * C : 0), da = carver.compute(C * C), db = carver.compute(token ? C * C : 0);
    resid = carver.compute(p.miras.objective == ObjectiveKind::l2 ? 0 : C * D);
    errors = carver.compute(C * D), d_err = carver.compute(C * D);
    row_sums = carver.compute(4 * C * row_tiles(D, NB));
    const int tile = C * NB;
    h = carver.compute(tile), a1 = carver.compute(tile), ga2 = carver.compute(tile), dz = carver.compute(tile);
    aq1 = carver.compute(tile), hq = carver.compute(tile), ddz = carver.compute(tile), dh = carver.compute(tile);
    dzq = carver.compute(tile);
    const int lag_n = kl ? N : 0, lag_d = kl ? D : 0;
    lag_hidden = carver.compute(lag_n), lag_first = carver.compute(lag_n), lag_second = carver.compute(lag_n);
    lag_grad = carver.compute(lag_n), lag_dx = carver.compute(lag_n), lag_dy = carver.compute(lag_n);
    lag_resid = carver.compute(lag_d), lag_err = carver.compute(lag_d), lag_de = carver.compute(lag_d);
    q = carver.input(C * ld), k = carver.input(C * ld), d_o = carver.input(C * ld);
    for (auto& buffer : blocks)
      for (int w = 0; w < 4; ++w) buffer[w] = carver.input(NB * D);
  }
  // Column tiles of the row sums: they come from [C, NB] and [C, D] products.
  __host__ __device__ static int row_tiles(int D, int NB) { return ((D > NB ? D : NB) + 7) / 8; }
};

namespace mlp {

// Backward of one weight matrix's Memora step (kernel::kl_softmax_rows_backward over row-major
// arrays): w, s: its inputs; w1: its output W' [rows, cols]; dw, ds: the cotangents of its
// outputs, turned in place into those of its inputs.
template <typename T, typename S, class X, class Y, class DX, class DY>
__device__ __forceinline__ void kl_softmax_rows_backward(const S* w, const S* s, const S* w1, T* dw, T* ds, int rows,
                                                         int cols, T theta, T eta, T beta, const X& x, const Y& y,
                                                         const DX& dx, const DY& dy, T (&gate_partials)[3]) {
  const auto at = [cols](int r, int c) { return index_t(r) * cols + c; };
  kernel::kl_softmax_rows_backward<T>(
      rows, cols, theta, eta, beta, [&](int r, int c) { return device::cast<T>(w[at(r, c)]); },
      [&](int r, int c) { return device::cast<T>(s[at(r, c)]); },
      [&](int r, int c) { return device::cast<T>(w1[at(r, c)]); }, [&](int r, int c) -> T& { return dw[at(r, c)]; },
      [&](int r, int c) -> T& { return ds[at(r, c)]; }, x, y, dx, dy, gate_partials);
}

}  // namespace mlp

template <typename Ktraits>
__global__ void __launch_bounds__(mlp::kThreads, 1)
    mlp_memory_bwd_kernel(MlpMemoryBwdParams launch, MlpMemoryBwdWorkspace workspace, int NB) {
  using input_t = typename Ktraits::input_t;
  using T = typename Ktraits::compute_t;
  using Policy = typename Ktraits::Policy;
  using acc_t = typename Policy::acc_t;
  using StateBlock = mlp::StateBlock<input_t, T>;

  // Block y walks batch row y, or with cu_seqlens sequence y (its view, sequences.cuh); the
  // workspace has a part per block.
  const MlpMemoryBwdParams params = mlp::sequence_view<input_t>(launch, blockIdx.y);
  const index_t state_slots = sequence_units(launch, 1);
  const index_t block_index = index_t(blockIdx.y) * launch.heads + blockIdx.x;
  const int h_idx = blockIdx.x, b = kernel::batch_row(launch, blockIdx.y);
  const int D = params.dim, N = params.hidden, C = params.chunk_size;
  const int row_tiles = MlpMemoryBwdSmem<Ktraits>::row_tiles(D, NB);
  const index_t bh = index_t(b) * params.heads + h_idx, block_elems = index_t(N) * D;
  const bool token_read = params.read_token, kl = params.miras.retention == RetentionKind::kl;
  const bool lq = params.miras.retention == RetentionKind::lq;
  const MlpActivation act_kind = params.activation;
  const kernel::Objective<T> objective(params.miras);
  const T* delta = static_cast<const T*>(params.miras.delta_ptr);
  T* d_delta = static_cast<T*>(params.d_delta_ptr);

  const MlpMemoryBwdSmem<Ktraits> layout(params, NB);
  const int ld = layout.ld;
  const mlp::SmemArrays<Ktraits> smem;
  const lm::ChunkGates<T> gates(smem.compute(layout.gates), C);
  const lm::ChunkGateRows<T> gate_rows(smem.compute(layout.gate_rows), C);
  const auto a = gate_rows.a, g = gate_rows.g, s_end = gate_rows.s_end;
  const auto P = smem.compute(layout.P);
  const auto norms = smem.compute(layout.norms);
  const auto d_a = smem.compute(layout.d_a), d_g = smem.compute(layout.d_g), d_s = smem.compute(layout.d_s);
  const auto prod_a = smem.compute(layout.prod_a), prod_gb = smem.compute(layout.prod_gb);
  const auto prod_ge = smem.compute(layout.prod_ge), scalars = smem.compute(layout.scalars);
  const auto c = smem.compute(layout.c), sig = smem.compute(layout.sig), hh = smem.compute(layout.hh);
  const auto da = smem.compute(layout.da), db = smem.compute(layout.db);
  const auto qk = sig;  // Q K^T while the products need it; the adjoint rebuilds sig there at the end
  const bool keep_residuals = params.miras.objective != ObjectiveKind::l2;
  const auto errors = smem.compute(layout.errors);
  const auto resid = keep_residuals ? smem.compute(layout.resid) : errors;  // E = 2 R is computed in place
  const auto d_err = smem.compute(layout.d_err), row_sums = smem.compute(layout.row_sums);
  const auto hid = smem.compute(layout.h), a1 = smem.compute(layout.a1), ga2 = smem.compute(layout.ga2);
  const auto dz = smem.compute(layout.dz), aq1 = smem.compute(layout.aq1), hq = smem.compute(layout.hq);
  const auto ddz = smem.compute(layout.ddz);
  const auto dh = smem.compute(layout.dh), dzq = smem.compute(layout.dzq);
  const auto q_s = smem.input(layout.q), k_s = smem.input(layout.k), do_s = smem.input(layout.d_o);
  const StateBlock blocks[2] = {
      {smem.input(layout.blocks[0][0]), smem.input(layout.blocks[0][1]), smem.input(layout.blocks[0][2]),
       smem.input(layout.blocks[0][3]), D, NB},
      {smem.input(layout.blocks[1][0]), smem.input(layout.blocks[1][1]), smem.input(layout.blocks[1][2]),
       smem.input(layout.blocks[1][3]), D, NB}};
  // The carried cotangent: the initial-state gradient outputs, from the final state's cotangent.
  const index_t state_offset = bh * block_elems;
  const mlp::GlobalState<T> cot(static_cast<T*>(params.dw1_0_ptr) + state_offset,
                                static_cast<T*>(params.ds1_0_ptr) + state_offset,
                                static_cast<T*>(params.dw2_0_ptr) + state_offset,
                                static_cast<T*>(params.ds2_0_ptr) + state_offset);
  const mlp::GlobalState<const T> cot_in(cot.w1, cot.s1, cot.w2, cot.s2);
  {
    const T* finals[4] = {static_cast<const T*>(params.d_w1_final_ptr), static_cast<const T*>(params.d_s1_final_ptr),
                          static_cast<const T*>(params.d_w2_final_ptr), static_cast<const T*>(params.d_s2_final_ptr)};
    T* const carried[4] = {cot.w1, cot.s1, cot.w2, cot.s2};
    for (int w = 0; w < 4; ++w)
      for (index_t i = threadIdx.x; i < block_elems; i += blockDim.x)
        carried[w][i] = finals[w] ? finals[w][state_offset + i] : T(0);
  }
  // Scratch: the chunk's dK and dQ sums [C, D] and the [C, N] part of dZ known after pass 2.
  T* dk_acc = static_cast<T*>(workspace.token_grads) + block_index * 2 * C * D;
  T* dq_acc = dk_acc + C * D;
  T* hidden_grads = static_cast<T*>(workspace.hidden_grads) + block_index * C * N;
  __syncthreads();

  const auto* v_in = static_cast<const input_t*>(params.v.ptr);
  const auto token_at = [&](int t) {
    return kernel::contiguous_token_offset(b, t, h_idx, params.seqlen, params.heads, D);
  };
  const auto gate_at = [&](int t) { return (index_t(b) * params.seqlen + t) * params.heads + h_idx; };
  auto* dq_out = static_cast<input_t*>(params.dq_ptr);
  auto* dk_out = static_cast<input_t*>(params.dk_ptr);
  auto* dv_out = static_cast<input_t*>(params.dv_ptr);
  auto* dtheta_out = static_cast<T*>(params.dtheta_ptr);
  auto* deta_out = static_cast<T*>(params.deta_ptr);
  auto* dalpha_out = static_cast<T*>(params.dalpha_ptr);
  const auto Q = [&](int t, int d) { return device::cast<T>(q_s[t * ld + d]); };
  const auto K = [&](int t, int d) { return device::cast<T>(k_s[t * ld + d]); };
  const auto dO = [&](int t, int d) { return device::cast<T>(do_s[t * ld + d]); };
  const auto delta_at = [&](int t, int j) { return delta ? delta[token_at(t) + j] : T(0); };

  // lq (docs/miras.md §2.3): the chunk's errors and reads see rho1 [W1; S1], rho2 [W2; S2] (1 unless
  // lq). The products read the unscaled state and scale their sums; what reaches the scaled
  // weights goes to the carried cotangent times rho, and its inner product with the unscaled
  // weights, with the masked products' direct terms, to this thread's share of d rho.
  T rho1 = T(1), rho2 = T(1);
  T rho_partials[2] = {T(0), T(0)};

  // Plain reads O = Q + act(rho1 Q W1^T) rho2 W2^T of rows [r0, r0 + Lr) at `state` (read
  // "chunk_start", and the kl lag token's read): adds to dQ (without the dO term) and to the carried
  // cotangent.
  const auto read_backward = [&](const mlp::GlobalState<const input_t>& state, int r0, int Lr) {
    mlp::hidden_block_loop(state, D, N, NB, false, blocks, [&](const mlp::HiddenBlock& hb, const StateBlock& w) {
      const int nb = hb.nb;
      mlp::product<Policy>(
          Lr, nb,
          [&](int t, int i, const auto* v) {
            const auto act = mlp::activation<1>(act_kind, rho1 * T(v[0]));
            hq[t * NB + i] = act.value;
            aq1[t * NB + i] = act.first;
          },
          mlp::term(D, [&](int t, int d) { return Q(r0 + t, d); }, [&](int d, int i) { return w.W1(i, d); }));
      __syncthreads();
      mlp::product<Policy>(
          Lr, nb, [&](int t, int i, const auto* v) { dzq[t * NB + i] = rho2 * T(v[0]) * aq1[t * NB + i]; },
          mlp::term(D, [&](int t, int j) { return dO(r0 + t, j); }, [&](int j, int i) { return w.W2(j, i); }));
      __syncthreads();
      const auto dZq = [&](int t, int i) { return dzq[t * NB + i]; };
      mlp::product<Policy>(Lr, D, [&](int t, int d, const auto* v) { dq_acc[(r0 + t) * D + d] += rho1 * T(v[0]); },
                           mlp::term(nb, dZq, [&](int i, int d) { return w.W1(i, d); }));
      mlp::product<Policy>(
          nb, D,
          [&](int i, int d, const auto* v) {
            cot.w1[index_t(hb.n0 + i) * D + d] += rho1 * T(v[0]);
            rho_partials[0] += T(v[0]) * w.W1(i, d);
          },
          mlp::term(Lr, [&](int i, int t) { return dzq[t * NB + i]; }, [&](int t, int d) { return Q(r0 + t, d); }));
      mlp::product<Policy>(
          D, nb,
          [&](int j, int i, const auto* v) {
            cot.w2[index_t(j) * N + hb.n0 + i] += rho2 * T(v[0]);
            rho_partials[1] += T(v[0]) * w.W2(j, i);
          },
          mlp::term(Lr, [&](int j, int t) { return dO(r0 + t, j); }, [&](int t, int i) { return hq[t * NB + i]; }));
    });
  };

  for (int n = params.n_chunks - 1; n >= 0; --n) {
    const int t0 = n * C, L = kernel::chunk_length(params, n);
    const mlp::GlobalState<const input_t> saved(
        static_cast<const input_t*>(params.chunk_states_ptr) + (bh * state_slots + n) * 4 * block_elems,
        block_elems);
    kernel::stage_token_rows<input_t>(params.q, b, h_idx, t0, L, 0, D, ld, q_s);
    kernel::stage_token_rows<input_t>(params.k, b, h_idx, t0, L, 0, D, ld, k_s);
    kernel::stage_token_rows<input_t>(params.d_o, b, h_idx, t0, L, 0, D, ld, do_s);
    gates.stage(params, b, h_idx, t0, L);
    for (int i = threadIdx.x; i < L * D; i += blockDim.x) dk_acc[i] = dq_acc[i] = T(0);
    kernel::finish_staging();
    __syncthreads();

    mlp::LqScales<T> scale;
    if (lq) scale = mlp::lq_scales(saved, block_elems, T(params.miras.q), scalars + 4);
    rho1 = scale.rho[0], rho2 = scale.rho[1];
    rho_partials[0] = rho_partials[1] = T(0);

    // kl: the chunk proper starts from the lag step of the saved state (into the scratch state).
    int lag = 0;
    mlp::GlobalState<const input_t> start = saved;
    const mlp::LagVectors<decltype(norms)> lag_vec{
        smem.compute(layout.lag_hidden), smem.compute(layout.lag_first), smem.compute(layout.lag_second),
        smem.compute(layout.lag_grad),   smem.compute(layout.lag_resid), smem.compute(layout.lag_err),
        scalars + 1};  // not norms[0]: the chunk proper's row 0 takes that
    const auto k0 = [&](int d) { return K(0, d); };
    const auto v0 = [&](int j) { return device::cast<T>(v_in[kernel::token_offset(params.v, b, t0, h_idx) + j]); };
    if (kl) {
      const mlp::GlobalState<input_t> scratch(static_cast<input_t*>(workspace.start_state) + block_index * 4 * block_elems,
                                              block_elems);
      mlp::lag_key_path(saved, D, N, act_kind, objective, k0, v0, [&](int j) { return delta_at(t0, j); }, true,
                        lag_vec);
      mlp::kl_lag_step(saved, scratch, D, N, gates.theta[0], gates.eta[0], T(1) - gates.alpha[0], k0, lag_vec);
      start = mlp::GlobalState<const input_t>(scratch.w1, scratch.s1, scratch.w2, scratch.s2);
      lag = 1;
    }

    const int Lc = L - lag;  // the chunk proper: rows lag + t, t < Lc
    if (Lc > 0) {
      const int off = lag;
      const auto Qc = [&](int t, int d) { return Q(off + t, d); };
      const auto Kc = [&](int t, int d) { return K(off + t, d); };
      const auto dOc = [&](int t, int d) { return dO(off + t, d); };
      // Gate tables: c [Lc, Lc] (row stride C), and the rows a, g, m = c[Lc-1], s = sig[Lc-1].
      const lm::ChunkGates<T> chunk_gates(gates.theta + off, C);
      const lm::ChunkGateTables<T> c_table{c, c, c, C, false};
      lm::build_gate_tables(Lc, C, chunk_gates, gate_rows, &c_table);
      for (int i = threadIdx.x; i < 4 * C * row_tiles; i += blockDim.x) row_sums[i] = T(0);
      __syncthreads();
      const T a_L = a[Lc - 1], g_L = g[Lc - 1], p_L = gate_rows.p_end();
      const auto m_end = gate_rows.m_end;

      // Pass 1: Y = sum over blocks of H W2^T, then R = K + Y - V, E = f(R).
      for (int i = threadIdx.x; i < C * D; i += blockDim.x) resid[i] = d_err[i] = T(0);
      mlp::hidden_block_loop(start, D, N, NB, false, blocks, [&](const mlp::HiddenBlock& hb, const StateBlock& w) {
        mlp::product<Policy>(
            Lc, hb.nb,
            [&](int t, int i, const auto* v) { hid[t * NB + i] = mlp::activation<0>(act_kind, rho1 * T(v[0])).value; },
            mlp::term(D, Kc, [&](int d, int i) { return w.W1(i, d); }));
        __syncthreads();
        mlp::product<Policy>(Lc, D, [&](int t, int j, const auto* v) { resid[t * D + j] += rho2 * T(v[0]); },
                             mlp::term(hb.nb, [&](int t, int i) { return hid[t * NB + i]; },
                                       [&](int i, int j) { return w.W2(j, i); }));
      });
      for (int i = threadIdx.x; i < Lc * D; i += blockDim.x) {
        const int t = i / D, j = i % D;
        resid[i] += Kc(t, j) - device::cast<T>(v_in[kernel::token_offset(params.v, b, t0 + off + t, h_idx) + j]);
      }
      __syncthreads();
      if (objective.uses_norm()) {
        mlp::warp_row_sums<T>(
            Lc, D, [&](int t, int j) { return resid[t * D + j] * resid[t * D + j]; },
            [&](int t, T sum) {
              if (device::lane_id() == 0) norms[t] = fmath::sqrt(sum);
            });
        __syncthreads();
      }
      const auto norm_at = [&](int t) { return objective.uses_norm() ? norms[t] : T(0); };
      for (int i = threadIdx.x; i < Lc * D; i += blockDim.x)
        errors[i] = objective.error(resid[i], delta_at(t0 + off + i / D, i % D), norm_at(i / D));
      if (token_read)
        for (int i = threadIdx.x; i < C * C; i += blockDim.x) hh[i] = db[i] = T(0);
      __syncthreads();
      const auto E = [&](int t, int j) { return errors[t * D + j]; };
      const auto Et = [&](int j, int t) { return errors[t * D + j]; };
      const auto cc = [&](int t, int s) { return c[t * C + s]; };
      if (token_read) {
        mlp::product<Policy>(Lc, Lc, [&](int t, int s, const auto* v) { qk[t * C + s] = T(v[0]); },
                             mlp::term(D, Qc, [&](int d, int s) { return Kc(s, d); }));
        mlp::product<Policy>(Lc, Lc, [&](int t, int s, const auto* v) { da[t * C + s] = T(v[0]); },
                             mlp::term(D, dOc, Et));
      }
      // Pass 2, per block. The per-thread shares of <dW1', W1> + <dW2', W2>, <dW1', S1> + <dW2', S2>
      // and <dS1', S1> + <dS2', S2> (the cotangents of a_L, g_L and p_L).
      T end_partials[3] = {T(0), T(0), T(0)};
      const auto row_sum_at = [&](int which, int t, int tile) -> T& {
        return row_sums[(which * C + t) * row_tiles + tile];
      };
      mlp::hidden_block_loop(
          start, D, N, NB, true, blocks, [&](const mlp::HiddenBlock& hb, const StateBlock& w) {
            const int nb = hb.nb;
            // The carried cotangent's block, read where it is (each element by few products).
            const mlp::GlobalBlock<T, T> dw{cot_in, hb.n0, D, N};
            const auto at = [&](int t, int i) { return t * NB + i; };
            const auto H = [&](int t, int i) { return hid[at(t, i)]; };
            const auto Hq = [&](int t, int i) { return hq[at(t, i)]; };
            const auto dZq = [&](int t, int i) { return dzq[at(t, i)]; };
            const auto DZ = [&](int t, int i) { return dz[at(t, i)]; };
            // Key path.
            mlp::product<Policy>(
                Lc, nb,
                [&](int t, int i, const auto* v) {
                  const auto act = mlp::activation<2>(act_kind, rho1 * T(v[0]));
                  hid[at(t, i)] = act.value, a1[at(t, i)] = act.first, ga2[at(t, i)] = act.second;
                },
                mlp::term(D, Kc, [&](int d, int i) { return w.W1(i, d); }));
            for (int idx = threadIdx.x; idx < nb * D; idx += blockDim.x) {
              const int i = idx / D, d = idx % D;   // W1's row i, column d
              const int j = idx / nb, i2 = idx % nb;  // W2's row j, column i2
              end_partials[0] += dw.W1(i, d) * w.W1(i, d) + dw.W2(j, i2) * w.W2(j, i2);
              end_partials[1] += dw.W1(i, d) * w.S1(i, d) + dw.W2(j, i2) * w.S2(j, i2);
              end_partials[2] += dw.S1(i, d) * w.S1(i, d) + dw.S2(j, i2) * w.S2(j, i2);
            }
            __syncthreads();
            mlp::product<Policy>(
                Lc, nb,
                [&](int t, int i, const auto* v) {
                  const T g_ti = rho2 * T(v[0]);  // G = E (rho2 W2)
                  dz[at(t, i)] = g_ti * a1[at(t, i)];
                  ga2[at(t, i)] *= g_ti;
                },
                mlp::term(D, E, [&](int j, int i) { return w.W2(j, i); }));
            __syncthreads();
            // The end-state cotangent's paths, and the token read's Zq.
            mlp::product_tiles<Policy>(
                Lc, nb,
                [&](int r0, int c0, const acc_t (&acc)[2][4]) {
                  mlp::for_each_element(r0, c0, Lc, nb, [&](int t, int i, int e) {
                    ddz[at(t, i)] = m_end[t] * T(acc[0][e]) + s_end[t] * T(acc[1][e]);
                  });
                  mlp::tile_row_sums<T>(r0, c0, Lc, nb, [&](int t, int i, int e) { return DZ(t, i) * T(acc[0][e]); },
                                        [&](int t, int tile, T sum) { row_sum_at(0, t, tile) += sum; });
                  mlp::tile_row_sums<T>(r0, c0, Lc, nb, [&](int t, int i, int e) { return DZ(t, i) * T(acc[1][e]); },
                                        [&](int t, int tile, T sum) { row_sum_at(1, t, tile) += sum; });
                },
                mlp::term(D, Kc, [&](int d, int i) { return dw.W1(i, d); }),
                mlp::term(D, Kc, [&](int d, int i) { return dw.S1(i, d); }));
            mlp::product_tiles<Policy>(
                Lc, nb,
                [&](int r0, int c0, const acc_t (&acc)[2][4]) {
                  mlp::for_each_element(r0, c0, Lc, nb, [&](int t, int i, int e) {
                    dh[at(t, i)] = m_end[t] * T(acc[0][e]) + s_end[t] * T(acc[1][e]);
                  });
                  mlp::tile_row_sums<T>(r0, c0, Lc, nb, [&](int t, int i, int e) { return H(t, i) * T(acc[0][e]); },
                                        [&](int t, int tile, T sum) { row_sum_at(0, t, tile) += sum; });
                  mlp::tile_row_sums<T>(r0, c0, Lc, nb, [&](int t, int i, int e) { return H(t, i) * T(acc[1][e]); },
                                        [&](int t, int tile, T sum) { row_sum_at(1, t, tile) += sum; });
                },
                mlp::term(D, E, [&](int j, int i) { return dw.W2(j, i); }),
                mlp::term(D, E, [&](int j, int i) { return dw.S2(j, i); }));
            mlp::product<Policy>(
                Lc, D, [&](int t, int d, const auto* v) { dk_acc[(off + t) * D + d] += T(v[0]) + T(v[1]); },
                mlp::term(nb, [&](int t, int i) { return m_end[t] * DZ(t, i); }, [&](int i, int d) { return dw.W1(i, d); }),
                mlp::term(nb, [&](int t, int i) { return s_end[t] * DZ(t, i); }, [&](int i, int d) { return dw.S1(i, d); }));
            mlp::product<Policy>(
                Lc, D, [&](int t, int j, const auto* v) { d_err[t * D + j] += T(v[0]) + T(v[1]); },
                mlp::term(nb, [&](int t, int i) { return m_end[t] * H(t, i); }, [&](int i, int j) { return dw.W2(j, i); }),
                mlp::term(nb, [&](int t, int i) { return s_end[t] * H(t, i); }, [&](int i, int j) { return dw.S2(j, i); }));
            if (token_read)
              mlp::product<Policy>(
                  Lc, nb,
                  [&](int t, int i, const auto* v) {
                    const auto act = mlp::activation<1>(act_kind, rho1 * (a[t] * T(v[0]) + g[t] * T(v[1]) + T(v[2])));
                    hq[at(t, i)] = act.value, aq1[at(t, i)] = act.first;
                  },
                  mlp::term(D, Qc, [&](int d, int i) { return w.W1(i, d); }),
                  mlp::term(D, Qc, [&](int d, int i) { return w.S1(i, d); }),
                  mlp::term(Lc, [&](int t, int s) { return qk[t * C + s] * cc(t, s); }, DZ));
            __syncthreads();
            if (token_read) {
              // dHq = a dO W2 + g dO S2 + (dA .* c) H; dZq = dHq .* act'(Zq); the a, g cotangents.
              mlp::product_tiles<Policy>(
                  Lc, nb,
                  [&](int r0, int c0, const acc_t (&acc)[3][4]) {
                    mlp::for_each_element(r0, c0, Lc, nb, [&](int t, int i, int e) {
                      const T d_hq = rho2 * (a[t] * T(acc[0][e]) + g[t] * T(acc[1][e]) + T(acc[2][e]));
                      dzq[at(t, i)] = d_hq * aq1[at(t, i)];
                    });
                    mlp::tile_row_sums<T>(
                        r0, c0, Lc, nb, [&](int t, int i, int e) { return rho2 * Hq(t, i) * T(acc[0][e]); },
                        [&](int t, int tile, T sum) { row_sum_at(2, t, tile) += sum; });
                    mlp::tile_row_sums<T>(
                        r0, c0, Lc, nb, [&](int t, int i, int e) { return rho2 * Hq(t, i) * T(acc[1][e]); },
                        [&](int t, int tile, T sum) { row_sum_at(3, t, tile) += sum; });
                  },
                  mlp::term(D, dOc, [&](int j, int i) { return w.W2(j, i); }),
                  mlp::term(D, dOc, [&](int j, int i) { return w.S2(j, i); }),
                  mlp::term(Lc, [&](int t, int s) { return da[t * C + s] * cc(t, s); }, H));
              mlp::product<Policy>(Lc, nb, [&](int t, int i, const auto* v) { dh[at(t, i)] += rho2 * T(v[0]); },
                                   mlp::term(Lc, [&](int t, int s) { return da[s * C + t] * cc(s, t); }, Hq));
              mlp::product<Policy>(Lc, Lc, [&](int t, int s, const auto* v) { hh[t * C + s] += T(v[0]); },
                                   mlp::term(nb, Hq, [&](int i, int s) { return H(s, i); }));
              __syncthreads();
              // dQ += a dZq W1 + g dZq S1, and the a, g cotangents rowsum(dZq .* Q W1^T) =
              // rowsum(Q .* dZq W1) (and S1's) from the same products.
              mlp::product_tiles<Policy>(
                  Lc, D,
                  [&](int r0, int c0, const acc_t (&acc)[2][4]) {
                    mlp::for_each_element(r0, c0, Lc, D, [&](int t, int d, int e) {
                      dq_acc[(off + t) * D + d] += rho1 * (a[t] * T(acc[0][e]) + g[t] * T(acc[1][e]));
                    });
                    mlp::tile_row_sums<T>(
                        r0, c0, Lc, D, [&](int t, int d, int e) { return rho1 * Qc(t, d) * T(acc[0][e]); },
                        [&](int t, int tile, T sum) { row_sum_at(2, t, tile) += sum; });
                    mlp::tile_row_sums<T>(
                        r0, c0, Lc, D, [&](int t, int d, int e) { return rho1 * Qc(t, d) * T(acc[1][e]); },
                        [&](int t, int tile, T sum) { row_sum_at(3, t, tile) += sum; });
                  },
                  mlp::term(nb, dZq, [&](int i, int d) { return w.W1(i, d); }),
                  mlp::term(nb, dZq, [&](int i, int d) { return w.S1(i, d); }));
              mlp::product<Policy>(Lc, Lc, [&](int t, int s, const auto* v) { db[t * C + s] += T(v[0]); },
                                   mlp::term(nb, dZq, [&](int i, int s) { return DZ(s, i); }));
              mlp::product<Policy>(Lc, nb, [&](int t, int i, const auto* v) { ddz[at(t, i)] += rho1 * T(v[0]); },
                                   mlp::term(Lc, [&](int t, int s) { return qk[s * C + t] * cc(s, t); }, dZq));
            }
            // The block's [dW1; dS1] of the chunk start: a_L dW1' + (a dZq)^T Q, g_L dW1' + p_L dS1' + (g dZq)^T Q.
            mlp::product<Policy>(
                nb, D,
                [&](int i, int d, const auto* v) {
                  const index_t at_g = index_t(hb.n0 + i) * D + d;
                  const T dw1 = dw.W1(i, d), ds1 = dw.S1(i, d);  // read before they are overwritten
                  cot.w1[at_g] = a_L * dw1 + rho1 * T(v[0]);
                  cot.s1[at_g] = g_L * dw1 + p_L * ds1 + rho1 * T(v[1]);
                  rho_partials[0] += T(v[0]) * w.W1(i, d) + T(v[1]) * w.S1(i, d);
                },
                mlp::term(token_read ? Lc : 0, [&](int i, int t) { return a[t] * dZq(t, i); }, Qc),
                mlp::term(token_read ? Lc : 0, [&](int i, int t) { return g[t] * dZq(t, i); }, Qc));
            __syncthreads();
            // dG = dDZ .* act'(Z) (in place of dDZ); the part of dZ known so far to the scratch.
            for (int idx = threadIdx.x; idx < Lc * nb; idx += blockDim.x) {
              const int t = idx / nb, i = idx % nb;
              const T d = ddz[at(t, i)];
              hidden_grads[t * N + hb.n0 + i] = d * ga2[at(t, i)] + dh[at(t, i)] * a1[at(t, i)];
              ddz[at(t, i)] = d * a1[at(t, i)];
            }
            __syncthreads();
            const auto dG = [&](int t, int i) { return ddz[at(t, i)]; };
            mlp::product<Policy>(Lc, D, [&](int t, int j, const auto* v) { d_err[t * D + j] += rho2 * T(v[0]); },
                                 mlp::term(nb, dG, [&](int i, int j) { return w.W2(j, i); }));
            // [dW2; dS2] of the chunk start: a_L dW2' + (a dO)^T Hq + E^T dG, g_L dW2' + p_L dS2' + (g dO)^T Hq.
            mlp::product<Policy>(
                D, nb,
                [&](int j, int i, const auto* v) {
                  const index_t at_g = index_t(j) * N + hb.n0 + i;
                  const T dw2 = dw.W2(j, i), ds2 = dw.S2(j, i);  // read before they are overwritten
                  cot.w2[at_g] = a_L * dw2 + rho2 * (T(v[0]) + T(v[2]));
                  cot.s2[at_g] = g_L * dw2 + p_L * ds2 + rho2 * T(v[1]);
                  rho_partials[1] += (T(v[0]) + T(v[2])) * w.W2(j, i) + T(v[1]) * w.S2(j, i);
                },
                mlp::term(token_read ? Lc : 0, [&](int j, int t) { return a[t] * dOc(t, j); }, Hq),
                mlp::term(token_read ? Lc : 0, [&](int j, int t) { return g[t] * dOc(t, j); }, Hq),
                mlp::term(Lc, Et, dG));
          });

      // The gate-table cotangents' row sums (in tile order) and the end-state scalars.
      for (int t = threadIdx.x; t < Lc; t += blockDim.x) {
        T sums[4] = {T(0), T(0), T(0), T(0)};
        for (int which = 0; which < 4; ++which)
          for (int tile = 0; tile < row_tiles; ++tile) sums[which] += row_sum_at(which, t, tile);
        d_s[t] = sums[1];
        prod_a[t] = sums[0];  // the cotangent of row Lc - 1 of c, until d_c holds it
        d_a[t] = sums[2];
        d_g[t] = sums[3];
      }
      kernel::block_sum(end_partials, scalars + 4);
      if (threadIdx.x == 0) {
        d_a[Lc - 1] += end_partials[0];
        d_g[Lc - 1] += end_partials[1];
        scalars[0] = end_partials[2];  // the cotangent of p_L
      }
      // Products of the masked reads that need the full HH and dB (read "token").
      if (token_read) {
        const auto HHc = [&](int t, int s) { return hh[t * C + s] * cc(t, s); };
        const auto dBc = [&](int t, int s) { return db[t * C + s] * cc(t, s); };
        mlp::product<Policy>(Lc, D, [&](int t, int j, const auto* v) { d_err[t * D + j] += rho2 * T(v[0]); },
                             mlp::term(Lc, [&](int t, int s) { return HHc(s, t); }, dOc));
        mlp::product<Policy>(Lc, D, [&](int t, int d, const auto* v) { dq_acc[(off + t) * D + d] += rho1 * T(v[0]); },
                             mlp::term(Lc, dBc, Kc));
        mlp::product<Policy>(Lc, D, [&](int t, int d, const auto* v) { dk_acc[(off + t) * D + d] += rho1 * T(v[0]); },
                             mlp::term(Lc, [&](int t, int s) { return dBc(s, t); }, Qc));
      }
      __syncthreads();
      // d_c (into da): dA .* HH + dB .* Q K^T below the diagonal, plus the end-state row.
      for (int idx = threadIdx.x; idx < Lc * Lc; idx += blockDim.x) {
        const int t = idx / Lc, s = idx % Lc;
        T value = T(0);
        if (token_read && s <= t) {
          const T masked_hh = da[t * C + s] * hh[t * C + s], masked_qk = db[t * C + s] * qk[t * C + s];
          value = rho2 * masked_hh + rho1 * masked_qk;
          // The direct cotangents of rho2 (in O) and rho1 (in Zq): <dA, HH .* c>, <dB, Q K^T .* c>.
          rho_partials[0] += masked_qk * c[t * C + s];
          rho_partials[1] += masked_hh * c[t * C + s];
        }
        if (t == Lc - 1) value += prod_a[s];
        da[t * C + s] = value;
      }
      // dR = dE .* f'(R) (in place of dE), d delta, dV = -dR, dK += dR.
      for (int idx = threadIdx.x; idx < Lc * D; idx += blockDim.x) {
        const int t = idx / D, j = idx % D, token = t0 + off + t;
        const T de = d_err[idx], r = keep_residuals ? resid[idx] : T(0), dl = delta_at(token, j), norm = norm_at(t);
        const T dr = de * objective.slope(r, dl, norm);
        if (d_delta) d_delta[token_at(token) + j] = de * objective.delta_slope(r, dl, norm);
        d_err[idx] = dr;
        dv_out[token_at(token) + j] = device::cast<input_t>(-dr);
        dk_acc[(off + t) * D + j] += dr;
      }
      __syncthreads();

      // Pass 3: dZ = scratch + (dR W2) .* act'(Z); dK += dZ W1, dW1 += dZ^T K, dW2 += dR^T H.
      mlp::hidden_block_loop(start, D, N, NB, false, blocks, [&](const mlp::HiddenBlock& hb, const StateBlock& w) {
        const int nb = hb.nb;
        const auto at = [&](int t, int i) { return t * NB + i; };
        mlp::product<Policy>(
            Lc, nb,
            [&](int t, int i, const auto* v) {
              const auto act = mlp::activation<1>(act_kind, rho1 * T(v[0]));
              hid[at(t, i)] = act.value, a1[at(t, i)] = act.first;
            },
            mlp::term(D, Kc, [&](int d, int i) { return w.W1(i, d); }));
        __syncthreads();
        mlp::product<Policy>(
            Lc, nb,
            [&](int t, int i, const auto* v) {
              dz[at(t, i)] = hidden_grads[t * N + hb.n0 + i] + rho2 * T(v[0]) * a1[at(t, i)];
            },
            mlp::term(D, [&](int t, int j) { return d_err[t * D + j]; }, [&](int j, int i) { return w.W2(j, i); }));
        __syncthreads();
        const auto dZ = [&](int t, int i) { return dz[at(t, i)]; };
        mlp::product<Policy>(Lc, D, [&](int t, int d, const auto* v) { dk_acc[(off + t) * D + d] += rho1 * T(v[0]); },
                             mlp::term(nb, dZ, [&](int i, int d) { return w.W1(i, d); }));
        mlp::product<Policy>(
            nb, D,
            [&](int i, int d, const auto* v) {
              cot.w1[index_t(hb.n0 + i) * D + d] += rho1 * T(v[0]);
              rho_partials[0] += T(v[0]) * w.W1(i, d);
            },
            mlp::term(Lc, [&](int i, int t) { return dZ(t, i); }, Kc));
        mlp::product<Policy>(
            D, nb,
            [&](int j, int i, const auto* v) {
              cot.w2[index_t(j) * N + hb.n0 + i] += rho2 * T(v[0]);
              rho_partials[1] += T(v[0]) * w.W2(j, i);
            },
            mlp::term(Lc, [&](int j, int t) { return d_err[t * D + j]; }, [&](int t, int i) { return hid[at(t, i)]; }));
      });

      // Gate gradients of the chunk proper from the cotangents of a, g, c, the last row of sig
      // and p_L (scalars[0]): the tables again, with sig in Q K^T's place, then their adjoint.
      const lm::ChunkGateTables<T> tables{c, sig, P, C, true};
      lm::build_gate_tables(Lc, C, chunk_gates, gate_rows, &tables);
      __syncthreads();
      lm::gate_adjoint(
          Lc, chunk_gates, gate_rows, tables,
          lm::GateCotangents<T>{da, C, d_a, d_g, d_s, scalars, prod_a, prod_gb, prod_ge},
          [&](int t, T dtheta) { dtheta_out[gate_at(t0 + off + t)] = dtheta; },
          [&](int t, T deta, T dalpha) {
            deta_out[gate_at(t0 + off + t)] = deta;
            dalpha_out[gate_at(t0 + off + t)] = dalpha;
          });
    }

    if (kl) {
      if (token_read) read_backward(start, 0, 1);
      __syncthreads();
      // The lag token: its softmax steps, then its key path at the saved state.
      T gate_partials[3] = {T(0), T(0), T(0)};  // theta, eta, beta
      const auto dx = smem.compute(layout.lag_dx), dy = smem.compute(layout.lag_dy);
      const auto de0 = smem.compute(layout.lag_de);
      for (int i = threadIdx.x; i < N; i += blockDim.x) dx[i] = dy[i] = T(0);
      for (int j = threadIdx.x; j < D; j += blockDim.x) de0[j] = T(0);
      __syncthreads();
      T* dk0 = dk_acc;  // row 0
      const T theta0 = gates.theta[0], eta0 = gates.eta[0], beta0 = T(1) - gates.alpha[0];
      mlp::kl_softmax_rows_backward(saved.w1, saved.s1, start.w1, cot.w1, cot.s1, N, D, theta0, eta0, beta0,
                                    [&](int i) { return lag_vec.grad[i]; }, k0, dx, dk0, gate_partials);
      mlp::kl_softmax_rows_backward(saved.w2, saved.s2, start.w2, cot.w2, cot.s2, D, N, theta0, eta0, beta0,
                                    [&](int j) { return lag_vec.err[j]; }, [&](int i) { return lag_vec.hidden[i]; },
                                    de0, dy, gate_partials);
      kernel::block_sum(gate_partials, scalars + 4);
      if (threadIdx.x == 0) {
        dtheta_out[gate_at(t0)] = gate_partials[0];
        deta_out[gate_at(t0)] = gate_partials[1];
        dalpha_out[gate_at(t0)] = -gate_partials[2];
      }
      // Key path backward (one token): dG = dDZ .* act', dZ = dDZ .* G .* act'' (dx -> dG, lag_second
      // -> dZ), dE += W2 dG, dR = dE .* f'(r), dH += W2^T dR, dZ += dH .* act', dk += W1^T dZ + dR,
      // dW2 += e dG^T + dR h^T, dW1 += dZ k^T, all at the saved state.
      for (int i = threadIdx.x; i < N; i += blockDim.x) {
        lag_vec.second[i] *= dx[i];
        dx[i] *= lag_vec.first[i];
      }
      __syncthreads();
      mlp::warp_matvec<T>(D, N, saved.w2, N, [&](int i) { return dx[i]; }, [&](int j, T value) {
        if (device::lane_id() == 0) de0[j] += value;
      });
      __syncthreads();
      for (int j = threadIdx.x; j < D; j += blockDim.x) {
        const T r = lag_vec.resid[j], dl = delta_at(t0, j), norm = objective.uses_norm() ? lag_vec.norm[0] : T(0);
        const T de = de0[j], dr = de * objective.slope(r, dl, norm);
        if (d_delta) d_delta[token_at(t0) + j] = de * objective.delta_slope(r, dl, norm);
        de0[j] = dr;
        dv_out[token_at(t0) + j] = device::cast<input_t>(-dr);
        dk0[j] += dr;
      }
      __syncthreads();
      mlp::column_matvec<T>(D, N, saved.w2, N, [&](int j) { return de0[j]; }, [&](int i, T value) {
        lag_vec.second[i] += (dy[i] + value) * lag_vec.first[i];
      });
      __syncthreads();
      mlp::column_matvec<T>(N, D, saved.w1, D, [&](int i) { return lag_vec.second[i]; },
                            [&](int d, T value) { dk0[d] += value; });
      for (index_t idx = threadIdx.x; idx < block_elems; idx += blockDim.x) {
        const int j = int(idx / N), i = int(idx % N), r = int(idx / D), d = int(idx % D);
        cot.w2[idx] += lag_vec.err[j] * dx[i] + de0[j] * lag_vec.hidden[i];
        cot.w1[idx] += lag_vec.second[r] * k0(d);
      }
      __syncthreads();
    }
    if (!token_read) read_backward(saved, 0, L);
    __syncthreads();
    if (lq) {  // d rho -> dA through rho = ||A||_q^(2-q), for each weight
      kernel::block_sum(rho_partials, scalars + 4);
      kernel::lq_scale_backward(saved.w1, block_elems, T(params.miras.q), scale.sums[0], rho_partials[0], cot.w1);
      kernel::lq_scale_backward(saved.w2, block_elems, T(params.miras.q), scale.sums[1], rho_partials[1], cot.w2);
      __syncthreads();
    }
    for (int idx = threadIdx.x; idx < L * D; idx += blockDim.x) {
      const int t = idx / D, d = idx % D;
      dq_out[token_at(t0 + t) + d] = device::cast<input_t>(dO(t, d) + dq_acc[idx]);
      dk_out[token_at(t0 + t) + d] = device::cast<input_t>(dk_acc[idx]);
    }
    __syncthreads();
  }
}

size_t mlp_memory_bwd_smem_bytes(const MlpMemoryParams& params, InputType input_type, int block) {
  return mlp::layout_bytes<MlpMemoryBwdSmem>(params, input_type, block);
}

int mlp_memory_bwd_hidden_block(const MlpMemoryParams& params, InputType input_type, const DeviceLimits& device) {
  return mlp::layout_hidden_block<MlpMemoryBwdSmem>(params, input_type, device);
}

int mlp_memory_bwd_launch(const MlpMemoryBwdParams& params, const MlpMemoryBwdWorkspace& workspace,
                          InputType input_type, int block, CUstream_st* stream) {
  if (sequence_rows(params) == 0 || params.heads == 0) return device::kSuccess;
  return static_cast<int>(mlp::dispatch(input_type, [&](auto ktraits) {
    using Ktraits = decltype(ktraits);
    return device::launch("mlp_memory_bwd", mlp_memory_bwd_kernel<Ktraits>, dim3(params.heads, sequence_rows(params)),
                          dim3(mlp::kThreads), mlp_memory_bwd_smem_bytes(params, input_type, block), stream, params,
                          workspace, block);
  }));
}

}  // namespace titans
