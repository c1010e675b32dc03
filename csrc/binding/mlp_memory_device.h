// Binding of the device-layer mlp_memory kernels (csrc/cuda/mlp_memory_{fwd,bwd}.cuh), shared by their
// two builds: the CUDA ops (ops_cuda.cpp) and the emulation ops (ops_emu.cpp). They differ only in
// how they launch and in the device they describe. Stable ABI only, like tensor_params.h.
#pragma once

#include <optional>
#include <string_view>
#include <tuple>

#include "binding/linear_memory_device.h"  // input_type
#include "binding/tensor_params.h"
#include "cuda/mlp_memory.h"

namespace titans {

// The kernels' limits (mlp_memory.h); titans_ext.mlp_memory raises a ValueError for them before
// dispatch, this guards direct calls of the operators.
inline void check_mlp_device_limits(const Tensor& q, int64_t chunk_size, const DeviceSequences& sequences) {
  STD_TORCH_CHECK(chunk_size >= 1 && chunk_size <= kCudaMlpMaxChunkSize, "mlp_memory: chunk_size must be in 1..",
                  kCudaMlpMaxChunkSize, " for the CUDA kernels, got ", chunk_size);
  STD_TORCH_CHECK(q.dim() == 4 && q.size(3) <= kCudaMlpMaxDim, "mlp_memory: the CUDA kernels support D <= ",
                  kCudaMlpMaxDim, ", got q of shape ", shape_str(q));
  // The batch is the grid's y dimension (heads its x, up to 2^31 - 1).
  STD_TORCH_CHECK(q.size(0) <= kCudaMaxGridYZ, "mlp_memory: the CUDA kernels support a batch of up to ",
                  kCudaMaxGridYZ, ", got q of shape ", shape_str(q));
  STD_TORCH_CHECK(sequences.n_seqs() <= kCudaMaxGridYZ, "mlp_memory: the CUDA kernels support up to ",
                  kCudaMaxGridYZ, " packed sequences, got ", sequences.n_seqs(), " (process them in parts)");
}

// The message of a configuration whose narrowest hidden block does not fit the device (the Python
// op raises it as a ValueError before dispatch, from mlp_memory_plan).
inline void check_mlp_hidden_block(const char* op, int block, size_t needed, const DeviceLimits& device,
                                   int64_t chunk_size, const Tensor& q, int64_t hidden) {
  STD_TORCH_CHECK(block > 0, op, ": chunk_size ", chunk_size, " with D = ", q.size(3), ", E * D = ", hidden, " and ",
                  q.scalar_type(), " inputs needs ", needed, " bytes of shared memory per block, more than the ",
                  device.max_shared_bytes, " this device allows; use a smaller chunk_size");
}

// What the launchers choose on a device with max_shared_bytes of shared memory per block: (forward
// hidden block, its bytes, backward hidden block, its bytes); a block of 0 means that none fits, and
// the bytes are then those of the narrowest block.
inline std::tuple<int64_t, int64_t, int64_t, int64_t> mlp_memory_plan(int64_t dim, int64_t hidden, int64_t chunk_size,
                                                                      ScalarType dtype, bool read_token,
                                                                      int64_t retention, int64_t max_shared_bytes) {
  STD_TORCH_CHECK(dim >= 1 && hidden >= 1 && chunk_size >= 1, "mlp_memory_plan: sizes must be >= 1");
  STD_TORCH_CHECK(retention >= 0 && retention <= int64_t(RetentionKind::kl), "mlp_memory_plan: unknown retention");
  MlpMemoryParams params;
  params.dim = int(dim), params.hidden = int(hidden), params.chunk_size = int(chunk_size);
  params.read_token = read_token;
  params.miras.retention = RetentionKind(retention);
  InputType type = InputType::kFloat32;
  switch (dtype) {
    case ScalarType::Double: type = InputType::kFloat64; break;
    case ScalarType::BFloat16: type = InputType::kBFloat16; break;
    case ScalarType::Half: type = InputType::kFloat16; break;
    case ScalarType::Float: break;
    default: STD_TORCH_CHECK(false, "mlp_memory_plan: dtype must be float32, float64, bfloat16 or float16");
  }
  // The hidden block depends only on the shared memory one block may have.
  const DeviceLimits device = {1, size_t(max_shared_bytes), size_t(max_shared_bytes)};
  const int fwd = mlp_memory_fwd_hidden_block(params, type, device);
  const int bwd = mlp_memory_bwd_hidden_block(params, type, device);
  const int narrowest = kMlpHiddenBlocks[3];
  return {fwd, int64_t(mlp_memory_fwd_smem_bytes(params, type, fwd ? fwd : narrowest)), bwd,
          int64_t(mlp_memory_bwd_smem_bytes(params, type, bwd ? bwd : narrowest))};
}

// Validates, allocates the outputs and calls launch(params, input_type, hidden_block). The kernel
// reads q, k, v in their own dtype (o is written in it), gates and states in the compute dtype, and
// saves the chunk-start states (when save_states) in the inputs' dtype.
template <typename Launch>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mlp_memory_fwd_device(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta, const Tensor& eta, const Tensor& alpha,
    const Tensor& w1, const Tensor& w2, const std::optional<Tensor>& s1, const std::optional<Tensor>& s2,
    int64_t chunk_size, bool read_token, std::string_view activation, bool save_states, int64_t objective, double p,
    double eps, const std::optional<Tensor>& delta, int64_t retention, double retention_q,
    const DeviceSequences& sequences, const DeviceLimits& device, const Launch& launch) {
  STD_TORCH_CHECK(w1.dim() == 4, "w1 must be [B, H, N, D], got ", shape_str(w1));
  const int64_t hidden = w1.size(2);
  check_mlp_memory_args(q, k, v, theta, eta, alpha, w1, w2, s1, s2, hidden, chunk_size, sequences.n_seqs());
  check_mlp_device_limits(q, chunk_size, sequences);
  const InputType type = input_type(q);
  const ScalarType dtype = compute_dtype(q);
  const Tensor q_c = with_unit_inner_stride(q), k_c = with_unit_inner_stride(k), v_c = with_unit_inner_stride(v);
  const Tensor theta_c = to_dtype(theta, dtype), eta_c = to_dtype(eta, dtype), alpha_c = to_dtype(alpha, dtype);
  const Tensor w1_c = *contiguous_in(w1, dtype), w2_c = *contiguous_in(w2, dtype);
  const auto s1_c = contiguous_in(s1, dtype), s2_c = contiguous_in(s2, dtype), delta_c = contiguous_in(delta, dtype);

  MlpMemoryParams params =
      mlp_memory_params(q_c, k_c, v_c, theta_c, eta_c, alpha_c, hidden, chunk_size, read_token, activation);
  sequences.apply(params);
  params.miras = miras_params(objective, p, eps, delta_c, retention, retention_q, v);
  const int block = mlp_memory_fwd_hidden_block(params, type, device);
  check_mlp_hidden_block("mlp_memory_fwd", block, mlp_memory_fwd_smem_bytes(params, type, kMlpHiddenBlocks[3]),
                         device, chunk_size, q, hidden);
  params.w1_0_ptr = w1_c.data_ptr();
  params.w2_0_ptr = w2_c.data_ptr();
  params.s1_0_ptr = data_or_null(s1_c);
  params.s2_0_ptr = data_or_null(s2_c);

  const Tensor o = empty_on(q, q.sizes(), q.scalar_type());
  const Tensor w1_final = empty_on(q, w1.sizes(), dtype), s1_final = empty_on(q, w1.sizes(), dtype);
  const Tensor w2_final = empty_on(q, w2.sizes(), dtype), s2_final = empty_on(q, w2.sizes(), dtype);
  Tensor chunk_states = save_states ? empty_on(q,
                                              {params.batch, params.heads, sequence_units(params, 1), 4,
                                               hidden * params.dim},
                                              q.scalar_type())
                                    : empty_on(q, {0}, q.scalar_type());
  // Packed, the entries no sequence uses are zeros (linear_memory_fwd_device).
  if (sequences.packed() && save_states) torch::stable::zero_(chunk_states);
  params.o_ptr = o.data_ptr();
  params.w1_final_ptr = w1_final.data_ptr();
  params.w2_final_ptr = w2_final.data_ptr();
  params.s1_final_ptr = s1_final.data_ptr();
  params.s2_final_ptr = s2_final.data_ptr();
  params.chunk_states_ptr = save_states ? chunk_states.data_ptr() : nullptr;
  launch(params, type, block);
  return {o, w1_final, w2_final, s1_final, s2_final, chunk_states};
}

using MlpMemoryGrads =
    std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// Validates, allocates the gradients and the workspace, and calls launch(params, workspace,
// input_type, hidden_block). Same output contract as the CPU op: dq, dk, dv in the inputs' dtype,
// the gates' and delta's gradients in their dtypes, the initial state's in the compute dtype.
// chunk_states: the forward's, in the inputs' dtype.
template <typename Launch>
MlpMemoryGrads mlp_memory_bwd_device(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta,
                                     const Tensor& eta, const Tensor& alpha, const Tensor& chunk_states,
                                     const Tensor& d_o, const std::optional<Tensor>& d_w1_final,
                                     const std::optional<Tensor>& d_w2_final, const std::optional<Tensor>& d_s1_final,
                                     const std::optional<Tensor>& d_s2_final, int64_t hidden, int64_t chunk_size,
                                     bool read_token, std::string_view activation, int64_t objective, double p,
                                     double eps, const std::optional<Tensor>& delta, int64_t retention,
                                     double retention_q, const DeviceSequences& sequences,
                                     const DeviceLimits& device, const Launch& launch) {
  check_mlp_memory_args(q, k, v, theta, eta, alpha, d_w1_final, d_w2_final, d_s1_final, d_s2_final, hidden,
                        chunk_size, sequences.n_seqs());
  check_mlp_device_limits(q, chunk_size, sequences);
  STD_TORCH_CHECK(same_shape(d_o, q), "mlp_memory_bwd: d_o must have the shape of q / o");
  STD_TORCH_CHECK(d_o.device() == q.device() && chunk_states.device() == q.device(),
                  "mlp_memory_bwd: d_o and chunk_states must be on the device of q");
  const InputType type = input_type(q);
  const ScalarType dtype = compute_dtype(q);
  const Tensor q_c = with_unit_inner_stride(q), k_c = with_unit_inner_stride(k), v_c = with_unit_inner_stride(v);
  const Tensor d_o_c = with_unit_inner_stride(to_dtype(d_o, q.scalar_type()));
  const Tensor theta_c = to_dtype(theta, dtype), eta_c = to_dtype(eta, dtype), alpha_c = to_dtype(alpha, dtype);
  const auto dw1_c = contiguous_in(d_w1_final, dtype), dw2_c = contiguous_in(d_w2_final, dtype);
  const auto ds1_c = contiguous_in(d_s1_final, dtype), ds2_c = contiguous_in(d_s2_final, dtype);
  const auto delta_c = contiguous_in(delta, dtype);
  const Tensor states_c = torch::stable::contiguous(to_dtype(chunk_states, q.scalar_type()));

  MlpMemoryBwdParams params;
  static_cast<MlpMemoryParams&>(params) =
      mlp_memory_params(q_c, k_c, v_c, theta_c, eta_c, alpha_c, hidden, chunk_size, read_token, activation);
  sequences.apply(params);
  params.miras = miras_params(objective, p, eps, delta_c, retention, retention_q, v);
  STD_TORCH_CHECK(states_c.numel() ==
                      int64_t(params.batch) * params.heads * sequence_units(params, 1) * 4 * hidden * params.dim,
                  "mlp_memory_bwd: chunk_states does not match the inputs (was the forward run with save_states?)");
  const int block = mlp_memory_bwd_hidden_block(params, type, device);
  check_mlp_hidden_block("mlp_memory_bwd", block, mlp_memory_bwd_smem_bytes(params, type, kMlpHiddenBlocks[3]),
                         device, chunk_size, q, hidden);
  params.chunk_states_ptr = states_c.data_ptr();
  params.d_o = token_tensor(d_o_c);
  params.d_w1_final_ptr = data_or_null(dw1_c);
  params.d_w2_final_ptr = data_or_null(dw2_c);
  params.d_s1_final_ptr = data_or_null(ds1_c);
  params.d_s2_final_ptr = data_or_null(ds2_c);

  // The kernels write dq, dk, dv in the input dtype and everything else in the compute dtype.
  const SequenceGrads g = allocate_sequence_grads(params, q, k, v, theta, delta_c, std::nullopt, dtype);
  const Tensor dw1 = empty_on(q, {params.n_seqs, params.heads, hidden, params.dim}, dtype);
  const Tensor dw2 = empty_on(q, {params.n_seqs, params.heads, params.dim, hidden}, dtype);
  const Tensor ds1 = torch::stable::empty_like(dw1), ds2 = torch::stable::empty_like(dw2);
  params.dw1_0_ptr = dw1.data_ptr();
  params.dw2_0_ptr = dw2.data_ptr();
  params.ds1_0_ptr = ds1.data_ptr();
  params.ds2_0_ptr = ds2.data_ptr();

  const MlpMemoryBwdWorkspaceSizes sizes = mlp_memory_bwd_workspace_sizes(params);
  const Tensor hidden_grads = empty_on(q, {sizes.hidden_grads}, dtype);
  const Tensor token_grads = empty_on(q, {sizes.token_grads}, dtype);
  const Tensor start_state = empty_on(q, {sizes.start_state}, q.scalar_type());
  MlpMemoryBwdWorkspace workspace;
  workspace.hidden_grads = hidden_grads.data_ptr();
  workspace.token_grads = token_grads.data_ptr();
  workspace.start_state = start_state.data_ptr();
  launch(params, workspace, type, block);
  return {g.dq,
          g.dk,
          g.dv,
          to_dtype(g.dtheta, theta.scalar_type()),
          to_dtype(g.deta, eta.scalar_type()),
          to_dtype(g.dalpha, alpha.scalar_type()),
          dw1,
          dw2,
          ds1,
          ds2,
          delta ? to_dtype(g.d_delta, delta->scalar_type()) : g.d_delta};
}

}  // namespace titans
