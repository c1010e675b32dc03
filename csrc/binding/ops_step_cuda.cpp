// CUDA implementations of the decode-step operators (schemas in ops_step.cpp): one fused kernel
// launch per call on torch's current stream (csrc/cuda/memory_step.cuh). Nothing here reads a tensor
// value on the host, so a step never synchronizes and can be captured in a CUDA graph. Compiled by
// g++, not nvcc, like ops_cuda.cpp.
#include <torch/csrc/stable/library.h>

#include "binding/cuda_launch.h"
#include "binding/linear_memory_device.h"  // input_type
#include "binding/memory_step.h"
#include "cuda/memory_step.h"

namespace titans {
namespace {

void check_step_launch(const char* op, int64_t batch, size_t smem_bytes) {
  STD_TORCH_CHECK(batch <= kStepMaxBatch, op, " on CUDA: batch up to ", kStepMaxBatch, ", got ", batch);
  STD_TORCH_CHECK(smem_bytes <= kStepMaxSharedBytes, op, " on CUDA: the token's vectors need ", smem_bytes,
                  " bytes of shared memory, more than ", kStepMaxSharedBytes, " (the head or hidden width is too large)");
}

LinearStepResult linear_memory_step_cuda(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta,
                                         const Tensor& eta, const Tensor& alpha, const std::optional<Tensor>& m,
                                         const std::optional<Tensor>& s, const std::optional<Tensor>& chunk_weights,
                                         const std::optional<Tensor>& chunk_scale,
                                         const std::optional<Tensor>& chunk_read, const Tensor& position,
                                         int64_t chunk_size, bool read_token, int64_t objective, double p, double eps,
                                         const std::optional<Tensor>& delta, int64_t retention, double retention_q) {
  const CudaLaunchContext context(q);
  const InputType type = input_type(q);
  return linear_memory_step_binding(
      q, k, v, theta, eta, alpha, m, s, chunk_weights, chunk_scale, chunk_read, position, chunk_size, read_token,
      objective, p, eps, delta, retention, retention_q, false,
      [&](const LinearMemoryStepParams& params, const StepInputs&) {
        check_step_launch("linear_memory_step", params.batch, linear_memory_step_smem_bytes(params, type));
        STD_CUDA_CHECK(static_cast<cudaError_t>(linear_memory_step_launch(params, type, context.stream())));
      });
}

MlpStepResult mlp_memory_step_cuda(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta,
                                   const Tensor& eta, const Tensor& alpha, const Tensor& w1, const Tensor& w2,
                                   const std::optional<Tensor>& s1, const std::optional<Tensor>& s2,
                                   const std::optional<Tensor>& chunk_w1, const std::optional<Tensor>& chunk_w2,
                                   const std::optional<Tensor>& chunk_scale,
                                   const std::optional<Tensor>& chunk_read_w1,
                                   const std::optional<Tensor>& chunk_read_w2, const Tensor& position,
                                   int64_t chunk_size, bool read_token, std::string_view activation, int64_t objective,
                                   double p, double eps, const std::optional<Tensor>& delta, int64_t retention,
                                   double retention_q) {
  const CudaLaunchContext context(q);
  const InputType type = input_type(q);
  return mlp_memory_step_binding(
      q, k, v, theta, eta, alpha, w1, w2, s1, s2, chunk_w1, chunk_w2, chunk_scale, chunk_read_w1, chunk_read_w2,
      position, chunk_size, read_token, activation, objective, p, eps, delta, retention, retention_q, false,
      [&](const MlpMemoryStepParams& params, const StepInputs&) {
        check_step_launch("mlp_memory_step", params.batch, mlp_memory_step_smem_bytes(params, type));
        STD_CUDA_CHECK(static_cast<cudaError_t>(mlp_memory_step_launch(params, type, context.stream())));
      });
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(titans_ext, CUDA, m) {
  m.impl("linear_memory_step", TORCH_BOX(&linear_memory_step_cuda));
  m.impl("mlp_memory_step", TORCH_BOX(&mlp_memory_step_cuda));
}

}  // namespace titans
