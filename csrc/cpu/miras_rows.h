// MIRAS helpers shared by the CPU memory kernels (torch-free): the objective applied to the
// residual rows of a chunk, and the "lq" retention's rescale of one weight matrix
// (shared/design/miras.md §2).
#pragma once

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

// ---- Retention "lq" on one weight matrix of n entries: M <- rho M, rho = ||M||_q^(2-q)
// (entrywise norm; rho = 1 for M = 0, where the scale has no limit for q > 2).

template <typename T>
T power_sum(const T* M, index_t n, T q) {
  T acc = 0;
  for (index_t i = 0; i < n; ++i) acc += std::pow(std::fabs(M[i]), q);
  return acc;
}

template <typename T>
void lq_rescale(T* M, index_t n, T q) {
  const T sum = power_sum(M, n, q);
  if (sum == T(0)) return;
  const T rho = std::pow(sum, (T(2) - q) / q);
  for (index_t i = 0; i < n; ++i) M[i] *= rho;
}

// dM in place: from the cotangent of rho M to that of M,
// rho dM + <dM, M> (2 - q) sign(M) |M|^(q-1) ||M||_q^(2-2q).
template <typename T>
void lq_rescale_backward(const T* M, index_t n, T q, T* dM) {
  const T sum = power_sum(M, n, q);
  if (sum == T(0)) return;
  const T rho = std::pow(sum, (T(2) - q) / q);
  T dM_dot_M = 0;
  for (index_t i = 0; i < n; ++i) dM_dot_M += dM[i] * M[i];
  const T coef = dM_dot_M * (T(2) - q) * std::pow(sum, (T(2) - T(2) * q) / q);
  for (index_t i = 0; i < n; ++i) dM[i] = rho * dM[i] + coef * sign_of(M[i]) * std::pow(std::fabs(M[i]), q - T(1));
}

}  // namespace titans::cpu
