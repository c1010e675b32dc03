// Tile loops: an M x N product cut into 16x8 output tiles dealt round-robin to the block's warps
// (warp-uniform, as mma.sync requires). An element's accumulator lives in exactly one lane, which
// lets epilogues update their output in place. Operands are callables A(r, k), B(k, c) returning
// the compute type, so transposes, row scalings and concatenations cost no copies; reads outside
// M x K / K x N give 0. Memory-type agnostic.
#pragma once

#include <type_traits>

#include "cuda/common/operands.cuh"
#include "device/device.h"

namespace titans {
namespace kernel {

// Calls body(r0, c0) for every 16x8 tile of an M x N output; tiles go round-robin to the warps,
// so the loop is warp-uniform as mma.sync requires.
template <class Body>
__device__ __forceinline__ void for_each_tile(int M, int N, const Body& body) {
  const int tiles_n = (N + 7) / 8, tiles = (M + 15) / 16 * tiles_n;
  const int n_warps = static_cast<int>(blockDim.x) / device::kWarpSize;
  for (int tile = device::warp_id(); tile < tiles; tile += n_warps) body(tile / tiles_n * 16, tile % tiles_n * 8);
}

// acc += A[r0:r0+16, 0:K] B[0:K, c0:c0+8] for an M x K by K x N product.
template <class Policy, class A, class B>
__device__ __forceinline__ void mma_accumulate(typename Policy::acc_t (&acc)[4], int r0, int c0, int M, int N, int K,
                                               const A& a, const B& b) {
  using acc_t = typename Policy::acc_t;
  const auto a_in = [&](int r, int k) -> acc_t { return r < M && k < K ? acc_t(a(r, k)) : acc_t(0); };
  const auto b_in = [&](int k, int c) -> acc_t { return k < K && c < N ? acc_t(b(k, c)) : acc_t(0); };
  for (int k0 = 0; k0 < K; k0 += Policy::kK) Policy::step(acc, a_in, b_in, r0, c0, k0);
}

// acc += A B for the 16x8 tile at (r0, c0) of an M x N product: with `fragments` (bf16 inputs
// only) through ldmatrix fragments of the bf16 tiles, else through the policy's loads of the
// operand views a(r, k), b(k, c). Both read the same bf16 values.
template <class Policy, bool kBKMajor, class A, class B, class Tile>
__device__ __forceinline__ void tile_product(typename Policy::acc_t (&acc)[4], int r0, int c0, int M, int N, int K,
                                             const A& a, const B& b, bool fragments, const Tile& a_tile,
                                             const Tile& b_tile) {
  if constexpr (std::is_same<Policy, Bf16Operands>::value) {
    if (fragments) return mma_bf16_tiles<kBKMajor>(acc, r0, c0, K, a_tile, b_tile);
  }
  mma_accumulate<Policy>(acc, r0, c0, M, N, K, a, b);
}

// Calls out(r, c, i) for this lane's accumulator elements i of the tile at (r0, c0) inside M x N.
template <class Out>
__device__ __forceinline__ void for_each_element(int r0, int c0, int M, int N, const Out& out) {
  const int lane = device::lane_id();
  for (int i = 0; i < 4; ++i) {
    const device::FragmentCoord at = device::mma_m16n8_c_coord(lane, i);
    if (r0 + at.row < M && c0 + at.col < N) out(r0 + at.row, c0 + at.col, i);
  }
}

// Deterministic block-wide sums of N values per thread: warp butterflies, then the warps' partial
// sums added in warp order by every thread. scratch holds N * warps values. Contains barriers.
template <int N, typename T, class Scratch>
__device__ __forceinline__ void block_sum(T (&values)[N], const Scratch& scratch) {
  const int n_warps = static_cast<int>(blockDim.x) / device::kWarpSize;
  for (int i = 0; i < N; ++i) values[i] = device::warp_reduce_sum(values[i]);
  if (device::lane_id() == 0)
    for (int i = 0; i < N; ++i) scratch[i * n_warps + device::warp_id()] = values[i];
  __syncthreads();
  for (int i = 0; i < N; ++i) {
    values[i] = T(0);
    for (int w = 0; w < n_warps; ++w) values[i] += scratch[i * n_warps + w];
  }
  __syncthreads();  // scratch may be reused at once
}

}  // namespace kernel
}  // namespace titans
