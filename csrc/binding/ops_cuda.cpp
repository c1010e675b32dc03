// CUDA implementations of the titans_ext operators (schemas in ops.cpp). Compiled by g++, not
// nvcc: the kernels (csrc/cuda/*.cu) see only the params structs (docs/build.md §3). Stable ABI
// only: the device guard, the current stream and error checks come from torch's stable C shim.
#include <torch/csrc/stable/library.h>

#include "binding/cuda_launch.h"
#include "binding/linear_memory_device.h"
#include "binding/linear_memory_plan.h"

namespace titans {
namespace {

// The CUDA kernels take the schemas' MIRAS and packed-sequence arguments but implement only their
// defaults.
void check_default_options(int64_t objective, const std::optional<Tensor>& delta, int64_t retention,
                           const std::optional<Tensor>& cu_seqlens) {
  STD_TORCH_CHECK(objective == int64_t(ObjectiveKind::l2) && !delta && retention == int64_t(RetentionKind::l2),
                  "linear_memory on CUDA: only objective=\"l2\" and retention=\"l2\" so far (the MIRAS options run "
                  "on the CPU kernels)");
  STD_TORCH_CHECK(!cu_seqlens, "linear_memory on CUDA: cu_seqlens is not supported by the CUDA kernels yet (packed "
                  "sequences run on the CPU kernels)");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_memory_fwd_cuda(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta, const Tensor& eta, const Tensor& alpha,
    const std::optional<Tensor>& m0, const std::optional<Tensor>& s0, int64_t chunk_size, bool read_token,
    bool save_states, int64_t objective, double /*p*/, double /*eps*/, const std::optional<Tensor>& delta,
    int64_t retention, double /*retention_q*/, const std::optional<Tensor>& cu_seqlens) {
  check_default_options(objective, delta, retention, cu_seqlens);
  const CudaLaunchContext context(q);
  return linear_memory_fwd_device(q, k, v, theta, eta, alpha, m0, s0, chunk_size, read_token, save_states,
                                  context.limits(),
                                  [&](const LinearMemoryParams& params, InputType type, const LinearMemoryFwdPlan& plan) {
                                    STD_CUDA_CHECK(static_cast<cudaError_t>(
                                        linear_memory_fwd_launch(params, type, plan, context.stream())));
                                  });
}

// The gradients of linear_memory_bwd's schema: those of linear_memory_bwd_device and an empty d_delta.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> linear_memory_bwd_cuda(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta, const Tensor& eta, const Tensor& alpha,
    const Tensor& chunk_states, const Tensor& d_o, const std::optional<Tensor>& d_m_final,
    const std::optional<Tensor>& d_s_final, int64_t chunk_size, bool read_token, int64_t objective, double /*p*/,
    double /*eps*/, const std::optional<Tensor>& delta, int64_t retention, double /*retention_q*/,
    const std::optional<Tensor>& cu_seqlens) {
  check_default_options(objective, delta, retention, cu_seqlens);
  const CudaLaunchContext context(q);
  const LinearMemoryGrads grads = linear_memory_bwd_device(
      q, k, v, theta, eta, alpha, chunk_states, d_o, d_m_final, d_s_final, chunk_size, read_token, context.limits(),
      [&](const LinearMemoryBwdParams& params, InputType type, const LinearMemoryBwdPlan& plan,
          const LinearMemoryBwdWorkspace& workspace) {
        STD_CUDA_CHECK(
            static_cast<cudaError_t>(linear_memory_bwd_launch(params, type, plan, workspace, context.stream())));
      });
  const Tensor& dm0 = std::get<6>(grads);
  return std::tuple_cat(grads, std::make_tuple(empty_on(dm0, {0}, dm0.scalar_type())));
}

// The plans for the current CUDA device.
std::string linear_memory_plan(int64_t batch, int64_t seqlen, int64_t heads, int64_t dk, int64_t dv, int64_t chunk_size,
                               ScalarType dtype, bool read_token, bool save_states, bool has_initial_state,
                               bool has_final_cotangent) {
  int device = 0;
  STD_CUDA_CHECK(cudaGetDevice(&device));
  return linear_memory_plan_json(batch, seqlen, heads, dk, dv, chunk_size, dtype, read_token, save_states,
                                 has_initial_state, has_final_cotangent, device_limits(device));
}

}  // namespace

// An operator of the CUDA build only (it describes the CUDA launches); it takes no tensor, so it
// is defined here rather than in ops.cpp's schema list, with a kernel for every dispatch key.
STABLE_TORCH_LIBRARY_FRAGMENT(titans_ext, m) { m.def(TITANS_LINEAR_MEMORY_PLAN_SCHEMA); }

STABLE_TORCH_LIBRARY_IMPL(titans_ext, CompositeExplicitAutograd, m) {
  m.impl("linear_memory_plan", TORCH_BOX(&linear_memory_plan));
}

STABLE_TORCH_LIBRARY_IMPL(titans_ext, CUDA, m) {
  m.impl("linear_memory_fwd", TORCH_BOX(&linear_memory_fwd_cuda));
  m.impl("linear_memory_bwd", TORCH_BOX(&linear_memory_bwd_cuda));
}

}  // namespace titans
