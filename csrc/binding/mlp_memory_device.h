// Binding of the device-layer mlp_memory kernels (csrc/cuda/mlp_memory_{fwd,bwd}.cuh), shared by their
// two builds: the CUDA ops (ops_cuda.cpp) and the emulation ops (ops_emu.cpp). They differ only in
// how they launch. g++ only: includes ATen.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/string_view.h>

#include "binding/linear_memory_device.h"  // input_type
#include "binding/tensor_params.h"
#include "cuda/mlp_memory.h"

namespace titans {

// The kernels' limits (mlp_memory.h); titans_ext.mlp_memory raises a ValueError for them before
// dispatch, this guards direct calls of the operators.
inline void check_mlp_device_limits(const at::Tensor& q, int64_t chunk_size) {
  TORCH_CHECK_VALUE(chunk_size >= 1 && chunk_size <= kCudaMlpMaxChunkSize, "mlp_memory: chunk_size must be in 1..",
                    kCudaMlpMaxChunkSize, " for the CUDA kernels, got ", chunk_size);
  TORCH_CHECK_VALUE(q.dim() == 4 && q.size(3) <= kCudaMlpMaxDim, "mlp_memory: the CUDA kernels support D <= ",
                    kCudaMlpMaxDim, ", got q of shape ", q.sizes());
  // The batch is the grid's y dimension (heads its x, up to 2^31 - 1).
  TORCH_CHECK_VALUE(q.size(0) <= kCudaMaxGridYZ, "mlp_memory: the CUDA kernels support a batch of up to ",
                    kCudaMaxGridYZ, ", got q of shape ", q.sizes());
}

// The hidden block the kernels run with on `device`, or a ValueError naming the bytes of shared
// memory the smallest block needs and the device's limit.
template <class Choose, class Bytes>
int mlp_hidden_block(const char* op, const Choose& choose, const Bytes& bytes, const DeviceLimits& device,
                     int64_t chunk_size, const at::Tensor& q, int64_t hidden) {
  const int block = choose();
  TORCH_CHECK_VALUE(block > 0, op, ": chunk_size ", chunk_size, " with D = ", q.size(3), ", E * D = ", hidden,
                    " and ", q.scalar_type(), " inputs needs ", bytes(kMlpHiddenBlocks[3]),
                    " bytes of shared memory per block, more than the ", device.max_shared_bytes,
                    " this device allows; use a smaller chunk_size");
  return block;
}

// Validates, allocates the outputs and calls launch(params, input_type, hidden_block). The kernel
// reads q, k, v in their own dtype (o is written in it), gates and states in the compute dtype, and
// saves the chunk-start states (when save_states) in the inputs' dtype.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_memory_fwd_device(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& theta, const at::Tensor& eta,
    const at::Tensor& alpha, const at::Tensor& w1, const at::Tensor& w2, const std::optional<at::Tensor>& s1,
    const std::optional<at::Tensor>& s2, int64_t chunk_size, bool read_token, c10::string_view activation,
    bool save_states, int64_t objective, double p, double eps, const std::optional<at::Tensor>& delta,
    int64_t retention, double retention_q, const DeviceLimits& device, const Launch& launch) {
  TORCH_CHECK(w1.dim() == 4, "w1 must be [B, H, N, D], got ", w1.sizes());
  const int64_t hidden = w1.size(2);
  check_mlp_memory_args(q, k, v, theta, eta, alpha, w1, w2, s1, s2, hidden, chunk_size);
  check_mlp_device_limits(q, chunk_size);
  const InputType type = input_type(q);
  const auto dtype = compute_dtype(q);
  const auto state = [&](const std::optional<at::Tensor>& x) {
    return x ? std::optional<at::Tensor>(x->to(dtype).contiguous()) : std::nullopt;
  };
  const auto q_c = with_unit_inner_stride(q), k_c = with_unit_inner_stride(k), v_c = with_unit_inner_stride(v);
  const auto theta_c = theta.to(dtype), eta_c = eta.to(dtype), alpha_c = alpha.to(dtype);
  const auto w1_c = *state(w1), w2_c = *state(w2);
  const auto s1_c = state(s1), s2_c = state(s2), delta_c = state(delta);

  MlpMemoryParams params =
      mlp_memory_params(q_c, k_c, v_c, theta_c, eta_c, alpha_c, hidden, chunk_size, read_token, activation);
  params.miras = miras_params(objective, p, eps, delta_c, retention, retention_q, v);
  const int block = mlp_hidden_block(
      "mlp_memory_fwd", [&] { return mlp_memory_fwd_hidden_block(params, type, device); },
      [&](int b) { return mlp_memory_fwd_smem_bytes(params, type, b); }, device, chunk_size, q, hidden);
  params.w1_0_ptr = w1_c.data_ptr();
  params.w2_0_ptr = w2_c.data_ptr();
  params.s1_0_ptr = s1_c ? s1_c->data_ptr() : nullptr;
  params.s2_0_ptr = s2_c ? s2_c->data_ptr() : nullptr;

  const auto opts = q.options().dtype(dtype);
  auto o = at::empty(q.sizes(), q.options());
  auto w1_final = at::empty(w1.sizes(), opts), s1_final = at::empty(w1.sizes(), opts);
  auto w2_final = at::empty(w2.sizes(), opts), s2_final = at::empty(w2.sizes(), opts);
  auto chunk_states = save_states
      ? at::empty({params.batch, params.heads, params.n_chunks, 4, hidden * params.dim}, q.options())
      : at::empty({0}, q.options());
  params.o_ptr = o.data_ptr();
  params.w1_final_ptr = w1_final.data_ptr();
  params.w2_final_ptr = w2_final.data_ptr();
  params.s1_final_ptr = s1_final.data_ptr();
  params.s2_final_ptr = s2_final.data_ptr();
  params.chunk_states_ptr = save_states ? chunk_states.data_ptr() : nullptr;
  launch(params, type, block);
  return {o, w1_final, w2_final, s1_final, s2_final, chunk_states};
}

}  // namespace titans
