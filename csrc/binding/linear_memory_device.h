// Binding of the device-layer linear_memory kernels (csrc/cuda/linear_memory_{fwd,bwd}.cuh), shared
// by their two builds: the CUDA ops (ops_cuda.cpp) and the emulation ops (ops_emu.cpp). They differ
// only in how they launch. g++ only: includes ATen.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include "binding/tensor_params.h"
#include "cuda/linear_memory_bwd.h"

namespace titans {

inline InputType input_type(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return InputType::kFloat32;
    case at::kDouble: return InputType::kFloat64;
    case at::kBFloat16: return InputType::kBFloat16;
    case at::kHalf: return InputType::kFloat16;
    default: TORCH_CHECK(false, "linear_memory_fwd: q, k, v must be float32, float64, bfloat16 or float16, got ",
                         x.scalar_type());
  }
}

// The kernels' limits (linear_memory_fwd.h); titans_ext.linear_memory raises a ValueError for the
// first two before dispatch, this guards direct calls of the operators.
inline void check_device_limits(const at::Tensor& q, int64_t chunk_size) {
  TORCH_CHECK(chunk_size >= 1 && chunk_size <= kCudaMaxChunkSize, "linear_memory: chunk_size must be in 1..",
              kCudaMaxChunkSize, " for the CUDA kernels (16, 32 and 64 are the tuned sizes), got ", chunk_size);
  TORCH_CHECK(q.dim() == 4 && q.size(3) <= kCudaMaxKeyDim, "linear_memory: the CUDA kernels support Dk <= ",
              kCudaMaxKeyDim, ", got q of shape ", q.sizes());
  // Heads and batch are the grid's y and z dimensions.
  TORCH_CHECK(q.size(0) <= kCudaMaxGridYZ && q.size(2) <= kCudaMaxGridYZ, "linear_memory: the CUDA kernels support ",
              "batch and heads up to ", kCudaMaxGridYZ, " each, got q of shape ", q.sizes(),
              " (fold the batch into fewer, longer sequences or process it in parts)");
}

// Shared memory grows with chunk_size * Dk and with the dtype (fp64 doubles it).
inline void check_shared_memory(const char* op, size_t bytes, const DeviceLimits& device, int64_t chunk_size,
                                const at::Tensor& q) {
  TORCH_CHECK(bytes <= device.max_shared_bytes, op, ": chunk_size ", chunk_size, " with Dk ", q.size(3), " and ",
              q.scalar_type(), " inputs needs ", bytes, " bytes of shared memory per block, more than the ",
              device.max_shared_bytes, " this device allows; use a smaller chunk_size (or fp32 inputs)");
}

// Validates, allocates the outputs and the workspace, chooses the value tiles for the device and
// calls launch(params, workspace, input_type, tiles). The kernel reads q, k, v in their own dtype
// (o is written in it) and gates and states in the compute dtype.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_memory_fwd_device(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& theta, const at::Tensor& eta,
    const at::Tensor& alpha, const std::optional<at::Tensor>& m0, const std::optional<at::Tensor>& s0,
    int64_t chunk_size, bool read_token, bool save_states, const DeviceLimits& device, const Launch& launch) {
  check_linear_memory_args(q, k, v, theta, eta, alpha, m0, s0, chunk_size);
  check_device_limits(q, chunk_size);
  const InputType type = input_type(q);
  const auto dtype = compute_dtype(q);
  const auto q_c = with_unit_inner_stride(q), k_c = with_unit_inner_stride(k), v_c = with_unit_inner_stride(v);
  const auto theta_c = theta.to(dtype), eta_c = eta.to(dtype), alpha_c = alpha.to(dtype);
  const auto m0_c = m0 ? std::optional<at::Tensor>(m0->to(dtype).contiguous()) : std::nullopt;
  const auto s0_c = s0 ? std::optional<at::Tensor>(s0->to(dtype).contiguous()) : std::nullopt;
  LinearMemoryParams params =
      linear_memory_params(q_c, k_c, v_c, theta_c, eta_c, alpha_c, m0_c, s0_c, chunk_size, read_token);
  const ValueTiles tiles = linear_memory_fwd_tiles(params, type, device);
  check_shared_memory("linear_memory_fwd", linear_memory_fwd_smem_bytes(params, type, tiles), device, chunk_size, q);
  // The chunk-start states are written in every case: the output kernel reads them.
  const auto out = linear_memory_fwd_outputs(params, q.options().dtype(dtype), q.scalar_type(), true);
  const auto gate_rows = at::empty({linear_memory_gate_rows_elems(params)}, q.options().dtype(dtype));
  LinearMemoryFwdWorkspace workspace;
  workspace.gate_rows = gate_rows.data_ptr();
  launch(params, workspace, type, tiles);
  return {out.o, out.m_final, out.s_final, save_states ? out.chunk_states : at::empty({0}, out.m_final.options())};
}

using LinearMemoryGrads =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Validates, allocates the gradients and the workspace, and calls launch(params, workspace,
// input_type, tiles). Same output contract as the CPU op: dq, dk, dv in the input dtype,
// gate gradients in the gates' dtype, dm0 and ds0 in the compute dtype.
template <typename Launch>
LinearMemoryGrads linear_memory_bwd_device(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& theta, const at::Tensor& eta, const at::Tensor& alpha,
                                           const at::Tensor& chunk_states, const at::Tensor& d_o,
                                           const std::optional<at::Tensor>& d_m_final,
                                           const std::optional<at::Tensor>& d_s_final, int64_t chunk_size,
                                           bool read_token, const DeviceLimits& device, const Launch& launch) {
  check_linear_memory_args(q, k, v, theta, eta, alpha, d_m_final, d_s_final, chunk_size);
  check_device_limits(q, chunk_size);
  TORCH_CHECK(d_o.sizes() == v.sizes(), "linear_memory_bwd: d_o must have the shape of v / o");
  TORCH_CHECK(d_o.device() == q.device() && chunk_states.device() == q.device(),
              "linear_memory_bwd: d_o and chunk_states must be on the device of q");
  const InputType type = input_type(q);
  const auto dtype = compute_dtype(q);
  const auto q_c = with_unit_inner_stride(q), k_c = with_unit_inner_stride(k), v_c = with_unit_inner_stride(v);
  const auto d_o_c = with_unit_inner_stride(d_o.to(q.scalar_type()));
  const auto theta_c = theta.to(dtype), eta_c = eta.to(dtype), alpha_c = alpha.to(dtype);
  const auto dm_c = d_m_final ? std::optional<at::Tensor>(d_m_final->to(dtype).contiguous()) : std::nullopt;
  const auto ds_c = d_s_final ? std::optional<at::Tensor>(d_s_final->to(dtype).contiguous()) : std::nullopt;
  const auto states_c = chunk_states.to(dtype).contiguous();

  LinearMemoryBwdParams params;
  static_cast<LinearMemoryParams&>(params) = linear_memory_params(q_c, k_c, v_c, theta_c, eta_c, alpha_c, std::nullopt,
                                                                  std::nullopt, chunk_size, read_token);
  TORCH_CHECK(states_c.numel() == int64_t(params.batch) * params.heads * params.n_chunks * 2 * params.dv * params.dk,
              "linear_memory_bwd: chunk_states does not match the inputs (was the forward run with save_states?)");
  const ValueTiles tiles = linear_memory_bwd_tiles(params, type, device);
  check_shared_memory("linear_memory_bwd", linear_memory_bwd_smem_bytes(params, type, tiles), device, chunk_size, q);
  params.chunk_states_ptr = const_cast<void*>(states_c.data_ptr());
  params.d_o = token_tensor(d_o_c);
  params.d_m_final_ptr = dm_c ? dm_c->data_ptr() : nullptr;
  params.d_s_final_ptr = ds_c ? ds_c->data_ptr() : nullptr;

  // The kernels write dq, dk, dv in the input dtype and everything else in the compute dtype.
  const auto opts = q.options().dtype(dtype);
  const SequenceGrads g = allocate_sequence_grads(params, q, k, v, theta, std::nullopt, q.options(), opts);
  auto dm0 = at::empty({params.batch, params.heads, params.dv, params.dk}, opts), ds0 = at::empty_like(dm0);
  params.dm0_ptr = dm0.data_ptr();
  params.ds0_ptr = ds0.data_ptr();

  const LinearMemoryBwdWorkspaceSizes sizes = linear_memory_bwd_workspace_sizes(params, tiles.parallel);
  const auto dq_part = at::empty({sizes.dqk_part}, opts), dk_part = at::empty({sizes.dqk_part}, opts);
  const auto coef_part = at::empty({sizes.coef_part}, opts);
  const auto gate_rows = at::empty({sizes.gate_rows}, opts);
  const auto errors_local = at::empty({sizes.errors_local}, opts);
  const auto chunk_cotangents = at::empty({sizes.chunk_cotangents}, opts);
  LinearMemoryBwdWorkspace workspace;
  workspace.gate_rows = gate_rows.data_ptr();
  workspace.errors_local = errors_local.data_ptr();
  workspace.chunk_cotangents = chunk_cotangents.data_ptr();
  workspace.dq_part = dq_part.data_ptr();
  workspace.dk_part = dk_part.data_ptr();
  workspace.coef_part = coef_part.data_ptr();
  launch(params, workspace, type, tiles);
  return {g.dq, g.dk, g.dv, g.dtheta.to(theta.scalar_type()), g.deta.to(eta.scalar_type()),
          g.dalpha.to(alpha.scalar_type()), dm0, ds0};
}

}  // namespace titans
