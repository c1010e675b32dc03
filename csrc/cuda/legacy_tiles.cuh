// The tile-by-tile product API the backward kernels were written against; removed with them.
#pragma once

#include <cstdint>
#include <type_traits>

#include <cstddef>

#include "cuda/common/operands.cuh"
#include "cuda/common/smem.cuh"
#include "cuda/common/tile_loops.cuh"
#include "device/device.h"

namespace titans {
namespace kernel {

struct Bf16Operands {
  using acc_t = float;
  static constexpr int kK = 16;
  template <class A, class B>
  __device__ __forceinline__ static void step(float (&acc)[4], const A& a, const B& b, int r0, int c0, int k0) {
    const int lane = device::lane_id();
    uint32_t af[4], bf[2];
    for (int i = 0; i < 4; ++i) {  // elements 2i and 2i+1 are neighbours along k
      const device::FragmentCoord at = device::mma_m16n8k16_a_coord(lane, 2 * i);
      af[i] = device::pack_half2<device::bf16>(a(r0 + at.row, k0 + at.col), a(r0 + at.row, k0 + at.col + 1));
    }
    for (int i = 0; i < 2; ++i) {
      const device::FragmentCoord at = device::mma_m16n8k16_b_coord(lane, 2 * i);
      bf[i] = device::pack_half2<device::bf16>(b(k0 + at.row, c0 + at.col), b(k0 + at.row + 1, c0 + at.col));
    }
    device::mma_m16n8k16_bf16(acc, af, bf, acc);
  }
};

template <bool kSplit>
struct Tf32Operands {
  using acc_t = float;
  static constexpr int kK = 8;
  template <class A, class B>
  __device__ __forceinline__ static void step(float (&acc)[4], const A& a, const B& b, int r0, int c0, int k0) {
    const int lane = device::lane_id();
    float av[4], bv[2];
    uint32_t ah[4], bh[2];
    for (int i = 0; i < 4; ++i) {
      const device::FragmentCoord at = device::mma_m16n8k8_tf32_a_coord(lane, i);
      av[i] = a(r0 + at.row, k0 + at.col);
      ah[i] = device::float_to_tf32_rna(av[i]);
    }
    for (int i = 0; i < 2; ++i) {
      const device::FragmentCoord at = device::mma_m16n8k8_tf32_b_coord(lane, i);
      bv[i] = b(k0 + at.row, c0 + at.col);
      bh[i] = device::float_to_tf32_rna(bv[i]);
    }
    if constexpr (kSplit) {
      // The small cross terms first, so the big product is added to an accumulator that already
      // holds them (the usual 3xTF32 order).
      uint32_t al[4], bl[2];
      for (int i = 0; i < 4; ++i) al[i] = device::float_to_tf32_rna(av[i] - device::tf32_to_float(ah[i]));
      for (int i = 0; i < 2; ++i) bl[i] = device::float_to_tf32_rna(bv[i] - device::tf32_to_float(bh[i]));
      device::mma_m16n8k8_tf32(acc, al, bh, acc);
      device::mma_m16n8k8_tf32(acc, ah, bl, acc);
    }
    device::mma_m16n8k8_tf32(acc, ah, bh, acc);
  }
};

struct Fp64Operands {
  using acc_t = double;
  static constexpr int kK = 8;
  template <class A, class B>
  __device__ __forceinline__ static void step(double (&acc)[4], const A& a, const B& b, int r0, int c0, int k0) {
    const int lane = device::lane_id();
    for (int i = 0; i < 4; ++i) {
      const device::FragmentCoord at = device::mma_m16n8_c_coord(lane, i);
      for (int k = k0; k < k0 + kK; ++k) acc[i] += a(r0 + at.row, k) * b(k, c0 + at.col);
    }
  }
};

template <typename input_t>
struct LegacyPolicy;
template <>
struct LegacyPolicy<device::bf16> { using type = Bf16Operands; };
template <>
struct LegacyPolicy<device::fp16> { using type = Tf32Operands<false>; };
template <>
struct LegacyPolicy<float> { using type = Tf32Operands<true>; };
template <>
struct LegacyPolicy<double> { using type = Fp64Operands; };

// bf16 products from ldmatrix fragments.
//
// Operands are bf16 tiles in shared memory, row-major with a leading dimension ld (a multiple of 8
// elements, so that every ldmatrix row is 16-byte aligned; ld = width + 8 keeps the 8 rows of a
// matrix in different banks): A [M, K] by its rows; B either by the rows of B^T ([N, K],
// "n-major", e.g. a state M0 read as M0^T) or by its own rows ([K, N], "k-major", loaded
// transposed). Nothing is bounds-checked: rows of A beyond M and of an n-major B beyond N only
// reach discarded outputs, but the contraction runs to K rounded up to 16, so entries beyond K
// must be zero in both operands (shared memory may hold NaN, and 0 * NaN is NaN).
template <class Ptr>
struct Bf16Tile {
  Ptr base;
  int ld;
};

// acc += A[r0:r0+16, 0:K] B[0:K, c0:c0+8] (fragment layouts: mma.h, ldmatrix.h).
template <bool kBKMajor, class Ptr>
__device__ __forceinline__ void mma_bf16_tiles(float (&acc)[4], int r0, int c0, int K, const Bf16Tile<Ptr>& a,
                                               const Bf16Tile<Ptr>& b) {
  const int lane = device::lane_id();
  const int matrix = lane / 8, row = lane % 8;
  for (int k0 = 0; k0 < K; k0 += 16) {
    uint32_t af[4], bf[2];
    // A's registers a0..a3: rows 0-7 | 8-15 of k 0-7, then of k 8-15.
    device::ldmatrix_x4(af, a.base + ((r0 + matrix % 2 * 8 + row) * a.ld + k0 + matrix / 2 * 8));
    // B's registers b0, b1: k 0-7, k 8-15 (lanes 16-31 repeat the addresses of lanes 0-15).
    if constexpr (kBKMajor)
      device::ldmatrix_x2_trans(bf, b.base + ((k0 + matrix % 2 * 8 + row) * b.ld + c0));
    else
      device::ldmatrix_x2(bf, b.base + ((c0 + row) * b.ld + k0 + matrix % 2 * 8));
    device::mma_m16n8k16_bf16(acc, af, bf, acc);
  }
}

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

// Leading dimension of a staged [rows, width] tile of T: one 16-byte piece wider than the row,
// so that consecutive rows start in different shared-memory banks.
template <typename T>
__host__ __device__ constexpr int padded(int width) {
  return width + 16 / int(sizeof(T));
}

// Carves the dynamic shared memory into arrays of compute_t followed by arrays of input_t (the
// staged q, k, v, dO tiles keep their own, often narrower, dtype). Offsets are in elements of
// each type; the same code runs on the host (to size the launch) and on the device. Every array
// starts 16-byte aligned (compute_t has at least 4 bytes, input_t at least 2), as 16-byte
// vector accesses and cp.async need.
struct SmemCarver {
  static constexpr int kComputeAlign = 4, kInputAlign = 8;  // elements
  int compute_elems = 0, input_elems = 0;
  __host__ __device__ int compute(int n) {
    const int at = compute_elems;
    compute_elems += (n + kComputeAlign - 1) / kComputeAlign * kComputeAlign;
    return at;
  }
  __host__ __device__ int input(int n) {
    const int at = input_elems;
    input_elems += (n + kInputAlign - 1) / kInputAlign * kInputAlign;
    return at;
  }
  template <typename compute_t, typename input_t>
  __host__ __device__ size_t bytes() const {
    return size_t(compute_elems) * sizeof(compute_t) + size_t(input_elems) * sizeof(input_t);
  }
};

// Pointers for a carve-up: compute_t arrays at the start, input_t arrays after them. compute_t is
// a multiple of input_t in size for every dtype pair used.
template <typename compute_t, typename input_t>
struct SmemBase {
  static_assert(sizeof(compute_t) % sizeof(input_t) == 0, "input arrays must stay aligned");
  device::SharedPtr<compute_t> compute_base;
  device::SharedPtr<input_t> input_base;
  int input_start;  // in input_t elements
  __device__ explicit SmemBase(const SmemCarver& carver)
      : compute_base(dynamic_shared<compute_t>()), input_base(dynamic_shared<input_t>()),
        input_start(carver.compute_elems * int(sizeof(compute_t) / sizeof(input_t))) {}
  __device__ device::SharedPtr<compute_t> compute(int offset) const { return compute_base + offset; }
  __device__ device::SharedPtr<input_t> input(int offset) const { return input_base + (input_start + offset); }
};

// Host side: the dynamic shared memory of a kernel's carve-up.
template <typename Ktraits, class Layout>
size_t smem_bytes(const Layout& layout) {
  return layout.carver.template bytes<typename Ktraits::compute_t, typename Ktraits::input_t>();
}

// The chunk loop of a sequential kernel, software-pipelined over two buffers: chunk i + 1 (in walk
// order; reverse: from the last chunk down) is staged by stage(n, buffer) while body(n, buffer)
// computes on chunk i. body runs after a barrier that follows the wait for its chunk's copies, and
// a barrier follows it, so the next stage may overwrite the buffer it read.
template <class Stage, class Body>
__device__ __forceinline__ void pipelined_chunk_loop(int n_chunks, bool reverse, const Stage& stage, const Body& body) {
  const auto chunk = [&](int i) { return reverse ? n_chunks - 1 - i : i; };
  if (n_chunks > 0) stage(chunk(0), 0);
  device::cp_async_commit();
  for (int i = 0; i < n_chunks; ++i) {
    const int buffer = i & 1;
    if (i + 1 < n_chunks) stage(chunk(i + 1), buffer ^ 1);
    device::cp_async_commit();  // possibly an empty group, so that wait<1> always means "chunk i"
    device::cp_async_wait<1>();
    __syncthreads();
    body(chunk(i), buffer);
    __syncthreads();
  }
  device::cp_async_wait<0>();
}

}  // namespace kernel
}  // namespace titans
