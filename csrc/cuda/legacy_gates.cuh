// The gate pieces the backward kernels were written against; removed with them.
#pragma once

#include "cuda/legacy_tiles.cuh"
#include "cuda/linear_memory_gates.cuh"
#include "cuda/legacy_launch.cuh"
#include "cuda/linear_memory_bwd.h"
#include "cuda/linear_memory_chunk.cuh"

namespace titans {
namespace lm {

using kernel::SmemBase;
using kernel::SmemCarver;

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

using kernel::for_each_element;
using kernel::for_each_tile;
using kernel::tile_product;

// E = 2 (K M0^T - V) for the block's value tile: calls emit(t, j, E[t, j]) for t < L, j < rows.
// With fragments, through ldmatrix from k_tile and m_tile (the keys and a bf16 copy of M0).
template <class Policy, typename T, class KOp, class VOp, class Ptr, class Tile, class Emit>
__device__ __forceinline__ void chunk_errors(int L, int rows, int dk, const KOp& K, const VOp& V, const Ptr& m0,
                                             bool fragments, const Tile& k_tile, const Tile& m_tile,
                                             const Emit& emit) {
  for_each_tile(L, rows, [&](int r0, int c0) {
    typename Policy::acc_t acc[4] = {};
    tile_product<Policy, false>(acc, r0, c0, L, rows, dk, K, [&](int d, int j) { return m0[j * dk + d]; }, fragments,
                                k_tile, m_tile);
    for_each_element(r0, c0, L, rows, [&](int t, int j, int i) { emit(t, j, T(2) * (T(acc[i]) - V(t, j))); });
  });
}

// G = Q K^T with the entries above the diagonal set to zero, into g [L, C]; with fragments,
// through ldmatrix from q_tile and k_tile.
template <class Policy, typename T, class QOp, class KOp, class Ptr, class Tile>
__device__ __forceinline__ void causal_scores(int L, int C, int dk, const QOp& Q, const KOp& K, const Ptr& g,
                                              bool fragments, const Tile& q_tile, const Tile& k_tile) {
  for_each_tile(L, L, [&](int r0, int c0) {
    typename Policy::acc_t acc[4] = {};
    tile_product<Policy, false>(acc, r0, c0, L, L, dk, Q, [&](int d, int i) { return K(i, d); }, fragments, q_tile,
                                k_tile);
    for_each_element(r0, c0, L, L, [&](int t, int i, int e) { g[t * C + i] = i <= t ? T(acc[e]) : T(0); });
  });
}

// X [L, 2 tile_v] = A [Z0; Z1]^T for two [rows, Dk] states stacked along the value index: X's
// column j holds A Z0[j]^T and column tile_v + j holds A Z1[j]^T (the columns of a partial
// tile's missing rows are not meaningful). With fragments, through ldmatrix from a_tile (A's rows)
// and z_tile (the bf16 stack [Z0; Z1] in rows 0.. and tile_v..).
template <class Policy, typename T, class AOp, class Ptr, class Tile>
__device__ __forceinline__ void stacked_state_product(int L, int rows, int dk, int tile_v, const AOp& A,
                                                      const Ptr& z0, const Ptr& z1, const Ptr& x, bool fragments,
                                                      const Tile& a_tile, const Tile& z_tile) {
  const auto stacked_t = [&](int d, int col) {
    const int j = col % tile_v;
    return j >= rows ? T(0) : col < tile_v ? z0[j * dk + d] : z1[j * dk + d];
  };
  for_each_tile(L, 2 * tile_v, [&](int r0, int c0) {
    typename Policy::acc_t acc[4] = {};
    tile_product<Policy, false>(acc, r0, c0, L, 2 * tile_v, dk, A, stacked_t, fragments, a_tile, z_tile);
    for_each_element(r0, c0, L, 2 * tile_v, [&](int t, int col, int i) { x[t * 2 * tile_v + col] = T(acc[i]); });
  });
}

}  // namespace lm
}  // namespace titans
