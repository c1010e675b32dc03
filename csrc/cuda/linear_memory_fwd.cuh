// CUDA forward of the linear memory, written only against the device layer (device/device.h),
// so the emulation runs this exact source in CI. Included by exactly one TU per build.
//
// A simple, correct first version: one block per (value tile, head, batch) keeps its rows of
// the memory M and the momentum S in shared memory and walks the chunks in order. Per chunk of
// L tokens (shared/design README §2, backward_linear.md §0):
//   E = 2 (K M0^T - V)                                  errors at the chunk-start memory
//   a, g, c, m = c[L-1], s, p                           gate tables by the row recurrence
//   O = diag(a) Q M0^T + diag(g) Q S0^T + (Q K^T .* c) E        (read_token)
//   O = Q M0^T                                                   (chunk_start read)
//   M_L = a_L M0 + g_L S0 + E^T diag(m) K ,   S_L = p S0 + E^T diag(s) K
// Every block recomputes the chunk's gate tables and Q K^T for its value tile; the fused kernel
// (tensor-core MMAs, split sequential pass) is a later issue.
#pragma once

#include <type_traits>

#include "cuda/linear_memory_fwd.h"
#include "device/device.h"
#include "titans_params.h"

namespace titans {

template <typename input_t_, int kNThreads_, int kTileV_>
struct LinearMemoryFwdTraits {
  using input_t = input_t_;
  // fp64 inputs are computed, and their gates and state kept, in fp64; all others in fp32.
  using compute_t = std::conditional_t<std::is_same<input_t, double>::value, double, float>;
  static constexpr int kNThreads = kNThreads_;
  static constexpr int kTileV = kTileV_;  // rows of M and S (value features) per block
};

// The block's dynamic shared memory, as offsets in compute_t elements.
struct LinearMemoryFwdSmem {
  int m, s;                       // [kTileV, Dk]: the block's rows of M and S
  int k, q;                       // [C, Dk]: the chunk's keys and queries
  int err;                        // [C, kTileV]: V's tile, then E in place
  int coef;                       // [C, C]: c, then c .* (Q K^T) in place (token read)
  int a, g, m_end, s_end;         // [C] each
  int theta, eta, beta;           // [C] each: the chunk's gates, beta = 1 - alpha
  int p;                          // [1]
  int total;
  __host__ __device__ LinearMemoryFwdSmem(int dk, int chunk, int tile_v) {
    int at = 0;
    auto take = [&at](int n) { const int start = at; at += n; return start; };
    m = take(tile_v * dk), s = take(tile_v * dk);
    k = take(chunk * dk), q = take(chunk * dk);
    err = take(chunk * tile_v);
    coef = take(chunk * chunk);
    a = take(chunk), g = take(chunk), m_end = take(chunk), s_end = take(chunk);
    theta = take(chunk), eta = take(chunk), beta = take(chunk);
    p = take(1);
    total = at;
  }
};

template <typename Ktraits>
__global__ void __launch_bounds__(Ktraits::kNThreads) linear_memory_fwd_kernel(LinearMemoryParams params) {
  using input_t = typename Ktraits::input_t;
  using compute_t = typename Ktraits::compute_t;
  constexpr int kNThreads = Ktraits::kNThreads;
  constexpr int kTileV = Ktraits::kTileV;

  const int tid = threadIdx.x;
  const int v0 = blockIdx.x * kTileV, h = blockIdx.y, b = blockIdx.z;
  const int rows = params.dv - v0 < kTileV ? params.dv - v0 : kTileV;
  const int dk = params.dk, dv = params.dv, C = params.chunk_size;

  const LinearMemoryFwdSmem layout(dk, C, kTileV);
  TITANS_DYNAMIC_SHARED(compute_t, smem);
  auto m = smem + layout.m;
  auto s = smem + layout.s;
  auto k_chunk = smem + layout.k;
  auto q_chunk = smem + layout.q;
  auto err = smem + layout.err;
  auto coef = smem + layout.coef;
  auto a = smem + layout.a;
  auto g = smem + layout.g;
  auto m_end = smem + layout.m_end;
  auto s_end = smem + layout.s_end;
  auto theta = smem + layout.theta;
  auto eta = smem + layout.eta;
  auto beta = smem + layout.beta;
  auto p = smem + layout.p;

  // This block's rows [v0, v0 + rows) of the contiguous [B, H, Dv, Dk] states.
  const index_t bh = index_t(b) * params.heads + h;
  const index_t state_offset = (bh * dv + v0) * dk;
  const auto* m0 = static_cast<const compute_t*>(params.m0_ptr);
  const auto* s0 = static_cast<const compute_t*>(params.s0_ptr);
  for (int idx = tid; idx < rows * dk; idx += kNThreads) {
    m[idx] = m0 ? m0[state_offset + idx] : compute_t(0);
    s[idx] = s0 ? s0[state_offset + idx] : compute_t(0);
  }

  const auto token = [&](const TokenTensor& x, int t) {
    return index_t(b) * x.batch_stride + index_t(t) * x.seq_stride + index_t(h) * x.head_stride;
  };
  const auto* q_in = static_cast<const input_t*>(params.q.ptr);
  const auto* k_in = static_cast<const input_t*>(params.k.ptr);
  const auto* v_in = static_cast<const input_t*>(params.v.ptr);
  const auto* theta_in = static_cast<const compute_t*>(params.theta.ptr);
  const auto* eta_in = static_cast<const compute_t*>(params.eta.ptr);
  const auto* alpha_in = static_cast<const compute_t*>(params.alpha.ptr);
  auto* o_out = static_cast<input_t*>(params.o_ptr);
  auto* chunk_states = static_cast<compute_t*>(params.chunk_states_ptr);

  for (int n = 0; n < params.n_chunks; ++n) {
    const int t0 = n * C;
    const int L = params.seqlen - t0 < C ? params.seqlen - t0 : C;

    // 1. Stage the chunk: K and Q rows, V's tile (into err), the gates.
    for (int idx = tid; idx < L * dk; idx += kNThreads) {
      const int t = idx / dk, col = idx % dk;
      k_chunk[idx] = device::cast<compute_t>(k_in[token(params.k, t0 + t) + col]);
      q_chunk[idx] = device::cast<compute_t>(q_in[token(params.q, t0 + t) + col]);
    }
    for (int idx = tid; idx < L * rows; idx += kNThreads) {
      const int t = idx / rows, r = idx % rows;
      err[t * kTileV + r] = device::cast<compute_t>(v_in[token(params.v, t0 + t) + v0 + r]);
    }
    for (int t = tid; t < L; t += kNThreads) {
      theta[t] = theta_in[token(params.theta, t0 + t)];
      eta[t] = eta_in[token(params.eta, t0 + t)];
      beta[t] = compute_t(1) - alpha_in[token(params.alpha, t0 + t)];
    }
    __syncthreads();

    // 2a. Gate tables: L + 2 independent scalar chains (columns c_0..c_{L-1}, a, g) of
    //     sigma_t = eta_t sigma_{t-1} + injection_t, mu_t = beta_t mu_{t-1} + sigma_t. The
    //     multiplicative form never divides and is exact for gates equal to 0 or 1.
    for (int col = tid; col < L + 2; col += kNThreads) {
      compute_t mu = col == L ? compute_t(1) : compute_t(0);         // a starts at 1
      compute_t sigma = col == L + 1 ? compute_t(1) : compute_t(0);  // g's sigma is P(1..t)
      for (int t = 0; t < L; ++t) {
        sigma = eta[t] * sigma - (col == t ? theta[t] : compute_t(0));
        mu = beta[t] * mu + sigma;
        if (col < L) coef[t * C + col] = mu;
        else if (col == L) a[t] = mu;
        else g[t] = mu;
      }
      if (col < L) {
        m_end[col] = mu;
        s_end[col] = sigma;
      } else if (col == L + 1) {
        p[0] = sigma;
      }
    }
    // 2b. E = 2 (K M0^T - V), in place over V's tile (each element is read and written by one thread).
    for (int idx = tid; idx < L * rows; idx += kNThreads) {
      const int t = idx / rows, r = idx % rows;
      compute_t pred = 0;
      for (int col = 0; col < dk; ++col) pred += k_chunk[t * dk + col] * m[r * dk + col];
      err[t * kTileV + r] = compute_t(2) * (pred - err[t * kTileV + r]);
    }
    __syncthreads();

    // 3. Outputs, from the chunk-start state.
    if (params.read_token) {
      for (int idx = tid; idx < L * L; idx += kNThreads) {
        const int t = idx / L, i = idx % L;
        if (i > t) continue;
        compute_t qk = 0;
        for (int col = 0; col < dk; ++col) qk += q_chunk[t * dk + col] * k_chunk[i * dk + col];
        coef[t * C + i] *= qk;
      }
      __syncthreads();
    }
    for (int idx = tid; idx < L * rows; idx += kNThreads) {
      const int t = idx / rows, r = idx % rows;
      compute_t qm = 0, qs = 0;
      for (int col = 0; col < dk; ++col) {
        qm += q_chunk[t * dk + col] * m[r * dk + col];
        qs += q_chunk[t * dk + col] * s[r * dk + col];
      }
      compute_t out = qm;
      if (params.read_token) {
        out = a[t] * qm + g[t] * qs;
        for (int i = 0; i <= t; ++i) out += coef[t * C + i] * err[i * kTileV + r];
      }
      o_out[((index_t(b) * params.seqlen + t0 + t) * params.heads + h) * dv + v0 + r] = device::cast<input_t>(out);
    }
    // 3 reads M0 and S0 that step 4 overwrites.
    __syncthreads();

    // 4. Save the chunk-start state for the backward, then step to the chunk end.
    const index_t chunk_offset = ((bh * params.n_chunks + n) * 2) * dv * dk;
    for (int idx = tid; idx < rows * dk; idx += kNThreads) {
      const int r = idx / dk, col = idx % dk;
      if (chunk_states) {
        chunk_states[chunk_offset + index_t(v0) * dk + idx] = m[idx];
        chunk_states[chunk_offset + index_t(dv + v0) * dk + idx] = s[idx];
      }
      compute_t m_new = a[L - 1] * m[idx] + g[L - 1] * s[idx];
      compute_t s_new = p[0] * s[idx];
      for (int i = 0; i < L; ++i) {
        const compute_t ek = err[i * kTileV + r] * k_chunk[i * dk + col];
        m_new += m_end[i] * ek;
        s_new += s_end[i] * ek;
      }
      m[idx] = m_new;
      s[idx] = s_new;
    }
    // The next chunk's staging overwrites what step 4 reads.
    __syncthreads();
  }

  auto* m_final = static_cast<compute_t*>(params.m_final_ptr);
  auto* s_final = static_cast<compute_t*>(params.s_final_ptr);
  for (int idx = tid; idx < rows * dk; idx += kNThreads) {
    m_final[state_offset + idx] = m[idx];
    s_final[state_offset + idx] = s[idx];
  }
}

template <typename input_t>
device::Error linear_memory_fwd_launch_typed(const LinearMemoryParams& params, device::Stream stream) {
  using Ktraits = LinearMemoryFwdTraits<input_t, 128, 16>;
  using compute_t = typename Ktraits::compute_t;
  if (params.batch == 0 || params.heads == 0 || params.dv == 0) return device::kSuccess;
  const LinearMemoryFwdSmem layout(params.dk, params.chunk_size, Ktraits::kTileV);
  const dim3 grid((params.dv + Ktraits::kTileV - 1) / Ktraits::kTileV, params.heads, params.batch);
  return device::launch("linear_memory_fwd", linear_memory_fwd_kernel<Ktraits>, grid, dim3(Ktraits::kNThreads),
                        layout.total * sizeof(compute_t), stream, params);
}

int linear_memory_fwd_launch(const LinearMemoryParams& params, InputType input_type, CUstream_st* stream) {
  switch (input_type) {
    case InputType::kFloat32: return static_cast<int>(linear_memory_fwd_launch_typed<float>(params, stream));
    case InputType::kFloat64: return static_cast<int>(linear_memory_fwd_launch_typed<double>(params, stream));
    case InputType::kBFloat16: return static_cast<int>(linear_memory_fwd_launch_typed<device::bf16>(params, stream));
    case InputType::kFloat16: return static_cast<int>(linear_memory_fwd_launch_typed<device::fp16>(params, stream));
  }
  return -1;
}

}  // namespace titans
