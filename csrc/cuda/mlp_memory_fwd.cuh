// CUDA forward of the deep memory M(x) = x + W2 act(W1 x), written only against the device layer
// (device/device.h), so the emulation runs this exact source in CI. Included by exactly one TU per
// build.
//
// One kernel, one block per (head, batch), walks the chunks in order (the chunk map is nonlinear in
// the weights, so chunk n + 1 cannot start before chunk n's state exists: docs/mlp_dual_form.md §6).
// The fp32 state lives in the final-state outputs and is streamed through shared memory in hidden
// blocks of NB units (mlp_memory.h has the bytes and barriers). Per chunk of L tokens, with the
// chunk-start weights and the gate tables a, g, c, m = c[L-1], s (docs/mlp_dual_form.md §2-3):
//   pass 1, per block:  Z = K W1^T, H = act(Z), Y += H W2^T
//                       (read "chunk_start": also O += act(Q W1^T) W2^T)
//   then                E = f(K + Y - V)                              (the objective, objectives.h)
//   pass 2, per block:  Z, H again, DZ = (E W2) .* act'(Z)
//                       read "token": Zq = a (Q W1^T) + g (Q S1^T) + (Q K^T .* c) DZ, Hq = act(Zq),
//                                     O += a (Hq W2^T) + g (Hq S2^T), HH += Hq H^T
//                       W1 = a_L W1 + g_L S1 + (m DZ)^T K,  S1 = p_L S1 + (s DZ)^T K,
//                       W2 = a_L W2 + g_L S2 + (m E)^T H,   S2 = p_L S2 + (s E)^T H   (written back)
//   then                O = Q + O + (HH .* c) E                                   (read "token")
// Retention "kl" (docs/miras.md §2.3): the chunk's first token is Memora's lag token, a softmax step on
// every row of W1 and W2 taken with matrix-vector products against the global state; the chunk
// proper is then tokens 1.. from its result, and read "chunk_start" reads the weights before it.
// Retention "lq": the state is the accumulators; the chunk's errors and reads see rho1 [W1; S1] and
// rho2 [W2; S2], rho = ||W||_q^(2-q) at the chunk start, which scale the products' sums.
// The forward saves each chunk's start state in the inputs' dtype when a backward will run.
#pragma once

#include "cuda/mlp_memory_common.cuh"

namespace titans {

// Shared memory of the forward kernel (byte offsets).
template <typename Ktraits>
struct MlpMemoryFwdSmem {
  using input_t = typename Ktraits::input_t;
  using compute_t = typename Ktraits::compute_t;
  mlp::SmemCarver<Ktraits> carver;
  int ld;                                        // leading dimension of the staged q, k
  int gates, gate_rows;                          // lm::ChunkGates, lm::ChunkGateRows of the chunk
  int norms;                                     // [C]: yaad's residual norms
  int scalars;                                   // [2 x warps]: lq's block sums
  int c, qkc, hh;                                // [C, C]: c; token read: Q K^T .* c, Hq H^T
  int errors, out;                               // [C, D]: Y, then R, then E; the read's sum
  int blocks[2][4];                              // two buffers of [NB, D] W1, S1, [D, NB] W2, S2
  int z, h, dz, zq;                              // [C, NB]: act'(Z), H, DZ, Hq of the block
  int lag_hidden, lag_first, lag_grad;           // kl: [N] the lag token's h0, act'(z0), dz0
  int lag_resid, lag_err;                        // kl: [D] its residual and error
  int q, k;                                      // input region: [C, ld]
  __host__ __device__ MlpMemoryFwdSmem(const MlpMemoryParams& p, int NB) : ld(kernel::padded<input_t>(p.dim)) {
    const int C = p.chunk_size, D = p.dim, N = p.hidden;
    const bool token = p.read_token, kl = p.miras.retention == RetentionKind::kl;
    gates = carver.compute(lm::ChunkGates<compute_t>::size(C));
    gate_rows = carver.compute(lm::ChunkGateRows<compute_t>::size(C));
    norms = carver.compute(C);
    scalars = carver.compute(2 * mlp::kThreads / device::kWarpSize);
    c = carver.compute(C * C), qkc = carver.compute(token ? C * C : 0), hh = carver.compute(token ? C * C : 0);
    errors = carver.compute(C * D), out = carver.compute(C * D);
    for (auto& buffer : blocks)
      for (int w = 0; w < 4; ++w) buffer[w] = carver.compute(NB * D);
    z = carver.compute(C * NB), h = carver.compute(C * NB), dz = carver.compute(C * NB), zq = carver.compute(C * NB);
    lag_hidden = carver.compute(kl ? N : 0), lag_first = carver.compute(kl ? N : 0);
    lag_grad = carver.compute(kl ? N : 0), lag_resid = carver.compute(kl ? D : 0), lag_err = carver.compute(kl ? D : 0);
    q = carver.input(C * ld), k = carver.input(C * ld);
  }
};

template <typename Ktraits>
__global__ void __launch_bounds__(mlp::kThreads, 1) mlp_memory_fwd_kernel(MlpMemoryParams launch, int NB) {
  using input_t = typename Ktraits::input_t;
  using T = typename Ktraits::compute_t;
  using Policy = typename Ktraits::Policy;
  using Block = mlp::StateBlock<T, T>;

  // Block y walks batch row y, or with cu_seqlens sequence y (its view, sequences.cuh).
  const MlpMemoryParams params = mlp::sequence_view<input_t>(launch, blockIdx.y);
  const index_t state_slots = sequence_units(launch, 1);
  const int h_idx = blockIdx.x, b = kernel::batch_row(launch, blockIdx.y);
  const int D = params.dim, N = params.hidden, C = params.chunk_size;
  const index_t bh = index_t(b) * params.heads + h_idx, block_elems = index_t(N) * D;
  const bool token_read = params.read_token, kl = params.miras.retention == RetentionKind::kl;
  const bool lq = params.miras.retention == RetentionKind::lq;
  const MlpActivation act_kind = params.activation;
  const kernel::Objective<T> objective(params.miras);
  const T* delta = static_cast<const T*>(params.miras.delta_ptr);

  const MlpMemoryFwdSmem<Ktraits> layout(params, NB);
  const int ld = layout.ld;
  const mlp::SmemArrays<Ktraits> smem;
  const lm::ChunkGates<T> gates(smem.compute(layout.gates), C);
  const lm::ChunkGateRows<T> gate_rows(smem.compute(layout.gate_rows), C);
  const auto a = gate_rows.a, g = gate_rows.g, m_end = gate_rows.m_end, s_end = gate_rows.s_end;
  const auto norms = smem.compute(layout.norms);
  const auto scalars = smem.compute(layout.scalars);
  const auto c = smem.compute(layout.c), qkc = smem.compute(layout.qkc), hh = smem.compute(layout.hh);
  const auto errors = smem.compute(layout.errors), out = smem.compute(layout.out);
  const auto z = smem.compute(layout.z), hid = smem.compute(layout.h), dz = smem.compute(layout.dz);
  const auto zq = smem.compute(layout.zq);
  const auto lag_hidden = smem.compute(layout.lag_hidden), lag_first = smem.compute(layout.lag_first);
  const auto lag_grad = smem.compute(layout.lag_grad), lag_resid = smem.compute(layout.lag_resid);
  const auto lag_err = smem.compute(layout.lag_err);
  const auto q_s = smem.input(layout.q), k_s = smem.input(layout.k);
  const Block buffers[2] = {
      {smem.compute(layout.blocks[0][0]), smem.compute(layout.blocks[0][1]), smem.compute(layout.blocks[0][2]),
       smem.compute(layout.blocks[0][3]), D, NB},
      {smem.compute(layout.blocks[1][0]), smem.compute(layout.blocks[1][1]), smem.compute(layout.blocks[1][2]),
       smem.compute(layout.blocks[1][3]), D, NB}};

  // The working state: the final-state outputs, from the initial state (momenta default to 0).
  const index_t state_offset = bh * block_elems;
  const mlp::GlobalState<T> state(static_cast<T*>(params.w1_final_ptr) + state_offset,
                                  static_cast<T*>(params.s1_final_ptr) + state_offset,
                                  static_cast<T*>(params.w2_final_ptr) + state_offset,
                                  static_cast<T*>(params.s2_final_ptr) + state_offset);
  const mlp::GlobalState<const T> state_in(state.w1, state.s1, state.w2, state.s2);
  {
    const auto* w1_0 = static_cast<const T*>(params.w1_0_ptr);
    const auto* w2_0 = static_cast<const T*>(params.w2_0_ptr);
    const auto* s1_0 = static_cast<const T*>(params.s1_0_ptr);
    const auto* s2_0 = static_cast<const T*>(params.s2_0_ptr);
    for (index_t i = threadIdx.x; i < block_elems; i += blockDim.x) {
      state.w1[i] = w1_0[state_offset + i];
      state.w2[i] = w2_0[state_offset + i];
      state.s1[i] = s1_0 ? s1_0[state_offset + i] : T(0);
      state.s2[i] = s2_0 ? s2_0[state_offset + i] : T(0);
    }
  }
  __syncthreads();

  auto* o_out = static_cast<input_t*>(params.o_ptr);
  const auto o_offset = [&](int t) {
    return kernel::contiguous_token_offset(b, t, h_idx, params.seqlen, params.heads, D);
  };
  const auto* v_in = static_cast<const input_t*>(params.v.ptr);
  const auto Q = [&](int t, int d) { return device::cast<T>(q_s[t * ld + d]); };
  const auto K = [&](int t, int d) { return device::cast<T>(k_s[t * ld + d]); };

  for (int n = 0; n < params.n_chunks; ++n) {
    const int t0 = n * C, L = kernel::chunk_length(params, n);
    if (params.chunk_states_ptr) {
      auto* saved = static_cast<input_t*>(params.chunk_states_ptr) + (bh * state_slots + n) * 4 * block_elems;
      for (index_t i = threadIdx.x; i < block_elems; i += blockDim.x) {
        saved[i] = device::cast<input_t>(state.w1[i]);
        saved[block_elems + i] = device::cast<input_t>(state.s1[i]);
        saved[2 * block_elems + i] = device::cast<input_t>(state.w2[i]);
        saved[3 * block_elems + i] = device::cast<input_t>(state.s2[i]);
      }
    }
    kernel::stage_token_rows<input_t>(params.q, b, h_idx, t0, L, 0, D, ld, q_s);
    kernel::stage_token_rows<input_t>(params.k, b, h_idx, t0, L, 0, D, ld, k_s);
    gates.stage(params, b, h_idx, t0, L);
    kernel::finish_staging();
    __syncthreads();
    // lq: the chunk learns and reads with rho1 [W1; S1], rho2 [W2; S2] (the state stays A, S); the
    // products below read A, S and scale their sums.
    const mlp::LqScales<T> scale = lq ? mlp::lq_scales(state_in, block_elems, T(params.miras.q), scalars)
                                      : mlp::LqScales<T>{};
    const T rho1 = scale.rho[0], rho2 = scale.rho[1];

    // Pass 1 over the hidden blocks for the key rows [key0, key0 + Lk) (Y into `errors`) and the
    // plain reads of rows [0, Lr) (into `out`), at the state as it is now.
    const auto pass1 = [&](int key0, int Lk, int Lr) {
      for (int i = threadIdx.x; i < C * D; i += blockDim.x) errors[i] = out[i] = T(0);
      mlp::hidden_block_loop(state_in, D, N, NB, false, buffers, [&](const mlp::HiddenBlock& hb, const Block& w) {
        const auto W1t = [&](int d, int i) { return w.W1(i, d); };
        const auto W2t = [&](int i, int j) { return w.W2(j, i); };
        mlp::product<Policy>(
            Lk, hb.nb,
            [&](int t, int i, const auto* v) { hid[t * NB + i] = mlp::activation<0>(act_kind, rho1 * T(v[0])).value; },
            mlp::term(D, [&](int t, int d) { return K(key0 + t, d); }, W1t));
        mlp::product<Policy>(
            Lr, hb.nb,
            [&](int t, int i, const auto* v) { zq[t * NB + i] = mlp::activation<0>(act_kind, rho1 * T(v[0])).value; },
            mlp::term(D, Q, W1t));
        __syncthreads();
        mlp::product<Policy>(Lk, D, [&](int t, int j, const auto* v) { errors[t * D + j] += rho2 * T(v[0]); },
                             mlp::term(hb.nb, [&](int t, int i) { return hid[t * NB + i]; }, W2t));
        mlp::product<Policy>(Lr, D, [&](int t, int j, const auto* v) { out[t * D + j] += rho2 * T(v[0]); },
                             mlp::term(hb.nb, [&](int t, int i) { return zq[t * NB + i]; }, W2t));
      });
      // o = q + the read, rows [0, Lr).
      for (int i = threadIdx.x; i < Lr * D; i += blockDim.x)
        o_out[o_offset(t0 + i / D) + i % D] = device::cast<input_t>(Q(i / D, i % D) + out[i]);
    };

    int lag = 0;  // tokens before the chunk proper (kl's lag token)
    if (kl) {
      if (!token_read) pass1(0, 0, L);
      __syncthreads();
      // Memora's step on both weights from the lag token's gradients at the previous weights.
      const index_t v0_offset = kernel::token_offset(params.v, b, t0, h_idx);
      const auto k0 = [&](int d) { return K(0, d); };
      const mlp::LagVectors<decltype(norms)> lag_vec{lag_hidden, lag_first, lag_first, lag_grad,
                                                     lag_resid, lag_err, norms};
      mlp::lag_key_path(
          state_in, D, N, act_kind, objective, k0, [&](int j) { return device::cast<T>(v_in[v0_offset + j]); },
          [&](int j) { return delta ? delta[o_offset(t0) + j] : T(0); }, false, lag_vec);
      mlp::kl_lag_step(state_in, state, D, N, gates.theta[0], gates.eta[0], T(1) - gates.alpha[0], k0, lag_vec);
      if (token_read) {  // o0 = q0 + W2 act(W1 q0) at the new weights
        mlp::warp_matvec<T>(N, D, state.w1, D, [&](int d) { return Q(0, d); }, [&](int i, T zi) {
          const T value = mlp::activation<0>(act_kind, zi).value;
          if (device::lane_id() == 0) lag_hidden[i] = value;
        });
        __syncthreads();
        mlp::warp_matvec<T>(D, N, state.w2, N, [&](int i) { return lag_hidden[i]; }, [&](int j, T yj) {
          if (device::lane_id() == 0) o_out[o_offset(t0) + j] = device::cast<input_t>(Q(0, j) + yj);
        });
        __syncthreads();
      }
      lag = 1;
    }

    const int Lc = L - lag;  // the chunk proper: tokens t0 + lag + t, t < Lc
    if (Lc > 0) {
      const auto Kc = [&](int t, int d) { return K(lag + t, d); };
      const auto Qc = [&](int t, int d) { return Q(lag + t, d); };
      const lm::ChunkGateTables<T> c_table{c, c, c, C, false};
      lm::build_gate_tables(Lc, C, lm::ChunkGates<T>(gates.theta + lag, C), gate_rows, &c_table);
      __syncthreads();
      if (token_read)
        mlp::product<Policy>(
            Lc, Lc, [&](int t, int s, const auto* v) { qkc[t * C + s] = s <= t ? T(v[0]) * c[t * C + s] : T(0); },
            mlp::term(D, Qc, [&](int d, int s) { return Kc(s, d); }));

      pass1(lag, Lc, kl || token_read ? 0 : L);

      // E = f(R), R = K + Y - V (in place of Y); yaad's switch reads each token's ||R||.
      for (int i = threadIdx.x; i < Lc * D; i += blockDim.x) {
        const int t = i / D, j = i % D;
        errors[i] += Kc(t, j) - device::cast<T>(v_in[kernel::token_offset(params.v, b, t0 + lag + t, h_idx) + j]);
      }
      __syncthreads();
      if (objective.uses_norm()) {
        mlp::warp_row_sums<T>(
            Lc, D, [&](int t, int j) { return errors[t * D + j] * errors[t * D + j]; },
            [&](int t, T sum) {
              if (device::lane_id() == 0) norms[t] = fmath::sqrt(sum);
            });
        __syncthreads();
      }
      for (int i = threadIdx.x; i < Lc * D; i += blockDim.x) {
        const int t = i / D, j = i % D;
        errors[i] = objective.error(errors[i], delta ? delta[o_offset(t0 + lag + t) + j] : T(0),
                                    objective.uses_norm() ? norms[t] : T(0));
      }
      if (token_read)  // `out` is zero: pass 1 read no rows
        for (int i = threadIdx.x; i < C * C; i += blockDim.x) hh[i] = T(0);

      // Pass 2: the key path's DZ, the token reads and the chunk-end state, block by block.
      const T a_L = a[Lc - 1], g_L = g[Lc - 1], p_L = gate_rows.p_end();
      const auto E = [&](int t, int j) { return errors[t * D + j]; };
      mlp::hidden_block_loop(state_in, D, N, NB, true, buffers, [&](const mlp::HiddenBlock& hb, const Block& w) {
        const int nb = hb.nb;
        const auto W1t = [&](int d, int i) { return w.W1(i, d); };
        const auto S1t = [&](int d, int i) { return w.S1(i, d); };
        const auto W2 = [&](int j, int i) { return w.W2(j, i); };
        const auto W2t = [&](int i, int j) { return w.W2(j, i); };
        const auto S2t = [&](int i, int j) { return w.S2(j, i); };
        const auto H = [&](int t, int i) { return hid[t * NB + i]; };
        const auto Hq = [&](int t, int i) { return zq[t * NB + i]; };
        mlp::product<Policy>(
            Lc, nb,
            [&](int t, int i, const auto* v) {
              const auto act = mlp::activation<1>(act_kind, rho1 * T(v[0]));
              hid[t * NB + i] = act.value;
              z[t * NB + i] = act.first;
            },
            mlp::term(D, Kc, W1t));
        __syncthreads();
        mlp::product<Policy>(
            Lc, nb, [&](int t, int i, const auto* v) { dz[t * NB + i] = rho2 * T(v[0]) * z[t * NB + i]; },
            mlp::term(D, E, W2));
        __syncthreads();
        if (token_read) {
          mlp::product<Policy>(
              Lc, nb,
              [&](int t, int i, const auto* v) {
                const T pre = rho1 * (a[t] * T(v[0]) + g[t] * T(v[1]) + T(v[2]));
                zq[t * NB + i] = mlp::activation<0>(act_kind, pre).value;
              },
              mlp::term(D, Qc, W1t), mlp::term(D, Qc, S1t),
              mlp::term(Lc, [&](int t, int s) { return qkc[t * C + s]; }, [&](int s, int i) { return dz[s * NB + i]; }));
          __syncthreads();
          mlp::product<Policy>(
              Lc, D, [&](int t, int j, const auto* v) { out[t * D + j] += rho2 * (a[t] * T(v[0]) + g[t] * T(v[1])); },
              mlp::term(nb, Hq, W2t), mlp::term(nb, Hq, S2t));
          mlp::product<Policy>(Lc, Lc, [&](int t, int s, const auto* v) { hh[t * C + s] += T(v[0]); },
                               mlp::term(nb, Hq, [&](int i, int s) { return hid[s * NB + i]; }));
        }
        // The block's chunk-end state, written to the working state (nothing reads it before the
        // next pass).
        mlp::product<Policy>(
            nb, D,
            [&](int i, int d, const auto* v) {
              const index_t at = index_t(hb.n0 + i) * D + d;
              state.w1[at] = a_L * w.W1(i, d) + g_L * w.S1(i, d) + T(v[0]);
              state.s1[at] = p_L * w.S1(i, d) + T(v[1]);
            },
            mlp::term(Lc, [&](int i, int t) { return m_end[t] * dz[t * NB + i]; }, Kc),
            mlp::term(Lc, [&](int i, int t) { return s_end[t] * dz[t * NB + i]; }, Kc));
        mlp::product<Policy>(
            D, nb,
            [&](int j, int i, const auto* v) {
              const index_t at = index_t(j) * N + hb.n0 + i;
              state.w2[at] = a_L * w.W2(j, i) + g_L * w.S2(j, i) + T(v[0]);
              state.s2[at] = p_L * w.S2(j, i) + T(v[1]);
            },
            mlp::term(Lc, [&](int j, int t) { return m_end[t] * errors[t * D + j]; }, H),
            mlp::term(Lc, [&](int j, int t) { return s_end[t] * errors[t * D + j]; }, H));
      });
      if (token_read)
        mlp::product<Policy>(
            Lc, D,
            [&](int t, int j, const auto* v) {
              o_out[o_offset(t0 + lag + t) + j] = device::cast<input_t>(Qc(t, j) + out[t * D + j] + rho2 * T(v[0]));
            },
            mlp::term(Lc, [&](int t, int s) { return hh[t * C + s] * c[t * C + s]; }, E));
    }
    __syncthreads();
  }
}

size_t mlp_memory_fwd_smem_bytes(const MlpMemoryParams& params, InputType input_type, int block) {
  return mlp::layout_bytes<MlpMemoryFwdSmem>(params, input_type, block);
}

int mlp_memory_fwd_hidden_block(const MlpMemoryParams& params, InputType input_type, const DeviceLimits& device) {
  return mlp::layout_hidden_block<MlpMemoryFwdSmem>(params, input_type, device);
}

int mlp_memory_fwd_launch(const MlpMemoryParams& params, InputType input_type, int block, CUstream_st* stream) {
  if (sequence_rows(params) == 0 || params.heads == 0) return device::kSuccess;
  return static_cast<int>(mlp::dispatch(input_type, [&](auto ktraits) {
    using Ktraits = decltype(ktraits);
    return device::launch("mlp_memory_fwd", mlp_memory_fwd_kernel<Ktraits>, dim3(params.heads, sequence_rows(params)),
                          dim3(mlp::kThreads), mlp_memory_fwd_smem_bytes(params, input_type, block), stream, params,
                          block);
  }));
}

}  // namespace titans
