// The CUDA decode-step kernels (csrc/cuda/memory_step.cuh) under the CPU SIMT emulation, as
// titans_emu::linear_memory_step and titans_emu::mlp_memory_step: the schemas and output contracts
// of the titans_ext:: step ops, on CPU tensors. Part of titans_ext._emu, beside ops_emu.cpp.
#include <torch/csrc/stable/library.h>

#include "binding/linear_memory_device.h"  // input_type
#include "binding/memory_step.h"
#include "cuda/memory_step.h"

namespace titans {
namespace {

LinearStepResult linear_memory_step_emu(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta,
                                        const Tensor& eta, const Tensor& alpha, const std::optional<Tensor>& m,
                                        const std::optional<Tensor>& s, const std::optional<Tensor>& chunk_weights,
                                        const std::optional<Tensor>& chunk_scale,
                                        const std::optional<Tensor>& chunk_read, const Tensor& position,
                                        int64_t chunk_size, bool read_token, int64_t objective, double p, double eps,
                                        const std::optional<Tensor>& delta, int64_t retention, double retention_q) {
  STD_TORCH_CHECK(q.is_cpu(), "titans_emu::linear_memory_step runs on CPU tensors");
  const InputType type = input_type(q);
  return linear_memory_step_binding(
      q, k, v, theta, eta, alpha, m, s, chunk_weights, chunk_scale, chunk_read, position, chunk_size, read_token,
      objective, p, eps, delta, retention, retention_q, false,
      [&](const LinearMemoryStepParams& params, const StepInputs&) {
        STD_TORCH_CHECK(linear_memory_step_smem_bytes(params, type) <= kStepMaxSharedBytes,
                        "linear_memory_step: too large for the kernel's shared memory");
        linear_memory_step_launch(params, type, nullptr);
      });
}

MlpStepResult mlp_memory_step_emu(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta,
                                  const Tensor& eta, const Tensor& alpha, const Tensor& w1, const Tensor& w2,
                                  const std::optional<Tensor>& s1, const std::optional<Tensor>& s2,
                                  const std::optional<Tensor>& chunk_w1, const std::optional<Tensor>& chunk_w2,
                                  const std::optional<Tensor>& chunk_scale,
                                  const std::optional<Tensor>& chunk_read_w1,
                                  const std::optional<Tensor>& chunk_read_w2, const Tensor& position,
                                  int64_t chunk_size, bool read_token, std::string_view activation, int64_t objective,
                                  double p, double eps, const std::optional<Tensor>& delta, int64_t retention,
                                  double retention_q) {
  STD_TORCH_CHECK(q.is_cpu(), "titans_emu::mlp_memory_step runs on CPU tensors");
  const InputType type = input_type(q);
  return mlp_memory_step_binding(
      q, k, v, theta, eta, alpha, w1, w2, s1, s2, chunk_w1, chunk_w2, chunk_scale, chunk_read_w1, chunk_read_w2,
      position, chunk_size, read_token, activation, objective, p, eps, delta, retention, retention_q, false,
      [&](const MlpMemoryStepParams& params, const StepInputs&) {
        STD_TORCH_CHECK(mlp_memory_step_smem_bytes(params, type) <= kStepMaxSharedBytes,
                        "mlp_memory_step: too large for the kernel's shared memory");
        mlp_memory_step_launch(params, type, nullptr);
      });
}

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(titans_emu, m) {
  m.def(TITANS_LINEAR_MEMORY_STEP_SCHEMA);
  m.def(TITANS_MLP_MEMORY_STEP_SCHEMA);
}

// CompositeExplicitAutograd, like the other emulated ops: CPU tensors, no autograd.
STABLE_TORCH_LIBRARY_IMPL(titans_emu, CompositeExplicitAutograd, m) {
  m.impl("linear_memory_step", TORCH_BOX(&linear_memory_step_emu));
  m.impl("mlp_memory_step", TORCH_BOX(&mlp_memory_step_emu));
}

}  // namespace titans
