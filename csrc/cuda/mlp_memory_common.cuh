// Building blocks of the CUDA mlp_memory kernels (mlp_memory_fwd.cuh, mlp_memory_bwd.cuh), written
// only against the device layer, so the emulation runs them unchanged. The operand policies,
// shared-memory carve-up, staging, block sums and the input-type dispatch are the kernel families'
// (csrc/cuda/common/), the gate tables and their adjoint the linear memory's
// (linear_memory_gates.cuh); what is here is specific to the deep memory:
// - the activation (exact GELU or SiLU) with its first and second derivatives, and the MIRAS
//   objective (cuda/common/objective.cuh, shared with the linear memory's kernels);
// - `product`: an M x N block product as a sum of terms, each a K-contraction of two operand views
//   (callables), with an epilogue that sees every term's value of each element. An element is
//   owned by one lane for a given (M, N) (16 x 8 tiles dealt by kernel::for_each_strip), so sums over hidden blocks are
//   accumulated in place by their owners without extra barriers;
// - the streamed state block (rows of W1, S1 and the same columns of W2, S2) and its cp.async
//   double buffer over the hidden blocks;
// - warp-per-row matrix-vector products against global memory, for single tokens (the kl
//   retention's lag token).
#pragma once

#include <cmath>
#include <type_traits>

#include "cuda/common/launch.cuh"
#include "cuda/common/operands.cuh"
#include "cuda/common/retention.cuh"
#include "cuda/common/sequences.cuh"
#include "cuda/common/smem.cuh"
#include "cuda/common/staging.cuh"
#include "cuda/common/tile_loops.cuh"
#include "cuda/linear_memory_gates.cuh"
#include "cuda/mlp_memory.h"
#include "cuda/common/objective.cuh"

namespace titans {
namespace mlp {

// Threads per block: one block per (batch, head) runs the whole sequence, so it takes eight warps
// to keep its products' 16 x 8 tiles busy.
constexpr int kThreads = 256;

// The params block y works with (sequences.cuh): the launch's, or with cu_seqlens those of
// sequence y's view: its tokens, its rows of the initial and final states, its chunk-start states.
template <typename input_t>
__device__ __forceinline__ MlpMemoryParams sequence_view(const MlpMemoryParams& launch, int y) {
  using compute_t = kernel::compute_type<input_t>;
  if (!launch.cu_seqlens) return launch;
  MlpMemoryParams p = launch;
  const kernel::SequenceSpan s = kernel::view_sequence<input_t, compute_t>(p, y, p.dim);
  kernel::advance_all<compute_t>(index_t(y) * p.heads * p.hidden * p.dim, p.w1_0_ptr, p.w2_0_ptr, p.s1_0_ptr,
                                 p.s2_0_ptr, p.w1_final_ptr, p.w2_final_ptr, p.s1_final_ptr, p.s2_final_ptr);
  kernel::advance_all<input_t>(index_t(s.begin) * p.heads * p.dim, p.o_ptr);
  kernel::advance_all<input_t>(kernel::first_unit(launch, y, 1) * 4 * p.hidden * p.dim, p.chunk_states_ptr);
  return p;
}

// The same for the backward: the forward's fields, dO, the gradients, the final state's
// cotangents and the initial state's gradients.
template <typename input_t>
__device__ __forceinline__ MlpMemoryBwdParams sequence_view(const MlpMemoryBwdParams& launch, int y) {
  using compute_t = kernel::compute_type<input_t>;
  if (!launch.cu_seqlens) return launch;
  MlpMemoryBwdParams p = launch;
  static_cast<MlpMemoryParams&>(p) = sequence_view<input_t>(static_cast<const MlpMemoryParams&>(launch), y);
  kernel::view_sequence_grads<input_t, compute_t>(p, kernel::packed_sequence(launch, y), p.heads, p.dim, p.dim);
  kernel::advance_all<compute_t>(index_t(y) * p.heads * p.hidden * p.dim, p.d_w1_final_ptr, p.d_w2_final_ptr,
                                 p.d_s1_final_ptr, p.d_s2_final_ptr, p.dw1_0_ptr, p.dw2_0_ptr, p.ds1_0_ptr,
                                 p.ds2_0_ptr);
  return p;
}

template <typename input_t_>
struct Traits {
  using input_t = input_t_;
  using compute_t = kernel::compute_type<input_t>;
  // kernel::OperandPolicy, except that bf16 inputs take tf32 MMAs as fp16 inputs do: nearly every
  // product here has fp32 operands (the state, H, E, DZ, Hq, their cotangents), and
  // rounding them to bf16 costs the deep memory's state and gradients 0.7-2.2 % relative RMS
  // against the float64 reference at D = 64 over five chunks (the lq scale feeds the state's error
  // back), against 0.2-0.4 % with tf32 (emulated, test_mlp_memory_emulated.py). The operands are
  // built by scalar shared-memory loads either way, whose count per FLOP is the same.
  using Policy = std::conditional_t<std::is_same<input_t, device::bf16>::value, kernel::Tf32Mma<false>,
                                    typename kernel::OperandPolicy<input_t>::type>;
};

// A kernel's shared-memory carve-up (kernel::SmemLayout) in arrays of its compute type and of its
// input type (the staged q, k, dO keep their own, often narrower, dtype): the layout structs
// build it on the host to size the launch and on the device to place the arrays.
template <typename Ktraits>
struct SmemCarver : kernel::SmemLayout {
  __host__ __device__ int compute(int n) { return array<typename Ktraits::compute_t>(n); }
  __host__ __device__ int input(int n) { return array<typename Ktraits::input_t>(n); }
};

// The arrays at a carve-up's byte offsets.
template <typename Ktraits>
struct SmemArrays {
  __device__ device::SharedPtr<typename Ktraits::compute_t> compute(int offset) const {
    return kernel::shared_array<typename Ktraits::compute_t>(offset);
  }
  __device__ device::SharedPtr<typename Ktraits::input_t> input(int offset) const {
    return kernel::shared_array<typename Ktraits::input_t>(offset);
  }
};

// Host side: the widest hidden block of kMlpHiddenBlocks (at most N rounded up to 8) whose shared
// memory, smem(block), fits the device; 0 if none does.
template <class Smem>
int choose_hidden_block(const MlpMemoryParams& params, const DeviceLimits& device, const Smem& smem) {
  const int widest = (params.hidden + 7) / 8 * 8;
  for (const int candidate : kMlpHiddenBlocks) {
    const int block = candidate < widest ? candidate : widest;
    if (smem(block) <= device.max_shared_bytes) return block;
  }
  return 0;
}

// Host side: calls f(Traits<input_t>{}) for the runtime input type.
template <class F>
auto dispatch(InputType type, const F& f) {
  return kernel::dispatch_input_type(type, [&](auto tag) { return f(Traits<decltype(tag)>{}); });
}

// Host side: the dynamic shared memory of a kernel whose carve-up is Layout<Traits>(params, block).
template <template <typename> class Layout>
size_t layout_bytes(const MlpMemoryParams& params, InputType type, int block) {
  return dispatch(type, [&](auto ktraits) {
    using Ktraits = decltype(ktraits);
    return size_t(Layout<Ktraits>(params, block).carver.bytes);
  });
}

// Host side: the hidden block of a kernel with carve-up Layout on `device` (choose_hidden_block).
template <template <typename> class Layout>
int layout_hidden_block(const MlpMemoryParams& params, InputType type, const DeviceLimits& device) {
  return choose_hidden_block(params, device, [&](int block) { return layout_bytes<Layout>(params, type, block); });
}

// ---------------------------------------------------------------------------------------------
// Elementwise math (fmath: cuda/common/retention.cuh)

// act(x) and, up to kOrder, act'(x) and act''(x) (docs/mlp_dual_form.md §4):
//   gelu: x Phi(x);  Phi + x phi;  phi (2 - x^2)          (Phi, phi: standard normal cdf, pdf)
//   silu: x s;       s (1 + x (1 - s));  s (1 - s) (2 + x (1 - 2 s))     (s = sigmoid(x))
template <typename T>
struct Activation {
  T value, first, second;
};

template <int kOrder, typename T>
__device__ __forceinline__ Activation<T> activation(MlpActivation kind, T x) {
  Activation<T> out{T(0), T(0), T(0)};
  if (kind == MlpActivation::kGelu) {
    const T cdf = T(0.5) * fmath::erfc(-x * T(0.70710678118654752440));
    const T pdf = T(0.39894228040143267794) * fmath::exp(T(-0.5) * x * x);
    out.value = x * cdf;
    if (kOrder >= 1) out.first = cdf + x * pdf;
    if (kOrder >= 2) out.second = pdf * (T(2) - x * x);
  } else {
    const T s = T(1) / (T(1) + fmath::exp(-x));
    out.value = x * s;
    if (kOrder >= 1) out.first = s * (T(1) + x * (T(1) - s));
    if (kOrder >= 2) out.second = s * (T(1) - s) * (T(2) + x * (T(1) - T(2) * s));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Block products

// One term of a product: sum over k < K of a(r, k) b(k, c).
template <class A, class B>
struct Term {
  int K;
  A a;
  B b;
};
template <class A, class B>
__device__ __forceinline__ Term<A, B> term(int K, const A& a, const B& b) {
  return {K, a, b};
}

// acc += A[r0:r0+16, 0:K] B[0:K, c0:c0+8] of an M x K by K x N product of operand views, which
// are read only inside their extents (zeros outside): the operands here are callables over
// unpadded arrays, unlike the padded tiles of kernel::strip_mma.
template <class Policy, class A, class B>
__device__ __forceinline__ void mma_accumulate(typename Policy::acc_t (&acc)[4], int r0, int c0, int M, int N, int K,
                                               const A& a, const B& b) {
  using acc_t = typename Policy::acc_t;
  const auto a_in = [&](int r, int k) -> acc_t { return r < M && k < K ? acc_t(a(r, k)) : acc_t(0); };
  const auto b_in = [&](int k, int c) -> acc_t { return k < K && c < N ? acc_t(b(k, c)) : acc_t(0); };
  for (int k0 = 0; k0 < K; k0 += Policy::kK)
    Policy::mma(acc, Policy::load_a(a_in, r0, k0), Policy::load_b(b_in, k0, c0));
}

// Calls out(r, c, e) for this lane's accumulator elements e of the 16 x 8 tile at (r0, c0) that lie
// inside M x N.
template <class Out>
__device__ __forceinline__ void for_each_element(int r0, int c0, int M, int N, const Out& out) {
  const int lane = device::lane_id();
  for (int e = 0; e < 4; ++e) {
    const device::FragmentCoord at = device::mma_m16n8_c_coord(lane, e);
    if (r0 + at.row < M && c0 + at.col < N) out(r0 + at.row, c0 + at.col, e);
  }
}

// For each 16 x 8 tile of the M x N output, calls tile_epilogue(r0, c0, acc) with acc[i][e] the
// value of terms[i] at this lane's accumulator element e (for_each_element's numbering).
// Operands outside their extents are never read (mma_accumulate gives zeros there); the tiles of
// one (M, N) shape always go to the same warps, so their elements to the same lanes.
template <class Policy, class TileEpilogue, class... Terms>
__device__ __forceinline__ void product_tiles(int M, int N, const TileEpilogue& tile_epilogue, const Terms&... terms) {
  using acc_t = typename Policy::acc_t;
  kernel::for_each_strip<1>(M, N, [&](int r0, int c0) {
    acc_t acc[sizeof...(Terms)][4] = {};
    int i = 0;
    ((mma_accumulate<Policy>(acc[i++], r0, c0, M, N, terms.K, terms.a, terms.b)), ...);
    tile_epilogue(r0, c0, acc);
  });
}

// For the M x N output, calls epilogue(r, c, v) for every element, v[i] the value of terms[i] there.
template <class Policy, class Epilogue, class... Terms>
__device__ __forceinline__ void product(int M, int N, const Epilogue& epilogue, const Terms&... terms) {
  using acc_t = typename Policy::acc_t;
  constexpr int kTerms = sizeof...(Terms);
  product_tiles<Policy>(
      M, N,
      [&](int r0, int c0, const acc_t (&acc)[kTerms][4]) {
        for_each_element(r0, c0, M, N, [&](int r, int c, int e) {
          acc_t v[kTerms];
          for (int j = 0; j < kTerms; ++j) v[j] = acc[j][e];
          epilogue(r, c, v);
        });
      },
      terms...);
}

// Inside a product's tile at (r0, c0) of an M x N output (a warp collective): for each of the tile's
// rows r < M, the sum over its columns of value(r, c, e) goes to out(r, c0 / 8, sum), called by one
// lane. Row sums over a whole block of columns are then the sums over column tiles, taken in a fixed
// order by the caller: deterministic, without atomics.
template <typename T, class Value, class Out>
__device__ __forceinline__ void tile_row_sums(int r0, int c0, int M, int N, const Value& value, const Out& out) {
  const int lane = device::lane_id();
  T sums[2] = {T(0), T(0)};  // this lane's rows lane / 4 and lane / 4 + 8 (mma_m16n8_c_coord)
  for (int e = 0; e < 4; ++e) {
    const device::FragmentCoord at = device::mma_m16n8_c_coord(lane, e);
    if (r0 + at.row < M && c0 + at.col < N) sums[e / 2] += value(r0 + at.row, c0 + at.col, e);
  }
  for (int half = 0; half < 2; ++half) {
    T sum = sums[half];
    sum += __shfl_xor_sync(device::kFullWarpMask, sum, 1);
    sum += __shfl_xor_sync(device::kFullWarpMask, sum, 2);
    const int r = r0 + lane / 4 + 8 * half;
    if (lane % 4 == 0 && r < M) out(r, c0 / 8, sum);
  }
}

// ---------------------------------------------------------------------------------------------
// The streamed state block

// Hidden blocks of the sequence's state: n0 = block * NB, nb hidden units (the last may be short).
struct HiddenBlock {
  int n0, nb;
};
__device__ __forceinline__ HiddenBlock hidden_block(int block, int NB, int N) {
  const int n0 = block * NB;
  return {n0, N - n0 < NB ? N - n0 : NB};
}
__host__ __device__ __forceinline__ int hidden_blocks(int N, int NB) { return (N + NB - 1) / NB; }

// A state [W1 | S1 | W2 | S2] in global memory (W1, S1 [N, D], W2, S2 [D, N], row-major), in the
// storage type S (the fp32 working state, or a saved chunk-start state in the inputs' dtype).
template <typename S>
struct GlobalState {
  S *w1, *s1, *w2, *s2;
  __device__ GlobalState(S* base, index_t block_elems)
      : w1(base), s1(base + block_elems), w2(base + 2 * block_elems), s2(base + 3 * block_elems) {}
  __device__ GlobalState(S* w1_, S* s1_, S* w2_, S* s2_) : w1(w1_), s1(s1_), w2(w2_), s2(s2_) {}
};

// Shared-memory copy of one hidden block: rows [n0, n0 + nb) of W1, S1 ([nb, D], stride D) and
// columns [n0, n0 + nb) of W2, S2 ([D, nb], stride NB), read as compute_t.
template <typename S, typename T>
struct StateBlock {
  device::SharedPtr<S> w1, s1, w2, s2;
  int D, NB;
  __device__ T W1(int i, int d) const { return device::cast<T>(w1[i * D + d]); }
  __device__ T S1(int i, int d) const { return device::cast<T>(s1[i * D + d]); }
  __device__ T W2(int j, int i) const { return device::cast<T>(w2[j * NB + i]); }
  __device__ T S2(int j, int i) const { return device::cast<T>(s2[j * NB + i]); }
};

// Block hb of a state in global memory, indexed like a StateBlock (through L1: for operands that
// few products read, such as the backward's carried cotangent).
template <typename S, typename T>
struct GlobalBlock {
  GlobalState<const S> state;
  int n0, D, N;
  __device__ T W1(int i, int d) const { return device::cast<T>(state.w1[index_t(n0 + i) * D + d]); }
  __device__ T S1(int i, int d) const { return device::cast<T>(state.s1[index_t(n0 + i) * D + d]); }
  __device__ T W2(int j, int i) const { return device::cast<T>(state.w2[index_t(j) * N + n0 + i]); }
  __device__ T S2(int j, int i) const { return device::cast<T>(state.s2[index_t(j) * N + n0 + i]); }
};

// Issues the copies of block hb of `state` into `dst` (with_momenta: also S1, S2); the caller
// commits and waits (the staging rules of common/staging.cuh).
template <typename S, typename T>
__device__ __forceinline__ void stage_state_block(const GlobalState<const S>& state, const HiddenBlock& hb, int D,
                                                  int N, bool with_momenta, const StateBlock<S, T>& dst) {
  constexpr int kPiece = 16 / int(sizeof(S));
  const index_t row0 = index_t(hb.n0) * D;
  kernel::stage_span(state.w1 + row0, hb.nb * D, dst.w1);
  if (with_momenta) kernel::stage_span(state.s1 + row0, hb.nb * D, dst.s1);
  const bool vectors = kernel::aligned16(state.w2) && kernel::aligned16(state.s2) && N % kPiece == 0 &&
                       hb.n0 % kPiece == 0 && hb.nb % kPiece == 0 && dst.NB % kPiece == 0;
  const auto column_rows = [&](int j) { return index_t(j) * N + hb.n0; };
  kernel::stage_rows_async(state.w2, column_rows, D, hb.nb, dst.NB, vectors, dst.w2);
  if (with_momenta) kernel::stage_rows_async(state.s2, column_rows, D, hb.nb, dst.NB, vectors, dst.s2);
}

// The loop over the hidden blocks of one pass, with block i + 1's state staged (cp.async) while
// block i is computed on (kernel::pipelined_steps): body(hb, buffer) runs after a barrier that
// follows its block's copies, and a barrier follows the loop.
template <typename S, typename T, class Body>
__device__ __forceinline__ void hidden_block_loop(const GlobalState<const S>& state, int D, int N, int NB,
                                                  bool with_momenta, const StateBlock<S, T> (&buffers)[2],
                                                  const Body& body) {
  kernel::pipelined_steps(
      hidden_blocks(N, NB),
      [&](int block) { stage_state_block(state, hidden_block(block, NB, N), D, N, with_momenta, buffers[block & 1]); },
      [&](int block) { body(hidden_block(block, NB, N), buffers[block & 1]); });
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Single-token matrix-vector products (the kl lag token), straight from global memory

// out(row, sum_col value(row, col)) for row < rows: a warp per row, lanes over the columns, a
// butterfly sum (deterministic); out is called by every lane of the row's warp.
template <typename T, class Value, class Out>
__device__ __forceinline__ void warp_row_sums(int rows, int cols, const Value& value, const Out& out) {
  const int n_warps = static_cast<int>(blockDim.x) / device::kWarpSize;
  for (int row = device::warp_id(); row < rows; row += n_warps) {
    T acc = 0;
    for (int col = device::lane_id(); col < cols; col += device::kWarpSize) acc += T(value(row, col));
    out(row, device::warp_reduce_sum(acc));
  }
}

// out(row, sum_col M[row * ld + col] x(col)) for row < rows (warp_row_sums).
template <typename T, class Matrix, class X, class Out>
__device__ __forceinline__ void warp_matvec(int rows, int cols, const Matrix& M, index_t ld, const X& x,
                                            const Out& out) {
  warp_row_sums<T>(rows, cols, [&](int row, int col) { return device::cast<T>(M[row * ld + col]) * x(col); }, out);
}

// out(col, sum_row M[row * ld + col] y(row)) for col < cols: a thread per column.
template <typename T, class Matrix, class Y, class Out>
__device__ __forceinline__ void column_matvec(int rows, int cols, const Matrix& M, index_t ld, const Y& y,
                                              const Out& out) {
  for (int col = threadIdx.x; col < cols; col += blockDim.x) {
    T acc = 0;
    for (int row = 0; row < rows; ++row) acc += device::cast<T>(M[row * ld + col]) * y(row);
    out(col, acc);
  }
}

// ---------------------------------------------------------------------------------------------
// Retention "kl": Memora's lag token (docs/miras.md §2.3), with matrix-vector products

// Shared-memory vectors of the lag token's key path: hidden, first, grad [N]; resid, err [D];
// norm [1]; second [N] only for the backward.
template <class Ptr>
struct LagVectors {
  Ptr hidden, first, second, grad, resid, err, norm;
};

// The lag token's key path at `state`: hidden = act(W1 k0), first = act'(W1 k0), resid = k0 + W2 hidden
// - v0, err = f(resid), grad = (W2^T err) .* first (dz0) and, with_second, second = (W2^T err) .*
// act''(W1 k0). k0(d), v0(d), delta0(d): the token's key, value and thresholds. Ends with a barrier.
template <typename T, typename S, class K0, class V0, class Delta0, class Ptr>
__device__ __forceinline__ void lag_key_path(const GlobalState<const S>& state, int D, int N, MlpActivation act_kind,
                                             const kernel::Objective<T>& objective, const K0& k0, const V0& v0,
                                             const Delta0& delta0, bool with_second, const LagVectors<Ptr>& vec) {
  const bool lane0 = device::lane_id() == 0;
  warp_matvec<T>(N, D, state.w1, D, k0, [&](int i, T zi) {
    const Activation<T> act = activation<2>(act_kind, zi);
    if (!lane0) return;
    vec.hidden[i] = act.value, vec.first[i] = act.first;
    if (with_second) vec.second[i] = act.second;
  });
  __syncthreads();
  warp_matvec<T>(D, N, state.w2, N, [&](int i) { return vec.hidden[i]; }, [&](int j, T yj) {
    if (lane0) vec.resid[j] = k0(j) + yj - v0(j);
  });
  __syncthreads();
  if (objective.uses_norm()) {
    warp_row_sums<T>(1, D, [&](int, int j) { return vec.resid[j] * vec.resid[j]; }, [&](int, T sum) {
      if (lane0) vec.norm[0] = fmath::sqrt(sum);
    });
    __syncthreads();
  }
  for (int j = threadIdx.x; j < D; j += blockDim.x)
    vec.err[j] = objective.error(vec.resid[j], delta0(j), objective.uses_norm() ? vec.norm[0] : T(0));
  __syncthreads();
  column_matvec<T>(D, N, state.w2, N, [&](int j) { return vec.err[j]; }, [&](int i, T gi) {
    vec.grad[i] = gi * vec.first[i];
    if (with_second) vec.second[i] = gi * vec.second[i];
  });
  __syncthreads();
}

// Memora's step on every row of one weight matrix W [rows, cols] with momentum S, whose inner
// gradient is x y^T, from (w, s) into (w_out, s_out), which may be the same arrays
// (kernel::kl_softmax_rows over row-major arrays).
template <typename T, typename S, typename Out, class X, class Y>
__device__ __forceinline__ void kl_softmax_rows(const S* w, const S* s, Out* w_out, Out* s_out, int rows, int cols,
                                                T theta, T eta, T beta, const X& x, const Y& y) {
  kernel::kl_softmax_rows<T>(
      rows, cols, theta, eta, beta, [&](int r, int c) { return device::cast<T>(w[index_t(r) * cols + c]); },
      [&](int r, int c) { return device::cast<T>(s[index_t(r) * cols + c]); }, x, y,
      [&](int r, int c, T value, T momentum) {
        w_out[index_t(r) * cols + c] = device::cast<Out>(value);
        s_out[index_t(r) * cols + c] = device::cast<Out>(momentum);
      });
}

// The lag token's step on both weights, from `state` into `out` (may be the same), after
// lag_key_path at `state`; k0(d): the token's key; theta, eta, beta: its gates. Ends with a barrier.
template <typename T, typename S, typename Out, class K0, class Ptr>
__device__ __forceinline__ void kl_lag_step(const GlobalState<const S>& state, const GlobalState<Out>& out, int D, int N,
                                            T theta, T eta, T beta, const K0& k0, const LagVectors<Ptr>& vec) {
  kl_softmax_rows(state.w1, state.s1, out.w1, out.s1, N, D, theta, eta, beta, [&](int i) { return vec.grad[i]; }, k0);
  kl_softmax_rows(state.w2, state.s2, out.w2, out.s2, D, N, theta, eta, beta, [&](int j) { return vec.err[j]; },
                  [&](int i) { return vec.hidden[i]; });
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Retention "lq" (docs/miras.md §2.3): the carried weights are accumulators A; a chunk learns and
// reads with rho A (and rho S for the momenta's share of the token reads), rho = ||A||_q^(2-q) per
// weight matrix, fixed at the chunk start.

// The lq scales of W1 (i = 0) and W2 (i = 1) of `state` (1 where not lq), and their power sums
// sum |A|^q (for the backward). The sums are block-wide (scratch: 2 x warps values); every thread
// gets them. Contains barriers.
template <typename T>
struct LqScales {
  T rho[2] = {T(1), T(1)};
  T sums[2] = {T(0), T(0)};
};

template <typename T, typename S, class Scratch>
__device__ __forceinline__ LqScales<T> lq_scales(const GlobalState<const S>& state, index_t n, T q,
                                                 const Scratch& scratch) {
  LqScales<T> out;
  for (index_t i = threadIdx.x; i < n; i += blockDim.x) {
    out.sums[0] += kernel::lq_power(device::cast<T>(state.w1[i]), q);
    out.sums[1] += kernel::lq_power(device::cast<T>(state.w2[i]), q);
  }
  kernel::block_sum(out.sums, scratch);
  for (int w = 0; w < 2; ++w) out.rho[w] = kernel::lq_rho(out.sums[w], q);
  return out;
}

}  // namespace mlp
}  // namespace titans
