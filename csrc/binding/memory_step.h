// Binding of the decode-step kernels (step_params.h), shared by their three builds: the CPU
// kernels (ops_step.cpp), the CUDA kernels (ops_step_cuda.cpp) and the CUDA kernels under the
// emulation (ops_step_emu.cpp). They differ in the dtype the kernels read q, k, v in and in how
// they launch. Stable ABI only, like tensor_params.h.
//
// The public Python functions (titans_ext/ops/step.py) check arguments with user-facing messages;
// the checks here guard the kernels against direct torch.ops calls.
#pragma once

#include <optional>
#include <string_view>
#include <tuple>

#include "binding/tensor_params.h"
#include "step_params.h"

namespace titans {

// Schemas of the step ops. The chunk-start state's read weights (chunk_read*) exist with read
// "chunk_start" and retention kl only (an empty [0] output otherwise); every other output always.
#define TITANS_LINEAR_MEMORY_STEP_SCHEMA                                                                   \
  "linear_memory_step(Tensor q, Tensor k, Tensor v, Tensor theta, Tensor eta, Tensor alpha, Tensor? m, "  \
  "Tensor? s, Tensor? chunk_weights, Tensor? chunk_scale, Tensor? chunk_read, Tensor position, "           \
  "int chunk_size, bool read_token, " TITANS_MIRAS_ARGS                                                    \
  ") -> (Tensor o, Tensor m_out, Tensor s_out, Tensor chunk_weights_out, Tensor chunk_scale_out, "        \
  "Tensor chunk_read_out)"
#define TITANS_MLP_MEMORY_STEP_SCHEMA                                                                      \
  "mlp_memory_step(Tensor q, Tensor k, Tensor v, Tensor theta, Tensor eta, Tensor alpha, Tensor w1, "     \
  "Tensor w2, Tensor? s1, Tensor? s2, Tensor? chunk_w1, Tensor? chunk_w2, Tensor? chunk_scale, "           \
  "Tensor? chunk_read_w1, Tensor? chunk_read_w2, Tensor position, int chunk_size, bool read_token, "       \
  "str activation, " TITANS_MIRAS_ARGS                                                                     \
  ") -> (Tensor o, Tensor w1_out, Tensor w2_out, Tensor s1_out, Tensor s2_out, Tensor chunk_w1_out, "     \
  "Tensor chunk_w2_out, Tensor chunk_scale_out, Tensor chunk_read_w1_out, Tensor chunk_read_w2_out)"

using LinearStepResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using MlpStepResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

inline HeadTensor head_tensor(const Tensor& x) {
  HeadTensor t;
  t.ptr = x.data_ptr();
  t.batch_stride = x.stride(0);
  t.head_stride = x.stride(1);
  return t;
}

inline void check_sizes(const char* name, const Tensor& x, torch::headeronly::IntHeaderOnlyArrayRef sizes,
                        const char* dims, const Tensor& q) {
  STD_TORCH_CHECK(x.sizes() == sizes, name, " must be ", dims, ", got ", shape_str(x));
  STD_TORCH_CHECK(x.device() == q.device(), name, " must be on ", device_str(q), ", got ", device_str(x));
}

inline void check_optional_sizes(const char* name, const std::optional<Tensor>& x,
                                 torch::headeronly::IntHeaderOnlyArrayRef sizes, const char* dims, const Tensor& q) {
  if (x) check_sizes(name, *x, sizes, dims, q);
}

// The per-token inputs of one step, in the dtypes the kernels read them in: q, k, v in the
// compute dtype (CPU) or their own (CUDA, which reads bf16/fp16 directly); gates, delta and states
// in the compute dtype; the position as int64.
struct StepInputs {
  ScalarType dtype;
  Tensor q, k, v, theta, eta, alpha, position;
  std::optional<Tensor> delta;

  StepInputs(const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& theta_, const Tensor& eta_,
             const Tensor& alpha_, const Tensor& position_, const std::optional<Tensor>& delta_,
             bool inputs_in_compute_dtype)
      : dtype(compute_dtype(q_)),
        q(with_unit_inner_stride(inputs_in_compute_dtype ? to_dtype(q_, dtype) : q_)),
        k(with_unit_inner_stride(inputs_in_compute_dtype ? to_dtype(k_, dtype) : k_)),
        v(with_unit_inner_stride(inputs_in_compute_dtype ? to_dtype(v_, dtype) : v_)),
        theta(to_dtype(theta_, dtype)), eta(to_dtype(eta_, dtype)), alpha(to_dtype(alpha_, dtype)),
        position(to_dtype(position_, ScalarType::Long)), delta(contiguous_in(delta_, dtype)) {}

  std::optional<Tensor> state(const std::optional<Tensor>& x) const { return contiguous_in(x, dtype); }
  Tensor empty(torch::headeronly::IntHeaderOnlyArrayRef sizes) const { return empty_on(q, sizes, dtype); }
  // An output present when `present`, else an empty [0] (its pointer null).
  Tensor empty_if(bool present, torch::headeronly::IntHeaderOnlyArrayRef sizes) const {
    return present ? empty(sizes) : empty({0});
  }
};

inline void* data_if_present(const Tensor& x) { return x.numel() ? x.data_ptr() : nullptr; }

// Checks what both memories share and fills the StepParams part of `p` (but the MIRAS options).
inline void fill_step_params(StepParams& p, const StepInputs& in, const Tensor& q, const Tensor& k, const Tensor& v,
                             const Tensor& theta, const Tensor& eta, const Tensor& alpha, const Tensor& position,
                             int64_t chunk_size, bool read_token) {
  STD_TORCH_CHECK(q.dim() == 3, "q must be [B, H, Dk], got ", shape_str(q));
  const int64_t B = q.size(0), H = q.size(1);
  check_sizes("k", k, q.sizes(), "[B, H, Dk] like q", q);
  STD_TORCH_CHECK(v.dim() == 3 && v.size(0) == B && v.size(1) == H, "v must be [B, H, Dv] with B, H of q, got ",
                  shape_str(v));
  STD_TORCH_CHECK(v.device() == q.device(), "v must be on ", device_str(q));
  STD_TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                  "q, k, v must have one dtype");
  for (const Tensor* g : {&theta, &eta, &alpha}) check_sizes("gates", *g, {B, H}, "[B, H]", q);
  STD_TORCH_CHECK(position.dim() == 0 || (position.dim() == 1 && position.size(0) == B),
                  "position must be a scalar or [B] tensor, got ", shape_str(position));
  STD_TORCH_CHECK(position.device() == q.device(), "position must be on ", device_str(q), ", got ",
                  device_str(position));
  STD_TORCH_CHECK(position.scalar_type() == ScalarType::Long || position.scalar_type() == ScalarType::Int,
                  "position must be an int64 or int32 tensor");
  STD_TORCH_CHECK(chunk_size >= 1, "chunk_size must be >= 1, got ", chunk_size);
  p.batch = int(B);
  p.heads = int(H);
  p.chunk_size = int(chunk_size);
  p.read_token = read_token;
  p.q = head_tensor(in.q);
  p.k = head_tensor(in.k);
  p.v = head_tensor(in.v);
  p.theta = head_tensor(in.theta);
  p.eta = head_tensor(in.eta);
  p.alpha = head_tensor(in.alpha);
  p.position_ptr = in.position.const_data_ptr<int64_t>();
  p.position_stride = in.position.dim() == 0 ? 0 : in.position.stride(0);
}

// The MIRAS options of a step; delta, when given, is the token's [B, H, Dv].
inline MirasParams step_miras_params(int64_t objective, double p, double eps, const StepInputs& in,
                                     int64_t retention, double retention_q, const Tensor& v) {
  // miras_params checks delta against a [B, T, H, Dv] tensor: the token's is [B, H, Dv].
  const Tensor v_one_token = torch::stable::unsqueeze(v, 1);
  const std::optional<Tensor> delta =
      in.delta ? std::optional<Tensor>(torch::stable::unsqueeze(*in.delta, 1)) : std::nullopt;
  return miras_params(objective, p, eps, delta, retention, retention_q, v_one_token);
}

// Whether the chunk-start state carries read weights of its own (step_params.h).
inline bool step_has_read_weights(bool read_token, int64_t retention) {
  return !read_token && retention == int64_t(RetentionKind::kl);
}

// Checks that a chunk-start state is given whole (weights and scale, and the read weights exactly
// when they exist) or not at all.
inline void check_chunk_state_parts(bool has_weights, bool has_scale, bool has_read, bool read_weights) {
  STD_TORCH_CHECK(has_weights == has_scale, "the chunk-start weights and scale must be given together");
  STD_TORCH_CHECK(!has_weights || has_read == read_weights,
                  "the chunk-start read weights must be given exactly with read \"chunk_start\" and retention kl");
}

// Validates, converts, allocates the outputs of the linear memory's step and calls
// launch(params, in) with every tensor alive. o is in the compute dtype when
// inputs_in_compute_dtype (the caller converts it), else in q's.
template <typename Launch>
LinearStepResult linear_memory_step_binding(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta, const Tensor& eta, const Tensor& alpha,
    const std::optional<Tensor>& m, const std::optional<Tensor>& s, const std::optional<Tensor>& chunk_weights,
    const std::optional<Tensor>& chunk_scale, const std::optional<Tensor>& chunk_read, const Tensor& position,
    int64_t chunk_size, bool read_token, int64_t objective, double p, double eps, const std::optional<Tensor>& delta,
    int64_t retention, double retention_q, bool inputs_in_compute_dtype, const Launch& launch) {
  const StepInputs in(q, k, v, theta, eta, alpha, position, delta, inputs_in_compute_dtype);
  LinearMemoryStepParams params;
  fill_step_params(params, in, q, k, v, theta, eta, alpha, position, chunk_size, read_token);
  const int64_t B = q.size(0), H = q.size(1), Dk = q.size(2), Dv = v.size(2);
  params.dk = int(Dk);
  params.dv = int(Dv);
  params.miras = step_miras_params(objective, p, eps, in, retention, retention_q, v);
  for (const auto* x : {&m, &s, &chunk_weights, &chunk_read})
    check_optional_sizes("the states", *x, {B, H, Dv, Dk}, "[B, H, Dv, Dk]", q);
  check_optional_sizes("chunk_scale", chunk_scale, {B, H}, "[B, H]", q);
  const bool read_weights = step_has_read_weights(read_token, retention);
  check_chunk_state_parts(chunk_weights.has_value(), chunk_scale.has_value(), chunk_read.has_value(), read_weights);

  const auto m_c = in.state(m), s_c = in.state(s), chunk_weights_c = in.state(chunk_weights);
  const auto chunk_scale_c = in.state(chunk_scale), chunk_read_c = in.state(chunk_read);
  params.m_ptr = data_or_null(m_c);
  params.s_ptr = data_or_null(s_c);
  params.chunk_weights_ptr = data_or_null(chunk_weights_c);
  params.chunk_scale_ptr = data_or_null(chunk_scale_c);
  params.chunk_read_ptr = data_or_null(chunk_read_c);

  const Tensor o = empty_on(q, {B, H, Dv}, inputs_in_compute_dtype ? in.dtype : q.scalar_type());
  const Tensor m_out = in.empty({B, H, Dv, Dk}), s_out = in.empty({B, H, Dv, Dk});
  const Tensor chunk_weights_out = in.empty({B, H, Dv, Dk}), chunk_scale_out = in.empty({B, H});
  const Tensor chunk_read_out = in.empty_if(read_weights, {B, H, Dv, Dk});
  params.o_ptr = o.data_ptr();
  params.m_out_ptr = m_out.data_ptr();
  params.s_out_ptr = s_out.data_ptr();
  params.chunk_weights_out_ptr = chunk_weights_out.data_ptr();
  params.chunk_scale_out_ptr = chunk_scale_out.data_ptr();
  params.chunk_read_out_ptr = data_if_present(chunk_read_out);
  if (B * H > 0) launch(params, in);
  return {o, m_out, s_out, chunk_weights_out, chunk_scale_out, chunk_read_out};
}

// The MLP memory's step, as linear_memory_step_binding.
template <typename Launch>
MlpStepResult mlp_memory_step_binding(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta, const Tensor& eta, const Tensor& alpha,
    const Tensor& w1, const Tensor& w2, const std::optional<Tensor>& s1, const std::optional<Tensor>& s2,
    const std::optional<Tensor>& chunk_w1, const std::optional<Tensor>& chunk_w2,
    const std::optional<Tensor>& chunk_scale, const std::optional<Tensor>& chunk_read_w1,
    const std::optional<Tensor>& chunk_read_w2, const Tensor& position, int64_t chunk_size, bool read_token,
    std::string_view activation, int64_t objective, double p, double eps, const std::optional<Tensor>& delta,
    int64_t retention, double retention_q, bool inputs_in_compute_dtype, const Launch& launch) {
  const StepInputs in(q, k, v, theta, eta, alpha, position, delta, inputs_in_compute_dtype);
  MlpMemoryStepParams params;
  fill_step_params(params, in, q, k, v, theta, eta, alpha, position, chunk_size, read_token);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  STD_TORCH_CHECK(v.size(2) == D, "the MLP memory needs Dk == Dv, got Dk = ", D, ", Dv = ", v.size(2));
  STD_TORCH_CHECK(w1.dim() == 4, "w1 must be [B, H, N, D], got ", shape_str(w1));
  const int64_t N = w1.size(2);
  STD_TORCH_CHECK(N >= 1 && N % D == 0, "the hidden width must be a positive multiple of D = ", D, ", got ", N);
  params.dim = int(D);
  params.hidden = int(N);
  params.activation = mlp_activation(activation);
  params.miras = step_miras_params(objective, p, eps, in, retention, retention_q, v);
  for (const auto* x : {&s1, &chunk_w1, &chunk_read_w1})
    check_optional_sizes("the W1 states", *x, {B, H, N, D}, "[B, H, N, D]", q);
  for (const auto* x : {&s2, &chunk_w2, &chunk_read_w2})
    check_optional_sizes("the W2 states", *x, {B, H, D, N}, "[B, H, D, N]", q);
  check_sizes("w1", w1, {B, H, N, D}, "[B, H, N, D]", q);
  check_sizes("w2", w2, {B, H, D, N}, "[B, H, D, N]", q);
  check_optional_sizes("chunk_scale", chunk_scale, {B, H, 2}, "[B, H, 2]", q);
  const bool read_weights = step_has_read_weights(read_token, retention);
  STD_TORCH_CHECK(chunk_w1.has_value() == chunk_w2.has_value() &&
                      chunk_read_w1.has_value() == chunk_read_w2.has_value(),
                  "the chunk-start states of W1 and W2 must be given together");
  check_chunk_state_parts(chunk_w1.has_value(), chunk_scale.has_value(), chunk_read_w1.has_value(), read_weights);

  const Tensor w1_c = *in.state(w1), w2_c = *in.state(w2);
  const auto s1_c = in.state(s1), s2_c = in.state(s2), chunk_w1_c = in.state(chunk_w1),
             chunk_w2_c = in.state(chunk_w2), chunk_scale_c = in.state(chunk_scale),
             chunk_read_w1_c = in.state(chunk_read_w1), chunk_read_w2_c = in.state(chunk_read_w2);
  params.w1_ptr = w1_c.data_ptr();
  params.w2_ptr = w2_c.data_ptr();
  params.s1_ptr = data_or_null(s1_c);
  params.s2_ptr = data_or_null(s2_c);
  params.chunk_w1_ptr = data_or_null(chunk_w1_c);
  params.chunk_w2_ptr = data_or_null(chunk_w2_c);
  params.chunk_scale_ptr = data_or_null(chunk_scale_c);
  params.chunk_read_w1_ptr = data_or_null(chunk_read_w1_c);
  params.chunk_read_w2_ptr = data_or_null(chunk_read_w2_c);

  const Tensor o = empty_on(q, {B, H, D}, inputs_in_compute_dtype ? in.dtype : q.scalar_type());
  const Tensor w1_out = in.empty({B, H, N, D}), s1_out = in.empty({B, H, N, D});
  const Tensor w2_out = in.empty({B, H, D, N}), s2_out = in.empty({B, H, D, N});
  const Tensor chunk_w1_out = in.empty({B, H, N, D}), chunk_w2_out = in.empty({B, H, D, N});
  const Tensor chunk_scale_out = in.empty({B, H, 2});
  const Tensor chunk_read_w1_out = in.empty_if(read_weights, {B, H, N, D});
  const Tensor chunk_read_w2_out = in.empty_if(read_weights, {B, H, D, N});
  params.o_ptr = o.data_ptr();
  params.w1_out_ptr = w1_out.data_ptr();
  params.w2_out_ptr = w2_out.data_ptr();
  params.s1_out_ptr = s1_out.data_ptr();
  params.s2_out_ptr = s2_out.data_ptr();
  params.chunk_w1_out_ptr = chunk_w1_out.data_ptr();
  params.chunk_w2_out_ptr = chunk_w2_out.data_ptr();
  params.chunk_scale_out_ptr = chunk_scale_out.data_ptr();
  params.chunk_read_w1_out_ptr = data_if_present(chunk_read_w1_out);
  params.chunk_read_w2_out_ptr = data_if_present(chunk_read_w2_out);
  if (B * H > 0) launch(params, in);
  return {o, w1_out, w2_out, s1_out, s2_out, chunk_w1_out, chunk_w2_out, chunk_scale_out, chunk_read_w1_out,
          chunk_read_w2_out};
}

}  // namespace titans
