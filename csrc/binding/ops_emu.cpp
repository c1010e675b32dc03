// titans_ext._emu: the CUDA kernels' sources run on the CPU through the device layer's SIMT
// emulation (csrc/device/emu/), as titans_emu:: operators. Built in every build, so CI without
// a GPU runs the CUDA kernels' code:
//   - the device layer's self-test kernels (csrc/device/selftest/), for python_tests/test_device_emulation.py;
//   - linear_memory_fwd and linear_memory_bwd with the schemas and output contracts of
//     titans_ext::linear_memory_fwd / titans_ext::linear_memory_bwd;
//   - mlp_memory_fwd and mlp_memory_bwd with the schemas and the CUDA output contracts of
//     titans_ext::mlp_memory_fwd / titans_ext::mlp_memory_bwd (chunk-start states in the inputs'
//     dtype), and mlp_memory_plan, what their launchers choose on a device.
// Emulation errors (barrier divergence, shared memory out of bounds, ...) raise RuntimeError
// naming the kernel, block and thread. Inputs are CPU tensors. Stable ABI only, like the CUDA
// binding it shares linear_memory_device.h with.
#include <Python.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include "binding/linear_memory_device.h"
#include "binding/linear_memory_plan.h"
#include "binding/mlp_memory_device.h"
#include "device/selftest/selftest.h"

// runtime.h is torch-free and defines no macros, unlike the device layer's emu.h.
#include "device/emu/runtime.h"

namespace titans {
namespace {

using selftest::HalfKind;
using selftest::MmaKind;
using selftest::ShuffleKind;
using selftest::WarpOrdering;

Tensor checked_float(const Tensor& x, const char* name) {
  STD_TORCH_CHECK(x.is_cpu() && x.scalar_type() == ScalarType::Float, name, " must be a float32 CPU tensor");
  return torch::stable::contiguous(x);
}

// A contiguous int32 CPU tensor whose values all lie in [0, bound].
Tensor checked_indices(const Tensor& x, const char* name, int64_t numel, int32_t bound) {
  STD_TORCH_CHECK(x.is_cpu() && x.scalar_type() == ScalarType::Int && (numel < 0 || x.numel() == numel), name,
                  " must be an int32 CPU tensor", numel < 0 ? "" : " of " + std::to_string(numel) + " elements");
  const Tensor x_c = torch::stable::contiguous(x);
  const int32_t* data = x_c.const_data_ptr<int32_t>();
  STD_TORCH_CHECK(std::all_of(data, data + x_c.numel(), [&](int32_t i) { return i >= 0 && i <= bound; }), name,
                  " must lie in [0, ", bound, "]");
  return x_c;
}

Tensor new_cpu(torch::headeronly::IntHeaderOnlyArrayRef sizes, ScalarType dtype) {
  return torch::stable::empty(sizes, dtype, std::nullopt, torch::stable::Device(torch::headeronly::DeviceType::CPU));
}

Tensor zeros_cpu(torch::headeronly::IntHeaderOnlyArrayRef sizes, ScalarType dtype) {
  Tensor out = new_cpu(sizes, dtype);
  return torch::stable::zero_(out);
}

bool has_sizes(const Tensor& x, torch::headeronly::IntHeaderOnlyArrayRef sizes) { return x.sizes() == sizes; }

Tensor block_reduce_sum(const Tensor& x, int64_t threads) {
  const Tensor x_c = checked_float(x, "x");
  STD_TORCH_CHECK(threads > 0 && (threads & (threads - 1)) == 0, "threads must be a power of two");
  Tensor out = new_cpu({(x.numel() + threads - 1) / threads}, ScalarType::Float);
  selftest::block_reduce_sum(x_c.const_data_ptr<float>(), out.mutable_data_ptr<float>(), int(x.numel()),
                             int(threads), nullptr);
  return out;
}

ShuffleKind shuffle_kind(const std::string& kind) {
  if (kind == "idx") return ShuffleKind::kIdx;
  if (kind == "up") return ShuffleKind::kUp;
  if (kind == "down") return ShuffleKind::kDown;
  STD_TORCH_CHECK(kind == "xor", "kind must be idx, up, down or xor, got ", kind);
  return ShuffleKind::kXor;
}

Tensor warp_shuffle(const Tensor& x, const std::string& kind, int64_t arg, int64_t width) {
  const Tensor x_c = checked_float(x, "x");
  STD_TORCH_CHECK(x.numel() % 32 == 0 && x.numel() <= 1024, "x must hold whole warps (at most 1024 lanes)");
  Tensor out = torch::stable::empty_like(x_c);
  selftest::warp_shuffle(x_c.const_data_ptr<float>(), out.mutable_data_ptr<float>(), int(x.numel()),
                         shuffle_kind(kind), int(arg), int(width), nullptr);
  return out;
}

std::tuple<Tensor, Tensor, Tensor> warp_reduce(const Tensor& x) {
  const Tensor x_c = checked_float(x, "x");
  STD_TORCH_CHECK(x.numel() % 32 == 0 && x.numel() <= 1024, "x must hold whole warps (at most 1024 lanes)");
  Tensor sum = torch::stable::empty_like(x_c), max = torch::stable::empty_like(x_c);
  Tensor ballot = new_cpu(x_c.sizes(), ScalarType::Int);
  selftest::warp_reduce(x_c.const_data_ptr<float>(), sum.mutable_data_ptr<float>(), max.mutable_data_ptr<float>(),
                        ballot.mutable_data_ptr<int32_t>(), int(x.numel()), nullptr);
  return {sum, max, ballot};
}

Tensor neighbour_exchange(const Tensor& x, bool with_barrier) {
  const Tensor x_c = checked_float(x, "x");
  STD_TORCH_CHECK(x.numel() == 256, "x must have 256 elements");
  Tensor out = torch::stable::empty_like(x_c);
  selftest::neighbour_exchange(x_c.const_data_ptr<float>(), out.mutable_data_ptr<float>(), with_barrier, nullptr);
  return out;
}

Tensor shared_read_shifted(int64_t shift) {
  Tensor out = new_cpu({64}, ScalarType::Float);
  selftest::shared_read_shifted(out.mutable_data_ptr<float>(), int(shift), nullptr);
  return out;
}

void partial_barrier(int64_t threads_at_barrier) { selftest::partial_barrier(int(threads_at_barrier), nullptr); }

std::tuple<Tensor, Tensor, Tensor> atomics(const Tensor& values, int64_t bins) {
  STD_TORCH_CHECK(bins > 0 && bins <= 256, "bins must be in 1..256");
  const Tensor values_c = checked_indices(values, "values", -1, int32_t(bins - 1));
  Tensor histogram = zeros_cpu({bins}, ScalarType::Int);
  Tensor sum = zeros_cpu({}, ScalarType::Float);
  Tensor max = zeros_cpu({}, ScalarType::Int);
  selftest::atomics(values_c.const_data_ptr<int32_t>(), int(values_c.numel()), histogram.mutable_data_ptr<int32_t>(),
                    int(bins), sum.mutable_data_ptr<float>(), max.mutable_data_ptr<int32_t>(), nullptr);
  return {histogram, sum, max};
}

MmaKind mma_kind(const std::string& kind) {
  if (kind == "m16n8k16_bf16") return MmaKind::kM16N8K16Bf16;
  if (kind == "m16n8k16_fp16") return MmaKind::kM16N8K16Fp16;
  STD_TORCH_CHECK(kind == "m16n8k8_tf32", "kind must be m16n8k16_bf16, m16n8k16_fp16 or m16n8k8_tf32, got ", kind);
  return MmaKind::kM16N8K8Tf32;
}

Tensor mma(const std::string& kind, const Tensor& a, const Tensor& b, const Tensor& c) {
  const MmaKind k = mma_kind(kind);
  const int64_t K = k == MmaKind::kM16N8K8Tf32 ? 8 : 16;
  const Tensor a_c = checked_float(a, "a"), b_c = checked_float(b, "b"), c_c = checked_float(c, "c");
  STD_TORCH_CHECK(has_sizes(a, {16, K}) && has_sizes(b, {K, 8}) && has_sizes(c, {16, 8}), "expected a [16, ", K,
                  "], b [", K, ", 8], c [16, 8]");
  Tensor d = torch::stable::empty_like(c_c);
  selftest::mma(k, a_c.const_data_ptr<float>(), b_c.const_data_ptr<float>(), c_c.const_data_ptr<float>(),
                d.mutable_data_ptr<float>(), nullptr);
  return d;
}

Tensor mma_fragment_layout(const std::string& kind, const std::string& operand) {
  STD_TORCH_CHECK(operand == "a" || operand == "b" || operand == "c", "operand must be a, b or c");
  const int which = operand == "a" ? 0 : operand == "b" ? 1 : 2;
  int32_t table[32 * 8 * 2];
  const int elements = selftest::mma_fragment_layout(mma_kind(kind), which, table);
  Tensor out = new_cpu({32, elements, 2}, ScalarType::Int);
  std::memcpy(out.mutable_data_ptr<int32_t>(), table, sizeof(int32_t) * 32 * elements * 2);
  return out;
}

Tensor ldmatrix(const Tensor& tile, const Tensor& row_offsets, int64_t matrices, bool trans) {
  STD_TORCH_CHECK(tile.is_cpu() && tile.scalar_type() == ScalarType::Short &&
                      tile.numel() == selftest::kLdmatrixTileElems,
                  "tile must be an int16 CPU tensor of ", selftest::kLdmatrixTileElems,
                  " elements (16-bit patterns)");
  const Tensor offsets_c = checked_indices(row_offsets, "row_offsets", 32, selftest::kLdmatrixTileElems);
  STD_TORCH_CHECK(matrices == 1 || matrices == 2 || matrices == 4, "matrices must be 1, 2 or 4");
  const Tensor tile_c = torch::stable::contiguous(tile);
  Tensor out = new_cpu({32, matrices}, ScalarType::Int);
  selftest::ldmatrix(static_cast<const uint16_t*>(tile_c.data_ptr()), offsets_c.const_data_ptr<int32_t>(),
                     int(matrices), trans, reinterpret_cast<uint32_t*>(out.mutable_data_ptr<int32_t>()), nullptr);
  return out;
}

Tensor ldmatrix_mma_bf16(const Tensor& a, const Tensor& b) {
  const Tensor a_c = checked_float(a, "a"), b_c = checked_float(b, "b");
  STD_TORCH_CHECK(has_sizes(a, {16, 16}) && has_sizes(b, {16, 8}), "expected a [16, 16], b [16, 8]");
  Tensor d = new_cpu({16, 8}, ScalarType::Float);
  selftest::ldmatrix_mma_bf16(a_c.const_data_ptr<float>(), b_c.const_data_ptr<float>(), d.mutable_data_ptr<float>(),
                              nullptr);
  return d;
}

Tensor cp_async_pipeline(const Tensor& x, int64_t bytes, bool with_wait, bool with_refill_barrier) {
  const Tensor x_c = checked_float(x, "x");
  STD_TORCH_CHECK(x.numel() > 0 && x.numel() % selftest::kCpAsyncChunk == 0, "x must hold whole chunks of ",
                  selftest::kCpAsyncChunk);
  STD_TORCH_CHECK(bytes == 4 || bytes == 8 || bytes == 16, "bytes must be 4, 8 or 16");
  Tensor out = torch::stable::empty_like(x_c);
  selftest::cp_async_pipeline(x_c.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
                              int(x.numel() / selftest::kCpAsyncChunk), int(bytes), with_wait, with_refill_barrier,
                              nullptr);
  return out;
}

Tensor cp_async_one_group(const Tensor& x, int64_t src_offset, int64_t dst_offset, bool commit, bool wait) {
  const Tensor x_c = checked_float(x, "x");
  STD_TORCH_CHECK(src_offset >= 0 && x.numel() == 128 + src_offset, "x must hold 128 + src_offset floats");
  STD_TORCH_CHECK(dst_offset >= 0 && dst_offset <= 4, "dst_offset must be in 0..4");
  Tensor out = new_cpu({128}, ScalarType::Float);
  selftest::cp_async_one_group(x_c.const_data_ptr<float>(), out.mutable_data_ptr<float>(), int(src_offset),
                               int(dst_offset), commit, wait, nullptr);
  return out;
}

Tensor warp_shared_exchange(const Tensor& x, const std::string& ordering) {
  const Tensor x_c = checked_float(x, "x");
  STD_TORCH_CHECK(x.numel() == 32, "x must have 32 elements (one warp)");
  STD_TORCH_CHECK(ordering == "syncwarp" || ordering == "shuffle" || ordering == "ballot",
                  "ordering must be syncwarp, shuffle or ballot, got ", ordering);
  const WarpOrdering kind = ordering == "syncwarp" ? WarpOrdering::kSyncwarp
                            : ordering == "shuffle" ? WarpOrdering::kShuffle
                                                    : WarpOrdering::kBallot;
  Tensor out = torch::stable::empty_like(x_c);
  selftest::warp_shared_exchange(x_c.const_data_ptr<float>(), out.mutable_data_ptr<float>(), kind, nullptr);
  return out;
}

Tensor block_chain(const Tensor& x, bool one_launch) {
  const Tensor x_c = checked_float(x, "x");
  STD_TORCH_CHECK(x.numel() > 0 && x.numel() % 32 == 0, "x must hold whole blocks of 32 elements");
  const int64_t blocks = x.numel() / 32;
  // NaN until the block that owns a sum writes it, so reading one too early shows.
  Tensor sums = new_cpu({blocks}, ScalarType::Float);
  std::fill_n(sums.mutable_data_ptr<float>(), blocks, std::numeric_limits<float>::quiet_NaN());
  Tensor out = new_cpu({blocks}, ScalarType::Float);
  selftest::block_chain(x_c.const_data_ptr<float>(), sums.mutable_data_ptr<float>(), out.mutable_data_ptr<float>(),
                        int(blocks), one_launch, nullptr);
  return out;
}

std::tuple<Tensor, Tensor> half_round_trip(const Tensor& x, ScalarType dtype) {
  STD_TORCH_CHECK(dtype == ScalarType::BFloat16 || dtype == ScalarType::Half, "dtype must be bfloat16 or float16");
  const Tensor x_c = checked_float(x, "x");
  Tensor narrow = new_cpu(x_c.sizes(), dtype);
  Tensor back = torch::stable::empty_like(x_c);
  selftest::half_round_trip(dtype == ScalarType::BFloat16 ? HalfKind::kBFloat16 : HalfKind::kFloat16,
                            x_c.const_data_ptr<float>(), static_cast<uint16_t*>(narrow.data_ptr()),
                            back.mutable_data_ptr<float>(), int(x_c.numel()), nullptr);
  return {narrow, back};
}

void set_schedule(int64_t seed) { device::emu::set_schedule(seed); }
void set_copy_landing(int64_t seed) { device::emu::set_copy_landing(seed); }
void set_write_visibility(int64_t seed) { device::emu::set_write_visibility(seed); }
void set_block_interleaving(int64_t seed) { device::emu::set_block_interleaving(seed); }

// The device the emulated linear_memory ops describe to the launchers: an H100 (132 SMs, 227 KiB
// of shared memory per block, 228 KiB per SM), unless a test sets fewer SMs (to reach the wide
// state tile with small shapes) or less shared memory per block.
constexpr size_t kH100SharedPerSm = 228 * 1024;
DeviceLimits emulated_device = {132, 227 * 1024, kH100SharedPerSm};
void set_device_limits(int64_t sm_count, int64_t max_shared_bytes) {
  emulated_device = {sm_count, size_t(max_shared_bytes), kH100SharedPerSm};
}

// Packed sequences in the emulation: its tensors are on the CPU, where reading the offsets costs
// nothing, so it checks their values always, as the CPU ops do.
DeviceSequences emulated_sequences(const std::optional<Tensor>& cu_seqlens, const Tensor& q) {
  return DeviceSequences(cu_seqlens, q, /*check_values=*/true);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_memory_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                                             const Tensor& theta, const Tensor& eta,
                                                             const Tensor& alpha, const std::optional<Tensor>& m0,
                                                             const std::optional<Tensor>& s0, int64_t chunk_size,
                                                             bool read_token, bool save_states, int64_t objective,
                                                             double p, double eps, const std::optional<Tensor>& delta,
                                                             int64_t retention, double retention_q,
                                                             const std::optional<Tensor>& cu_seqlens) {
  STD_TORCH_CHECK(q.is_cpu(), "titans_emu::linear_memory_fwd runs on CPU tensors");
  return linear_memory_fwd_device(q, k, v, theta, eta, alpha, m0, s0, chunk_size, read_token, save_states, objective,
                                  p, eps, delta, retention, retention_q, emulated_sequences(cu_seqlens, q),
                                  emulated_device,
                                  [](const LinearMemoryParams& params, InputType type, const LinearMemoryFwdPlan& plan) {
                                    linear_memory_fwd_launch(params, type, plan, nullptr);
                                  });
}

LinearMemoryGrads linear_memory_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta,
                                    const Tensor& eta, const Tensor& alpha, const Tensor& chunk_states,
                                    const Tensor& d_o, const std::optional<Tensor>& d_m_final,
                                    const std::optional<Tensor>& d_s_final, int64_t chunk_size, bool read_token,
                                    int64_t objective, double p, double eps, const std::optional<Tensor>& delta,
                                    int64_t retention, double retention_q, const std::optional<Tensor>& cu_seqlens) {
  STD_TORCH_CHECK(q.is_cpu(), "titans_emu::linear_memory_bwd runs on CPU tensors");
  return linear_memory_bwd_device(
      q, k, v, theta, eta, alpha, chunk_states, d_o, d_m_final, d_s_final, chunk_size, read_token, objective, p, eps,
      delta, retention, retention_q, emulated_sequences(cu_seqlens, q), emulated_device,
      [](const LinearMemoryBwdParams& params, InputType type, const LinearMemoryBwdPlan& plan,
         const LinearMemoryBwdWorkspace& workspace) { linear_memory_bwd_launch(params, type, plan, workspace, nullptr); });
}

std::string linear_memory_plan(int64_t batch, int64_t seqlen, int64_t heads, int64_t dk, int64_t dv, int64_t chunk_size,
                               ScalarType dtype, bool read_token, bool save_states, bool has_initial_state,
                               bool has_final_cotangent, int64_t objective, int64_t n_seqs, int64_t retention) {
  return linear_memory_plan_json(batch, seqlen, heads, dk, dv, chunk_size, dtype, read_token, save_states,
                                 has_initial_state, has_final_cotangent, objective, n_seqs, retention,
                                 emulated_device);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mlp_memory_fwd(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta, const Tensor& eta, const Tensor& alpha,
    const Tensor& w1, const Tensor& w2, const std::optional<Tensor>& s1, const std::optional<Tensor>& s2,
    int64_t chunk_size, bool read_token, std::string_view activation, bool save_states, int64_t objective, double p,
    double eps, const std::optional<Tensor>& delta, int64_t retention, double retention_q,
    const std::optional<Tensor>& cu_seqlens) {
  STD_TORCH_CHECK(q.is_cpu(), "titans_emu::mlp_memory_fwd runs on CPU tensors");
  return mlp_memory_fwd_device(q, k, v, theta, eta, alpha, w1, w2, s1, s2, chunk_size, read_token, activation,
                               save_states, objective, p, eps, delta, retention, retention_q,
                               emulated_sequences(cu_seqlens, q), emulated_device,
                               [](const MlpMemoryParams& params, InputType type, int block) {
                                 mlp_memory_fwd_launch(params, type, block, nullptr);
                               });
}

MlpMemoryGrads mlp_memory_bwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& theta,
                              const Tensor& eta, const Tensor& alpha, const Tensor& chunk_states, const Tensor& d_o,
                              const std::optional<Tensor>& d_w1_final, const std::optional<Tensor>& d_w2_final,
                              const std::optional<Tensor>& d_s1_final, const std::optional<Tensor>& d_s2_final,
                              int64_t hidden, int64_t chunk_size, bool read_token, std::string_view activation,
                              int64_t objective, double p, double eps, const std::optional<Tensor>& delta,
                              int64_t retention, double retention_q, const std::optional<Tensor>& cu_seqlens) {
  STD_TORCH_CHECK(q.is_cpu(), "titans_emu::mlp_memory_bwd runs on CPU tensors");
  return mlp_memory_bwd_device(
      q, k, v, theta, eta, alpha, chunk_states, d_o, d_w1_final, d_w2_final, d_s1_final, d_s2_final, hidden,
      chunk_size, read_token, activation, objective, p, eps, delta, retention, retention_q,
      emulated_sequences(cu_seqlens, q), emulated_device,
      [](const MlpMemoryBwdParams& params, const MlpMemoryBwdWorkspace& workspace, InputType type, int block) {
        mlp_memory_bwd_launch(params, workspace, type, block, nullptr);
      });
}

}  // namespace

// The MIRAS arguments of the titans_ext:: schemas (ops.cpp).
#define TITANS_EMU_MIRAS_ARGS \
  "int objective=0, float p=2., float eps=0., Tensor? delta=None, int retention=0, float retention_q=2."

STABLE_TORCH_LIBRARY(titans_emu, m) {
  m.def("set_schedule(int seed) -> ()");
  m.def("set_copy_landing(int seed) -> ()");
  m.def("set_write_visibility(int seed) -> ()");
  m.def("set_block_interleaving(int seed) -> ()");
  m.def("set_device_limits(int sm_count, int max_shared_bytes) -> ()");
  m.def(TITANS_LINEAR_MEMORY_PLAN_SCHEMA);
  m.def("block_reduce_sum(Tensor x, int threads) -> Tensor");
  m.def("warp_shuffle(Tensor x, str kind, int arg, int width) -> Tensor");
  m.def("warp_reduce(Tensor x) -> (Tensor sum, Tensor max, Tensor ballot)");
  m.def("neighbour_exchange(Tensor x, bool with_barrier) -> Tensor");
  m.def("shared_read_shifted(int shift) -> Tensor");
  m.def("partial_barrier(int threads_at_barrier) -> ()");
  m.def("atomics(Tensor values, int bins) -> (Tensor histogram, Tensor sum, Tensor max)");
  m.def("mma(str kind, Tensor a, Tensor b, Tensor c) -> Tensor");
  m.def("mma_fragment_layout(str kind, str operand) -> Tensor");
  m.def("ldmatrix(Tensor tile, Tensor row_offsets, int matrices, bool trans) -> Tensor");
  m.def("ldmatrix_mma_bf16(Tensor a, Tensor b) -> Tensor");
  m.def("cp_async_pipeline(Tensor x, int bytes, bool with_wait, bool with_refill_barrier=True) -> Tensor");
  m.def("cp_async_one_group(Tensor x, int src_offset, int dst_offset, bool commit, bool wait) -> Tensor");
  m.def("warp_shared_exchange(Tensor x, str ordering) -> Tensor");
  m.def("block_chain(Tensor x, bool one_launch) -> Tensor");
  m.def("half_round_trip(Tensor x, ScalarType dtype) -> (Tensor narrow, Tensor back)");
  m.def(
      "linear_memory_fwd(Tensor q, Tensor k, Tensor v, Tensor theta, Tensor eta, Tensor alpha, "
      "Tensor? m0, Tensor? s0, int chunk_size, bool read_token, bool save_states, " TITANS_EMU_MIRAS_ARGS
      ", Tensor? cu_seqlens=None) "
      "-> (Tensor o, Tensor m_final, Tensor s_final, Tensor chunk_states)");
  m.def(
      "linear_memory_bwd(Tensor q, Tensor k, Tensor v, Tensor theta, Tensor eta, Tensor alpha, "
      "Tensor chunk_states, Tensor d_o, Tensor? d_m_final, Tensor? d_s_final, int chunk_size, bool read_token, "
      TITANS_EMU_MIRAS_ARGS ", Tensor? cu_seqlens=None) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dtheta, Tensor deta, Tensor dalpha, Tensor dm0, Tensor ds0, "
      "Tensor d_delta)");
  m.def(
      "mlp_memory_fwd(Tensor q, Tensor k, Tensor v, Tensor theta, Tensor eta, Tensor alpha, "
      "Tensor w1, Tensor w2, Tensor? s1, Tensor? s2, int chunk_size, bool read_token, str activation, "
      "bool save_states, " TITANS_EMU_MIRAS_ARGS ", Tensor? cu_seqlens=None) "
      "-> (Tensor o, Tensor w1_final, Tensor w2_final, Tensor s1_final, Tensor s2_final, Tensor chunk_states)");
  m.def(
      "mlp_memory_bwd(Tensor q, Tensor k, Tensor v, Tensor theta, Tensor eta, Tensor alpha, "
      "Tensor chunk_states, Tensor d_o, Tensor? d_w1_final, Tensor? d_w2_final, Tensor? d_s1_final, "
      "Tensor? d_s2_final, int hidden, int chunk_size, bool read_token, str activation, " TITANS_EMU_MIRAS_ARGS
      ", Tensor? cu_seqlens=None) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dtheta, Tensor deta, Tensor dalpha, Tensor dw1, Tensor dw2, "
      "Tensor ds1, Tensor ds2, Tensor d_delta)");
  m.def(
      "mlp_memory_plan(int dim, int hidden, int chunk_size, ScalarType dtype, bool read_token, int retention, "
      "int max_shared_bytes) -> (int fwd_block, int fwd_bytes, int bwd_block, int bwd_bytes)");
}

// CompositeExplicitAutograd: several ops take no tensor to dispatch on, and none is differentiable.
STABLE_TORCH_LIBRARY_IMPL(titans_emu, CompositeExplicitAutograd, m) {
  m.impl("set_schedule", TORCH_BOX(&set_schedule));
  m.impl("set_copy_landing", TORCH_BOX(&set_copy_landing));
  m.impl("set_write_visibility", TORCH_BOX(&set_write_visibility));
  m.impl("set_block_interleaving", TORCH_BOX(&set_block_interleaving));
  m.impl("set_device_limits", TORCH_BOX(&set_device_limits));
  m.impl("linear_memory_plan", TORCH_BOX(&linear_memory_plan));
  m.impl("block_reduce_sum", TORCH_BOX(&block_reduce_sum));
  m.impl("warp_shuffle", TORCH_BOX(&warp_shuffle));
  m.impl("warp_reduce", TORCH_BOX(&warp_reduce));
  m.impl("neighbour_exchange", TORCH_BOX(&neighbour_exchange));
  m.impl("shared_read_shifted", TORCH_BOX(&shared_read_shifted));
  m.impl("partial_barrier", TORCH_BOX(&partial_barrier));
  m.impl("atomics", TORCH_BOX(&atomics));
  m.impl("mma", TORCH_BOX(&mma));
  m.impl("mma_fragment_layout", TORCH_BOX(&mma_fragment_layout));
  m.impl("ldmatrix", TORCH_BOX(&ldmatrix));
  m.impl("ldmatrix_mma_bf16", TORCH_BOX(&ldmatrix_mma_bf16));
  m.impl("cp_async_pipeline", TORCH_BOX(&cp_async_pipeline));
  m.impl("cp_async_one_group", TORCH_BOX(&cp_async_one_group));
  m.impl("warp_shared_exchange", TORCH_BOX(&warp_shared_exchange));
  m.impl("block_chain", TORCH_BOX(&block_chain));
  m.impl("half_round_trip", TORCH_BOX(&half_round_trip));
  m.impl("linear_memory_fwd", TORCH_BOX(&linear_memory_fwd));
  m.impl("linear_memory_bwd", TORCH_BOX(&linear_memory_bwd));
  m.impl("mlp_memory_fwd", TORCH_BOX(&mlp_memory_fwd));
  m.impl("mlp_memory_bwd", TORCH_BOX(&mlp_memory_bwd));
  m.impl("mlp_memory_plan", TORCH_BOX(&mlp_memory_plan));
}

}  // namespace titans

// `import titans_ext._emu` loads this library and so registers the titans_emu:: operators.
extern "C" PyMODINIT_FUNC PyInit__emu(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_emu", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
