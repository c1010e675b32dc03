// Tensor -> params-struct helpers shared by the CPU and CUDA bindings (g++ only: includes ATen).
#pragma once

#include <optional>
#include <string>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include "titans_params.h"

namespace titans {

// Kernels compute in fp32 (fp64 when q is fp64) and keep gates and state in that type.
inline at::ScalarType compute_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Kernels index every per-token tensor by (batch, seq, head) strides and read the feature
// dimension contiguously; other layouts (e.g. slices of a larger buffer) are kept as views.
inline at::Tensor with_unit_inner_stride(const at::Tensor& x) {
  return x.size(-1) <= 1 || x.stride(-1) == 1 ? x : x.contiguous();
}

// A [B, T, H, D] or [B, T, H] tensor as the kernels see it.
inline TokenTensor token_tensor(const at::Tensor& x) {
  TokenTensor t;
  t.ptr = const_cast<void*>(x.data_ptr());
  t.batch_stride = x.stride(0);
  t.seq_stride = x.stride(1);
  t.head_stride = x.stride(2);
  return t;
}

inline void check_state(const char* name, const std::optional<at::Tensor>& x, int64_t B, int64_t H, int64_t Dv,
                        int64_t Dk, const at::Device& device) {
  if (!x) return;
  TORCH_CHECK(x->dim() == 4 && x->size(0) == B && x->size(1) == H && x->size(2) == Dv && x->size(3) == Dk, name,
              " must have shape [B, H, Dv, Dk] = [", B, ", ", H, ", ", Dv, ", ", Dk, "], got ", x->sizes());
  TORCH_CHECK(x->device() == device, name, " must be on ", device, ", got ", x->device());
}

inline void check_linear_memory_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& theta, const at::Tensor& eta, const at::Tensor& alpha,
                                     const std::optional<at::Tensor>& m, const std::optional<at::Tensor>& s,
                                     int64_t chunk_size) {
  TORCH_CHECK(q.dim() == 4, "q must be [B, T, H, Dk], got ", q.sizes());
  const auto B = q.size(0), T = q.size(1), H = q.size(2), Dk = q.size(3);
  TORCH_CHECK(k.sizes() == q.sizes(), "k must have the shape of q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.dim() == 4 && v.size(0) == B && v.size(1) == T && v.size(2) == H,
              "v must be [B, T, H, Dv] with B, T, H of q, got ", v.sizes());
  for (const auto* g : {&theta, &eta, &alpha})
    TORCH_CHECK(g->dim() == 3 && g->size(0) == B && g->size(1) == T && g->size(2) == H,
                "gates must be [B, T, H] = [", B, ", ", T, ", ", H, "], got ", g->sizes());
  for (const auto* x : {&k, &v, &theta, &eta, &alpha})
    TORCH_CHECK(x->device() == q.device(), "all inputs must be on the device of q (", q.device(), ")");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k, v must have one dtype");
  TORCH_CHECK(chunk_size >= 1, "chunk_size must be >= 1, got ", chunk_size);
  check_state("initial or final state", m, B, H, v.size(3), Dk, q.device());
  check_state("initial or final state", s, B, H, v.size(3), Dk, q.device());
}

// The fields every memory's params share (SequenceParams) but the MIRAS options.
inline void fill_sequence_params(SequenceParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& theta, const at::Tensor& eta, const at::Tensor& alpha,
                                 int64_t chunk_size, bool read_token) {
  p.batch = int(q.size(0));
  p.seqlen = int(q.size(1));
  p.heads = int(q.size(2));
  p.chunk_size = int(chunk_size);
  p.n_chunks = int((p.seqlen + chunk_size - 1) / chunk_size);
  p.read_token = read_token;
  p.q = token_tensor(q);
  p.k = token_tensor(k);
  p.v = token_tensor(v);
  p.theta = token_tensor(theta);
  p.eta = token_tensor(eta);
  p.alpha = token_tensor(alpha);
}

// The gradients of the per-token inputs, which every memory's backward returns.
struct SequenceGrads {
  at::Tensor dq, dk, dv, dtheta, deta, dalpha, d_delta;
};

// Allocates the per-token input gradients and points `g` at them: dq, dk, dv like q, k, v with
// token_options; the gates' and delta's with gate_options (d_delta: an empty [0] without delta).
inline SequenceGrads allocate_sequence_grads(SequenceGradParams& g, const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, const at::Tensor& theta,
                                             const std::optional<at::Tensor>& delta,
                                             const at::TensorOptions& token_options,
                                             const at::TensorOptions& gate_options) {
  SequenceGrads out;
  out.dq = at::empty(q.sizes(), token_options);
  out.dk = at::empty(k.sizes(), token_options);
  out.dv = at::empty(v.sizes(), token_options);
  out.dtheta = at::empty(theta.sizes(), gate_options);
  out.deta = at::empty(theta.sizes(), gate_options);
  out.dalpha = at::empty(theta.sizes(), gate_options);
  out.d_delta = delta ? at::empty(delta->sizes(), gate_options) : at::empty({0}, gate_options);
  g.dq_ptr = out.dq.data_ptr();
  g.dk_ptr = out.dk.data_ptr();
  g.dv_ptr = out.dv.data_ptr();
  g.dtheta_ptr = out.dtheta.data_ptr();
  g.deta_ptr = out.deta.data_ptr();
  g.dalpha_ptr = out.dalpha.data_ptr();
  g.d_delta_ptr = delta ? out.d_delta.data_ptr() : nullptr;
  return out;
}

// Sizes and input pointers; outputs are set by the caller. States must be contiguous.
inline LinearMemoryParams linear_memory_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& theta, const at::Tensor& eta,
                                               const at::Tensor& alpha, const std::optional<at::Tensor>& m0,
                                               const std::optional<at::Tensor>& s0, int64_t chunk_size,
                                               bool read_token) {
  LinearMemoryParams p;
  fill_sequence_params(p, q, k, v, theta, eta, alpha, chunk_size, read_token);
  p.dk = int(q.size(3));
  p.dv = int(v.size(3));
  p.m0_ptr = m0 ? m0->data_ptr() : nullptr;
  p.s0_ptr = s0 ? s0->data_ptr() : nullptr;
  return p;
}

// The MIRAS arguments of the schemas as kernel parameters. delta (when the objective has one) must
// already be contiguous [B, T, H, Dv] in the compute dtype; the caller keeps it alive.
inline MirasParams miras_params(int64_t objective, double p, double eps, const std::optional<at::Tensor>& delta,
                                int64_t retention, double q, const at::Tensor& v) {
  TORCH_CHECK(objective >= 0 && objective <= int64_t(ObjectiveKind::yaad), "objective: unknown code ", objective);
  TORCH_CHECK(retention >= 0 && retention <= int64_t(RetentionKind::kl), "retention: unknown code ", retention);
  MirasParams m;
  m.objective = ObjectiveKind(objective);
  m.retention = RetentionKind(retention);
  m.p = p;
  m.eps = eps;
  m.q = q;
  TORCH_CHECK(m.objective != ObjectiveKind::lp || (p >= 1 && eps >= 0 && (eps > 0 || p >= 2)),
              "objective lp: needs p >= 1, eps >= 0, and eps > 0 when p < 2; got p=", p, ", eps=", eps);
  TORCH_CHECK(m.retention != RetentionKind::lq || q > 1, "retention lq: needs q > 1, got ", q);
  const bool needs_delta = m.objective == ObjectiveKind::huber || m.objective == ObjectiveKind::pseudo_huber ||
                           m.objective == ObjectiveKind::yaad;
  TORCH_CHECK(needs_delta == delta.has_value(),
              "delta: required exactly by the huber, pseudo_huber and yaad objectives");
  if (delta) {
    TORCH_CHECK(delta->sizes() == v.sizes() && delta->is_contiguous() && delta->device() == v.device(),
                "delta: expected a contiguous [B, T, H, Dv] tensor ", v.sizes(), " on ", v.device(), ", got ",
                delta->sizes());
    m.delta_ptr = delta->data_ptr();
  }
  return m;
}

struct LinearMemoryFwdOutputs {
  at::Tensor o, m_final, s_final, chunk_states;
};

// Allocates the forward's outputs and points `p` at them: o [B, T, H, Dv] in o_dtype, the states
// with state_options; chunk_states is [B, H, N, 2, Dv, Dk] when save_states, else an empty [0].
inline LinearMemoryFwdOutputs linear_memory_fwd_outputs(LinearMemoryParams& p, const at::TensorOptions& state_options,
                                                        at::ScalarType o_dtype, bool save_states) {
  LinearMemoryFwdOutputs out;
  out.o = at::empty({p.batch, p.seqlen, p.heads, p.dv}, state_options.dtype(o_dtype));
  out.m_final = at::empty({p.batch, p.heads, p.dv, p.dk}, state_options);
  out.s_final = at::empty({p.batch, p.heads, p.dv, p.dk}, state_options);
  out.chunk_states = save_states ? at::empty({p.batch, p.heads, p.n_chunks, 2, p.dv, p.dk}, state_options)
                                 : at::empty({0}, state_options);
  p.o_ptr = out.o.data_ptr();
  p.m_final_ptr = out.m_final.data_ptr();
  p.s_final_ptr = out.s_final.data_ptr();
  p.chunk_states_ptr = save_states ? out.chunk_states.data_ptr() : nullptr;
  return out;
}

// The MLP memory's activation by name (the schema passes a string).
inline MlpActivation mlp_activation(c10::string_view name) {
  if (name == "gelu") return MlpActivation::kGelu;
  if (name == "silu") return MlpActivation::kSilu;
  TORCH_CHECK(false, "activation must be \"gelu\" or \"silu\", got \"", std::string(name), "\"");
}

// The MLP memory's inputs: those of the linear memory with Dk == Dv = D, plus a [B, H, N, D]
// or [B, H, D, N] shape for each weight / momentum given (nullopt: not given).
inline void check_mlp_memory_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& theta, const at::Tensor& eta, const at::Tensor& alpha,
                                  const std::optional<at::Tensor>& w1, const std::optional<at::Tensor>& w2,
                                  const std::optional<at::Tensor>& s1, const std::optional<at::Tensor>& s2,
                                  int64_t hidden, int64_t chunk_size) {
  check_linear_memory_args(q, k, v, theta, eta, alpha, std::nullopt, std::nullopt, chunk_size);
  const auto B = q.size(0), H = q.size(2), D = q.size(3);
  TORCH_CHECK(v.size(3) == D, "the MLP memory needs Dk == Dv, got Dk = ", D, ", Dv = ", v.size(3));
  TORCH_CHECK(hidden >= 1 && hidden % D == 0, "the hidden width must be a positive multiple of D = ", D, ", got ",
              hidden);
  check_state("W1 / S1 (or their cotangents)", w1, B, H, hidden, D, q.device());
  check_state("W1 / S1 (or their cotangents)", s1, B, H, hidden, D, q.device());
  check_state("W2 / S2 (or their cotangents)", w2, B, H, D, hidden, q.device());
  check_state("W2 / S2 (or their cotangents)", s2, B, H, D, hidden, q.device());
}

// Sizes and input pointers; outputs and state pointers are set by the caller.
inline MlpMemoryParams mlp_memory_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& theta, const at::Tensor& eta, const at::Tensor& alpha,
                                         int64_t hidden, int64_t chunk_size, bool read_token,
                                         c10::string_view activation) {
  MlpMemoryParams p;
  fill_sequence_params(p, q, k, v, theta, eta, alpha, chunk_size, read_token);
  p.dim = int(q.size(3));
  p.hidden = int(hidden);
  p.activation = mlp_activation(activation);
  return p;
}

}  // namespace titans
