// Gate coefficients of one chunk and their backward (torch-free, shared by the CPU kernels).
//
// Inside a chunk of L tokens with per-token gates theta, eta, alpha (beta = 1 - alpha), every
// state quantity is a linear combination of the chunk-start state and the chunk's per-token
// gradients u_i (taken at the chunk-start memory):
//   S_t = P_t S0 + sum_{i<=t} sig[t][i] u_i,      sig[t][i] = -theta_i eta_{i+1} ... eta_t
//   M_t = a_t M0 + g_t S0 + sum_{i<=t} c[t][i] u_i
// with P_t = eta_1 ... eta_t, a_t = beta_1 ... beta_t and g_t = sum_{s<=t} beta_{s+1..t} P_s.
// (docs/backward_linear.md §0 and docs/mlp_dual_form.md §2.)
//
// The tables are built with the multiplicative row recurrence rather than from ratios of
// cumulative products (or differences of cumulative logs): it never divides, is exact for
// gates equal to 0 or 1, and rounding does not grow along the chunk because every factor is a
// gate in [0, 1]. It costs L^2 multiply-adds, negligible beside the chunk's matmuls.
#pragma once

#include "titans_params.h"

namespace titans::cpu {

// Tables for a chunk of L tokens (row t = token t of the chunk, 0-based). a, g, P: [L];
// c, sig: [L * L] row-major, lower triangular (the strict upper triangle is written as 0).
template <typename T>
void chunk_gate_tables(int L, const T* theta, const T* eta, const T* alpha, T* a, T* g, T* P, T* c, T* sig) {
  T a_prev = 1, g_prev = 0, P_prev = 1;
  for (int t = 0; t < L; ++t) {
    const T beta = T(1) - alpha[t];
    T* c_row = c + t * L;
    T* sig_row = sig + t * L;
    const T* c_prev = c + (t - 1) * L;
    const T* sig_prev = sig + (t - 1) * L;
    for (int i = 0; i < t; ++i) {
      sig_row[i] = eta[t] * sig_prev[i];
      c_row[i] = beta * c_prev[i] + sig_row[i];
    }
    sig_row[t] = -theta[t];
    c_row[t] = sig_row[t];
    for (int i = t + 1; i < L; ++i) sig_row[i] = c_row[i] = T(0);
    P[t] = eta[t] * P_prev;
    a[t] = beta * a_prev;
    g[t] = beta * g_prev + P[t];
    a_prev = a[t], g_prev = g[t], P_prev = P[t];
  }
}

// Gate gradients from the cotangents of the tables: d_a, d_g [L], d_c [L * L] (lower
// triangle used), d_sig_last [L] (of the last row of sig: the chunk-end momentum
// coefficients) and d_P_last (of P_{L-1}). Runs the adjoint of the row recurrence backwards
// over rows; each column (a, g, and c_i / sig_i per token i) is an independent scalar chain.
// scratch: 2 * (L + 2) elements. Writes dtheta, deta, dalpha for tokens t = 0..L-1 at
// t * out_stride (the gradients are [B, T, H] tensors: out_stride = H).
template <typename T>
void chunk_gate_backward(int L, const T* eta, const T* alpha, const T* a, const T* g, const T* P,
                         const T* c, const T* sig, const T* d_a, const T* d_g, const T* d_c, const T* d_sig_last,
                         T d_P_last, T* scratch, T* dtheta, T* deta, T* dalpha, index_t out_stride) {
  // Column j: 0 -> a (mu = a, sigma = 0), 1 -> g (mu = g, sigma = P), 2 + i -> c_i (mu = c, sigma = sig).
  T* mu_bar = scratch;
  T* sig_bar = scratch + L + 2;
  const int last = L - 1;
  mu_bar[0] = d_a[last];
  mu_bar[1] = d_g[last];
  sig_bar[0] = mu_bar[0];
  sig_bar[1] = mu_bar[1] + d_P_last;
  for (int i = 0; i < L; ++i) {
    mu_bar[2 + i] = d_c[last * L + i];
    sig_bar[2 + i] = mu_bar[2 + i] + d_sig_last[i];
  }
  for (int t = last; t >= 0; --t) {
    if (t < last) {
      // Row t only reads columns a, g and c_0..c_t: later columns are dead from here on.
      const T beta_next = T(1) - alpha[t + 1], eta_next = eta[t + 1];
      mu_bar[0] = d_a[t] + beta_next * mu_bar[0];
      mu_bar[1] = d_g[t] + beta_next * mu_bar[1];
      sig_bar[0] = mu_bar[0] + eta_next * sig_bar[0];
      sig_bar[1] = mu_bar[1] + eta_next * sig_bar[1];
      const T* d_c_row = d_c + t * L;
      for (int i = 0; i <= t; ++i) {
        mu_bar[2 + i] = d_c_row[i] + beta_next * mu_bar[2 + i];
        sig_bar[2 + i] = mu_bar[2 + i] + eta_next * sig_bar[2 + i];
      }
    }
    // d beta_t = <mu_bar_t, mu_{t-1}> and d eta_t = <sig_bar_t, sigma_{t-1}>, with the
    // forward rows one step earlier (mu_{-1} = (1, 0, 0..), sigma_{-1} = (0, 1, 0..)).
    T d_beta, d_eta;
    if (t == 0) {
      d_beta = mu_bar[0];
      d_eta = sig_bar[1];
    } else {
      d_beta = mu_bar[0] * a[t - 1] + mu_bar[1] * g[t - 1];
      d_eta = sig_bar[1] * P[t - 1];
      const T* c_prev = c + (t - 1) * L;
      const T* sig_prev = sig + (t - 1) * L;
      for (int i = 0; i < t; ++i) {
        d_beta += mu_bar[2 + i] * c_prev[i];
        d_eta += sig_bar[2 + i] * sig_prev[i];
      }
    }
    dalpha[t * out_stride] = -d_beta;
    deta[t * out_stride] = d_eta;
    dtheta[t * out_stride] = -sig_bar[2 + t];
  }
}

}  // namespace titans::cpu
