// MIRAS helpers shared by the CPU memory kernels (torch-free): the objective applied to the
// residual rows of a chunk, the "lq" retention's scale of one weight matrix and the "kl"
// retention's softmax step on one weight matrix (docs/miras.md §2).
#pragma once

#include <algorithm>
#include <cmath>

#include "objectives.h"
#include "titans_params.h"

namespace titans::cpu {

// ||r|| over one token's channels (yaad's switch).
template <typename T>
T row_norm(const T* r, int D) {
  T acc = 0;
  for (int j = 0; j < D; ++j) acc += r[j] * r[j];
  return std::sqrt(acc);
}

// e = f(r) for one token's residual r [D]; delta: its thresholds [D], read when the objective
// has one (else may be nullptr).
template <typename T, typename Objective>
void objective_error_row(const Objective& objective, const T* r, const T* delta, int D, T* e) {
  const T norm = Objective::kUsesRowNorm ? row_norm(r, D) : T(0);
  for (int j = 0; j < D; ++j) e[j] = objective.error(r[j], Objective::kUsesDelta ? delta[j] : T(0), norm);
}

// Backward of objective_error_row: de becomes dr = de .* f'(r) in place, and d_delta = de .* df/d delta
// when the objective has a delta.
template <typename T, typename Objective>
void objective_error_row_backward(const Objective& objective, const T* r, const T* delta, int D, T* de,
                                  T* d_delta) {
  const T norm = Objective::kUsesRowNorm ? row_norm(r, D) : T(0);
  if constexpr (Objective::kUsesDelta) {
    for (int j = 0; j < D; ++j) d_delta[j] = de[j] * objective.delta_slope(r[j], delta[j], norm);
    for (int j = 0; j < D; ++j) de[j] *= objective.slope(r[j], delta[j], norm);
  } else {
    for (int j = 0; j < D; ++j) de[j] *= objective.slope(r[j], T(0), norm);
  }
}

// ---- Retention "lq" (docs/miras.md §2.3): the carried weight matrix is the accumulator A of n
// entries, and a chunk's weights are rho A with rho = ||A||_q^(2-q) (entrywise norm), fixed at the
// chunk start; rho = 1 for A = 0, where the scale has no limit for q > 2.

template <typename T>
T power_sum(const T* A, index_t n, T q) {
  T acc = 0;
  for (index_t i = 0; i < n; ++i) acc += std::pow(std::fabs(A[i]), q);
  return acc;
}

template <typename T>
T lq_scale(const T* A, index_t n, T q) {
  const T sum = power_sum(A, n, q);
  return sum == T(0) ? T(1) : std::pow(sum, (T(2) - q) / q);
}

// Backward of lq_scale: dA += d_rho drho/dA = d_rho (2 - q) sign(A) |A|^(q-1) ||A||_q^(2-2q)
// (nothing for A = 0, where rho is constant).
template <typename T>
void lq_scale_backward(const T* A, index_t n, T q, T d_rho, T* dA) {
  const T sum = power_sum(A, n, q);
  if (sum == T(0)) return;
  const T coef = d_rho * (T(2) - q) * std::pow(sum, (T(2) - T(2) * q) / q);
  for (index_t i = 0; i < n; ++i) dA[i] += coef * sign_of(A[i]) * std::pow(std::fabs(A[i]), q - T(1));
}

// ---- Retention "kl": Memora's step (the lag token of a chunk) on one weight matrix M [rows, cols]
// with momentum S, whose inner gradient is the rank-1 u = x y^T (e k^T for the linear memory,
// dz k^T and e h^T for the MLP's two weights), in place:
//   S <- eta S - theta x y^T,   M <- rowsoftmax(beta log max(M, kKlLogFloor) + S),  beta = 1 - alpha.

template <typename T>
void kl_step(T* M, T* S, int rows, int cols, const T* x, const T* y, T theta, T eta, T beta) {
  for (int i = 0; i < rows; ++i) {
    T* m = M + index_t(i) * cols;
    T* s = S + index_t(i) * cols;
    T row_max = -INFINITY;
    for (int j = 0; j < cols; ++j) {
      s[j] = eta * s[j] - theta * x[i] * y[j];
      m[j] = beta * std::log(std::max(m[j], T(kKlLogFloor))) + s[j];
      row_max = std::max(row_max, m[j]);
    }
    T total = 0;
    for (int j = 0; j < cols; ++j) total += (m[j] = std::exp(m[j] - row_max));
    for (int j = 0; j < cols; ++j) m[j] /= total;
  }
}

// Cotangents of the gates of kl steps, summed over the matrices that share them.
template <typename T>
struct KlGateGrads {
  T theta = 0, eta = 0, beta = 0;
};

// Backward of kl_step. M_prev, S_prev: its inputs; M1: its output M. dM, dS: the cotangents of
// its outputs, turned in place into those of its inputs. Adds the cotangents of x, y to dx [rows],
// dy [cols] and those of the gates to grads. The clamp passes no gradient below kKlLogFloor.
template <typename T>
void kl_step_backward(const T* M_prev, const T* S_prev, const T* M1, int rows, int cols, const T* x, const T* y,
                      T theta, T eta, T beta, T* dM, T* dS, T* dx, T* dy, KlGateGrads<T>& grads) {
  for (int i = 0; i < rows; ++i) {
    const index_t row = index_t(i) * cols;
    T row_dot = 0;
    for (int j = 0; j < cols; ++j) row_dot += dM[row + j] * M1[row + j];
    T ds_y = 0;  // (dS_total y)_i
    for (int j = 0; j < cols; ++j) {
      const index_t ij = row + j;
      const T d_logit = M1[ij] * (dM[ij] - row_dot);  // softmax backward
      const T ds = dS[ij] + d_logit;                  // the logits contain the new S
      grads.beta += d_logit * std::log(std::max(M_prev[ij], T(kKlLogFloor)));
      grads.eta += ds * S_prev[ij];
      dM[ij] = M_prev[ij] >= T(kKlLogFloor) ? beta * d_logit / M_prev[ij] : T(0);
      dS[ij] = eta * ds;
      ds_y += ds * y[j];
      dy[j] -= theta * ds * x[i];
    }
    grads.theta -= x[i] * ds_y;
    dx[i] -= theta * ds_y;
  }
}

}  // namespace titans::cpu
