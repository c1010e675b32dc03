// Binding of the device-layer linear_memory kernels (csrc/cuda/linear_memory_{fwd,bwd}.cuh), shared
// by their two builds: the CUDA ops (ops_cuda.cpp) and the emulation ops (ops_emu.cpp). They differ
// only in how they launch and in the device they describe. Stable ABI only, like tensor_params.h.
#pragma once

#include <optional>
#include <tuple>

#include "binding/packed_sequences.h"
#include "binding/tensor_params.h"
#include "cuda/linear_memory_bwd.h"

namespace titans {

inline InputType input_type(ScalarType dtype) {
  switch (dtype) {
    case ScalarType::Float: return InputType::kFloat32;
    case ScalarType::Double: return InputType::kFloat64;
    case ScalarType::BFloat16: return InputType::kBFloat16;
    case ScalarType::Half: return InputType::kFloat16;
    default:
      STD_TORCH_CHECK(false, "linear_memory: q, k, v must be float32, float64, bfloat16 or float16, got ", dtype);
      return InputType::kFloat32;  // not reached
  }
}
inline InputType input_type(const Tensor& x) { return input_type(x.scalar_type()); }

// The kernels' limits (linear_memory_fwd.h); titans_ext.linear_memory raises a ValueError for the
// first two before dispatch, this guards direct calls of the operators.
inline void check_device_limits(const Tensor& q, int64_t chunk_size, const DeviceSequences& sequences) {
  STD_TORCH_CHECK(chunk_size >= 1 && chunk_size <= kCudaMaxChunkSize, "linear_memory: chunk_size must be in 1..",
                  kCudaMaxChunkSize, " for the CUDA kernels (16, 32 and 64 are the tuned sizes), got ", chunk_size);
  STD_TORCH_CHECK(q.dim() == 4 && q.size(3) <= kCudaMaxKeyDim, "linear_memory: the CUDA kernels support Dk <= ",
                  kCudaMaxKeyDim, ", got q of shape ", shape_str(q));
  // Heads and batch are the grid's y and z dimensions.
  STD_TORCH_CHECK(q.size(0) <= kCudaMaxGridYZ && q.size(2) <= kCudaMaxGridYZ,
                  "linear_memory: the CUDA kernels support batch and heads up to ", kCudaMaxGridYZ,
                  " each, got q of shape ", shape_str(q),
                  " (fold the batch into fewer, longer sequences or process it in parts)");
  STD_TORCH_CHECK(sequences.n_seqs() <= kCudaMaxGridYZ, "linear_memory: the CUDA kernels support up to ",
                  kCudaMaxGridYZ, " packed sequences, got ", sequences.n_seqs(), " (process them in parts)");
}

// Shared memory grows with chunk_size * Dk and with the dtype (fp64 doubles it).
inline void check_shared_memory(const char* op, const LaunchPlan& plan, const DeviceLimits& device,
                                int64_t chunk_size, const Tensor& q) {
  const size_t bytes = plan.smem_bytes();
  STD_TORCH_CHECK(plan.fits && bytes <= device.max_shared_bytes, op, ": chunk_size ", chunk_size, " with Dk ",
                  q.size(3), " and ", q.scalar_type(), " inputs needs ", bytes,
                  " bytes of shared memory per block, more than the ", device.max_shared_bytes,
                  " this device allows; use a smaller chunk_size");
}

// Validates, allocates the outputs, plans the launch for the device and calls launch(params,
// input_type, plan). The kernel reads q, k, v in their own dtype (o is written in it), gates,
// states and delta in the compute dtype, and writes the checkpoints (chunk_states) in q's dtype when
// save_states; otherwise it allocates none.
template <typename Launch>
std::tuple<Tensor, Tensor, Tensor, Tensor> linear_memory_fwd_device(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta, const Tensor& eta, const Tensor& alpha,
    const std::optional<Tensor>& m0, const std::optional<Tensor>& s0, int64_t chunk_size, bool read_token,
    bool save_states, int64_t objective, double p, double eps, const std::optional<Tensor>& delta,
    int64_t retention, double retention_q, const DeviceSequences& sequences, const DeviceLimits& device,
    const Launch& launch) {
  check_linear_memory_args(q, k, v, theta, eta, alpha, m0, s0, chunk_size, sequences.n_seqs());
  check_device_limits(q, chunk_size, sequences);
  const InputType type = input_type(q);
  const ScalarType dtype = compute_dtype(q);
  const Tensor q_c = with_unit_inner_stride(q), k_c = with_unit_inner_stride(k), v_c = with_unit_inner_stride(v);
  const Tensor theta_c = to_dtype(theta, dtype), eta_c = to_dtype(eta, dtype), alpha_c = to_dtype(alpha, dtype);
  const auto m0_c = contiguous_in(m0, dtype), s0_c = contiguous_in(s0, dtype), delta_c = contiguous_in(delta, dtype);
  LinearMemoryParams params =
      linear_memory_params(q_c, k_c, v_c, theta_c, eta_c, alpha_c, m0_c, s0_c, chunk_size, read_token);
  sequences.apply(params);
  params.miras = miras_params(objective, p, eps, delta_c, retention, retention_q, v);
  const LinearMemoryFwdPlan plan = linear_memory_fwd_plan(params, type, device, save_states, m0_c || s0_c);
  check_shared_memory("linear_memory_fwd", plan, device, chunk_size, q);
  auto out = linear_memory_fwd_outputs(params, q, dtype, q.scalar_type(), save_states,
                                       linear_memory_checkpoints(params, type));
  // Packed, the checkpoint entries no sequence uses are zeros: an op's outputs must not depend on
  // uninitialized memory (one more write of the checkpoints, only with cu_seqlens).
  if (sequences.packed() && save_states) torch::stable::zero_(out.chunk_states);
  launch(params, type, plan);
  return {out.o, out.m_final, out.s_final, out.chunk_states};
}

using LinearMemoryGrads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// Validates, allocates the gradients and the plan's buffer (the group cotangents, when the plan has
// several groups: one allocation), and calls launch(params, input_type, plan, workspace). Same
// output contract as the CPU op: dq, dk, dv in the input dtype, gate gradients in the gates'
// dtype, dm0 and ds0 in the compute dtype, d_delta in delta's (an empty [0] without delta). chunk_states: the forward's checkpoints (q's dtype).
template <typename Launch>
LinearMemoryGrads linear_memory_bwd_device(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta,
                                           const Tensor& eta, const Tensor& alpha, const Tensor& chunk_states,
                                           const Tensor& d_o, const std::optional<Tensor>& d_m_final,
                                           const std::optional<Tensor>& d_s_final, int64_t chunk_size,
                                           bool read_token, int64_t objective, double p, double eps,
                                           const std::optional<Tensor>& delta, int64_t retention,
                                           double retention_q, const DeviceSequences& sequences,
                                           const DeviceLimits& device, const Launch& launch) {
  check_linear_memory_args(q, k, v, theta, eta, alpha, d_m_final, d_s_final, chunk_size, sequences.n_seqs());
  check_device_limits(q, chunk_size, sequences);
  STD_TORCH_CHECK(same_shape(d_o, v), "linear_memory_bwd: d_o must have the shape of v / o");
  STD_TORCH_CHECK(d_o.device() == q.device() && chunk_states.device() == q.device(),
                  "linear_memory_bwd: d_o and chunk_states must be on the device of q");
  const InputType type = input_type(q);
  const ScalarType dtype = compute_dtype(q);
  const Tensor q_c = with_unit_inner_stride(q), k_c = with_unit_inner_stride(k), v_c = with_unit_inner_stride(v);
  const Tensor d_o_c = with_unit_inner_stride(to_dtype(d_o, q.scalar_type()));
  const Tensor theta_c = to_dtype(theta, dtype), eta_c = to_dtype(eta, dtype), alpha_c = to_dtype(alpha, dtype);
  const auto dm_c = contiguous_in(d_m_final, dtype), ds_c = contiguous_in(d_s_final, dtype);
  const auto delta_c = contiguous_in(delta, dtype);
  const Tensor states_c = torch::stable::contiguous(to_dtype(chunk_states, q.scalar_type()));

  LinearMemoryBwdParams params;
  static_cast<LinearMemoryParams&>(params) = linear_memory_params(q_c, k_c, v_c, theta_c, eta_c, alpha_c, std::nullopt,
                                                                  std::nullopt, chunk_size, read_token);
  sequences.apply(params);
  params.miras = miras_params(objective, p, eps, delta_c, retention, retention_q, v);
  STD_TORCH_CHECK(states_c.numel() == int64_t(params.batch) * params.heads * linear_memory_checkpoints(params, type) *
                                          2 * params.dv * params.dk,
                  "linear_memory_bwd: chunk_states does not match the inputs (was the forward run with save_states?)");
  const LinearMemoryBwdPlan plan = linear_memory_bwd_plan(params, type, device, dm_c || ds_c);
  check_shared_memory("linear_memory_bwd", plan, device, chunk_size, q);
  params.chunk_states_ptr = states_c.data_ptr();
  params.d_o = token_tensor(d_o_c);
  params.d_m_final_ptr = data_or_null(dm_c);
  params.d_s_final_ptr = data_or_null(ds_c);

  // The kernels write dq, dk, dv in the input dtype and everything else in the compute dtype.
  const SequenceGrads g = allocate_sequence_grads(params, q, k, v, theta, delta_c, std::nullopt, dtype);
  const Tensor dm0 = empty_on(q, {params.n_seqs, params.heads, params.dv, params.dk}, dtype);
  const Tensor ds0 = torch::stable::empty_like(dm0);
  params.dm0_ptr = dm0.data_ptr();
  params.ds0_ptr = ds0.data_ptr();

  const Tensor buffer = empty_on(q, {plan.buffer_bytes()}, ScalarType::Byte);
  LinearMemoryBwdWorkspace workspace;
  workspace.group_cotangents = plan.n_buffers > 0 ? buffer.data_ptr() : nullptr;
  launch(params, type, plan, workspace);
  return {g.dq, g.dk, g.dv, to_dtype(g.dtheta, theta.scalar_type()), to_dtype(g.deta, eta.scalar_type()),
          to_dtype(g.dalpha, alpha.scalar_type()), dm0, ds0,
          delta ? to_dtype(g.d_delta, delta->scalar_type()) : g.d_delta};
}

}  // namespace titans
