// The one place where titans_ext's kernels meet torch: operator schemas (TORCH_LIBRARY) and
// the CPU implementations, which validate tensors, fill the params structs and run the
// torch-free kernels of csrc/cpu/ over (batch, head) pairs with at::parallel_for.
// CUDA implementations of the same schemas live in ops_cuda.cpp.
//
// The public Python functions (titans_ext/ops/) check arguments with user-facing messages;
// the TORCH_CHECKs here guard the kernels against direct torch.ops calls.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "binding/tensor_params.h"
#include "cpu/linear_memory.h"
#include "cpu/mlp_memory.h"

namespace titans {
namespace {

// The per-token inputs in the compute dtype, feature dimension contiguous.
struct ComputeInputs {
  at::ScalarType dtype;
  at::Tensor q, k, v, theta, eta, alpha;

  ComputeInputs(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& theta_,
                const at::Tensor& eta_, const at::Tensor& alpha_)
      : dtype(compute_dtype(q_)), q(with_unit_inner_stride(q_.to(dtype))), k(with_unit_inner_stride(k_.to(dtype))),
        v(with_unit_inner_stride(v_.to(dtype))), theta(theta_.to(dtype)), eta(eta_.to(dtype)),
        alpha(alpha_.to(dtype)) {}

  // A state, state cotangent or delta in the compute dtype, contiguous, or none.
  std::optional<at::Tensor> state(const std::optional<at::Tensor>& x) const {
    if (!x) return std::nullopt;
    return x->to(dtype).contiguous();
  }

  LinearMemoryParams params(const std::optional<at::Tensor>& m0, const std::optional<at::Tensor>& s0,
                            int64_t chunk_size, bool read_token) const {
    return linear_memory_params(q, k, v, theta, eta, alpha, m0, s0, chunk_size, read_token);
  }

  // Gradients computed in the compute dtype, returned in the dtypes of the inputs they belong to.
  static SequenceGrads input_dtypes(const SequenceGrads& g, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v, const at::Tensor& theta, const at::Tensor& eta,
                                    const at::Tensor& alpha, const std::optional<at::Tensor>& delta) {
    return {g.dq.to(q.scalar_type()),         g.dk.to(k.scalar_type()),     g.dv.to(v.scalar_type()),
            g.dtheta.to(theta.scalar_type()), g.deta.to(eta.scalar_type()), g.dalpha.to(alpha.scalar_type()),
            delta ? g.d_delta.to(delta->scalar_type()) : g.d_delta};
  }

  MlpMemoryParams mlp_params(int64_t hidden, int64_t chunk_size, bool read_token, c10::string_view activation) const {
    return mlp_memory_params(q, k, v, theta, eta, alpha, hidden, chunk_size, read_token, activation);
  }
};

const void* data_or_null(const std::optional<at::Tensor>& x) {
  return x ? x->data_ptr() : nullptr;
}

// The gradient of delta, shaped like the compute-dtype delta_c, or an empty tensor without delta.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_memory_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& theta, const at::Tensor& eta,
    const at::Tensor& alpha, const std::optional<at::Tensor>& m0, const std::optional<at::Tensor>& s0,
    int64_t chunk_size, bool read_token, bool save_states, int64_t objective, double p, double eps,
    const std::optional<at::Tensor>& delta, int64_t retention, double retention_q) {
  check_linear_memory_args(q, k, v, theta, eta, alpha, m0, s0, chunk_size);
  const ComputeInputs in(q, k, v, theta, eta, alpha);
  const auto m0_c = in.state(m0), s0_c = in.state(s0), delta_c = in.state(delta);
  LinearMemoryParams params = in.params(m0_c, s0_c, chunk_size, read_token);
  params.miras = miras_params(objective, p, eps, delta_c, retention, retention_q, v);
  const auto out = linear_memory_fwd_outputs(params, in.q.options(), in.dtype, save_states);

  AT_DISPATCH_FLOATING_TYPES(in.dtype, "linear_memory_fwd_cpu", [&] {
    at::parallel_for(0, int64_t(params.batch) * params.heads, 1, [&](int64_t begin, int64_t end) {
      cpu::linear_memory_fwd<scalar_t>(params, begin, end);
    });
  });
  return {out.o.to(q.scalar_type()), out.m_final, out.s_final, out.chunk_states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
linear_memory_bwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& theta,
                      const at::Tensor& eta, const at::Tensor& alpha, const at::Tensor& chunk_states,
                      const at::Tensor& d_o, const std::optional<at::Tensor>& d_m_final,
                      const std::optional<at::Tensor>& d_s_final, int64_t chunk_size, bool read_token,
                      int64_t objective, double p, double eps, const std::optional<at::Tensor>& delta,
                      int64_t retention, double retention_q) {
  check_linear_memory_args(q, k, v, theta, eta, alpha, d_m_final, d_s_final, chunk_size);
  const ComputeInputs in(q, k, v, theta, eta, alpha);
  const auto dm_c = in.state(d_m_final), ds_c = in.state(d_s_final), delta_c = in.state(delta);
  const auto states_c = chunk_states.to(in.dtype).contiguous();
  const auto d_o_c = with_unit_inner_stride(d_o.to(in.dtype));

  LinearMemoryBwdParams params;
  static_cast<LinearMemoryParams&>(params) = in.params(std::nullopt, std::nullopt, chunk_size, read_token);
  TORCH_CHECK(states_c.numel() == int64_t(params.batch) * params.heads * params.n_chunks * 2 * params.dv * params.dk,
              "linear_memory_bwd: chunk_states does not match the inputs (was the forward run with save_states?)");
  TORCH_CHECK(d_o_c.sizes() == v.sizes(), "linear_memory_bwd: d_o must have the shape of v / o");
  params.miras = miras_params(objective, p, eps, delta_c, retention, retention_q, v);
  params.chunk_states_ptr = const_cast<void*>(states_c.data_ptr());
  params.d_o = token_tensor(d_o_c);
  params.d_m_final_ptr = data_or_null(dm_c);
  params.d_s_final_ptr = data_or_null(ds_c);

  const auto opts = in.q.options();
  const SequenceGrads g = allocate_sequence_grads(params, q, k, v, theta, delta_c, opts, opts);
  auto dm0 = at::empty({params.batch, params.heads, params.dv, params.dk}, opts), ds0 = at::empty_like(dm0);
  params.dm0_ptr = dm0.data_ptr();
  params.ds0_ptr = ds0.data_ptr();

  AT_DISPATCH_FLOATING_TYPES(in.dtype, "linear_memory_bwd_cpu", [&] {
    at::parallel_for(0, int64_t(params.batch) * params.heads, 1, [&](int64_t begin, int64_t end) {
      cpu::linear_memory_bwd<scalar_t>(params, begin, end);
    });
  });
  const auto in_dtypes = in.input_dtypes(g, q, k, v, theta, eta, alpha, delta);
  return {in_dtypes.dq, in_dtypes.dk, in_dtypes.dv, in_dtypes.dtheta, in_dtypes.deta, in_dtypes.dalpha, dm0, ds0,
          in_dtypes.d_delta};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_memory_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& theta, const at::Tensor& eta,
    const at::Tensor& alpha, const at::Tensor& w1, const at::Tensor& w2, const std::optional<at::Tensor>& s1,
    const std::optional<at::Tensor>& s2, int64_t chunk_size, bool read_token, c10::string_view activation,
    bool save_states, int64_t objective, double p, double eps, const std::optional<at::Tensor>& delta,
    int64_t retention, double retention_q) {
  TORCH_CHECK(w1.dim() == 4, "w1 must be [B, H, N, D], got ", w1.sizes());
  const int64_t hidden = w1.size(2);
  check_mlp_memory_args(q, k, v, theta, eta, alpha, w1, w2, s1, s2, hidden, chunk_size);
  const ComputeInputs in(q, k, v, theta, eta, alpha);
  const auto w1_c = *in.state(w1), w2_c = *in.state(w2);
  const auto s1_c = in.state(s1), s2_c = in.state(s2), delta_c = in.state(delta);

  MlpMemoryParams params = in.mlp_params(hidden, chunk_size, read_token, activation);
  params.miras = miras_params(objective, p, eps, delta_c, retention, retention_q, v);
  params.w1_0_ptr = w1_c.data_ptr();
  params.w2_0_ptr = w2_c.data_ptr();
  params.s1_0_ptr = data_or_null(s1_c);
  params.s2_0_ptr = data_or_null(s2_c);
  const auto opts = in.q.options();
  auto o = at::empty(q.sizes(), opts);
  auto w1_final = at::empty(w1.sizes(), opts), s1_final = at::empty(w1.sizes(), opts);
  auto w2_final = at::empty(w2.sizes(), opts), s2_final = at::empty(w2.sizes(), opts);
  auto chunk_states = save_states
      ? at::empty({params.batch, params.heads, params.n_chunks, 4, hidden * params.dim}, opts)
      : at::empty({0}, opts);
  params.o_ptr = o.data_ptr();
  params.w1_final_ptr = w1_final.data_ptr();
  params.w2_final_ptr = w2_final.data_ptr();
  params.s1_final_ptr = s1_final.data_ptr();
  params.s2_final_ptr = s2_final.data_ptr();
  params.chunk_states_ptr = save_states ? chunk_states.data_ptr() : nullptr;

  AT_DISPATCH_FLOATING_TYPES(in.dtype, "mlp_memory_fwd_cpu", [&] {
    at::parallel_for(0, int64_t(params.batch) * params.heads, 1, [&](int64_t begin, int64_t end) {
      cpu::mlp_memory_fwd<scalar_t>(params, begin, end);
    });
  });
  return {o.to(q.scalar_type()), w1_final, w2_final, s1_final, s2_final, chunk_states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor, at::Tensor, at::Tensor>
mlp_memory_bwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& theta,
                   const at::Tensor& eta, const at::Tensor& alpha, const at::Tensor& chunk_states,
                   const at::Tensor& d_o, const std::optional<at::Tensor>& d_w1_final,
                   const std::optional<at::Tensor>& d_w2_final, const std::optional<at::Tensor>& d_s1_final,
                   const std::optional<at::Tensor>& d_s2_final, int64_t hidden, int64_t chunk_size, bool read_token,
                   c10::string_view activation, int64_t objective, double p, double eps,
                   const std::optional<at::Tensor>& delta, int64_t retention, double retention_q) {
  check_mlp_memory_args(q, k, v, theta, eta, alpha, d_w1_final, d_w2_final, d_s1_final, d_s2_final, hidden,
                        chunk_size);
  const ComputeInputs in(q, k, v, theta, eta, alpha);
  const auto dw1_c = in.state(d_w1_final), dw2_c = in.state(d_w2_final);
  const auto ds1_c = in.state(d_s1_final), ds2_c = in.state(d_s2_final), delta_c = in.state(delta);
  const auto states_c = chunk_states.to(in.dtype).contiguous();
  const auto d_o_c = with_unit_inner_stride(d_o.to(in.dtype));

  MlpMemoryBwdParams params;
  static_cast<MlpMemoryParams&>(params) = in.mlp_params(hidden, chunk_size, read_token, activation);
  params.miras = miras_params(objective, p, eps, delta_c, retention, retention_q, v);
  TORCH_CHECK(states_c.numel() == int64_t(params.batch) * params.heads * params.n_chunks * 4 * hidden * params.dim,
              "mlp_memory_bwd: chunk_states does not match the inputs (was the forward run with save_states?)");
  TORCH_CHECK(d_o_c.sizes() == q.sizes(), "mlp_memory_bwd: d_o must have the shape of q / o");
  params.chunk_states_ptr = const_cast<void*>(states_c.data_ptr());
  params.d_o = token_tensor(d_o_c);
  params.d_w1_final_ptr = data_or_null(dw1_c);
  params.d_w2_final_ptr = data_or_null(dw2_c);
  params.d_s1_final_ptr = data_or_null(ds1_c);
  params.d_s2_final_ptr = data_or_null(ds2_c);

  const auto opts = in.q.options();
  const SequenceGrads g = allocate_sequence_grads(params, q, k, v, theta, delta_c, opts, opts);
  auto dw1 = at::empty({params.batch, params.heads, hidden, params.dim}, opts), ds1 = at::empty_like(dw1);
  auto dw2 = at::empty({params.batch, params.heads, params.dim, hidden}, opts), ds2 = at::empty_like(dw2);
  params.dw1_0_ptr = dw1.data_ptr();
  params.dw2_0_ptr = dw2.data_ptr();
  params.ds1_0_ptr = ds1.data_ptr();
  params.ds2_0_ptr = ds2.data_ptr();

  AT_DISPATCH_FLOATING_TYPES(in.dtype, "mlp_memory_bwd_cpu", [&] {
    at::parallel_for(0, int64_t(params.batch) * params.heads, 1, [&](int64_t begin, int64_t end) {
      cpu::mlp_memory_bwd<scalar_t>(params, begin, end);
    });
  });
  const auto in_dtypes = in.input_dtypes(g, q, k, v, theta, eta, alpha, delta);
  return {in_dtypes.dq, in_dtypes.dk, in_dtypes.dv, in_dtypes.dtheta, in_dtypes.deta, in_dtypes.dalpha,
          dw1,          dw2,          ds1,          ds2,              in_dtypes.d_delta};
}

}  // namespace

// Schemas: one forward and one backward op per memory. The forward also returns what the
// backward needs (the chunk-start states), so autograd can be attached in Python with
// torch.library.register_autograd and both directions stay visible to torch.compile.
// The trailing MIRAS arguments of every op (codes of titans_params.h; delta contiguous
// [B, T, H, Dv] or None) default to the l2 objective and retention. d_delta is empty when delta
// is None.
#define TITANS_MIRAS_ARGS \
  "int objective=0, float p=2., float eps=0., Tensor? delta=None, int retention=0, float retention_q=2."

TORCH_LIBRARY(titans_ext, m) {
  m.def(
      "linear_memory_fwd(Tensor q, Tensor k, Tensor v, Tensor theta, Tensor eta, Tensor alpha, "
      "Tensor? m0, Tensor? s0, int chunk_size, bool read_token, bool save_states, " TITANS_MIRAS_ARGS ") "
      "-> (Tensor o, Tensor m_final, Tensor s_final, Tensor chunk_states)");
  m.def(
      "linear_memory_bwd(Tensor q, Tensor k, Tensor v, Tensor theta, Tensor eta, Tensor alpha, "
      "Tensor chunk_states, Tensor d_o, Tensor? d_m_final, Tensor? d_s_final, int chunk_size, bool read_token, "
      TITANS_MIRAS_ARGS ") "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dtheta, Tensor deta, Tensor dalpha, Tensor dm0, Tensor ds0, "
      "Tensor d_delta)");
  // chunk_states: [B, H, n_chunks, 4, N * D], the chunk-start W1, S1, W2, S2 (titans_params.h).
  m.def(
      "mlp_memory_fwd(Tensor q, Tensor k, Tensor v, Tensor theta, Tensor eta, Tensor alpha, "
      "Tensor w1, Tensor w2, Tensor? s1, Tensor? s2, int chunk_size, bool read_token, str activation, "
      "bool save_states, " TITANS_MIRAS_ARGS ") "
      "-> (Tensor o, Tensor w1_final, Tensor w2_final, Tensor s1_final, Tensor s2_final, Tensor chunk_states)");
  m.def(
      "mlp_memory_bwd(Tensor q, Tensor k, Tensor v, Tensor theta, Tensor eta, Tensor alpha, "
      "Tensor chunk_states, Tensor d_o, Tensor? d_w1_final, Tensor? d_w2_final, Tensor? d_s1_final, "
      "Tensor? d_s2_final, int hidden, int chunk_size, bool read_token, str activation, " TITANS_MIRAS_ARGS ") "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dtheta, Tensor deta, Tensor dalpha, Tensor dw1, Tensor dw2, "
      "Tensor ds1, Tensor ds2, Tensor d_delta)");
}

TORCH_LIBRARY_IMPL(titans_ext, CPU, m) {
  m.impl("linear_memory_fwd", &linear_memory_fwd_cpu);
  m.impl("linear_memory_bwd", &linear_memory_bwd_cpu);
  m.impl("mlp_memory_fwd", &mlp_memory_fwd_cpu);
  m.impl("mlp_memory_bwd", &mlp_memory_bwd_cpu);
}

}  // namespace titans

// `import titans_ext._C` loads this library, which runs the registrations above; the module
// itself is empty (no pybind11), so the .so only depends on the stable Python ABI.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
