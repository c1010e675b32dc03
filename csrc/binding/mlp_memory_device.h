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

using MlpMemoryGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                  at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Validates, allocates the gradients and the workspace, and calls launch(params, workspace,
// input_type, hidden_block). Same output contract as the CPU op: dq, dk, dv in the inputs' dtype,
// the gates' and delta's gradients in their dtypes, the initial state's in the compute dtype.
// chunk_states: the forward's, in the inputs' dtype.
template <typename Launch>
MlpMemoryGrads mlp_memory_bwd_device(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& theta, const at::Tensor& eta, const at::Tensor& alpha,
                                     const at::Tensor& chunk_states, const at::Tensor& d_o,
                                     const std::optional<at::Tensor>& d_w1_final,
                                     const std::optional<at::Tensor>& d_w2_final,
                                     const std::optional<at::Tensor>& d_s1_final,
                                     const std::optional<at::Tensor>& d_s2_final, int64_t hidden, int64_t chunk_size,
                                     bool read_token, c10::string_view activation, int64_t objective, double p,
                                     double eps, const std::optional<at::Tensor>& delta, int64_t retention,
                                     double retention_q, const DeviceLimits& device, const Launch& launch) {
  check_mlp_memory_args(q, k, v, theta, eta, alpha, d_w1_final, d_w2_final, d_s1_final, d_s2_final, hidden,
                        chunk_size);
  check_mlp_device_limits(q, chunk_size);
  TORCH_CHECK(d_o.sizes() == q.sizes(), "mlp_memory_bwd: d_o must have the shape of q / o");
  TORCH_CHECK(d_o.device() == q.device() && chunk_states.device() == q.device(),
              "mlp_memory_bwd: d_o and chunk_states must be on the device of q");
  const InputType type = input_type(q);
  const auto dtype = compute_dtype(q);
  const auto state = [&](const std::optional<at::Tensor>& x) {
    return x ? std::optional<at::Tensor>(x->to(dtype).contiguous()) : std::nullopt;
  };
  const auto q_c = with_unit_inner_stride(q), k_c = with_unit_inner_stride(k), v_c = with_unit_inner_stride(v);
  const auto d_o_c = with_unit_inner_stride(d_o.to(q.scalar_type()));
  const auto theta_c = theta.to(dtype), eta_c = eta.to(dtype), alpha_c = alpha.to(dtype);
  const auto dw1_c = state(d_w1_final), dw2_c = state(d_w2_final), ds1_c = state(d_s1_final);
  const auto ds2_c = state(d_s2_final), delta_c = state(delta);
  const auto states_c = chunk_states.to(q.scalar_type()).contiguous();

  MlpMemoryBwdParams params;
  static_cast<MlpMemoryParams&>(params) =
      mlp_memory_params(q_c, k_c, v_c, theta_c, eta_c, alpha_c, hidden, chunk_size, read_token, activation);
  params.miras = miras_params(objective, p, eps, delta_c, retention, retention_q, v);
  TORCH_CHECK(states_c.numel() == int64_t(params.batch) * params.heads * params.n_chunks * 4 * hidden * params.dim,
              "mlp_memory_bwd: chunk_states does not match the inputs (was the forward run with save_states?)");
  const int block = mlp_hidden_block(
      "mlp_memory_bwd", [&] { return mlp_memory_bwd_hidden_block(params, type, device); },
      [&](int b) { return mlp_memory_bwd_smem_bytes(params, type, b); }, device, chunk_size, q, hidden);
  params.chunk_states_ptr = const_cast<void*>(states_c.data_ptr());
  params.d_o = token_tensor(d_o_c);
  params.d_w1_final_ptr = dw1_c ? dw1_c->data_ptr() : nullptr;
  params.d_w2_final_ptr = dw2_c ? dw2_c->data_ptr() : nullptr;
  params.d_s1_final_ptr = ds1_c ? ds1_c->data_ptr() : nullptr;
  params.d_s2_final_ptr = ds2_c ? ds2_c->data_ptr() : nullptr;

  const auto opts = q.options().dtype(dtype);
  const SequenceGrads g = allocate_sequence_grads(params, q, k, v, theta, delta_c, q.options(), opts);
  auto dw1 = at::empty({params.batch, params.heads, hidden, params.dim}, opts), ds1 = at::empty_like(dw1);
  auto dw2 = at::empty({params.batch, params.heads, params.dim, hidden}, opts), ds2 = at::empty_like(dw2);
  params.dw1_0_ptr = dw1.data_ptr();
  params.dw2_0_ptr = dw2.data_ptr();
  params.ds1_0_ptr = ds1.data_ptr();
  params.ds2_0_ptr = ds2.data_ptr();

  const MlpMemoryBwdWorkspaceSizes sizes = mlp_memory_bwd_workspace_sizes(params);
  const auto hidden_grads = at::empty({sizes.hidden_grads}, opts), token_grads = at::empty({sizes.token_grads}, opts);
  const auto start_state = at::empty({sizes.start_state}, q.options());
  MlpMemoryBwdWorkspace workspace;
  workspace.hidden_grads = hidden_grads.data_ptr();
  workspace.token_grads = token_grads.data_ptr();
  workspace.start_state = start_state.data_ptr();
  launch(params, workspace, type, block);
  return {g.dq,
          g.dk,
          g.dv,
          g.dtheta.to(theta.scalar_type()),
          g.deta.to(eta.scalar_type()),
          g.dalpha.to(alpha.scalar_type()),
          dw1,
          dw2,
          ds1,
          ds2,
          delta ? g.d_delta.to(delta->scalar_type()) : g.d_delta};
}

}  // namespace titans
