// CUDA implementations of the titans_ext operators (schemas in ops.cpp). Compiled by g++, not
// nvcc: the kernels (csrc/cuda/*.cu) see only the params structs (docs/build.md §3). Stable ABI
// only: the device guard, the current stream and error checks come from torch's stable C shim.
#include <torch/csrc/stable/library.h>

#include "binding/cuda_launch.h"
#include "binding/linear_memory_device.h"
#include "binding/linear_memory_plan.h"
#include "binding/mlp_memory_device.h"

namespace titans {
namespace {

// Packed sequences on a GPU: their values are not read (a host sync; the Python op checks them
// under value_checks_enabled).
DeviceSequences cuda_sequences(const std::optional<Tensor>& cu_seqlens, const Tensor& q) {
  return DeviceSequences(cu_seqlens, q, /*check_values=*/false);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_memory_fwd_cuda(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta, const Tensor& eta, const Tensor& alpha,
    const std::optional<Tensor>& m0, const std::optional<Tensor>& s0, int64_t chunk_size, bool read_token,
    bool save_states, int64_t objective, double p, double eps, const std::optional<Tensor>& delta,
    int64_t retention, double retention_q, const std::optional<Tensor>& cu_seqlens) {
  const CudaLaunchContext context(q);
  return linear_memory_fwd_device(q, k, v, theta, eta, alpha, m0, s0, chunk_size, read_token, save_states, objective,
                                  p, eps, delta, retention, retention_q, cuda_sequences(cu_seqlens, q),
                                  context.limits(),
                                  [&](const LinearMemoryParams& params, InputType type, const LinearMemoryFwdPlan& plan) {
                                    STD_CUDA_CHECK(static_cast<cudaError_t>(
                                        linear_memory_fwd_launch(params, type, plan, context.stream())));
                                  });
}

LinearMemoryGrads linear_memory_bwd_cuda(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta, const Tensor& eta, const Tensor& alpha,
    const Tensor& chunk_states, const Tensor& d_o, const std::optional<Tensor>& d_m_final,
    const std::optional<Tensor>& d_s_final, int64_t chunk_size, bool read_token, int64_t objective, double p,
    double eps, const std::optional<Tensor>& delta, int64_t retention, double retention_q,
    const std::optional<Tensor>& cu_seqlens) {
  const CudaLaunchContext context(q);
  return linear_memory_bwd_device(
      q, k, v, theta, eta, alpha, chunk_states, d_o, d_m_final, d_s_final, chunk_size, read_token, objective, p, eps,
      delta, retention, retention_q, cuda_sequences(cu_seqlens, q), context.limits(),
      [&](const LinearMemoryBwdParams& params, InputType type, const LinearMemoryBwdPlan& plan,
          const LinearMemoryBwdWorkspace& workspace) {
        STD_CUDA_CHECK(
            static_cast<cudaError_t>(linear_memory_bwd_launch(params, type, plan, workspace, context.stream())));
      });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mlp_memory_fwd_cuda(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta, const Tensor& eta, const Tensor& alpha,
    const Tensor& w1, const Tensor& w2, const std::optional<Tensor>& s1, const std::optional<Tensor>& s2,
    int64_t chunk_size, bool read_token, std::string_view activation, bool save_states, int64_t objective, double p,
    double eps, const std::optional<Tensor>& delta, int64_t retention, double retention_q,
    const std::optional<Tensor>& cu_seqlens) {
  const CudaLaunchContext context(q);
  return mlp_memory_fwd_device(q, k, v, theta, eta, alpha, w1, w2, s1, s2, chunk_size, read_token, activation,
                               save_states, objective, p, eps, delta, retention, retention_q,
                               cuda_sequences(cu_seqlens, q), context.limits(),
                               [&](const MlpMemoryParams& params, InputType type, int block) {
                                 STD_CUDA_CHECK(static_cast<cudaError_t>(
                                     mlp_memory_fwd_launch(params, type, block, context.stream())));
                               });
}

MlpMemoryGrads mlp_memory_bwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta,
                                   const Tensor& eta, const Tensor& alpha, const Tensor& chunk_states,
                                   const Tensor& d_o, const std::optional<Tensor>& d_w1_final,
                                   const std::optional<Tensor>& d_w2_final, const std::optional<Tensor>& d_s1_final,
                                   const std::optional<Tensor>& d_s2_final, int64_t hidden, int64_t chunk_size,
                                   bool read_token, std::string_view activation, int64_t objective, double p,
                                   double eps, const std::optional<Tensor>& delta, int64_t retention,
                                   double retention_q, const std::optional<Tensor>& cu_seqlens) {
  const CudaLaunchContext context(q);
  return mlp_memory_bwd_device(
      q, k, v, theta, eta, alpha, chunk_states, d_o, d_w1_final, d_w2_final, d_s1_final, d_s2_final, hidden,
      chunk_size, read_token, activation, objective, p, eps, delta, retention, retention_q,
      cuda_sequences(cu_seqlens, q), context.limits(),
      [&](const MlpMemoryBwdParams& params, const MlpMemoryBwdWorkspace& workspace, InputType type, int block) {
        STD_CUDA_CHECK(
            static_cast<cudaError_t>(mlp_memory_bwd_launch(params, workspace, type, block, context.stream())));
      });
}

// The plans for the current CUDA device.
std::string linear_memory_plan(int64_t batch, int64_t seqlen, int64_t heads, int64_t dk, int64_t dv, int64_t chunk_size,
                               ScalarType dtype, bool read_token, bool save_states, bool has_initial_state,
                               bool has_final_cotangent, int64_t objective, int64_t n_seqs, int64_t retention) {
  int device = 0;
  STD_CUDA_CHECK(cudaGetDevice(&device));
  return linear_memory_plan_json(batch, seqlen, heads, dk, dv, chunk_size, dtype, read_token, save_states,
                                 has_initial_state, has_final_cotangent, objective, n_seqs, retention,
                                 device_limits(device));
}

}  // namespace

// An operator of the CUDA build only (it describes the CUDA launches); it takes no tensor, so it
// is defined here rather than in ops.cpp's schema list, with a kernel for every dispatch key. What
// the CUDA mlp_memory launchers choose on a device (binding/mlp_memory_device.h): the Python op asks
// it before dispatch, so that a configuration no block fits is a ValueError naming the bytes.
STABLE_TORCH_LIBRARY_FRAGMENT(titans_ext, m) {
  m.def(TITANS_LINEAR_MEMORY_PLAN_SCHEMA);
  m.def(
      "mlp_memory_plan(int dim, int hidden, int chunk_size, ScalarType dtype, bool read_token, int retention, "
      "int max_shared_bytes) -> (int fwd_block, int fwd_bytes, int bwd_block, int bwd_bytes)");
}

STABLE_TORCH_LIBRARY_IMPL(titans_ext, CompositeExplicitAutograd, m) {
  m.impl("linear_memory_plan", TORCH_BOX(&linear_memory_plan));
  m.impl("mlp_memory_plan", TORCH_BOX(&mlp_memory_plan));
}

STABLE_TORCH_LIBRARY_IMPL(titans_ext, CUDA, m) {
  m.impl("linear_memory_fwd", TORCH_BOX(&linear_memory_fwd_cuda));
  m.impl("linear_memory_bwd", TORCH_BOX(&linear_memory_bwd_cuda));
  m.impl("mlp_memory_fwd", TORCH_BOX(&mlp_memory_fwd_cuda));
  m.impl("mlp_memory_bwd", TORCH_BOX(&mlp_memory_bwd_cuda));
}

}  // namespace titans
