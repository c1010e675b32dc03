// titans_ext._emu: the CUDA kernels' sources run on the CPU through the device layer's SIMT
// emulation (csrc/device/emu/), as titans_emu:: operators. Built in every build, so CI without
// a GPU runs the CUDA kernels' code:
//   - the device layer's self-test kernels (csrc/device/selftest/), for python_tests/test_device_emulation.py;
//   - linear_memory_fwd and linear_memory_bwd with the schemas and output contracts of
//     titans_ext::linear_memory_fwd / titans_ext::linear_memory_bwd;
//   - mlp_memory_fwd and mlp_memory_bwd with the schemas and the CUDA output contracts of
//     titans_ext::mlp_memory_fwd / titans_ext::mlp_memory_bwd (chunk-start states in the inputs'
//     dtype).
// Emulation errors (barrier divergence, shared memory out of bounds, ...) raise RuntimeError
// naming the kernel, block and thread. Inputs are CPU tensors.
#include <Python.h>

#include <string>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "binding/linear_memory_device.h"
#include "binding/mlp_memory_device.h"
#include "device/selftest/selftest.h"

// runtime.h is torch-free and defines no macros, unlike the device layer's emu.h.
#include "device/emu/runtime.h"

namespace titans {
namespace {

using selftest::HalfKind;
using selftest::MmaKind;
using selftest::ShuffleKind;

at::Tensor checked_float(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  return x.contiguous();
}

at::Tensor block_reduce_sum(const at::Tensor& x, int64_t threads) {
  const auto x_c = checked_float(x, "x");
  TORCH_CHECK(threads > 0 && (threads & (threads - 1)) == 0, "threads must be a power of two");
  auto out = at::empty({(x.numel() + threads - 1) / threads}, x_c.options());
  selftest::block_reduce_sum(x_c.data_ptr<float>(), out.data_ptr<float>(), int(x.numel()), int(threads), nullptr);
  return out;
}

ShuffleKind shuffle_kind(const std::string& kind) {
  if (kind == "idx") return ShuffleKind::kIdx;
  if (kind == "up") return ShuffleKind::kUp;
  if (kind == "down") return ShuffleKind::kDown;
  TORCH_CHECK(kind == "xor", "kind must be idx, up, down or xor, got ", kind);
  return ShuffleKind::kXor;
}

at::Tensor warp_shuffle(const at::Tensor& x, const std::string& kind, int64_t arg, int64_t width) {
  const auto x_c = checked_float(x, "x");
  TORCH_CHECK(x.numel() % 32 == 0 && x.numel() <= 1024, "x must hold whole warps (at most 1024 lanes)");
  auto out = at::empty_like(x_c);
  selftest::warp_shuffle(x_c.data_ptr<float>(), out.data_ptr<float>(), int(x.numel()), shuffle_kind(kind), int(arg),
                         int(width), nullptr);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> warp_reduce(const at::Tensor& x) {
  const auto x_c = checked_float(x, "x");
  TORCH_CHECK(x.numel() % 32 == 0 && x.numel() <= 1024, "x must hold whole warps (at most 1024 lanes)");
  auto sum = at::empty_like(x_c), max = at::empty_like(x_c);
  auto ballot = at::empty(x_c.sizes(), x_c.options().dtype(at::kInt));
  selftest::warp_reduce(x_c.data_ptr<float>(), sum.data_ptr<float>(), max.data_ptr<float>(), ballot.data_ptr<int32_t>(),
                        int(x.numel()), nullptr);
  return {sum, max, ballot};
}

at::Tensor neighbour_exchange(const at::Tensor& x, bool with_barrier) {
  const auto x_c = checked_float(x, "x");
  TORCH_CHECK(x.numel() == 256, "x must have 256 elements");
  auto out = at::empty_like(x_c);
  selftest::neighbour_exchange(x_c.data_ptr<float>(), out.data_ptr<float>(), with_barrier, nullptr);
  return out;
}

at::Tensor shared_read_shifted(int64_t shift) {
  auto out = at::empty({64}, at::kFloat);
  selftest::shared_read_shifted(out.data_ptr<float>(), int(shift), nullptr);
  return out;
}

void partial_barrier(int64_t threads_at_barrier) { selftest::partial_barrier(int(threads_at_barrier), nullptr); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> atomics(const at::Tensor& values, int64_t bins) {
  TORCH_CHECK(values.device().is_cpu() && values.scalar_type() == at::kInt, "values must be an int32 CPU tensor");
  TORCH_CHECK(bins > 0 && bins <= 256, "bins must be in 1..256");
  const auto values_c = values.contiguous();
  TORCH_CHECK(values_c.numel() == 0 || (values_c.min().item<int>() >= 0 && values_c.max().item<int>() < bins),
              "values must lie in [0, bins)");
  auto histogram = at::zeros({bins}, values_c.options());
  auto sum = at::zeros({}, values_c.options().dtype(at::kFloat));
  auto max = at::zeros({}, values_c.options());
  selftest::atomics(values_c.data_ptr<int32_t>(), int(values_c.numel()), histogram.data_ptr<int32_t>(), int(bins),
                    sum.data_ptr<float>(), max.data_ptr<int32_t>(), nullptr);
  return {histogram, sum, max};
}

MmaKind mma_kind(const std::string& kind) {
  if (kind == "m16n8k16_bf16") return MmaKind::kM16N8K16Bf16;
  if (kind == "m16n8k16_fp16") return MmaKind::kM16N8K16Fp16;
  TORCH_CHECK(kind == "m16n8k8_tf32", "kind must be m16n8k16_bf16, m16n8k16_fp16 or m16n8k8_tf32, got ", kind);
  return MmaKind::kM16N8K8Tf32;
}

at::Tensor mma(const std::string& kind, const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  const MmaKind k = mma_kind(kind);
  const int64_t K = k == MmaKind::kM16N8K8Tf32 ? 8 : 16;
  const auto a_c = checked_float(a, "a"), b_c = checked_float(b, "b"), c_c = checked_float(c, "c");
  TORCH_CHECK(a.sizes() == at::IntArrayRef({16, K}) && b.sizes() == at::IntArrayRef({K, 8}) &&
                  c.sizes() == at::IntArrayRef({16, 8}),
              "expected a [16, ", K, "], b [", K, ", 8], c [16, 8]");
  auto d = at::empty_like(c_c);
  selftest::mma(k, a_c.data_ptr<float>(), b_c.data_ptr<float>(), c_c.data_ptr<float>(), d.data_ptr<float>(), nullptr);
  return d;
}

at::Tensor mma_fragment_layout(const std::string& kind, const std::string& operand) {
  TORCH_CHECK(operand == "a" || operand == "b" || operand == "c", "operand must be a, b or c");
  const int which = operand == "a" ? 0 : operand == "b" ? 1 : 2;
  int32_t table[32 * 8 * 2];
  const int elements = selftest::mma_fragment_layout(mma_kind(kind), which, table);
  return at::empty({32, elements, 2}, at::kInt).copy_(
      at::from_blob(table, {32, elements, 2}, at::TensorOptions().dtype(at::kInt)));
}

at::Tensor ldmatrix(const at::Tensor& tile, const at::Tensor& row_offsets, int64_t matrices, bool trans) {
  TORCH_CHECK(tile.device().is_cpu() && tile.scalar_type() == at::kShort &&
                  tile.numel() == selftest::kLdmatrixTileElems,
              "tile must be an int16 CPU tensor of ", selftest::kLdmatrixTileElems, " elements (16-bit patterns)");
  TORCH_CHECK(row_offsets.device().is_cpu() && row_offsets.scalar_type() == at::kInt && row_offsets.numel() == 32,
              "row_offsets must be an int32 CPU tensor of 32 elements");
  TORCH_CHECK(matrices == 1 || matrices == 2 || matrices == 4, "matrices must be 1, 2 or 4");
  const auto tile_c = tile.contiguous(), offsets_c = row_offsets.contiguous();
  TORCH_CHECK(offsets_c.min().item<int>() >= 0 && offsets_c.max().item<int>() <= selftest::kLdmatrixTileElems,
              "row_offsets must point into the tile");
  auto out = at::empty({32, matrices}, offsets_c.options());
  selftest::ldmatrix(static_cast<const uint16_t*>(tile_c.data_ptr()), offsets_c.data_ptr<int32_t>(), int(matrices),
                     trans, reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), nullptr);
  return out;
}

at::Tensor ldmatrix_mma_bf16(const at::Tensor& a, const at::Tensor& b) {
  const auto a_c = checked_float(a, "a"), b_c = checked_float(b, "b");
  TORCH_CHECK(a.sizes() == at::IntArrayRef({16, 16}) && b.sizes() == at::IntArrayRef({16, 8}),
              "expected a [16, 16], b [16, 8]");
  auto d = at::empty({16, 8}, a_c.options());
  selftest::ldmatrix_mma_bf16(a_c.data_ptr<float>(), b_c.data_ptr<float>(), d.data_ptr<float>(), nullptr);
  return d;
}

at::Tensor cp_async_pipeline(const at::Tensor& x, int64_t bytes, bool with_wait) {
  const auto x_c = checked_float(x, "x");
  TORCH_CHECK(x.numel() > 0 && x.numel() % selftest::kCpAsyncChunk == 0, "x must hold whole chunks of ",
              selftest::kCpAsyncChunk);
  TORCH_CHECK(bytes == 4 || bytes == 8 || bytes == 16, "bytes must be 4, 8 or 16");
  auto out = at::empty_like(x_c);
  selftest::cp_async_pipeline(x_c.data_ptr<float>(), out.data_ptr<float>(), int(x.numel() / selftest::kCpAsyncChunk),
                              int(bytes), with_wait, nullptr);
  return out;
}

at::Tensor cp_async_one_group(const at::Tensor& x, int64_t src_offset, int64_t dst_offset, bool commit, bool wait) {
  const auto x_c = checked_float(x, "x");
  TORCH_CHECK(src_offset >= 0 && x.numel() == 128 + src_offset, "x must hold 128 + src_offset floats");
  TORCH_CHECK(dst_offset >= 0 && dst_offset <= 4, "dst_offset must be in 0..4");
  auto out = at::empty({128}, x_c.options());
  selftest::cp_async_one_group(x_c.data_ptr<float>(), out.data_ptr<float>(), int(src_offset), int(dst_offset), commit,
                               wait, nullptr);
  return out;
}

std::tuple<at::Tensor, at::Tensor> half_round_trip(const at::Tensor& x, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "dtype must be bfloat16 or float16");
  const auto x_c = checked_float(x, "x");
  auto narrow = at::empty(x_c.sizes(), x_c.options().dtype(dtype));
  auto back = at::empty_like(x_c);
  selftest::half_round_trip(dtype == at::kBFloat16 ? HalfKind::kBFloat16 : HalfKind::kFloat16, x_c.data_ptr<float>(),
                            static_cast<uint16_t*>(narrow.data_ptr()), back.data_ptr<float>(), int(x_c.numel()),
                            nullptr);
  return {narrow, back};
}

void set_schedule(int64_t seed) { device::emu::set_schedule(seed); }

// The device the emulated linear_memory ops describe to the launchers: an H100 (132 SMs, 227 KiB
// of shared memory per block, 228 KiB per SM), unless a test sets fewer SMs (to reach the wide
// state tile with small shapes) or less shared memory per block.
constexpr size_t kH100SharedPerSm = 228 * 1024;
DeviceLimits emulated_device = {132, 227 * 1024, kH100SharedPerSm};
void set_device_limits(int64_t sm_count, int64_t max_shared_bytes) {
  emulated_device = {sm_count, size_t(max_shared_bytes), kH100SharedPerSm};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_memory_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& theta, const at::Tensor& eta,
    const at::Tensor& alpha, const std::optional<at::Tensor>& m0, const std::optional<at::Tensor>& s0,
    int64_t chunk_size, bool read_token, bool save_states) {
  TORCH_CHECK(q.device().is_cpu(), "titans_emu::linear_memory_fwd runs on CPU tensors");
  return linear_memory_fwd_device(q, k, v, theta, eta, alpha, m0, s0, chunk_size, read_token, save_states,
                                  emulated_device,
                                  [](const LinearMemoryParams& params, const LinearMemoryFwdWorkspace& workspace,
                                     InputType type, const ValueTiles& tiles) {
                                    linear_memory_fwd_launch(params, workspace, type, tiles, nullptr);
                                  });
}

LinearMemoryGrads linear_memory_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& theta, const at::Tensor& eta, const at::Tensor& alpha,
                                    const at::Tensor& chunk_states, const at::Tensor& d_o,
                                    const std::optional<at::Tensor>& d_m_final,
                                    const std::optional<at::Tensor>& d_s_final, int64_t chunk_size, bool read_token) {
  TORCH_CHECK(q.device().is_cpu(), "titans_emu::linear_memory_bwd runs on CPU tensors");
  return linear_memory_bwd_device(
      q, k, v, theta, eta, alpha, chunk_states, d_o, d_m_final, d_s_final, chunk_size, read_token,
      emulated_device,
      [](const LinearMemoryBwdParams& params, const LinearMemoryBwdWorkspace& workspace, InputType type,
         const ValueTiles& tiles) { linear_memory_bwd_launch(params, workspace, type, tiles, nullptr); });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_memory_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& theta, const at::Tensor& eta,
    const at::Tensor& alpha, const at::Tensor& w1, const at::Tensor& w2, const std::optional<at::Tensor>& s1,
    const std::optional<at::Tensor>& s2, int64_t chunk_size, bool read_token, c10::string_view activation,
    bool save_states, int64_t objective, double p, double eps, const std::optional<at::Tensor>& delta,
    int64_t retention, double retention_q) {
  TORCH_CHECK(q.device().is_cpu(), "titans_emu::mlp_memory_fwd runs on CPU tensors");
  return mlp_memory_fwd_device(q, k, v, theta, eta, alpha, w1, w2, s1, s2, chunk_size, read_token, activation,
                               save_states, objective, p, eps, delta, retention, retention_q, emulated_device,
                               [](const MlpMemoryParams& params, InputType type, int block) {
                                 mlp_memory_fwd_launch(params, type, block, nullptr);
                               });
}

MlpMemoryGrads mlp_memory_bwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& theta,
                              const at::Tensor& eta, const at::Tensor& alpha, const at::Tensor& chunk_states,
                              const at::Tensor& d_o, const std::optional<at::Tensor>& d_w1_final,
                              const std::optional<at::Tensor>& d_w2_final,
                              const std::optional<at::Tensor>& d_s1_final,
                              const std::optional<at::Tensor>& d_s2_final, int64_t hidden, int64_t chunk_size,
                              bool read_token, c10::string_view activation, int64_t objective, double p, double eps,
                              const std::optional<at::Tensor>& delta, int64_t retention, double retention_q) {
  TORCH_CHECK(q.device().is_cpu(), "titans_emu::mlp_memory_bwd runs on CPU tensors");
  return mlp_memory_bwd_device(
      q, k, v, theta, eta, alpha, chunk_states, d_o, d_w1_final, d_w2_final, d_s1_final, d_s2_final, hidden,
      chunk_size, read_token, activation, objective, p, eps, delta, retention, retention_q, emulated_device,
      [](const MlpMemoryBwdParams& params, const MlpMemoryBwdWorkspace& workspace, InputType type, int block) {
        mlp_memory_bwd_launch(params, workspace, type, block, nullptr);
      });
}

// What the mlp_memory launchers choose on a device with max_shared_bytes of shared memory per block:
// (forward hidden block, its bytes, backward hidden block, its bytes); a block of 0 means that none
// fits, and the bytes are then those the narrowest block needs (bench/mlp_traffic.py reads this).
std::tuple<int64_t, int64_t, int64_t, int64_t> mlp_memory_plan(int64_t dim, int64_t hidden, int64_t chunk_size,
                                                               at::ScalarType dtype, bool read_token,
                                                               int64_t retention, int64_t max_shared_bytes) {
  TORCH_CHECK(dim >= 1 && hidden >= 1 && chunk_size >= 1, "mlp_memory_plan: sizes must be >= 1");
  TORCH_CHECK(retention >= 0 && retention <= int64_t(RetentionKind::kl), "mlp_memory_plan: unknown retention");
  MlpMemoryParams params;
  params.dim = int(dim), params.hidden = int(hidden), params.chunk_size = int(chunk_size);
  params.read_token = read_token;
  params.miras.retention = RetentionKind(retention);
  const InputType type = input_type(at::empty({0}, at::TensorOptions().dtype(dtype)));
  const DeviceLimits device = {emulated_device.sm_count, size_t(max_shared_bytes), kH100SharedPerSm};
  const int fwd = mlp_memory_fwd_hidden_block(params, type, device);
  const int bwd = mlp_memory_bwd_hidden_block(params, type, device);
  const int narrowest = kMlpHiddenBlocks[3];
  return {fwd, int64_t(mlp_memory_fwd_smem_bytes(params, type, fwd ? fwd : narrowest)), bwd,
          int64_t(mlp_memory_bwd_smem_bytes(params, type, bwd ? bwd : narrowest))};
}

}  // namespace

// The MIRAS arguments of the titans_ext:: schemas (ops.cpp).
#define TITANS_EMU_MIRAS_ARGS \
  "int objective=0, float p=2., float eps=0., Tensor? delta=None, int retention=0, float retention_q=2."

TORCH_LIBRARY(titans_emu, m) {
  m.def("set_schedule(int seed) -> ()", &set_schedule);
  m.def("set_device_limits(int sm_count, int max_shared_bytes) -> ()", &set_device_limits);
  m.def("block_reduce_sum(Tensor x, int threads) -> Tensor", &block_reduce_sum);
  m.def("warp_shuffle(Tensor x, str kind, int arg, int width) -> Tensor", &warp_shuffle);
  m.def("warp_reduce(Tensor x) -> (Tensor sum, Tensor max, Tensor ballot)", &warp_reduce);
  m.def("neighbour_exchange(Tensor x, bool with_barrier) -> Tensor", &neighbour_exchange);
  m.def("shared_read_shifted(int shift) -> Tensor", &shared_read_shifted);
  m.def("partial_barrier(int threads_at_barrier) -> ()", &partial_barrier);
  m.def("atomics(Tensor values, int bins) -> (Tensor histogram, Tensor sum, Tensor max)", &atomics);
  m.def("mma(str kind, Tensor a, Tensor b, Tensor c) -> Tensor", &mma);
  m.def("mma_fragment_layout(str kind, str operand) -> Tensor", &mma_fragment_layout);
  m.def("ldmatrix(Tensor tile, Tensor row_offsets, int matrices, bool trans) -> Tensor", &ldmatrix);
  m.def("ldmatrix_mma_bf16(Tensor a, Tensor b) -> Tensor", &ldmatrix_mma_bf16);
  m.def("cp_async_pipeline(Tensor x, int bytes, bool with_wait) -> Tensor", &cp_async_pipeline);
  m.def("cp_async_one_group(Tensor x, int src_offset, int dst_offset, bool commit, bool wait) -> Tensor",
        &cp_async_one_group);
  m.def("half_round_trip(Tensor x, ScalarType dtype) -> (Tensor narrow, Tensor back)", &half_round_trip);
  m.def(
      "linear_memory_fwd(Tensor q, Tensor k, Tensor v, Tensor theta, Tensor eta, Tensor alpha, "
      "Tensor? m0, Tensor? s0, int chunk_size, bool read_token, bool save_states) "
      "-> (Tensor o, Tensor m_final, Tensor s_final, Tensor chunk_states)",
      &linear_memory_fwd);
  m.def(
      "linear_memory_bwd(Tensor q, Tensor k, Tensor v, Tensor theta, Tensor eta, Tensor alpha, "
      "Tensor chunk_states, Tensor d_o, Tensor? d_m_final, Tensor? d_s_final, int chunk_size, bool read_token) "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dtheta, Tensor deta, Tensor dalpha, Tensor dm0, Tensor ds0)",
      &linear_memory_bwd);
  m.def(
      "mlp_memory_fwd(Tensor q, Tensor k, Tensor v, Tensor theta, Tensor eta, Tensor alpha, "
      "Tensor w1, Tensor w2, Tensor? s1, Tensor? s2, int chunk_size, bool read_token, str activation, "
      "bool save_states, " TITANS_EMU_MIRAS_ARGS ") "
      "-> (Tensor o, Tensor w1_final, Tensor w2_final, Tensor s1_final, Tensor s2_final, Tensor chunk_states)",
      &mlp_memory_fwd);
  m.def(
      "mlp_memory_bwd(Tensor q, Tensor k, Tensor v, Tensor theta, Tensor eta, Tensor alpha, "
      "Tensor chunk_states, Tensor d_o, Tensor? d_w1_final, Tensor? d_w2_final, Tensor? d_s1_final, "
      "Tensor? d_s2_final, int hidden, int chunk_size, bool read_token, str activation, " TITANS_EMU_MIRAS_ARGS ") "
      "-> (Tensor dq, Tensor dk, Tensor dv, Tensor dtheta, Tensor deta, Tensor dalpha, Tensor dw1, Tensor dw2, "
      "Tensor ds1, Tensor ds2, Tensor d_delta)",
      &mlp_memory_bwd);
  m.def(
      "mlp_memory_plan(int dim, int hidden, int chunk_size, ScalarType dtype, bool read_token, int retention, "
      "int max_shared_bytes) -> (int fwd_block, int fwd_bytes, int bwd_block, int bwd_bytes)",
      &mlp_memory_plan);
}

}  // namespace titans

// `import titans_ext._emu` loads this library and so registers the titans_emu:: operators.
extern "C" PyMODINIT_FUNC PyInit__emu(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_emu", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
