// The decode-step operators titans_ext::linear_memory_step and titans_ext::mlp_memory_step: their
// schemas (memory_step.h) and CPU implementations, which run the torch-free kernels of
// csrc/cpu/memory_step.cpp over (batch, head) pairs. The CUDA implementations are in
// ops_step_cuda.cpp. Part of titans_ext._C, beside ops.cpp.
#include <algorithm>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include "binding/cpu_dispatch.h"
#include "binding/memory_step.h"
#include "cpu/memory_step.h"

namespace titans {
namespace {

// A step's work per (batch, head) is its state, a few thousand multiply-adds: tasks of fewer than
// this many state elements would cost more in thread hand-offs than they save.
constexpr int64_t kStepElementsPerTask = 1 << 16;

int64_t step_grain(int64_t state_elements_per_head) {
  return std::max<int64_t>(1, kStepElementsPerTask / std::max<int64_t>(1, state_elements_per_head));
}

LinearStepResult linear_memory_step_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta,
                                        const Tensor& eta, const Tensor& alpha, const std::optional<Tensor>& m,
                                        const std::optional<Tensor>& s, const std::optional<Tensor>& chunk_weights,
                                        const std::optional<Tensor>& chunk_scale,
                                        const std::optional<Tensor>& chunk_read, const Tensor& position,
                                        int64_t chunk_size, bool read_token, int64_t objective, double p, double eps,
                                        const std::optional<Tensor>& delta, int64_t retention, double retention_q) {
  auto out = linear_memory_step_binding(
      q, k, v, theta, eta, alpha, m, s, chunk_weights, chunk_scale, chunk_read, position, chunk_size, read_token,
      objective, p, eps, delta, retention, retention_q, true,
      [](const LinearMemoryStepParams& params, const StepInputs& in) {
        const int64_t pairs = int64_t(params.batch) * params.heads;
        run_over_heads(in.dtype, pairs, step_grain(int64_t(params.dk) * params.dv),
                       [&](auto zero, int64_t begin, int64_t end) {
                         cpu::linear_memory_step<decltype(zero)>(params, begin, end);
                       });
      });
  std::get<0>(out) = to_dtype(std::get<0>(out), q.scalar_type());
  return out;
}

MlpStepResult mlp_memory_step_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta,
                                  const Tensor& eta, const Tensor& alpha, const Tensor& w1, const Tensor& w2,
                                  const std::optional<Tensor>& s1, const std::optional<Tensor>& s2,
                                  const std::optional<Tensor>& chunk_w1, const std::optional<Tensor>& chunk_w2,
                                  const std::optional<Tensor>& chunk_scale,
                                  const std::optional<Tensor>& chunk_read_w1,
                                  const std::optional<Tensor>& chunk_read_w2, const Tensor& position,
                                  int64_t chunk_size, bool read_token, std::string_view activation, int64_t objective,
                                  double p, double eps, const std::optional<Tensor>& delta, int64_t retention,
                                  double retention_q) {
  auto out = mlp_memory_step_binding(
      q, k, v, theta, eta, alpha, w1, w2, s1, s2, chunk_w1, chunk_w2, chunk_scale, chunk_read_w1, chunk_read_w2,
      position, chunk_size, read_token, activation, objective, p, eps, delta, retention, retention_q, true,
      [](const MlpMemoryStepParams& params, const StepInputs& in) {
        const int64_t pairs = int64_t(params.batch) * params.heads;
        run_over_heads(in.dtype, pairs, step_grain(2 * int64_t(params.dim) * params.hidden),
                       [&](auto zero, int64_t begin, int64_t end) {
                         cpu::mlp_memory_step<decltype(zero)>(params, begin, end);
                       });
      });
  std::get<0>(out) = to_dtype(std::get<0>(out), q.scalar_type());
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(titans_ext, m) {
  m.def(TITANS_LINEAR_MEMORY_STEP_SCHEMA);
  m.def(TITANS_MLP_MEMORY_STEP_SCHEMA);
}

STABLE_TORCH_LIBRARY_IMPL(titans_ext, CPU, m) {
  m.impl("linear_memory_step", TORCH_BOX(&linear_memory_step_cpu));
  m.impl("mlp_memory_step", TORCH_BOX(&mlp_memory_step_cpu));
}

}  // namespace titans
