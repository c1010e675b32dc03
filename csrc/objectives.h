// Attentional-bias objectives of the MIRAS options (docs/miras.md §2.1), torch-free and
// usable from host and device code, so the CUDA kernels can take them as a compile-time
// epilogue on the error matrix E.
//
// The objective replaces the l2 error map 2r by f(r), applied to the residual r = M(k) - v at
// the chunk-start weights. Each objective is a functor with, for one entry r_j of a token's
// residual (delta_j its threshold, norm = ||r|| over the token's Dv channels):
//   error(r, delta, norm)        f(r)_j
//   slope(r, delta, norm)        df_j/dr_j  (all used objectives have a diagonal Jacobian, so
//                                the backward is dR = dE .* slope)
//   delta_slope(r, delta, norm)  df_j/d delta_j
// kUsesDelta / kUsesRowNorm say whether delta / norm are read; callers pass 0 otherwise and
// skip the row reduction. Kernels are instantiated once per objective (dispatch_objective), so
// no switch runs per element.
#pragma once

#include <cmath>

#include "titans_params.h"

#if defined(__CUDACC__)
#define TITANS_HOST_DEVICE __host__ __device__
#else
#define TITANS_HOST_DEVICE
#endif

namespace titans {

template <typename T>
TITANS_HOST_DEVICE inline T sign_of(T r) {
  return T((r > T(0)) - (r < T(0)));
}

// sum r^2: f = 2r.
template <typename T>
struct L2Objective {
  static constexpr bool kUsesDelta = false, kUsesRowNorm = false;
  TITANS_HOST_DEVICE T error(T r, T, T) const { return T(2) * r; }
  TITANS_HOST_DEVICE T slope(T, T, T) const { return T(2); }
  TITANS_HOST_DEVICE T delta_slope(T, T, T) const { return T(0); }
};

// sum (r^2 + eps)^(p/2): f = p r (r^2 + eps)^(p/2 - 1). eps = 0 only with p >= 2 (checked by the
// callers), where f' = p (p - 1) |r|^(p-2) is finite at r = 0.
template <typename T>
struct LpObjective {
  static constexpr bool kUsesDelta = false, kUsesRowNorm = false;
  T p, eps;
  TITANS_HOST_DEVICE T error(T r, T, T) const {
    using std::pow;
    return p * r * pow(r * r + eps, p / T(2) - T(1));
  }
  TITANS_HOST_DEVICE T slope(T r, T, T) const {
    using std::fabs;
    using std::pow;
    // The general form p (r^2+eps)^(p/2-2) ((p-1) r^2 + eps) is 0 * inf at r = 0 when eps = 0.
    if (eps == T(0)) return p * (p - T(1)) * pow(fabs(r), p - T(2));
    const T s = r * r + eps;
    return p * pow(s, p / T(2) - T(2)) * ((p - T(1)) * r * r + eps);
  }
  TITANS_HOST_DEVICE T delta_slope(T, T, T) const { return T(0); }
};

// Elementwise Huber, r^2 inside |r| <= delta, 2 delta |r| - delta^2 outside: f = 2 clamp(r, -delta, delta).
// At |r| = delta the inside branch applies (torch.clamp's gradient convention).
template <typename T>
struct HuberObjective {
  static constexpr bool kUsesDelta = true, kUsesRowNorm = false;
  TITANS_HOST_DEVICE T error(T r, T delta, T) const { return T(2) * (r > delta ? delta : r < -delta ? -delta : r); }
  TITANS_HOST_DEVICE T slope(T r, T delta, T) const { return r <= delta && r >= -delta ? T(2) : T(0); }
  TITANS_HOST_DEVICE T delta_slope(T r, T delta, T) const {
    return r <= delta && r >= -delta ? T(0) : T(2) * sign_of(r);
  }
};

// 2 delta^2 (sqrt(1 + (r/delta)^2) - 1): f = 2r / sqrt(1 + (r/delta)^2).
template <typename T>
struct PseudoHuberObjective {
  static constexpr bool kUsesDelta = true, kUsesRowNorm = false;
  TITANS_HOST_DEVICE static T inv_root(T x) {
    using std::sqrt;
    return T(1) / sqrt(T(1) + x * x);
  }
  TITANS_HOST_DEVICE T error(T r, T delta, T) const { return T(2) * r * inv_root(r / delta); }
  TITANS_HOST_DEVICE T slope(T r, T delta, T) const {
    const T w = inv_root(r / delta);
    return T(2) * w * w * w;
  }
  TITANS_HOST_DEVICE T delta_slope(T r, T delta, T) const {
    const T x = r / delta, w = inv_root(x);
    return T(2) * r * x * x / delta * w * w * w;
  }
};

// Yaad's switch (not the gradient of one loss): 2r while ||r|| <= delta, else 2 delta sign(r).
// With a per-channel delta each channel compares the token's norm with its own delta.
template <typename T>
struct YaadObjective {
  static constexpr bool kUsesDelta = true, kUsesRowNorm = true;
  TITANS_HOST_DEVICE T error(T r, T delta, T norm) const {
    return norm <= delta ? T(2) * r : T(2) * delta * sign_of(r);
  }
  TITANS_HOST_DEVICE T slope(T, T delta, T norm) const { return norm <= delta ? T(2) : T(0); }
  TITANS_HOST_DEVICE T delta_slope(T r, T delta, T norm) const { return norm <= delta ? T(0) : T(2) * sign_of(r); }
};

// Calls fn(objective) with the functor for params.objective: one instantiation per objective.
template <typename T, typename Fn>
void dispatch_objective(const MirasParams& params, Fn&& fn) {
  switch (params.objective) {
    case ObjectiveKind::l2: return fn(L2Objective<T>{});
    case ObjectiveKind::lp: return fn(LpObjective<T>{T(params.p), T(params.eps)});
    case ObjectiveKind::huber: return fn(HuberObjective<T>{});
    case ObjectiveKind::pseudo_huber: return fn(PseudoHuberObjective<T>{});
    case ObjectiveKind::yaad: return fn(YaadObjective<T>{});
  }
}

}  // namespace titans
