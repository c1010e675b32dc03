// Gate algebra of the linear memory (docs/backward_linear.md §0, §2): a chunk's gate tables, built
// from its gates by column chains, and the adjoint of those chains that turns the coefficient
// cotangents into the gate gradients.
#pragma once

#include "cuda/common/smem.cuh"
#include "cuda/common/staging.cuh"
#include "device/device.h"
#include "titans_params.h"

namespace titans {
namespace lm {

using kernel::token_offset;

// One column of the chunk's gate recurrence (docs/backward_linear.md §0): columns 0..L-1 are c_i,
// column L is a, column L + 1 is g (its sigma is P(1..t)). Per row t:
//   sigma_t = eta_t sigma_{t-1} - theta_t [t == col],   mu_t = beta_t mu_{t-1} + sigma_t,
// and emit(t, mu_t, sigma_t) is called. The multiplicative form never divides, is exact for
// gates equal to 0 or 1, and cannot amplify rounding (every factor is in [0, 1]). Rows above the
// diagonal of a c column come out as exact zeros. With `lag` (retention kl: token 0 took Memora's
// step before the chunk, docs/miras.md §2.3) row 0 is the identity, M_0 = M, S_0 = S: tokens
// 1..L-1 are a chunk from the lagged state, and column 0 is zero.
template <typename T, class Theta, class Eta, class Beta, class Emit>
__device__ __forceinline__ void gate_column(int col, int L, const Theta& theta, const Eta& eta, const Beta& beta,
                                            const Emit& emit, bool lag = false) {
  T mu = col == L ? T(1) : T(0);
  T sigma = col == L + 1 ? T(1) : T(0);
  for (int t = 0; t < L; ++t) {
    if (t > 0 || !lag) {
      sigma = eta[t] * sigma - (col == t ? theta[t] : T(0));
      mu = beta[t] * mu + sigma;
    }
    emit(t, mu, sigma);
  }
}


// The gates of one chunk as staged, [theta | eta | alpha] with `stride` entries each
// (kernel::stage_token_scalars); beta = 1 - alpha is formed where it is read.
template <typename T>
struct ChunkGates {
  device::SharedPtr<T> theta, eta, alpha;
  __device__ __forceinline__ ChunkGates(const device::SharedPtr<T>& base, int stride)
      : theta(base), eta(base + stride), alpha(base + 2 * stride) {}
  static constexpr int size(int stride) { return 3 * stride; }
  __device__ __forceinline__ void stage(const SequenceParams& p, int b, int h, int t0, int L) const {
    kernel::stage_token_scalars<T>(p.theta, b, h, t0, L, theta);
    kernel::stage_token_scalars<T>(p.eta, b, h, t0, L, eta);
    kernel::stage_token_scalars<T>(p.alpha, b, h, t0, L, alpha);
  }
};

template <typename T, class Ptr>
struct OneMinus {
  Ptr x;
  __device__ __forceinline__ T operator[](int i) const { return T(1) - x[i]; }
};

// The rows of a chunk's gate tables that every kernel reads (docs/backward_linear.md §0), `stride`
// entries each, zero from the chunk's length L on (the products run over whole k-steps):
// a_t, g_t, the chunk-end rows m = c[L-1, :] and s = sig[L-1, :], then a_L, g_L, p.
template <typename T>
struct ChunkGateRows {
  device::SharedPtr<T> a, g, m_end, s_end, ends;
  __device__ __forceinline__ ChunkGateRows(const device::SharedPtr<T>& base, int stride)
      : a(base), g(base + stride), m_end(base + 2 * stride), s_end(base + 3 * stride), ends(base + 4 * stride) {}
  static constexpr int size(int stride) { return 4 * stride + 4; }
  __device__ __forceinline__ T a_end() const { return ends[0]; }
  __device__ __forceinline__ T g_end() const { return ends[1]; }
  __device__ __forceinline__ T p_end() const { return ends[2]; }
};

// The full C x C tables (leading dimension ld): c, and for the gate adjoint (with_sig) sig and the
// g column's P(1..t).
template <typename T>
struct ChunkGateTables {
  device::SharedPtr<T> c, sig, P;
  int ld;
  bool with_sig;
};

// Builds a chunk's rows, and c (and sig, P with_sig) when `tables` is non-null, from its staged
// gates: one thread per column of the recurrence (gate_column), so the loop is sequential only in
// L. Rows past L up to `stride` are zeroed. No barrier inside; readers need one. lag: gate_column's.
template <typename T>
__device__ __forceinline__ void build_gate_tables(int L, int stride, const ChunkGates<T>& gates,
                                                  const ChunkGateRows<T>& rows, const ChunkGateTables<T>* tables,
                                                  bool lag = false) {
  const OneMinus<T, device::SharedPtr<T>> beta{gates.alpha};
  for (int col = threadIdx.x; col < L + 2; col += blockDim.x) {
    gate_column<T>(col, L, gates.theta, gates.eta, beta, [&](int t, T mu, T sigma) {
      if (col < L) {
        if (tables) {
          tables->c[t * tables->ld + col] = mu;
          if (tables->with_sig) tables->sig[t * tables->ld + col] = sigma;
        }
        if (t == L - 1) rows.m_end[col] = mu, rows.s_end[col] = sigma;
      } else if (col == L) {
        rows.a[t] = mu;
        if (t == L - 1) rows.ends[0] = mu;
      } else {
        rows.g[t] = mu;
        if (tables && tables->with_sig) tables->P[t] = sigma;
        if (t == L - 1) rows.ends[1] = mu, rows.ends[2] = sigma;
      }
    }, lag);
  }
  if (L == 0 && threadIdx.x == 0) rows.ends[0] = T(1), rows.ends[1] = T(0), rows.ends[2] = T(1);
  for (int idx = threadIdx.x; idx < 4 * (stride - L); idx += blockDim.x) {
    const int t = L + idx % (stride - L);
    (idx / (stride - L) == 0 ? rows.a : idx / (stride - L) == 1 ? rows.g : idx / (stride - L) == 2 ? rows.m_end
                                                                                                   : rows.s_end)[t] = T(0);
  }
}

// The coefficient cotangents of a chunk (docs/backward_linear.md §1): d_c (lower triangle, leading
// dimension ld), d_a, d_g, d_s [L] and d_p [1]; and the scratch of the adjoint, three [L] rows.
template <typename T>
struct GateCotangents {
  device::SharedPtr<T> d_c;
  int ld;
  device::SharedPtr<T> d_a, d_g, d_s, d_p, prod_a, prod_gb, prod_ge;
};

// The gate gradients of a chunk by the reverse column recurrence (docs/backward_linear.md §2), one
// thread per column, rows L-1 down to the column's first row:
//   mubar_t = dmu_t + beta_{t+1} mubar_{t+1},   sigbar_t = mubar_t + eta_{t+1} sigbar_{t+1},
// with dtheta_i = -sigbar_i of column c_i; then dbeta_t = <mubar_t, mu_{t-1}> and
// deta_t = <sigbar_t, sigma_{t-1}> as row sums of products written in place of the tables c and
// sig (row t of a column is overwritten once row t + 1 has read it; c columns past the row are
// exact zeros). write_theta(t, dtheta_t) and write_rows(t, deta_t, dalpha_t) store them. The
// tables must be complete (a barrier before); contains one barrier; c and sig are consumed. With
// lag tables the rows t >= 1 are exact as they are (they read only rows >= t and the identity row
// 0's values), and token 0's gates, which the chunk does not read, come out meaningless: the
// caller stores the lag step's instead.
template <typename T, class WriteTheta, class WriteRows>
__device__ __forceinline__ void gate_adjoint(int L, const ChunkGates<T>& gates, const ChunkGateRows<T>& rows,
                                             const ChunkGateTables<T>& tables, const GateCotangents<T>& cot,
                                             const WriteTheta& write_theta, const WriteRows& write_rows) {
  const int ld = tables.ld;
  const OneMinus<T, device::SharedPtr<T>> beta{gates.alpha};
  for (int col = threadIdx.x; col < L + 2; col += blockDim.x) {
    const auto dmu = [&](int t) { return col < L ? cot.d_c[t * cot.ld + col] : col == L ? cot.d_a[t] : cot.d_g[t]; };
    T mubar = dmu(L - 1);
    T sigbar = mubar + (col < L ? cot.d_s[col] : col == L ? T(0) : cot.d_p[0]);
    const int first = col < L ? col : 0;
    for (int t = L - 1; t >= first; --t) {
      if (t < L - 1) {
        mubar = dmu(t) + beta[t + 1] * mubar;
        sigbar = mubar + gates.eta[t + 1] * sigbar;
      }
      // mu_{-1} = (a: 1, g: 0, c: 0), sigma_{-1} = (a: 0, g: 1, c: 0).
      T mu_prev, sigma_prev;
      if (t == 0) {
        mu_prev = col == L ? T(1) : T(0);
        sigma_prev = col == L + 1 ? T(1) : T(0);
      } else if (col < L) {
        mu_prev = tables.c[(t - 1) * ld + col];
        sigma_prev = tables.sig[(t - 1) * ld + col];
      } else {
        mu_prev = col == L ? rows.a[t - 1] : rows.g[t - 1];
        sigma_prev = col == L ? T(0) : tables.P[t - 1];
      }
      if (col < L) {
        tables.c[t * ld + col] = mubar * mu_prev;
        tables.sig[t * ld + col] = sigbar * sigma_prev;
      } else if (col == L) {
        cot.prod_a[t] = mubar * mu_prev;
      } else {
        cot.prod_gb[t] = mubar * mu_prev;
        cot.prod_ge[t] = sigbar * sigma_prev;
      }
    }
    if (col < L) write_theta(col, -sigbar);  // the loop ended at t = col
  }
  __syncthreads();
  for (int t = threadIdx.x; t < L; t += blockDim.x) {
    T d_beta = cot.prod_a[t] + cot.prod_gb[t], d_eta = cot.prod_ge[t];
    for (int col = 0; col < L; ++col) {
      d_beta += tables.c[t * ld + col];
      d_eta += tables.sig[t * ld + col];
    }
    write_rows(t, d_eta, -d_beta);
  }
}

}  // namespace lm
}  // namespace titans
