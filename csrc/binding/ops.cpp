// The one place where titans_ext's kernels meet torch: operator schemas (STABLE_TORCH_LIBRARY) and
// the CPU implementations, which validate tensors, fill the params structs and run the torch-free
// kernels of csrc/cpu/ over (batch, head) pairs on torch's intra-op threads.
// CUDA implementations of the same schemas live in ops_cuda.cpp.
//
// Only the LibTorch stable ABI is used (torch/csrc/stable, torch/headeronly; setup.py sets
// TORCH_TARGET_VERSION), so one build runs on every torch from the target version on.
// The public Python functions (titans_ext/ops/) check arguments with user-facing messages;
// the STD_TORCH_CHECKs here guard the kernels against direct torch.ops calls.
#include <Python.h>

#include <tuple>
#include <vector>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include "binding/cpu_dispatch.h"
#include "binding/cpu_state_cache.h"
#include "binding/packed_sequences.h"
#include "binding/tensor_params.h"
#include "cpu/linear_memory.h"
#include "cpu/mlp_memory.h"

namespace titans {
namespace {

// Runs kernel(scalar_t{}, begin, end) over the params' (sequence, head) work items
// (cpu/kernel_utils.h's Head), one item per task.
template <typename Kernel>
void run_over_heads(ScalarType dtype, const SequenceParams& params, const Kernel& kernel) {
  titans::run_over_heads(dtype, int64_t(params.n_seqs) * params.heads, 1, kernel);
}

// The per-token inputs in the compute dtype, feature dimension contiguous.
struct ComputeInputs {
  ScalarType dtype;
  Tensor q, k, v, theta, eta, alpha;

  ComputeInputs(const Tensor& q_, const Tensor& k_, const Tensor& v_, const Tensor& theta_, const Tensor& eta_,
                const Tensor& alpha_)
      : dtype(compute_dtype(q_)), q(with_unit_inner_stride(to_dtype(q_, dtype))),
        k(with_unit_inner_stride(to_dtype(k_, dtype))), v(with_unit_inner_stride(to_dtype(v_, dtype))),
        theta(to_dtype(theta_, dtype)), eta(to_dtype(eta_, dtype)), alpha(to_dtype(alpha_, dtype)) {}

  std::optional<Tensor> state(const std::optional<Tensor>& x) const { return contiguous_in(x, dtype); }

  LinearMemoryParams params(const std::optional<Tensor>& m0, const std::optional<Tensor>& s0, int64_t chunk_size,
                            bool read_token) const {
    return linear_memory_params(q, k, v, theta, eta, alpha, m0, s0, chunk_size, read_token);
  }

  MlpMemoryParams mlp_params(int64_t hidden, int64_t chunk_size, bool read_token, std::string_view activation) const {
    return mlp_memory_params(q, k, v, theta, eta, alpha, hidden, chunk_size, read_token, activation);
  }

  // An output of the compute dtype on the device of the inputs.
  Tensor empty(torch::headeronly::IntHeaderOnlyArrayRef sizes) const { return empty_on(q, sizes, dtype); }

  // Gradients computed in the compute dtype, returned in the dtypes of the inputs they belong to.
  static SequenceGrads input_dtypes(const SequenceGrads& g, const Tensor& q, const Tensor& k, const Tensor& v,
                                    const Tensor& theta, const Tensor& eta, const Tensor& alpha,
                                    const std::optional<Tensor>& delta) {
    return {to_dtype(g.dq, q.scalar_type()),         to_dtype(g.dk, k.scalar_type()),
            to_dtype(g.dv, v.scalar_type()),         to_dtype(g.dtheta, theta.scalar_type()),
            to_dtype(g.deta, eta.scalar_type()),     to_dtype(g.dalpha, alpha.scalar_type()),
            delta ? to_dtype(g.d_delta, delta->scalar_type()) : g.d_delta};
  }
};

// Packed sequences (cu_seqlens, titans_params.h) for the CPU kernels: the offsets as int64 and
// each sequence's first chunk-start slot. The offsets' values are checked here, where reading
// them costs nothing (the Python op has already said what is wrong; this guards direct
// torch.ops calls). Without cu_seqlens it changes nothing.
class PackedSequences {
 public:
  PackedSequences(const std::optional<Tensor>& cu_seqlens, const Tensor& q) {
    if (!cu_seqlens) return;
    check_cu_seqlens_tensor(*cu_seqlens, q);
    offsets_ = torch::stable::contiguous(to_dtype(*cu_seqlens, ScalarType::Long));
  }

  // The rows of the initial and final states: N with cu_seqlens, -1 (the batch) without.
  int64_t n_seqs() const { return offsets_ ? offsets_->size(0) - 1 : -1; }

  // Points params at the sequences (after params' sizes are set, the arguments checked).
  void apply(SequenceParams& params) {
    if (!offsets_) return;
    const int64_t n = n_seqs(), C = params.chunk_size;
    const auto* offsets = static_cast<const int64_t*>(offsets_->data_ptr());
    STD_TORCH_CHECK(params.batch == 1, "cu_seqlens needs B == 1 (the sequences packed along T), got B = ",
                    params.batch);
    check_cu_seqlens_values(offsets, n, params.seqlen);
    chunk_offsets_.assign(1, 0);
    for (int64_t i = 0; i < n; ++i)
      chunk_offsets_.push_back(chunk_offsets_.back() + (offsets[i + 1] - offsets[i] + C - 1) / C);
    params.cu_seqlens = offsets;
    params.chunk_offsets = chunk_offsets_.data();
    params.n_seqs = int(n);
    params.n_chunks = int((params.seqlen + n * (C - 1)) / C);
  }

  // Zeroes the saved-state slots of [B, H, n_chunks, ...] chunk_states past the last sequence's:
  // n_chunks is a bound, and the op's outputs must not depend on uninitialized memory.
  void clear_unused_slots(const SequenceParams& params, Tensor chunk_states) const {
    if (!offsets_ || chunk_states.numel() == 0) return;
    const int64_t used = chunk_offsets_.back();
    if (used == params.n_chunks) return;
    Tensor unused = torch::stable::narrow(chunk_states, 2, used, params.n_chunks - used);
    torch::stable::zero_(unused);
  }

 private:
  std::optional<Tensor> offsets_;
  std::vector<int64_t> chunk_offsets_;
};

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_memory_fwd_cpu(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta, const Tensor& eta, const Tensor& alpha,
    const std::optional<Tensor>& m0, const std::optional<Tensor>& s0, int64_t chunk_size, bool read_token,
    bool save_states, int64_t objective, double p, double eps, const std::optional<Tensor>& delta, int64_t retention,
    double retention_q, const std::optional<Tensor>& cu_seqlens) {
  PackedSequences packed(cu_seqlens, q);
  check_linear_memory_args(q, k, v, theta, eta, alpha, m0, s0, chunk_size, packed.n_seqs());
  const ComputeInputs in(q, k, v, theta, eta, alpha);
  const auto m0_c = in.state(m0), s0_c = in.state(s0), delta_c = in.state(delta);
  LinearMemoryParams params = in.params(m0_c, s0_c, chunk_size, read_token);
  packed.apply(params);
  params.miras = miras_params(objective, p, eps, delta_c, retention, retention_q, v);
  // Every chunk's start state (the CPU backward reads each; the CUDA kernels keep fewer).
  const auto out = linear_memory_fwd_outputs(params, in.q, in.dtype, in.dtype, save_states, params.n_chunks,
                                             cached_cpu_empty);
  packed.clear_unused_slots(params, out.chunk_states);

  run_over_heads(in.dtype, params, [&](auto zero, int64_t begin, int64_t end) {
    cpu::linear_memory_fwd<decltype(zero)>(params, begin, end);
  });
  // The checkpoints keep q's dtype on every device (the CUDA kernels' rule, linear_memory_launch.cuh).
  return {to_dtype(out.o, q.scalar_type()), out.m_final, out.s_final, to_dtype(out.chunk_states, q.scalar_type())};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> linear_memory_bwd_cpu(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta, const Tensor& eta, const Tensor& alpha,
    const Tensor& chunk_states, const Tensor& d_o, const std::optional<Tensor>& d_m_final,
    const std::optional<Tensor>& d_s_final, int64_t chunk_size, bool read_token, int64_t objective, double p,
    double eps, const std::optional<Tensor>& delta, int64_t retention, double retention_q,
    const std::optional<Tensor>& cu_seqlens) {
  PackedSequences packed(cu_seqlens, q);
  check_linear_memory_args(q, k, v, theta, eta, alpha, d_m_final, d_s_final, chunk_size, packed.n_seqs());
  const ComputeInputs in(q, k, v, theta, eta, alpha);
  const auto dm_c = in.state(d_m_final), ds_c = in.state(d_s_final), delta_c = in.state(delta);
  const Tensor states_c = torch::stable::contiguous(to_dtype(chunk_states, in.dtype));
  const Tensor d_o_c = with_unit_inner_stride(to_dtype(d_o, in.dtype));

  LinearMemoryBwdParams params;
  static_cast<LinearMemoryParams&>(params) = in.params(std::nullopt, std::nullopt, chunk_size, read_token);
  packed.apply(params);
  STD_TORCH_CHECK(
      states_c.numel() == int64_t(params.batch) * params.heads * params.n_chunks * 2 * params.dv * params.dk,
      "linear_memory_bwd: chunk_states does not match the inputs (was the forward run with save_states?)");
  STD_TORCH_CHECK(same_shape(d_o_c, v), "linear_memory_bwd: d_o must have the shape of v / o");
  params.miras = miras_params(objective, p, eps, delta_c, retention, retention_q, v);
  params.chunk_states_ptr = states_c.data_ptr();
  params.d_o = token_tensor(d_o_c);
  params.d_m_final_ptr = data_or_null(dm_c);
  params.d_s_final_ptr = data_or_null(ds_c);

  const SequenceGrads g = allocate_sequence_grads(params, in.q, in.k, in.v, in.theta, delta_c, in.dtype, in.dtype);
  const Tensor dm0 = in.empty({params.n_seqs, params.heads, params.dv, params.dk}), ds0 = torch::stable::empty_like(dm0);
  params.dm0_ptr = dm0.data_ptr();
  params.ds0_ptr = ds0.data_ptr();

  run_over_heads(in.dtype, params, [&](auto zero, int64_t begin, int64_t end) {
    cpu::linear_memory_bwd<decltype(zero)>(params, begin, end);
  });
  const SequenceGrads out = ComputeInputs::input_dtypes(g, q, k, v, theta, eta, alpha, delta);
  return {out.dq, out.dk, out.dv, out.dtheta, out.deta, out.dalpha, dm0, ds0, out.d_delta};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mlp_memory_fwd_cpu(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta, const Tensor& eta, const Tensor& alpha,
    const Tensor& w1, const Tensor& w2, const std::optional<Tensor>& s1, const std::optional<Tensor>& s2,
    int64_t chunk_size, bool read_token, std::string_view activation, bool save_states, int64_t objective, double p,
    double eps, const std::optional<Tensor>& delta, int64_t retention, double retention_q,
    const std::optional<Tensor>& cu_seqlens) {
  STD_TORCH_CHECK(w1.dim() == 4, "w1 must be [B, H, N, D], got ", shape_str(w1));
  const int64_t hidden = w1.size(2);
  PackedSequences packed(cu_seqlens, q);
  check_mlp_memory_args(q, k, v, theta, eta, alpha, w1, w2, s1, s2, hidden, chunk_size, packed.n_seqs());
  const ComputeInputs in(q, k, v, theta, eta, alpha);
  const Tensor w1_c = *in.state(w1), w2_c = *in.state(w2);
  const auto s1_c = in.state(s1), s2_c = in.state(s2), delta_c = in.state(delta);

  MlpMemoryParams params = in.mlp_params(hidden, chunk_size, read_token, activation);
  packed.apply(params);
  params.miras = miras_params(objective, p, eps, delta_c, retention, retention_q, v);
  params.w1_0_ptr = w1_c.data_ptr();
  params.w2_0_ptr = w2_c.data_ptr();
  params.s1_0_ptr = data_or_null(s1_c);
  params.s2_0_ptr = data_or_null(s2_c);
  const Tensor o = in.empty(q.sizes());
  const Tensor w1_final = in.empty(w1.sizes()), s1_final = in.empty(w1.sizes());
  const Tensor w2_final = in.empty(w2.sizes()), s2_final = in.empty(w2.sizes());
  const Tensor chunk_states = save_states ? cached_cpu_empty({params.batch, params.heads, params.n_chunks,
                                                              cpu::mlp_memory_slot_size(params)},
                                                             in.dtype)
                                          : in.empty({0});
  params.o_ptr = o.data_ptr();
  params.w1_final_ptr = w1_final.data_ptr();
  params.w2_final_ptr = w2_final.data_ptr();
  params.s1_final_ptr = s1_final.data_ptr();
  params.s2_final_ptr = s2_final.data_ptr();
  params.chunk_states_ptr = save_states ? chunk_states.data_ptr() : nullptr;
  packed.clear_unused_slots(params, chunk_states);

  run_over_heads(in.dtype, params, [&](auto zero, int64_t begin, int64_t end) {
    cpu::mlp_memory_fwd<decltype(zero)>(params, begin, end);
  });
  return {to_dtype(o, q.scalar_type()), w1_final, w2_final, s1_final, s2_final, chunk_states};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
mlp_memory_bwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta, const Tensor& eta,
                   const Tensor& alpha, const Tensor& chunk_states, const Tensor& d_o,
                   const std::optional<Tensor>& d_w1_final, const std::optional<Tensor>& d_w2_final,
                   const std::optional<Tensor>& d_s1_final, const std::optional<Tensor>& d_s2_final, int64_t hidden,
                   int64_t chunk_size, bool read_token, std::string_view activation, int64_t objective, double p,
                   double eps, const std::optional<Tensor>& delta, int64_t retention, double retention_q,
                   const std::optional<Tensor>& cu_seqlens) {
  PackedSequences packed(cu_seqlens, q);
  check_mlp_memory_args(q, k, v, theta, eta, alpha, d_w1_final, d_w2_final, d_s1_final, d_s2_final, hidden,
                        chunk_size, packed.n_seqs());
  const ComputeInputs in(q, k, v, theta, eta, alpha);
  const auto dw1_c = in.state(d_w1_final), dw2_c = in.state(d_w2_final);
  const auto ds1_c = in.state(d_s1_final), ds2_c = in.state(d_s2_final), delta_c = in.state(delta);
  const Tensor states_c = torch::stable::contiguous(to_dtype(chunk_states, in.dtype));
  const Tensor d_o_c = with_unit_inner_stride(to_dtype(d_o, in.dtype));

  MlpMemoryBwdParams params;
  static_cast<MlpMemoryParams&>(params) = in.mlp_params(hidden, chunk_size, read_token, activation);
  packed.apply(params);
  params.miras = miras_params(objective, p, eps, delta_c, retention, retention_q, v);
  STD_TORCH_CHECK(
      states_c.numel() == int64_t(params.batch) * params.heads * params.n_chunks * cpu::mlp_memory_slot_size(params),
      "mlp_memory_bwd: chunk_states does not match the inputs (was the forward run with save_states?)");
  STD_TORCH_CHECK(same_shape(d_o_c, q), "mlp_memory_bwd: d_o must have the shape of q / o");
  params.chunk_states_ptr = states_c.data_ptr();
  params.d_o = token_tensor(d_o_c);
  params.d_w1_final_ptr = data_or_null(dw1_c);
  params.d_w2_final_ptr = data_or_null(dw2_c);
  params.d_s1_final_ptr = data_or_null(ds1_c);
  params.d_s2_final_ptr = data_or_null(ds2_c);

  const SequenceGrads g = allocate_sequence_grads(params, in.q, in.k, in.v, in.theta, delta_c, in.dtype, in.dtype);
  const Tensor dw1 = in.empty({params.n_seqs, params.heads, hidden, params.dim}), ds1 = torch::stable::empty_like(dw1);
  const Tensor dw2 = in.empty({params.n_seqs, params.heads, params.dim, hidden}), ds2 = torch::stable::empty_like(dw2);
  params.dw1_0_ptr = dw1.data_ptr();
  params.dw2_0_ptr = dw2.data_ptr();
  params.ds1_0_ptr = ds1.data_ptr();
  params.ds2_0_ptr = ds2.data_ptr();

  run_over_heads(in.dtype, params, [&](auto zero, int64_t begin, int64_t end) {
    cpu::mlp_memory_bwd<decltype(zero)>(params, begin, end);
  });
  const SequenceGrads out = ComputeInputs::input_dtypes(g, q, k, v, theta, eta, alpha, delta);
  return {out.dq, out.dk, out.dv, out.dtheta, out.deta, out.dalpha, dw1, dw2, ds1, ds2, out.d_delta};
}

}  // namespace

// Schemas: one forward and one backward op per memory. The forward also returns what the
// backward needs (the chunk-start states), so autograd can be attached in Python with
// torch.library.register_autograd and both directions stay visible to torch.compile.
// The trailing arguments of every op: the MIRAS options (TITANS_MIRAS_ARGS, tensor_params.h)
// default to the l2 objective and retention; d_delta is empty when delta is None. Last,
// cu_seqlens: None, or the int32/int64 [N + 1] offsets of packed sequences (titans_params.h;
// B == 1); the states are then [N, H, ...] and chunk_states has (T + N (chunk_size - 1)) //
// chunk_size slots per head.
#define TITANS_OPTION_ARGS TITANS_MIRAS_ARGS ", Tensor? cu_seqlens=None"

STABLE_TORCH_LIBRARY(titans_ext, m) {
  m.def(
      "linear_memory_fwd(Tensor q, Tensor k, Tensor v, Tensor theta, Tensor eta, Tensor alpha, "
      "Tensor? m0, Tensor? s0, int chunk_size, bool read_token, bool save_states, " TITANS_OPTION_ARGS ") "
      "-> (Tensor o, Tensor m_final, Tensor s_final, Tensor chunk_states)");
  m.def(
      "linear_memory_bwd(Tensor q, Tensor k, Tensor v, Tensor theta, Tensor eta, Tensor alpha, "
      "Tensor chunk_states, Tensor d_o, Tensor? d_m_final, Tensor? d_s_final, int chunk_size, bool read_token, "
      TITANS_OPTION_ARGS ") "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dtheta, Tensor deta, Tensor dalpha, Tensor dm0, Tensor ds0, "
      "Tensor d_delta)");
  // chunk_states: [B, H, n_chunks, 4, N * D], the chunk-start W1, S1, W2, S2 (titans_params.h).
  m.def(
      "mlp_memory_fwd(Tensor q, Tensor k, Tensor v, Tensor theta, Tensor eta, Tensor alpha, "
      "Tensor w1, Tensor w2, Tensor? s1, Tensor? s2, int chunk_size, bool read_token, str activation, "
      "bool save_states, " TITANS_OPTION_ARGS ") "
      "-> (Tensor o, Tensor w1_final, Tensor w2_final, Tensor s1_final, Tensor s2_final, Tensor chunk_states)");
  m.def(
      "mlp_memory_bwd(Tensor q, Tensor k, Tensor v, Tensor theta, Tensor eta, Tensor alpha, "
      "Tensor chunk_states, Tensor d_o, Tensor? d_w1_final, Tensor? d_w2_final, Tensor? d_s1_final, "
      "Tensor? d_s2_final, int hidden, int chunk_size, bool read_token, str activation, " TITANS_OPTION_ARGS ") "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dtheta, Tensor deta, Tensor dalpha, Tensor dw1, Tensor dw2, "
      "Tensor ds1, Tensor ds2, Tensor d_delta)");
}

STABLE_TORCH_LIBRARY_IMPL(titans_ext, CPU, m) {
  m.impl("linear_memory_fwd", TORCH_BOX(&linear_memory_fwd_cpu));
  m.impl("linear_memory_bwd", TORCH_BOX(&linear_memory_bwd_cpu));
  m.impl("mlp_memory_fwd", TORCH_BOX(&mlp_memory_fwd_cpu));
  m.impl("mlp_memory_bwd", TORCH_BOX(&mlp_memory_bwd_cpu));
}

}  // namespace titans

// `import titans_ext._C` loads this library, which runs the registrations above; the module
// itself is empty (no pybind11, no other Python C-API), so the .so depends only on the stable
// Python ABI (abi3) and the LibTorch stable ABI.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
