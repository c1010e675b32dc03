// Tensor -> params-struct helpers shared by the CPU, CUDA and emulation bindings. They use only
// the LibTorch stable ABI (torch/csrc/stable, torch/headeronly): setup.py compiles the bindings
// with TORCH_STABLE_ONLY and TORCH_TARGET_VERSION, so an ATen or c10 header fails the build.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include "titans_params.h"

namespace titans {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// The stable ABI prints neither sizes nor devices; these give error messages "[2, 3]" and "cuda:0".
inline std::string shape_str(const Tensor& x) {
  std::ostringstream out;
  out << '[';
  for (int64_t d = 0; d < x.dim(); ++d) out << (d ? ", " : "") << x.size(d);
  out << ']';
  return out.str();
}

inline std::string device_str(const Tensor& x) {
  if (x.is_cpu()) return "cpu";
  const std::string index = std::to_string(x.get_device_index());
  return x.is_cuda() ? "cuda:" + index : "device " + std::to_string(int(x.device().type())) + ":" + index;
}

inline bool same_shape(const Tensor& a, const Tensor& b) { return a.sizes() == b.sizes(); }

// Kernels compute in fp32 (fp64 when q is fp64) and keep gates and state in that type.
inline ScalarType compute_dtype(const Tensor& q) {
  return q.scalar_type() == ScalarType::Double ? ScalarType::Double : ScalarType::Float;
}

// x in dtype (x itself when it already is). Every stable-ABI op is a call through the dispatcher
// by name, microseconds each; a decode step would spend more in such no-op calls than in its
// kernel, so the no-ops are decided here, from metadata.
inline Tensor to_dtype(const Tensor& x, ScalarType dtype) {
  return x.scalar_type() == dtype ? x : torch::stable::to(x, dtype);
}

// A state, state cotangent or delta in dtype and contiguous, or none (x itself when it already is).
inline std::optional<Tensor> contiguous_in(const std::optional<Tensor>& x, ScalarType dtype) {
  if (!x) return std::nullopt;
  const Tensor converted = to_dtype(*x, dtype);
  return converted.is_contiguous() ? converted : torch::stable::contiguous(converted);
}

// Kernels index every per-token tensor by (batch, seq, head) strides and read the feature
// dimension contiguously; other layouts (e.g. slices of a larger buffer) are kept as views.
inline Tensor with_unit_inner_stride(const Tensor& x) {
  const int64_t last = x.dim() - 1;
  return x.size(last) <= 1 || x.stride(last) == 1 ? x : torch::stable::contiguous(x);
}

// A new uninitialized tensor on the device of `like`.
inline Tensor empty_on(const Tensor& like, torch::headeronly::IntHeaderOnlyArrayRef sizes, ScalarType dtype) {
  return torch::stable::new_empty(like, sizes, dtype);
}

inline const void* data_or_null(const std::optional<Tensor>& x) { return x ? x->data_ptr() : nullptr; }

// A [B, T, H, D] or [B, T, H] tensor as the kernels see it.
inline TokenTensor token_tensor(const Tensor& x) {
  TokenTensor t;
  t.ptr = x.data_ptr();
  t.batch_stride = x.stride(0);
  t.seq_stride = x.stride(1);
  t.head_stride = x.stride(2);
  return t;
}

inline void check_state(const char* name, const std::optional<Tensor>& x, int64_t B, int64_t H, int64_t Dv,
                        int64_t Dk, const Tensor& q) {
  if (!x) return;
  STD_TORCH_CHECK(x->dim() == 4 && x->size(0) == B && x->size(1) == H && x->size(2) == Dv && x->size(3) == Dk, name,
                  " must have shape [B, H, Dv, Dk] = [", B, ", ", H, ", ", Dv, ", ", Dk, "], got ", shape_str(*x));
  STD_TORCH_CHECK(x->device() == q.device(), name, " must be on ", device_str(q), ", got ", device_str(*x));
}

// n_seqs: the rows of the states m, s (B without cu_seqlens; -1: B).
inline void check_linear_memory_args(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta,
                                     const Tensor& eta, const Tensor& alpha, const std::optional<Tensor>& m,
                                     const std::optional<Tensor>& s, int64_t chunk_size, int64_t n_seqs = -1) {
  STD_TORCH_CHECK(q.dim() == 4, "q must be [B, T, H, Dk], got ", shape_str(q));
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), Dk = q.size(3);
  STD_TORCH_CHECK(same_shape(k, q), "k must have the shape of q ", shape_str(q), ", got ", shape_str(k));
  STD_TORCH_CHECK(v.dim() == 4 && v.size(0) == B && v.size(1) == T && v.size(2) == H,
                  "v must be [B, T, H, Dv] with B, T, H of q, got ", shape_str(v));
  for (const Tensor* g : {&theta, &eta, &alpha})
    STD_TORCH_CHECK(g->dim() == 3 && g->size(0) == B && g->size(1) == T && g->size(2) == H,
                    "gates must be [B, T, H] = [", B, ", ", T, ", ", H, "], got ", shape_str(*g));
  for (const Tensor* x : {&k, &v, &theta, &eta, &alpha})
    STD_TORCH_CHECK(x->device() == q.device(), "all inputs must be on the device of q (", device_str(q), ")");
  STD_TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                  "q, k, v must have one dtype");
  STD_TORCH_CHECK(chunk_size >= 1, "chunk_size must be >= 1, got ", chunk_size);
  const int64_t rows = n_seqs < 0 ? B : n_seqs;
  check_state("initial or final state", m, rows, H, v.size(3), Dk, q);
  check_state("initial or final state", s, rows, H, v.size(3), Dk, q);
}

// The fields every memory's params share (SequenceParams) but the MIRAS options.
inline void fill_sequence_params(SequenceParams& p, const Tensor& q, const Tensor& k, const Tensor& v,
                                 const Tensor& theta, const Tensor& eta, const Tensor& alpha, int64_t chunk_size,
                                 bool read_token) {
  p.batch = int(q.size(0));
  p.seqlen = int(q.size(1));
  p.heads = int(q.size(2));
  p.chunk_size = int(chunk_size);
  p.n_chunks = int((p.seqlen + chunk_size - 1) / chunk_size);
  p.n_seqs = p.batch;
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
  Tensor dq, dk, dv, dtheta, deta, dalpha, d_delta;
};

// Allocates the per-token input gradients and points `g` at them: dq, dk, dv like q, k, v in
// token_dtype (nullopt: their own dtype); the gates' and delta's in gate_dtype (d_delta: an
// empty [0] without delta).
inline SequenceGrads allocate_sequence_grads(SequenceGradParams& g, const Tensor& q, const Tensor& k,
                                             const Tensor& v, const Tensor& theta,
                                             const std::optional<Tensor>& delta,
                                             std::optional<ScalarType> token_dtype, ScalarType gate_dtype) {
  const auto like = [&](const Tensor& x) { return empty_on(x, x.sizes(), token_dtype.value_or(x.scalar_type())); };
  SequenceGrads out;
  out.dq = like(q);
  out.dk = like(k);
  out.dv = like(v);
  out.dtheta = empty_on(theta, theta.sizes(), gate_dtype);
  out.deta = empty_on(theta, theta.sizes(), gate_dtype);
  out.dalpha = empty_on(theta, theta.sizes(), gate_dtype);
  out.d_delta = delta ? empty_on(*delta, delta->sizes(), gate_dtype) : empty_on(theta, {0}, gate_dtype);
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
inline LinearMemoryParams linear_memory_params(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta,
                                               const Tensor& eta, const Tensor& alpha,
                                               const std::optional<Tensor>& m0, const std::optional<Tensor>& s0,
                                               int64_t chunk_size, bool read_token) {
  LinearMemoryParams p;
  fill_sequence_params(p, q, k, v, theta, eta, alpha, chunk_size, read_token);
  p.dk = int(q.size(3));
  p.dv = int(v.size(3));
  p.m0_ptr = data_or_null(m0);
  p.s0_ptr = data_or_null(s0);
  return p;
}

// The trailing MIRAS arguments of every op's schema: codes of titans_params.h, delta contiguous
// [B, T, H, Dv] ([B, H, Dv] for a step) or None.
#define TITANS_MIRAS_ARGS \
  "int objective=0, float p=2., float eps=0., Tensor? delta=None, int retention=0, float retention_q=2."

// The MIRAS arguments of the schemas as kernel parameters. delta (when the objective has one) must
// already be contiguous [B, T, H, Dv] in the compute dtype; the caller keeps it alive.
// The MIRAS options but delta (miras_params); has_delta: whether a delta tensor is given.
inline MirasParams miras_options(int64_t objective, double p, double eps, bool has_delta, int64_t retention,
                                 double q) {
  STD_TORCH_CHECK(objective >= 0 && objective <= int64_t(ObjectiveKind::yaad), "objective: unknown code ",
                  objective);
  STD_TORCH_CHECK(retention >= 0 && retention <= int64_t(RetentionKind::kl), "retention: unknown code ", retention);
  MirasParams m;
  m.objective = ObjectiveKind(objective);
  m.retention = RetentionKind(retention);
  m.p = p;
  m.eps = eps;
  m.q = q;
  STD_TORCH_CHECK(m.objective != ObjectiveKind::lp || (p >= 1 && eps >= 0 && (eps > 0 || p >= 2)),
                  "objective lp: needs p >= 1, eps >= 0, and eps > 0 when p < 2; got p=", p, ", eps=", eps);
  STD_TORCH_CHECK(m.retention != RetentionKind::lq || q > 1, "retention lq: needs q > 1, got ", q);
  STD_TORCH_CHECK(objective_has_delta(m.objective) == has_delta,
                  "delta: required exactly by the huber, pseudo_huber and yaad objectives");
  return m;
}

// The MIRAS options of an op; delta, when given, is a contiguous tensor shaped like v.
inline MirasParams miras_params(int64_t objective, double p, double eps, const std::optional<Tensor>& delta,
                                int64_t retention, double q, const Tensor& v) {
  MirasParams m = miras_options(objective, p, eps, delta.has_value(), retention, q);
  if (delta) {
    STD_TORCH_CHECK(same_shape(*delta, v) && delta->is_contiguous() && delta->device() == v.device(),
                    "delta: expected a contiguous [B, T, H, Dv] tensor ", shape_str(v), " on ", device_str(v),
                    ", got ", shape_str(*delta));
    m.delta_ptr = delta->data_ptr();
  }
  return m;
}

struct LinearMemoryFwdOutputs {
  Tensor o, m_final, s_final, chunk_states;
};

// Allocates chunk_states of the given sizes and dtype (the CPU's come from cpu_state_cache.h).
using EmptyStates = Tensor (*)(torch::headeronly::IntHeaderOnlyArrayRef sizes, ScalarType dtype);

// Allocates the forward's outputs on the device of `like` and points `p` at them: o [B, T, H, Dv]
// and the checkpoints in the inputs' dtype io_dtype, the final states [n_seqs, H, Dv, Dk] in
// state_dtype; chunk_states is [B, H, checkpoints, 2, Dv, Dk] when save_states (from empty_states
// when given), else an empty [0].
inline LinearMemoryFwdOutputs linear_memory_fwd_outputs(LinearMemoryParams& p, const Tensor& like,
                                                        ScalarType state_dtype, ScalarType io_dtype,
                                                        bool save_states, int64_t checkpoints,
                                                        EmptyStates empty_states = nullptr) {
  LinearMemoryFwdOutputs out;
  out.o = empty_on(like, {p.batch, p.seqlen, p.heads, p.dv}, io_dtype);
  out.m_final = empty_on(like, {p.n_seqs, p.heads, p.dv, p.dk}, state_dtype);
  out.s_final = empty_on(like, {p.n_seqs, p.heads, p.dv, p.dk}, state_dtype);
  const std::initializer_list<int64_t> states_sizes = {p.batch, p.heads, checkpoints, 2, p.dv, p.dk};
  out.chunk_states = !save_states  ? empty_on(like, {0}, io_dtype)
                     : empty_states ? empty_states(states_sizes, io_dtype)
                                    : empty_on(like, states_sizes, io_dtype);
  p.o_ptr = out.o.data_ptr();
  p.m_final_ptr = out.m_final.data_ptr();
  p.s_final_ptr = out.s_final.data_ptr();
  p.chunk_states_ptr = save_states ? out.chunk_states.data_ptr() : nullptr;
  return out;
}

// The MLP memory's activation by name (the schema passes a string).
inline MlpActivation mlp_activation(std::string_view name) {
  if (name == "gelu") return MlpActivation::kGelu;
  if (name == "silu") return MlpActivation::kSilu;
  STD_TORCH_CHECK(false, "activation must be \"gelu\" or \"silu\", got \"", std::string(name), "\"");
  return MlpActivation::kGelu;  // not reached
}

// The MLP memory's inputs: those of the linear memory with Dk == Dv = D, plus a [n_seqs, H, N, D]
// or [n_seqs, H, D, N] shape for each weight / momentum given (nullopt: not given; n_seqs -1: B).
inline void check_mlp_memory_args(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta,
                                  const Tensor& eta, const Tensor& alpha, const std::optional<Tensor>& w1,
                                  const std::optional<Tensor>& w2, const std::optional<Tensor>& s1,
                                  const std::optional<Tensor>& s2, int64_t hidden, int64_t chunk_size,
                                  int64_t n_seqs = -1) {
  check_linear_memory_args(q, k, v, theta, eta, alpha, std::nullopt, std::nullopt, chunk_size);
  const int64_t B = n_seqs < 0 ? q.size(0) : n_seqs, H = q.size(2), D = q.size(3);
  STD_TORCH_CHECK(v.size(3) == D, "the MLP memory needs Dk == Dv, got Dk = ", D, ", Dv = ", v.size(3));
  STD_TORCH_CHECK(hidden >= 1 && hidden % D == 0, "the hidden width must be a positive multiple of D = ", D,
                  ", got ", hidden);
  check_state("W1 / S1 (or their cotangents)", w1, B, H, hidden, D, q);
  check_state("W1 / S1 (or their cotangents)", s1, B, H, hidden, D, q);
  check_state("W2 / S2 (or their cotangents)", w2, B, H, D, hidden, q);
  check_state("W2 / S2 (or their cotangents)", s2, B, H, D, hidden, q);
}

// Sizes and input pointers; outputs and state pointers are set by the caller.
inline MlpMemoryParams mlp_memory_params(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta,
                                         const Tensor& eta, const Tensor& alpha, int64_t hidden, int64_t chunk_size,
                                         bool read_token, std::string_view activation) {
  MlpMemoryParams p;
  fill_sequence_params(p, q, k, v, theta, eta, alpha, chunk_size, read_token);
  p.dim = int(q.size(3));
  p.hidden = int(hidden);
  p.activation = mlp_activation(activation);
  return p;
}

}  // namespace titans
