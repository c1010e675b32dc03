// Binding of the decode-step kernels (step_params.h), shared by their three builds: the CPU
// kernels (ops_step.cpp), the CUDA kernels (ops_step_cuda.cpp) and the CUDA kernels under the
// emulation (ops_step_emu.cpp). The operators are written once here, templated on a backend that
// says how a build reads q, k, v and launches (CpuStep in ops_step.cpp, DeviceStep in
// memory_step_device.h). Stable ABI only, like tensor_params.h.
//
// These are the steps' argument checks: titans_ext.linear_memory_step and mlp_memory_step call the
// operator first and run their Python checks only when it raises, to turn the error into a
// ValueError / TypeError naming the argument (titans_ext/ops/step.py). So every check a decode
// step needs is here, on CPU tensors the value checks too.
#pragma once

#include <cstdlib>
#include <initializer_list>
#include <iterator>
#include <limits>
#include <optional>
#include <string_view>
#include <tuple>
#include <utility>

#include <torch/csrc/stable/library.h>

#include "binding/tensor_params.h"
#include "step_params.h"

namespace titans {

// Schemas of the step ops. The chunk-start state's read weights (chunk_read*) exist with read
// "chunk_start" and retention kl only (an empty [0] output otherwise); every other output always,
// but with mid_chunk.
//
// mid_chunk: the caller states that no batch row's token starts a chunk (checked by the CPU
// kernels' operator; not by the CUDA kernels', whose positions the host does not read), so the
// chunk-start state after the token is the one passed in, which the caller keeps: the chunk-start
// outputs are then empty [0] tensors instead of copies (custom operators may not return their
// inputs). The decode path passes it for a position it knows (titans_ext/ops/step.py); mid-chunk,
// a copy was most of a step's memory traffic.
#define TITANS_LINEAR_MEMORY_STEP_SCHEMA                                                                   \
  "linear_memory_step(Tensor q, Tensor k, Tensor v, Tensor theta, Tensor eta, Tensor alpha, Tensor? m, "  \
  "Tensor? s, Tensor? chunk_weights, Tensor? chunk_scale, Tensor? chunk_read, Tensor position, "           \
  "int chunk_size, bool read_token, " TITANS_MIRAS_ARGS ", bool mid_chunk=False"                          \
  ") -> (Tensor o, Tensor m_out, Tensor s_out, Tensor chunk_weights_out, Tensor chunk_scale_out, "        \
  "Tensor chunk_read_out)"
#define TITANS_MLP_MEMORY_STEP_SCHEMA                                                                      \
  "mlp_memory_step(Tensor q, Tensor k, Tensor v, Tensor theta, Tensor eta, Tensor alpha, Tensor w1, "     \
  "Tensor w2, Tensor? s1, Tensor? s2, Tensor? chunk_w1, Tensor? chunk_w2, Tensor? chunk_scale, "           \
  "Tensor? chunk_read_w1, Tensor? chunk_read_w2, Tensor position, int chunk_size, bool read_token, "       \
  "str activation, " TITANS_MIRAS_ARGS ", bool mid_chunk=False"                                           \
  ") -> (Tensor o, Tensor w1_out, Tensor w2_out, Tensor s1_out, Tensor s2_out, Tensor chunk_w1_out, "     \
  "Tensor chunk_w2_out, Tensor chunk_scale_out, Tensor chunk_read_w1_out, Tensor chunk_read_w2_out)"

// The in-place steps, for a caller that owns its decode state (the model's streaming state, a
// serving loop; flash-attn's flash_attn_with_kvcache updates its cache alike): the running state
// (m, s; w1, w2, s1, s2) holds the state before the token and is overwritten with the state after
// it; the chunk-start buffers hold the chunk-start state and are overwritten from the running state
// when the token starts a chunk (read on the device: no host read, no mid_chunk). Only o is new. Every
// buffer is a contiguous tensor of the state dtype and a tensor of its own. One token costs one
// allocation and one read-and-write pass over the state, where the functional step allocates its
// outputs (six or ten) and writes a second copy of the state.
#define TITANS_LINEAR_MEMORY_STEP_INPLACE_SCHEMA                                                           \
  "linear_memory_step_(Tensor q, Tensor k, Tensor v, Tensor theta, Tensor eta, Tensor alpha, Tensor(a!) m, " \
  "Tensor(b!) s, Tensor(c!) chunk_weights, Tensor(d!) chunk_scale, Tensor(e!)? chunk_read, Tensor position, " \
  "int chunk_size, bool read_token, " TITANS_MIRAS_ARGS ") -> Tensor o"
#define TITANS_MLP_MEMORY_STEP_INPLACE_SCHEMA                                                              \
  "mlp_memory_step_(Tensor q, Tensor k, Tensor v, Tensor theta, Tensor eta, Tensor alpha, Tensor(a!) w1, "  \
  "Tensor(b!) w2, Tensor(c!) s1, Tensor(d!) s2, Tensor(e!) chunk_w1, Tensor(f!) chunk_w2, "                \
  "Tensor(g!) chunk_scale, Tensor(h!)? chunk_read_w1, Tensor(i!)? chunk_read_w2, Tensor position, "          \
  "int chunk_size, bool read_token, str activation, " TITANS_MIRAS_ARGS ") -> Tensor o"

using LinearStepResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using MlpStepResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

inline HeadTensor head_tensor(const Tensor& x) {
  HeadTensor t;
  t.ptr = x.data_ptr();
  t.batch_stride = x.stride(0);
  t.head_stride = x.stride(1);
  return t;
}

inline bool is_float_dtype(ScalarType dtype) {
  return dtype == ScalarType::Float || dtype == ScalarType::Double || dtype == ScalarType::BFloat16 ||
         dtype == ScalarType::Half;
}

inline void check_on_device_of_q(const char* name, const Tensor& x, const Tensor& q) {
  STD_TORCH_CHECK(x.device() == q.device(), name, ": expected a tensor on ", device_str(q), " (the device of q), got ",
                  device_str(x));
}

// A state tensor: floating point, of the given sizes (named by dims), on q's device.
inline void check_state_tensor(const char* name, const Tensor& x, torch::headeronly::IntHeaderOnlyArrayRef sizes,
                               const char* dims, const Tensor& q) {
  STD_TORCH_CHECK(x.sizes() == sizes, name, ": expected shape ", dims, ", got ", shape_str(x));
  STD_TORCH_CHECK(is_float_dtype(x.scalar_type()), name, ": expected dtype float32, float64, bfloat16 or float16, got ",
                  x.scalar_type());
  check_on_device_of_q(name, x, q);
}

inline void check_optional_state(const char* name, const std::optional<Tensor>& x,
                                 torch::headeronly::IntHeaderOnlyArrayRef sizes, const char* dims, const Tensor& q) {
  if (x) check_state_tensor(name, *x, sizes, dims, q);
}

// Whether the checks that read tensor values run on CPU tensors: TITANS_EXT_CHECK_VALUES as
// titans_ext/ops/checks.py reads it (unset or empty: on for CPU tensors; "1" on; "0" off), read at
// every call like there. CUDA tensors are never read here (that would sync the host).
inline bool cpu_value_checks_enabled() {
  const char* setting = std::getenv("TITANS_EXT_CHECK_VALUES");
  if (setting == nullptr || *setting == '\0') return true;
  const std::string_view value(setting);
  STD_TORCH_CHECK(value == "0" || value == "1", "TITANS_EXT_CHECK_VALUES: expected 0 or 1 (or unset), got ", value);
  return value == "1";
}

// The per-token inputs of one step, in the dtypes the kernels read them in: q, k, v in the
// compute dtype (CPU) or their own (CUDA, which reads bf16/fp16 directly); gates, delta and states
// in the compute dtype; the position as int64. A tensor already in its dtype and layout is used as
// it is (no dispatcher call).
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

// A buffer of an in-place step: a state tensor (check_state_tensor) in the state dtype, contiguous.
inline void check_state_buffer(const char* name, const Tensor& x, torch::headeronly::IntHeaderOnlyArrayRef sizes,
                               const char* dims, const Tensor& q) {
  check_state_tensor(name, x, sizes, dims, q);
  const ScalarType dtype = compute_dtype(q);
  STD_TORCH_CHECK(x.scalar_type() == dtype, name, ": expected dtype ", dtype, " (the state dtype of q's dtype ",
                  q.scalar_type(), "; the step updates it in place), got ", x.scalar_type());
  STD_TORCH_CHECK(x.is_contiguous(), name, ": expected a contiguous tensor (the step updates it in place)");
}

// The buffers of an in-place step are tensors of their own: an update written through one must not
// change what the kernel reads through another. Absent (optional) buffers are null.
inline void check_distinct_buffers(std::initializer_list<std::pair<const char*, const Tensor*>> buffers) {
  for (auto a = buffers.begin(); a != buffers.end(); ++a)
    for (auto b = std::next(a); b != buffers.end(); ++b)
      STD_TORCH_CHECK(!a->second || !b->second || a->second->data_ptr() != b->second->data_ptr(), b->first,
                      ": expected a tensor of its own, got the memory of ", a->first,
                      " (the in-place step writes both)");
}

// Checks the per-token inputs both memories share (shapes, dtypes, devices; q, k [B, H, Dk],
// v [B, H, Dv], gates [B, H], position a scalar or [B]).
inline void check_token_args(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta,
                             const Tensor& eta, const Tensor& alpha, const Tensor& position, int64_t chunk_size) {
  STD_TORCH_CHECK(q.dim() == 3, "q: expected a 3-d tensor [B, H, Dk], got shape ", shape_str(q));
  STD_TORCH_CHECK(is_float_dtype(q.scalar_type()), "q: expected dtype float32, float64, bfloat16 or float16, got ",
                  q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1);
  STD_TORCH_CHECK(k.sizes() == q.sizes(), "k: expected shape [B, H, Dk] = ", shape_str(q), " (that of q), got ",
                  shape_str(k));
  STD_TORCH_CHECK(v.dim() == 3 && v.size(0) == B && v.size(1) == H, "v: expected shape [B, H, Dv] with B = ", B,
                  ", H = ", H, " (those of q), got ", shape_str(v));
  for (const auto& [name, x] : {std::pair<const char*, const Tensor*>{"k", &k}, {"v", &v}}) {
    STD_TORCH_CHECK(x->scalar_type() == q.scalar_type(), name, ": expected dtype ", q.scalar_type(),
                    " (the dtype of q), got ", x->scalar_type());
    check_on_device_of_q(name, *x, q);
  }
  for (const auto& [name, g] :
       {std::pair<const char*, const Tensor*>{"theta", &theta}, {"eta", &eta}, {"alpha", &alpha}}) {
    STD_TORCH_CHECK(g->dim() == 2 && g->size(0) == B && g->size(1) == H, name, ": expected shape [B, H] = [", B,
                    ", ", H, "], got ", shape_str(*g));
    const ScalarType dtype = g->scalar_type();
    STD_TORCH_CHECK(dtype == q.scalar_type() || dtype == ScalarType::Float || dtype == ScalarType::Double, name,
                    ": expected dtype ", q.scalar_type(), " (the dtype of q), float32 or float64, got ", dtype);
    check_on_device_of_q(name, *g, q);
  }
  STD_TORCH_CHECK(position.dim() == 0 || (position.dim() == 1 && position.size(0) == B),
                  "position: expected a scalar or [B] = [", B, "] tensor, got shape ", shape_str(position));
  STD_TORCH_CHECK(position.scalar_type() == ScalarType::Long || position.scalar_type() == ScalarType::Int,
                  "position: expected an int64 or int32 tensor, got ", position.scalar_type());
  check_on_device_of_q("position", position, q);
  STD_TORCH_CHECK(chunk_size >= 1, "chunk_size: expected an int >= 1, got ", chunk_size);
}

// Checks the per-token inputs of an MLP step and the shape of its running W1 [B, H, E*D, D] up to
// B and H (checked with the rest of the state); returns the hidden width N = E*D.
inline int64_t check_mlp_token_args(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta,
                                    const Tensor& eta, const Tensor& alpha, const Tensor& w1, const Tensor& position,
                                    int64_t chunk_size) {
  check_token_args(q, k, v, theta, eta, alpha, position, chunk_size);
  const int64_t D = q.size(2);
  STD_TORCH_CHECK(v.size(2) == D, "v: the MLP memory needs Dk == Dv (M(x) = x + W2 act(W1 x)), got Dk = ", D,
                  ", Dv = ", v.size(2));
  STD_TORCH_CHECK(w1.dim() == 4, "state[0][0]: expected shape [B, H, E*D, D], got ", shape_str(w1));
  const int64_t N = w1.size(2);
  STD_TORCH_CHECK(N >= 1 && N % D == 0,
                  "state[0][0]: expected shape [B, H, E*D, D] with E*D a positive multiple of D = ", D, ", got ",
                  shape_str(w1));
  return N;
}

// The value checks of a step on the CPU (docs/design.md §1 for the gate ranges): finite gates,
// theta >= 0, eta and alpha in [0, 1]; positions >= 0. One pass over B * H values, no tensors.
template <typename T>
void check_step_values(const StepParams& p) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  for (const auto& [name, gate, high] : {std::tuple<const char*, const HeadTensor*, T>{"theta", &p.theta, inf},
                                          {"eta", &p.eta, T(1)},
                                          {"alpha", &p.alpha, T(1)}}) {
    for (int b = 0; b < p.batch; ++b)
      for (int h = 0; h < p.heads; ++h) {
        const T x = static_cast<const T*>(gate->ptr)[b * gate->batch_stride + h * gate->head_stride];
        // Comparisons with NaN are false; the strict bound rejects inf.
        STD_TORCH_CHECK(x >= T(0) && (high == inf ? x < high : x <= high), name, ": expected finite values ",
                        high == inf ? ">= 0" : "in [0, 1]", ", got ", x, " (batch ", b, ", head ", h, ")");
      }
  }
  for (int b = 0; b < (p.position_stride ? p.batch : 1); ++b) {
    const int64_t position = p.position_ptr[b * p.position_stride];
    STD_TORCH_CHECK(position >= 0, "position: expected positions >= 0, got ", position);
  }
}

// Fills the StepParams part of `p` (but the MIRAS options) from checked inputs.
inline void fill_step_params(StepParams& p, const StepInputs& in, int64_t chunk_size, bool read_token) {
  p.batch = int(in.q.size(0));
  p.heads = int(in.q.size(1));
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
  MirasParams m = miras_options(objective, p, eps, in.delta.has_value(), retention, retention_q);
  if (in.delta) {
    STD_TORCH_CHECK(in.delta->sizes() == v.sizes(), "delta: expected shape [B, H, Dv] = ", shape_str(v), ", got ",
                    shape_str(*in.delta));
    check_on_device_of_q("delta", *in.delta, v);
    m.delta_ptr = in.delta->data_ptr();
  }
  return m;
}

// Whether the chunk-start state carries read weights of its own (step_params.h).
inline bool step_has_read_weights(bool read_token, int64_t retention) {
  return !read_token && retention == int64_t(RetentionKind::kl);
}

// Checks that a chunk-start state is given whole (weights and scale, and the read weights exactly
// when they exist) or not at all, and given with mid_chunk.
inline void check_chunk_state_parts(bool has_weights, bool has_scale, bool has_read, bool read_weights,
                                    bool mid_chunk) {
  STD_TORCH_CHECK(has_weights == has_scale, "chunk_state: the chunk-start weights and scale must be given together");
  STD_TORCH_CHECK(!has_weights || has_read == read_weights,
                  "chunk_state: the read weights must be given exactly with read \"chunk_start\" and retention kl");
  STD_TORCH_CHECK(has_weights || !mid_chunk, "mid_chunk: needs the chunk-start state (chunk_state is None)");
}

// With mid_chunk, no row's position may start a chunk: a host read, so for the CPU kernels only.
inline void check_mid_chunk_positions(const StepParams& p) {
  for (int b = 0; b < (p.position_stride ? p.batch : 1); ++b) {
    const int64_t position = p.position_ptr[b * p.position_stride];
    STD_TORCH_CHECK(position % p.chunk_size != 0, "mid_chunk: position ", position,
                    " starts a chunk (a multiple of chunk_size = ", p.chunk_size, ")");
  }
}

// What both step operators set up after their argument checks: the backend, the token's inputs in
// the dtypes the kernels read, and the params' shared fields and MIRAS options (the operator adds
// its memory's own); run() launches after the checks that read values where the backend does them.
template <typename Backend, typename Params>
struct StepCall {
  const Backend backend;
  const StepInputs in;
  Params params;
  const bool mid_chunk;

  StepCall(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta, const Tensor& eta,
           const Tensor& alpha, const Tensor& position, int64_t chunk_size, bool read_token, int64_t objective,
           double p, double eps, const std::optional<Tensor>& delta, int64_t retention, double retention_q,
           bool mid_chunk)
      : backend(q), in(q, k, v, theta, eta, alpha, position, delta, Backend::kInputsInComputeDtype),
        mid_chunk(mid_chunk) {
    fill_step_params(params, in, chunk_size, read_token);
    params.miras = step_miras_params(objective, p, eps, in, retention, retention_q, v);
  }

  // A chunk-start output: present unless mid_chunk (and, for the read weights, `present`).
  Tensor chunk_output(torch::headeronly::IntHeaderOnlyArrayRef sizes, bool present = true) const {
    return in.empty_if(present && !mid_chunk, sizes);
  }

  // For the in-place operators: allocates o [B, H, dv] in the kernels' dtype, runs, and returns o in
  // q's dtype.
  Tensor run_for_output(const Tensor& q, int64_t dv) {
    const Tensor o =
        empty_on(q, {q.size(0), q.size(1), dv}, Backend::kInputsInComputeDtype ? in.dtype : q.scalar_type());
    params.o_ptr = o.data_ptr();
    run();
    return Backend::kInputsInComputeDtype ? to_dtype(o, q.scalar_type()) : o;
  }

  void run() const {
    if constexpr (Backend::kChecksValues) {
      if (cpu_value_checks_enabled()) {
        if (in.dtype == ScalarType::Double) check_step_values<double>(params);
        else check_step_values<float>(params);
      }
      if (mid_chunk) check_mid_chunk_positions(params);
    }
    if (params.batch * params.heads > 0) backend.launch(params, in);
  }
};

// o in q's dtype: the CPU kernels write it in the compute dtype.
template <typename Backend>
Tensor output_in_dtype_of(const Tensor& o, const Tensor& q) {
  if constexpr (Backend::kInputsInComputeDtype) return to_dtype(o, q.scalar_type());
  else return o;
}

// The operator titans_ext::linear_memory_step (its schema above) on a backend: a type with
//   static constexpr bool kInputsInComputeDtype;  // the kernels read q, k, v in the compute dtype
//   static constexpr bool kChecksValues;          // the inputs are host memory: value checks run here
//   explicit Backend(const Tensor& q);             // per call (device guard, stream)
//   void launch(const LinearMemoryStepParams&, const StepInputs&) const;
//   void launch(const MlpMemoryStepParams&, const StepInputs&) const;
template <typename Backend>
LinearStepResult linear_memory_step_op(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta,
                                       const Tensor& eta, const Tensor& alpha, const std::optional<Tensor>& m,
                                       const std::optional<Tensor>& s, const std::optional<Tensor>& chunk_weights,
                                       const std::optional<Tensor>& chunk_scale,
                                       const std::optional<Tensor>& chunk_read, const Tensor& position,
                                       int64_t chunk_size, bool read_token, int64_t objective, double p, double eps,
                                       const std::optional<Tensor>& delta, int64_t retention, double retention_q,
                                       bool mid_chunk) {
  check_token_args(q, k, v, theta, eta, alpha, position, chunk_size);
  const int64_t B = q.size(0), H = q.size(1), Dk = q.size(2), Dv = v.size(2);
  for (const auto& [name, x] :
       {std::pair<const char*, const std::optional<Tensor>*>{"state[0]", &m}, {"state[1]", &s},
        {"chunk_state.weights", &chunk_weights}, {"chunk_state.read_weights", &chunk_read}})
    check_optional_state(name, *x, {B, H, Dv, Dk}, "[B, H, Dv, Dk]", q);
  check_optional_state("chunk_state.scale", chunk_scale, {B, H}, "[B, H]", q);
  const bool read_weights = step_has_read_weights(read_token, retention);
  check_chunk_state_parts(chunk_weights.has_value(), chunk_scale.has_value(), chunk_read.has_value(), read_weights,
                          mid_chunk);

  StepCall<Backend, LinearMemoryStepParams> call(q, k, v, theta, eta, alpha, position, chunk_size, read_token,
                                                 objective, p, eps, delta, retention, retention_q, mid_chunk);
  const StepInputs& in = call.in;
  LinearMemoryStepParams& params = call.params;
  params.dk = int(Dk);
  params.dv = int(Dv);
  const auto m_c = in.state(m), s_c = in.state(s), chunk_weights_c = in.state(chunk_weights);
  const auto chunk_scale_c = in.state(chunk_scale), chunk_read_c = in.state(chunk_read);
  params.m_ptr = data_or_null(m_c);
  params.s_ptr = data_or_null(s_c);
  params.chunk_weights_ptr = data_or_null(chunk_weights_c);
  params.chunk_scale_ptr = data_or_null(chunk_scale_c);
  params.chunk_read_ptr = data_or_null(chunk_read_c);

  const Tensor o = empty_on(q, {B, H, Dv}, Backend::kInputsInComputeDtype ? in.dtype : q.scalar_type());
  const Tensor m_out = in.empty({B, H, Dv, Dk}), s_out = in.empty({B, H, Dv, Dk});
  const Tensor chunk_weights_out = call.chunk_output({B, H, Dv, Dk}), chunk_scale_out = call.chunk_output({B, H});
  const Tensor chunk_read_out = call.chunk_output({B, H, Dv, Dk}, read_weights);
  params.o_ptr = o.data_ptr();
  params.m_out_ptr = m_out.data_ptr();
  params.s_out_ptr = s_out.data_ptr();
  params.chunk_weights_out_ptr = data_if_present(chunk_weights_out);
  params.chunk_scale_out_ptr = data_if_present(chunk_scale_out);
  params.chunk_read_out_ptr = data_if_present(chunk_read_out);
  call.run();
  return {output_in_dtype_of<Backend>(o, q), m_out, s_out, chunk_weights_out, chunk_scale_out, chunk_read_out};
}

// The operator titans_ext::mlp_memory_step on a backend, as linear_memory_step_op.
template <typename Backend>
MlpStepResult mlp_memory_step_op(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta,
                                 const Tensor& eta, const Tensor& alpha, const Tensor& w1, const Tensor& w2,
                                 const std::optional<Tensor>& s1, const std::optional<Tensor>& s2,
                                 const std::optional<Tensor>& chunk_w1, const std::optional<Tensor>& chunk_w2,
                                 const std::optional<Tensor>& chunk_scale, const std::optional<Tensor>& chunk_read_w1,
                                 const std::optional<Tensor>& chunk_read_w2, const Tensor& position,
                                 int64_t chunk_size, bool read_token, std::string_view activation, int64_t objective,
                                 double p, double eps, const std::optional<Tensor>& delta, int64_t retention,
                                 double retention_q, bool mid_chunk) {
  const int64_t N = check_mlp_token_args(q, k, v, theta, eta, alpha, w1, position, chunk_size);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  check_state_tensor("state[0][0]", w1, {B, H, N, D}, "[B, H, E*D, D]", q);
  check_state_tensor("state[0][1]", w2, {B, H, D, N}, "[B, H, D, E*D]", q);
  using Named = std::pair<const char*, const std::optional<Tensor>*>;
  for (const auto& [name, x] : {Named{"state[1][0]", &s1}, Named{"chunk_state.weights[0]", &chunk_w1},
                                Named{"chunk_state.read_weights[0]", &chunk_read_w1}})
    check_optional_state(name, *x, {B, H, N, D}, "[B, H, E*D, D]", q);
  for (const auto& [name, x] : {Named{"state[1][1]", &s2}, Named{"chunk_state.weights[1]", &chunk_w2},
                                Named{"chunk_state.read_weights[1]", &chunk_read_w2}})
    check_optional_state(name, *x, {B, H, D, N}, "[B, H, D, E*D]", q);
  check_optional_state("chunk_state.scale", chunk_scale, {B, H, 2}, "[B, H, 2]", q);
  const bool read_weights = step_has_read_weights(read_token, retention);
  STD_TORCH_CHECK(chunk_w1.has_value() == chunk_w2.has_value() &&
                      chunk_read_w1.has_value() == chunk_read_w2.has_value(),
                  "chunk_state: the chunk-start states of W1 and W2 must be given together");
  check_chunk_state_parts(chunk_w1.has_value(), chunk_scale.has_value(), chunk_read_w1.has_value(), read_weights,
                          mid_chunk);

  StepCall<Backend, MlpMemoryStepParams> call(q, k, v, theta, eta, alpha, position, chunk_size, read_token, objective,
                                              p, eps, delta, retention, retention_q, mid_chunk);
  const StepInputs& in = call.in;
  MlpMemoryStepParams& params = call.params;
  params.dim = int(D);
  params.hidden = int(N);
  params.activation = mlp_activation(activation);
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

  const Tensor o = empty_on(q, {B, H, D}, Backend::kInputsInComputeDtype ? in.dtype : q.scalar_type());
  const Tensor w1_out = in.empty({B, H, N, D}), s1_out = in.empty({B, H, N, D});
  const Tensor w2_out = in.empty({B, H, D, N}), s2_out = in.empty({B, H, D, N});
  const Tensor chunk_w1_out = call.chunk_output({B, H, N, D}), chunk_w2_out = call.chunk_output({B, H, D, N});
  const Tensor chunk_scale_out = call.chunk_output({B, H, 2});
  const Tensor chunk_read_w1_out = call.chunk_output({B, H, N, D}, read_weights);
  const Tensor chunk_read_w2_out = call.chunk_output({B, H, D, N}, read_weights);
  params.o_ptr = o.data_ptr();
  params.w1_out_ptr = w1_out.data_ptr();
  params.w2_out_ptr = w2_out.data_ptr();
  params.s1_out_ptr = s1_out.data_ptr();
  params.s2_out_ptr = s2_out.data_ptr();
  params.chunk_w1_out_ptr = data_if_present(chunk_w1_out);
  params.chunk_w2_out_ptr = data_if_present(chunk_w2_out);
  params.chunk_scale_out_ptr = data_if_present(chunk_scale_out);
  params.chunk_read_w1_out_ptr = data_if_present(chunk_read_w1_out);
  params.chunk_read_w2_out_ptr = data_if_present(chunk_read_w2_out);
  call.run();
  return {output_in_dtype_of<Backend>(o, q), w1_out, w2_out, s1_out, s2_out, chunk_w1_out, chunk_w2_out,
          chunk_scale_out, chunk_read_w1_out, chunk_read_w2_out};
}

// The operator titans_ext::linear_memory_step_ (its schema above) on a backend: the kernel of
// linear_memory_step_op with every state output its input.
template <typename Backend>
Tensor linear_memory_step_inplace_op(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta,
                                     const Tensor& eta, const Tensor& alpha, Tensor m, Tensor s, Tensor chunk_weights,
                                     Tensor chunk_scale, std::optional<Tensor> chunk_read, const Tensor& position,
                                     int64_t chunk_size, bool read_token, int64_t objective, double p, double eps,
                                     const std::optional<Tensor>& delta, int64_t retention, double retention_q) {
  check_token_args(q, k, v, theta, eta, alpha, position, chunk_size);
  const int64_t B = q.size(0), H = q.size(1), Dk = q.size(2), Dv = v.size(2);
  check_state_buffer("state[0]", m, {B, H, Dv, Dk}, "[B, H, Dv, Dk]", q);
  check_state_buffer("state[1]", s, {B, H, Dv, Dk}, "[B, H, Dv, Dk]", q);
  check_state_buffer("chunk_state.weights", chunk_weights, {B, H, Dv, Dk}, "[B, H, Dv, Dk]", q);
  check_state_buffer("chunk_state.scale", chunk_scale, {B, H}, "[B, H]", q);
  const bool read_weights = step_has_read_weights(read_token, retention);
  STD_TORCH_CHECK(chunk_read.has_value() == read_weights,
                  "chunk_state.read_weights: expected a buffer exactly with read \"chunk_start\" and retention kl");
  if (chunk_read) check_state_buffer("chunk_state.read_weights", *chunk_read, {B, H, Dv, Dk}, "[B, H, Dv, Dk]", q);
  check_distinct_buffers({{"state[0]", &m}, {"state[1]", &s}, {"chunk_state.weights", &chunk_weights},
                          {"chunk_state.read_weights", chunk_read ? &*chunk_read : nullptr}});

  StepCall<Backend, LinearMemoryStepParams> call(q, k, v, theta, eta, alpha, position, chunk_size, read_token,
                                                 objective, p, eps, delta, retention, retention_q, false);
  LinearMemoryStepParams& params = call.params;
  params.dk = int(Dk);
  params.dv = int(Dv);
  params.m_ptr = params.m_out_ptr = m.data_ptr();
  params.s_ptr = params.s_out_ptr = s.data_ptr();
  params.chunk_weights_ptr = params.chunk_weights_out_ptr = chunk_weights.data_ptr();
  params.chunk_scale_ptr = params.chunk_scale_out_ptr = chunk_scale.data_ptr();
  params.chunk_read_ptr = params.chunk_read_out_ptr = chunk_read ? chunk_read->data_ptr() : nullptr;
  return call.run_for_output(q, Dv);
}

// The operator titans_ext::mlp_memory_step_ on a backend, as linear_memory_step_inplace_op.
template <typename Backend>
Tensor mlp_memory_step_inplace_op(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta,
                                  const Tensor& eta, const Tensor& alpha, Tensor w1, Tensor w2, Tensor s1, Tensor s2,
                                  Tensor chunk_w1, Tensor chunk_w2, Tensor chunk_scale,
                                  std::optional<Tensor> chunk_read_w1, std::optional<Tensor> chunk_read_w2,
                                  const Tensor& position, int64_t chunk_size, bool read_token,
                                  std::string_view activation, int64_t objective, double p, double eps,
                                  const std::optional<Tensor>& delta, int64_t retention, double retention_q) {
  const int64_t N = check_mlp_token_args(q, k, v, theta, eta, alpha, w1, position, chunk_size);
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const bool read_weights = step_has_read_weights(read_token, retention);
  STD_TORCH_CHECK(chunk_read_w1.has_value() == read_weights && chunk_read_w2.has_value() == read_weights,
                  "chunk_state.read_weights: expected buffers exactly with read \"chunk_start\" and retention kl");
  using Named = std::pair<const char*, const Tensor*>;
  for (const auto& [name, x] : {Named{"state[0][0]", &w1}, Named{"state[1][0]", &s1},
                                Named{"chunk_state.weights[0]", &chunk_w1},
                                Named{"chunk_state.read_weights[0]", chunk_read_w1 ? &*chunk_read_w1 : nullptr}})
    if (x) check_state_buffer(name, *x, {B, H, N, D}, "[B, H, E*D, D]", q);
  for (const auto& [name, x] : {Named{"state[0][1]", &w2}, Named{"state[1][1]", &s2},
                                Named{"chunk_state.weights[1]", &chunk_w2},
                                Named{"chunk_state.read_weights[1]", chunk_read_w2 ? &*chunk_read_w2 : nullptr}})
    if (x) check_state_buffer(name, *x, {B, H, D, N}, "[B, H, D, E*D]", q);
  check_state_buffer("chunk_state.scale", chunk_scale, {B, H, 2}, "[B, H, 2]", q);
  check_distinct_buffers({{"state[0][0]", &w1}, {"state[0][1]", &w2}, {"state[1][0]", &s1}, {"state[1][1]", &s2},
                          {"chunk_state.weights[0]", &chunk_w1}, {"chunk_state.weights[1]", &chunk_w2},
                          {"chunk_state.read_weights[0]", chunk_read_w1 ? &*chunk_read_w1 : nullptr},
                          {"chunk_state.read_weights[1]", chunk_read_w2 ? &*chunk_read_w2 : nullptr}});

  StepCall<Backend, MlpMemoryStepParams> call(q, k, v, theta, eta, alpha, position, chunk_size, read_token, objective,
                                              p, eps, delta, retention, retention_q, false);
  MlpMemoryStepParams& params = call.params;
  params.dim = int(D);
  params.hidden = int(N);
  params.activation = mlp_activation(activation);
  params.w1_ptr = params.w1_out_ptr = w1.data_ptr();
  params.w2_ptr = params.w2_out_ptr = w2.data_ptr();
  params.s1_ptr = params.s1_out_ptr = s1.data_ptr();
  params.s2_ptr = params.s2_out_ptr = s2.data_ptr();
  params.chunk_w1_ptr = params.chunk_w1_out_ptr = chunk_w1.data_ptr();
  params.chunk_w2_ptr = params.chunk_w2_out_ptr = chunk_w2.data_ptr();
  params.chunk_scale_ptr = params.chunk_scale_out_ptr = chunk_scale.data_ptr();
  params.chunk_read_w1_ptr = params.chunk_read_w1_out_ptr = chunk_read_w1 ? chunk_read_w1->data_ptr() : nullptr;
  params.chunk_read_w2_ptr = params.chunk_read_w2_out_ptr = chunk_read_w2 ? chunk_read_w2->data_ptr() : nullptr;
  return call.run_for_output(q, D);
}

// Registers the step operators of a backend in a STABLE_TORCH_LIBRARY_IMPL block.
template <typename Backend>
void impl_step_ops(torch::stable::detail::StableLibrary& m) {
  m.impl("linear_memory_step", TORCH_BOX(&linear_memory_step_op<Backend>));
  m.impl("mlp_memory_step", TORCH_BOX(&mlp_memory_step_op<Backend>));
  m.impl("linear_memory_step_", TORCH_BOX(&linear_memory_step_inplace_op<Backend>));
  m.impl("mlp_memory_step_", TORCH_BOX(&mlp_memory_step_inplace_op<Backend>));
}

// Defines the step operators in a STABLE_TORCH_LIBRARY_FRAGMENT block.
inline void define_step_ops(torch::stable::detail::StableLibrary& m) {
  m.def(TITANS_LINEAR_MEMORY_STEP_SCHEMA);
  m.def(TITANS_MLP_MEMORY_STEP_SCHEMA);
  m.def(TITANS_LINEAR_MEMORY_STEP_INPLACE_SCHEMA);
  m.def(TITANS_MLP_MEMORY_STEP_INPLACE_SCHEMA);
}

}  // namespace titans
