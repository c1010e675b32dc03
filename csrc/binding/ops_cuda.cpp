// CUDA implementations of the titans_ext operators (schemas in ops.cpp). Compiled by g++, not
// nvcc: the kernels (csrc/cuda/*.cu) see only the params structs (build.md §3).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "binding/linear_memory_device.h"
#include "binding/mlp_memory_device.h"

namespace titans {
namespace {

// The CUDA kernels take the schemas' MIRAS arguments but implement only their defaults.
void check_default_miras(int64_t objective, const std::optional<at::Tensor>& delta, int64_t retention) {
  TORCH_CHECK(objective == int64_t(ObjectiveKind::l2) && !delta && retention == int64_t(RetentionKind::l2),
              "linear_memory on CUDA: only objective=\"l2\" and retention=\"l2\" so far (the MIRAS options run on "
              "the CPU kernels)");
}

// The current device's SM count and shared memory (per block with opt-in, and per SM).
DeviceLimits device_limits() {
  const int device = c10::cuda::current_device();
  int sm_count = 0, block_bytes = 0, sm_bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&block_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_bytes, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  return {sm_count, size_t(block_bytes), size_t(sm_bytes)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_memory_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& theta, const at::Tensor& eta,
    const at::Tensor& alpha, const std::optional<at::Tensor>& m0, const std::optional<at::Tensor>& s0,
    int64_t chunk_size, bool read_token, bool save_states, int64_t objective, double /*p*/, double /*eps*/,
    const std::optional<at::Tensor>& delta, int64_t retention, double /*retention_q*/) {
  check_default_miras(objective, delta, retention);
  // Otherwise the kernel would be launched on the current device, not q's.
  const c10::cuda::CUDAGuard device_guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  return linear_memory_fwd_device(q, k, v, theta, eta, alpha, m0, s0, chunk_size, read_token, save_states,
                                  device_limits(),
                                  [&](const LinearMemoryParams& params, const LinearMemoryFwdWorkspace& workspace,
                                      InputType type, const ValueTiles& tiles) {
                                    C10_CUDA_CHECK(static_cast<cudaError_t>(
                                        linear_memory_fwd_launch(params, workspace, type, tiles, stream)));
                                  });
}

// The gradients of linear_memory_bwd's schema: those of linear_memory_bwd_device and an empty d_delta.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_memory_bwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& theta,
                       const at::Tensor& eta, const at::Tensor& alpha, const at::Tensor& chunk_states,
                       const at::Tensor& d_o, const std::optional<at::Tensor>& d_m_final,
                       const std::optional<at::Tensor>& d_s_final, int64_t chunk_size, bool read_token,
                       int64_t objective, double /*p*/, double /*eps*/, const std::optional<at::Tensor>& delta,
                       int64_t retention, double /*retention_q*/) {
  check_default_miras(objective, delta, retention);
  const c10::cuda::CUDAGuard device_guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const LinearMemoryGrads grads = linear_memory_bwd_device(
      q, k, v, theta, eta, alpha, chunk_states, d_o, d_m_final, d_s_final, chunk_size, read_token,
      device_limits(),
      [&](const LinearMemoryBwdParams& params, const LinearMemoryBwdWorkspace& workspace, InputType type,
          const ValueTiles& tiles) {
        C10_CUDA_CHECK(static_cast<cudaError_t>(linear_memory_bwd_launch(params, workspace, type, tiles, stream)));
      });
  const at::Tensor& dm0 = std::get<6>(grads);
  return std::tuple_cat(grads, std::make_tuple(at::empty({0}, dm0.options())));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_memory_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& theta, const at::Tensor& eta,
    const at::Tensor& alpha, const at::Tensor& w1, const at::Tensor& w2, const std::optional<at::Tensor>& s1,
    const std::optional<at::Tensor>& s2, int64_t chunk_size, bool read_token, c10::string_view activation,
    bool save_states, int64_t objective, double p, double eps, const std::optional<at::Tensor>& delta,
    int64_t retention, double retention_q) {
  const c10::cuda::CUDAGuard device_guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  return mlp_memory_fwd_device(q, k, v, theta, eta, alpha, w1, w2, s1, s2, chunk_size, read_token, activation,
                               save_states, objective, p, eps, delta, retention, retention_q, device_limits(),
                               [&](const MlpMemoryParams& params, InputType type, int block) {
                                 C10_CUDA_CHECK(static_cast<cudaError_t>(
                                     mlp_memory_fwd_launch(params, type, block, stream)));
                               });
}

MlpMemoryGrads mlp_memory_bwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& theta, const at::Tensor& eta, const at::Tensor& alpha,
                                   const at::Tensor& chunk_states, const at::Tensor& d_o,
                                   const std::optional<at::Tensor>& d_w1_final,
                                   const std::optional<at::Tensor>& d_w2_final,
                                   const std::optional<at::Tensor>& d_s1_final,
                                   const std::optional<at::Tensor>& d_s2_final, int64_t hidden, int64_t chunk_size,
                                   bool read_token, c10::string_view activation, int64_t objective, double p,
                                   double eps, const std::optional<at::Tensor>& delta, int64_t retention,
                                   double retention_q) {
  const c10::cuda::CUDAGuard device_guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  return mlp_memory_bwd_device(
      q, k, v, theta, eta, alpha, chunk_states, d_o, d_w1_final, d_w2_final, d_s1_final, d_s2_final, hidden,
      chunk_size, read_token, activation, objective, p, eps, delta, retention, retention_q, device_limits(),
      [&](const MlpMemoryBwdParams& params, const MlpMemoryBwdWorkspace& workspace, InputType type, int block) {
        C10_CUDA_CHECK(static_cast<cudaError_t>(mlp_memory_bwd_launch(params, workspace, type, block, stream)));
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(titans_ext, CUDA, m) {
  m.impl("linear_memory_fwd", &linear_memory_fwd_cuda);
  m.impl("linear_memory_bwd", &linear_memory_bwd_cuda);
  m.impl("mlp_memory_fwd", &mlp_memory_fwd_cuda);
  m.impl("mlp_memory_bwd", &mlp_memory_bwd_cuda);
}

}  // namespace titans
