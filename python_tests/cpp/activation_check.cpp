// titans::cpu::activation (csrc/cpu/activation.h) against libm in long double, for every
// instruction-set variant this build and machine support: GELU and SiLU with their first and
// second derivatives, fp32 and fp64, over [-40, 40] (both tails, where exp underflows and erf
// saturates) and densely around the branch points of the fp64 erf (|x| = 2 sqrt(2), 6 sqrt(2)).
// Torch-free: built and run by python_tests/test_cpu_isa.py.
//
//   c++ -O2 -std=c++20 -I csrc python_tests/cpp/activation_check.cpp csrc/cpu/{matmul,cpu_isa,isa_*}.cpp
//
// Prints one line per variant; exits with 1 on the first mismatch.
#include <cmath>
#include <cstdio>
#include <vector>

#include "cpu/activation.h"
#include "cpu/cpu_isa.h"

using titans::MlpActivation;
using titans::cpu::index_t;

namespace {

// act, act', act'' at x in long double from libm.
void exact(MlpActivation kind, long double x, long double out[3]) {
  if (kind == MlpActivation::kGelu) {
    const long double cdf = 0.5L * std::erfc(-x / std::sqrt(2.0L));
    const long double pdf = std::exp(-0.5L * x * x) / std::sqrt(2.0L * 3.14159265358979323846264338327950288L);
    out[0] = x * cdf;
    out[1] = cdf + x * pdf;
    out[2] = pdf * (2 - x * x);
  } else {
    const long double s = 1 / (1 + std::exp(-x));
    out[0] = x * s;
    out[1] = s * (1 + x * (1 - s));
    out[2] = s * (1 - s) * (2 + x * (1 - 2 * s));
  }
}

template <typename T>
bool check(const char* isa, MlpActivation kind, double tolerance) {
  std::vector<T> x;
  for (int i = -4000; i <= 4000; ++i) x.push_back(T(i * 0.01));
  for (double centre : {2 * std::sqrt(2.0), 6 * std::sqrt(2.0)})
    for (int i = -100; i <= 100; ++i)
      for (double sign : {-1.0, 1.0}) x.push_back(T(sign * (centre + i * 1e-9)));
  const index_t n = index_t(x.size());
  std::vector<T> value(n), first(n), second(n);
  titans::cpu::activation(kind, n, x.data(), value.data(), first.data(), second.data());
  for (index_t i = 0; i < n; ++i) {
    long double want[3];
    exact(kind, x[i], want);
    const T got[3] = {value[i], first[i], second[i]};
    for (int order = 0; order < 3; ++order) {
      // Absolute error, relative to the size of the terms (x times a probability).
      const double tol = tolerance * (1 + std::fabs(double(x[i])));
      if (!(std::fabs(double(got[order] - want[order])) <= tol)) {
        std::printf("FAIL [%s] %s %s order %d at x = %.17g: %.17g, want %.17Lg\n", isa, sizeof(T) == 4 ? "f32" : "f64",
                    kind == MlpActivation::kGelu ? "gelu" : "silu", order, double(x[i]), double(got[order]),
                    want[order]);
        return false;
      }
    }
  }
  return true;
}

}  // namespace

int main() {
  for (titans::cpu::CpuIsa isa : titans::cpu::supported_cpu_isas()) {
    titans::cpu::set_cpu_isa(isa);
    const char* name = titans::cpu::cpu_isa_name(isa);
    for (MlpActivation kind : {MlpActivation::kGelu, MlpActivation::kSilu})
      if (!check<float>(name, kind, 1e-6) || !check<double>(name, kind, 1e-14)) return 1;
    std::printf("%s: gelu and silu match in float and double\n", name);
  }
  return 0;
}
