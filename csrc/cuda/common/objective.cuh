// The MIRAS objective's error map of the CUDA kernels, chosen at run time (docs/miras.md §2.1):
// objectives.h's functors behind one switch, so each kernel is instantiated per dtype only. Shared by
// the linear and the deep memory's kernels.
#pragma once

#include "device/device.h"
#include "objectives.h"
#include "titans_params.h"

namespace titans {
namespace kernel {

// One switch per element is cheap beside the products.
template <typename T>
struct Objective {
  ObjectiveKind kind;
  T p, eps;
  __host__ __device__ explicit Objective(const MirasParams& m) : kind(m.objective), p(T(m.p)), eps(T(m.eps)) {}

  __device__ bool uses_norm() const { return kind == ObjectiveKind::yaad; }
  __device__ bool uses_delta() const { return objective_has_delta(kind); }
  template <class F>
  __device__ T with(const F& f) const {
    switch (kind) {
      case ObjectiveKind::lp: return f(LpObjective<T>{p, eps});
      case ObjectiveKind::huber: return f(HuberObjective<T>{});
      case ObjectiveKind::pseudo_huber: return f(PseudoHuberObjective<T>{});
      case ObjectiveKind::yaad: return f(YaadObjective<T>{});
      case ObjectiveKind::l2: break;
    }
    return f(L2Objective<T>{});
  }
  __device__ T error(T r, T delta, T norm) const {
    return with([&](const auto& o) { return o.error(r, delta, norm); });
  }
  __device__ T slope(T r, T delta, T norm) const {
    return with([&](const auto& o) { return o.slope(r, delta, norm); });
  }
  __device__ T delta_slope(T r, T delta, T norm) const {
    return with([&](const auto& o) { return o.delta_slope(r, delta, norm); });
  }
};

}  // namespace kernel
}  // namespace titans
