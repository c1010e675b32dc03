// Gate algebra of the linear memory (docs/backward_linear.md §0, §2): the chunk's gate tables by
// column chains, their staging, and the gate-rows kernel that writes what the sequential kernels
// need of them.
#pragma once

#include "cuda/common/smem.cuh"
#include "cuda/common/staging.cuh"
#include "cuda/linear_memory_launch.cuh"
#include "device/device.h"
#include "titans_params.h"

namespace titans {
namespace lm {

using kernel::SmemBase;
using kernel::SmemCarver;
using kernel::token_offset;

// One column of the chunk's gate recurrence (docs/backward_linear.md §0): columns 0..L-1 are c_i,
// column L is a, column L + 1 is g (its sigma is P(1..t)). Per row t:
//   sigma_t = eta_t sigma_{t-1} - theta_t [t == col],   mu_t = beta_t mu_{t-1} + sigma_t,
// and emit(t, mu_t, sigma_t) is called. The multiplicative form never divides, is exact for
// gates equal to 0 or 1, and cannot amplify rounding (every factor is in [0, 1]). Rows above the
// diagonal of a c column come out as exact zeros.
template <typename T, class Gate, class Emit>
__device__ __forceinline__ void gate_column(int col, int L, const Gate& theta, const Gate& eta, const Gate& beta,
                                            const Emit& emit) {
  T mu = col == L ? T(1) : T(0);
  T sigma = col == L + 1 ? T(1) : T(0);
  for (int t = 0; t < L; ++t) {
    sigma = eta[t] * sigma - (col == t ? theta[t] : T(0));
    mu = beta[t] * mu + sigma;
    emit(t, mu, sigma);
  }
}

// The tables the forward and the reverse pass use: c [t * C + i] (zeros above the diagonal), a, g,
// the chunk-end rows m = c[L-1], s = sig[L-1] and p = P(1..L) (p[0]). One thread per column.
template <typename T, class Ptr>
__device__ __forceinline__ void chunk_gate_tables(int L, int C, const Ptr& theta, const Ptr& eta, const Ptr& beta,
                                                  const Ptr& c, const Ptr& a, const Ptr& g, const Ptr& m_end,
                                                  const Ptr& s_end, const Ptr& p) {
  for (int col = threadIdx.x; col < L + 2; col += blockDim.x) {
    gate_column<T>(col, L, theta, eta, beta, [&](int t, T mu, T sigma) {
      if (col < L) {
        c[t * C + col] = mu;
        if (t == L - 1) m_end[col] = mu, s_end[col] = sigma;
      } else if (col == L) {
        a[t] = mu;
      } else {
        g[t] = mu;
        if (t == L - 1) p[0] = sigma;
      }
    });
  }
}

// Stages the gates of tokens t0..t0+L-1 into shared memory (beta = 1 - alpha).
template <typename compute_t, class Ptr>
__device__ __forceinline__ void stage_gates(const LinearMemoryParams& params, int b, int h, int t0, int L,
                                            const Ptr& theta, const Ptr& eta, const Ptr& beta) {
  const auto* theta_in = static_cast<const compute_t*>(params.theta.ptr);
  const auto* eta_in = static_cast<const compute_t*>(params.eta.ptr);
  const auto* alpha_in = static_cast<const compute_t*>(params.alpha.ptr);
  for (int t = threadIdx.x; t < L; t += blockDim.x) {
    theta[t] = theta_in[token_offset(params.theta, b, t0 + t, h)];
    eta[t] = eta_in[token_offset(params.eta, b, t0 + t, h)];
    beta[t] = compute_t(1) - alpha_in[token_offset(params.alpha, b, t0 + t, h)];
  }
}

// The full gate tables of a chunk in shared memory (the parallel kernels): the chunk's gates and,
// built from them, c [C, C], a, g, m_end, s_end, p (chunk_gate_tables).
struct GateTablesSmem {
  int c, a, g, m_end, s_end, theta, eta, beta, p;
  __host__ __device__ GateTablesSmem(SmemCarver& carver, int chunk)
      : c(carver.compute(chunk * chunk)), a(carver.compute(chunk)), g(carver.compute(chunk)),
        m_end(carver.compute(chunk)), s_end(carver.compute(chunk)), theta(carver.compute(chunk)),
        eta(carver.compute(chunk)), beta(carver.compute(chunk)), p(carver.compute(1)) {}
};

template <typename T>
struct GateTables {
  device::SharedPtr<T> c, a, g, m_end, s_end, theta, eta, beta, p;
  template <class Base>
  __device__ GateTables(const Base& smem, const GateTablesSmem& at)
      : c(smem.compute(at.c)), a(smem.compute(at.a)), g(smem.compute(at.g)), m_end(smem.compute(at.m_end)),
        s_end(smem.compute(at.s_end)), theta(smem.compute(at.theta)), eta(smem.compute(at.eta)),
        beta(smem.compute(at.beta)), p(smem.compute(at.p)) {}
  // The gates of tokens t0..t0+L-1 (plain loads, complete at once).
  __device__ void stage(const LinearMemoryParams& params, int b, int h, int t0, int L) const {
    stage_gates<T>(params, b, h, t0, L, theta, eta, beta);
  }
  // The tables, from the staged gates (after a barrier).
  __device__ void build(int L, int C) const { chunk_gate_tables<T>(L, C, theta, eta, beta, c, a, g, m_end, s_end, p); }
};

// The gate rows of a chunk (layout at linear_memory_gate_rows_size) as views into one array.
template <class Ptr>
struct GateRows {
  Ptr m_end, s_end, a, g, ends;  // ends: a_L, g_L, p
  __device__ GateRows(const Ptr& rows, int C) : m_end(rows), s_end(rows + C), a(rows + 2 * C), g(rows + 3 * C),
                                                ends(rows + 4 * C) {}
};

// Stages chunk n's gate rows into dst[0 .. gate_rows_size) (see "Staging" above).
template <typename T, class Ptr>
__device__ __forceinline__ void stage_gate_rows(const void* gate_rows, const LinearMemoryParams& p, index_t bh, int n,
                                                const Ptr& dst) {
  const int size = linear_memory_gate_rows_size(p.chunk_size);
  kernel::stage_span(static_cast<const T*>(gate_rows) + (bh * p.n_chunks + n) * size, size, dst);
}

// ---------------------------------------------------------------------------------------------
// The gate-rows kernel (parallel over chunks; it runs before both sequential passes)

// Shared memory: the chunk's theta, eta, beta.
struct GateRowsSmem {
  SmemCarver carver;
  int theta, eta, beta;  // [C]
  __host__ __device__ explicit GateRowsSmem(int chunk) {
    theta = carver.compute(chunk), eta = carver.compute(chunk), beta = carver.compute(chunk);
  }
};

// One block per (chunk, head, batch), one thread per column of the chunk's gate recurrence.
template <typename Ktraits>
__global__ void __launch_bounds__(Ktraits::kNThreads, Ktraits::kMinBlocksPerSm)
    gate_rows_kernel(LinearMemoryParams params, void* gate_rows) {
  using compute_t = typename Ktraits::compute_t;
  const int n = blockIdx.x, h = blockIdx.y, b = blockIdx.z, C = params.chunk_size, t0 = n * C;
  const int L = chunk_length(params, n);
  const GateRowsSmem layout(C);
  const SmemBase<compute_t, typename Ktraits::input_t> smem(layout.carver);
  const auto theta = smem.compute(layout.theta);
  const auto eta = smem.compute(layout.eta);
  const auto beta = smem.compute(layout.beta);
  stage_gates<compute_t>(params, b, h, t0, L, theta, eta, beta);
  __syncthreads();

  const index_t bh = index_t(b) * params.heads + h;
  compute_t* out = static_cast<compute_t*>(gate_rows) + (bh * params.n_chunks + n) * linear_memory_gate_rows_size(C);
  const GateRows<compute_t*> rows(out, C);
  for (int col = threadIdx.x; col < L + 2; col += blockDim.x) {
    gate_column<compute_t>(col, L, theta, eta, beta, [&](int t, compute_t mu, compute_t sigma) {
      if (col < L) {
        if (t == L - 1) rows.m_end[col] = mu, rows.s_end[col] = sigma;
      } else if (col == L) {
        rows.a[t] = mu;
        if (t == L - 1) rows.ends[0] = mu;
      } else {
        rows.g[t] = mu;
        if (t == L - 1) rows.ends[1] = mu, rows.ends[2] = sigma;
      }
    });
  }
}

template <typename Ktraits>
device::Error launch_gate_rows(const LinearMemoryParams& params, void* gate_rows, CUstream_st* stream) {
  return device::launch("linear_memory_gate_rows", gate_rows_kernel<Ktraits>,
                        dim3(params.n_chunks, params.heads, params.batch), dim3(Ktraits::kNThreads),
                        kernel::smem_bytes<Ktraits>(GateRowsSmem(params.chunk_size)), stream, params, gate_rows);
}

}  // namespace lm
}  // namespace titans
