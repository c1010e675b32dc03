// Tile loops: products cut into strips of 16 rows x kN 8-column MMA tiles, dealt round-robin to
// the block's warps (warp-uniform, as mma.sync requires). Memory-type agnostic.
//
// A strip's kN accumulators are independent, and a strip may run several products that share an
// operand: per k-step the shared fragment is loaded once and every product's MMAs follow each other,
// so a warp always has several independent accumulators in flight (the ILP that hides the MMA
// latency of the sequential kernels' short chains). Operands are SmemMatrix views of PaddedTiles
// (smem.cuh): the k-steps run to the contraction rounded up to the policy's k, and strips cover
// the padded extent, so operands hold zeros there and no read is bounds-checked.
//
// An element's accumulator lives in exactly one lane (the C layout of mma.h), which lets an
// epilogue (for_each_strip_element) update its output in place, and WarpStrips keep a warp's
// strips in registers across the phases of a loop.
#pragma once

#include "cuda/common/operands.cuh"
#include "device/device.h"

namespace titans {
namespace kernel {

constexpr int kStripRows = 16;

// Strips of 16 x 8 kN covering an M x N output (both rounded up to the strip).
template <int kN>
__host__ __device__ constexpr int strip_count(int M, int N) {
  return (M + kStripRows - 1) / kStripRows * ((N + 8 * kN - 1) / (8 * kN));
}

__device__ __forceinline__ int warp_count() { return static_cast<int>(blockDim.x) / device::kWarpSize; }

// Calls body(r0, c0) for every strip of an M x N output that this warp owns: strip s goes to warp
// (first + s) % warps, so that consecutive loops (first = the strips dealt before) share the warps
// evenly.
template <int kN, class Body>
__device__ __forceinline__ void for_each_strip(int M, int N, const Body& body, int first = 0) {
  const int per_row = (N + 8 * kN - 1) / (8 * kN), strips = strip_count<kN>(M, N), warps = warp_count();
  const int start = ((device::warp_id() - first) % warps + warps) % warps;
  for (int s = start; s < strips; s += warps) body(s / per_row * kStripRows, s % per_row * 8 * kN);
}

// One product of a strip whose A operand is shared with others: acc[n] += A B[:, c0 + 8 n ...].
template <typename acc_t, int kN, class B>
struct ProductWithB {
  acc_t (&acc)[kN][4];
  B b;
  template <class Policy>
  __device__ __forceinline__ void step(const typename Policy::AFragment& a, int k0, int c0) {
    for (int n = 0; n < kN; ++n) Policy::mma(acc[n], a, Policy::load_b(b, k0, c0 + 8 * n));
  }
};
template <typename acc_t, int kN, class B>
__device__ __forceinline__ ProductWithB<acc_t, kN, B> times(acc_t (&acc)[kN][4], const B& b) {
  return {acc, b};
}

// One product of a strip whose B operand is shared with others: acc[n] += A B[:, c0 + 8 n ...].
template <class Policy, int kN, class A>
struct ProductWithA {
  typename Policy::acc_t (&acc)[kN][4];
  A a;
  typename Policy::AFragment fragment;
  __device__ __forceinline__ void load(int r0, int k0) { fragment = Policy::load_a(a, r0, k0); }
  __device__ __forceinline__ void step(int n, const typename Policy::BFragment& b) { Policy::mma(acc[n], fragment, b); }
};
template <class Policy, int kN, class A>
__device__ __forceinline__ ProductWithA<Policy, kN, A> product(typename Policy::acc_t (&acc)[kN][4], const A& a) {
  return {acc, a, {}};
}

// The strip at (r0, c0) of A B_i for every product i: A[r0 .. r0 + 16, 0 .. K) is loaded once per
// k-step and multiplied with each B_i.
template <class Policy, class A, class... Products>
__device__ __forceinline__ void strip_mma(const A& a, int r0, int c0, int K, Products&&... products) {
  for (int k0 = 0; k0 < K; k0 += Policy::kK) {
    const typename Policy::AFragment fragment = Policy::load_a(a, r0, k0);
    (products.template step<Policy>(fragment, k0, c0), ...);
  }
}

// The strip at (r0, c0) of A_i B for every product i: each B fragment is loaded once per k-step and
// multiplied with each A_i.
template <class Policy, int kN, class B, class... Products>
__device__ __forceinline__ void strip_mma_shared_b(const B& b, int r0, int c0, int K, Products&&... products) {
  for (int k0 = 0; k0 < K; k0 += Policy::kK) {
    (products.load(r0, k0), ...);
    for (int n = 0; n < kN; ++n) {
      const typename Policy::BFragment fragment = Policy::load_b(b, k0, c0 + 8 * n);
      (products.step(n, fragment), ...);
    }
  }
}

// Calls f(r, c, n, i) for this lane's elements of the strip at (r0, c0): accumulator [n][i] holds
// output (r, c).
template <int kN, class F>
__device__ __forceinline__ void for_each_strip_element(int r0, int c0, const F& f) {
  const int lane = device::lane_id();
  for (int n = 0; n < kN; ++n)
    for (int i = 0; i < 4; ++i) {
      const device::FragmentCoord at = device::mma_m16n8_c_coord(lane, i);
      f(r0 + at.row, c0 + 8 * n + at.col, n, i);
    }
}

template <typename acc_t, int kN>
__device__ __forceinline__ void zero(acc_t (&acc)[kN][4]) {
  for (int n = 0; n < kN; ++n)
    for (int i = 0; i < 4; ++i) acc[n][i] = acc_t(0);
}

// The sum over the four lanes that hold one accumulator row (a quad: lanes 4q .. 4q + 3); every
// lane of the quad gets it.
template <typename T>
__device__ __forceinline__ T quad_sum(T x) {
  x += __shfl_xor_sync(device::kFullWarpMask, x, 1);
  x += __shfl_xor_sync(device::kFullWarpMask, x, 2);
  return x;
}

// The strips of an M x N output that this warp keeps in registers across the phases of a loop
// (barriers in between): strip s = warp + i * warps for i < kMaxPerWarp, which the caller sizes
// for the largest M x N it launches. The loops over i are unrolled, so acc[i] stays in registers.
template <typename acc_t, int kMaxPerWarp, int kN>
struct WarpStrips {
  acc_t acc[kMaxPerWarp][kN][4];
  int per_row, strips;
  __device__ __forceinline__ WarpStrips(int M, int N)
      : per_row((N + 8 * kN - 1) / (8 * kN)), strips(strip_count<kN>(M, N)) {}
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kMaxPerWarp; ++i) kernel::zero(acc[i]);
  }
  // f(acc, r0, c0) for each strip this warp owns.
  template <class F>
  __device__ __forceinline__ void for_each(const F& f) {
    const int warps = warp_count();
#pragma unroll
    for (int i = 0; i < kMaxPerWarp; ++i) {
      const int s = device::warp_id() + i * warps;
      if (s < strips) f(acc[i], s / per_row * kStripRows, s % per_row * 8 * kN);
    }
  }
};

// Deterministic block-wide sums of N values per thread: warp butterflies, then the warps' partial
// sums added in warp order by every thread. scratch holds N * warps values. Contains barriers.
template <int N, typename T, class Scratch>
__device__ __forceinline__ void block_sum(T (&values)[N], const Scratch& scratch) {
  const int n_warps = warp_count();
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
