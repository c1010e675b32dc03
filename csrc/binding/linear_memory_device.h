// Binding of the device-layer linear_memory forward (csrc/cuda/linear_memory_fwd.cuh), shared by
// its two builds: the CUDA op (ops_cuda.cpp) and the emulation op (ops_emu.cpp). They differ
// only in how they launch. g++ only: includes ATen.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

#include "binding/tensor_params.h"
#include "cuda/linear_memory_fwd.h"

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

// Validates, allocates the outputs and calls launch(params, input_type). The kernel reads q, k, v
// in their own dtype (o is written in it) and gates and states in the compute dtype.
template <typename Launch>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_memory_fwd_device(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& theta, const at::Tensor& eta,
    const at::Tensor& alpha, const std::optional<at::Tensor>& m0, const std::optional<at::Tensor>& s0,
    int64_t chunk_size, bool read_token, bool save_states, const Launch& launch) {
  check_linear_memory_args(q, k, v, theta, eta, alpha, m0, s0, chunk_size);
  const InputType type = input_type(q);
  const auto dtype = compute_dtype(q);
  const auto q_c = with_unit_inner_stride(q), k_c = with_unit_inner_stride(k), v_c = with_unit_inner_stride(v);
  const auto theta_c = theta.to(dtype), eta_c = eta.to(dtype), alpha_c = alpha.to(dtype);
  const auto m0_c = m0 ? std::optional<at::Tensor>(m0->to(dtype).contiguous()) : std::nullopt;
  const auto s0_c = s0 ? std::optional<at::Tensor>(s0->to(dtype).contiguous()) : std::nullopt;
  LinearMemoryParams params =
      linear_memory_params(q_c, k_c, v_c, theta_c, eta_c, alpha_c, m0_c, s0_c, chunk_size, read_token);
  const auto out = linear_memory_fwd_outputs(params, q.options().dtype(dtype), q.scalar_type(), save_states);
  launch(params, type);
  return {out.o, out.m_final, out.s_final, out.chunk_states};
}

}  // namespace titans
