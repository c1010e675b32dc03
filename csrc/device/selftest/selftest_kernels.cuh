// Self-test kernels of the device layer, written only against device.h. Included by exactly one
// TU per build: csrc/emu/selftest_emu.cpp (emulation) and selftest_kernels.cu (nvcc compile check).
#pragma once

#include "device/device.h"
#include "device/selftest/selftest.h"

#include <type_traits>

namespace titans {
namespace selftest {

using device::Stream;

__global__ void block_reduce_sum_kernel(const float* x, float* out, int n) {
  TITANS_DYNAMIC_SHARED(float, partial);
  const int tid = threadIdx.x;
  const int i = blockIdx.x * blockDim.x + tid;
  partial[tid] = i < n ? x[i] : 0.f;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (tid < stride) partial[tid] += partial[tid + stride];
    __syncthreads();
  }
  if (tid == 0) out[blockIdx.x] = partial[0];
}

int block_reduce_sum(const float* x, float* out, int n, int threads, CUstream_st* stream) {
  const int blocks = (n + threads - 1) / threads;
  return device::launch("block_reduce_sum", block_reduce_sum_kernel, dim3(blocks), dim3(threads),
                        threads * sizeof(float), stream, x, out, n);
}

__global__ void warp_shuffle_kernel(const float* x, float* out, ShuffleKind kind, int arg, int width) {
  const int i = threadIdx.x;
  const float v = x[i];
  switch (kind) {
    case ShuffleKind::kIdx: out[i] = __shfl_sync(device::kFullWarpMask, v, arg, width); break;
    case ShuffleKind::kUp: out[i] = __shfl_up_sync(device::kFullWarpMask, v, arg, width); break;
    case ShuffleKind::kDown: out[i] = __shfl_down_sync(device::kFullWarpMask, v, arg, width); break;
    case ShuffleKind::kXor: out[i] = __shfl_xor_sync(device::kFullWarpMask, v, arg, width); break;
  }
}

int warp_shuffle(const float* x, float* out, int threads, ShuffleKind kind, int arg, int width, CUstream_st* stream) {
  return device::launch("warp_shuffle", warp_shuffle_kernel, dim3(1), dim3(threads), 0, stream, x, out, kind, arg,
                        width);
}

__global__ void warp_reduce_kernel(const float* x, float* sum, float* max, int32_t* ballot) {
  const int i = threadIdx.x;
  sum[i] = device::warp_reduce_sum(x[i]);
  max[i] = device::warp_reduce_max(x[i]);
  ballot[i] = static_cast<int32_t>(__ballot_sync(device::kFullWarpMask, x[i] > 0.f));
}

int warp_reduce(const float* x, float* sum, float* max, int32_t* ballot, int threads, CUstream_st* stream) {
  return device::launch("warp_reduce", warp_reduce_kernel, dim3(1), dim3(threads), 0, stream, x, sum, max, ballot);
}

constexpr int kNeighbourThreads = 256;

__global__ void neighbour_exchange_kernel(const float* x, float* out, bool with_barrier) {
  TITANS_SHARED_ARRAY(float, staged, kNeighbourThreads);
  const int tid = threadIdx.x;
  staged[tid] = 2.f * x[tid];
  // Without this barrier a thread may read its neighbour's slot before the neighbour wrote it.
  if (with_barrier) __syncthreads();
  out[tid] = staged[tid > 0 ? tid - 1 : tid];
}

int neighbour_exchange(const float* x, float* out, bool with_barrier, CUstream_st* stream) {
  return device::launch("neighbour_exchange", neighbour_exchange_kernel, dim3(1), dim3(kNeighbourThreads), 0, stream,
                        x, out, with_barrier);
}

constexpr int kShiftedThreads = 64;

__global__ void shared_read_shifted_kernel(float* out, int shift) {
  TITANS_SHARED_ARRAY(float, tile, kShiftedThreads);
  const int tid = threadIdx.x;
  tile[tid] = static_cast<float>(tid);
  __syncthreads();
  out[tid] = tile[tid + shift];
}

int shared_read_shifted(float* out, int shift, CUstream_st* stream) {
  return device::launch("shared_read_shifted", shared_read_shifted_kernel, dim3(1), dim3(kShiftedThreads), 0, stream,
                        out, shift);
}

__global__ void partial_barrier_kernel(int threads_at_barrier) {
  if (static_cast<int>(threadIdx.x) < threads_at_barrier) __syncthreads();
}

int partial_barrier(int threads_at_barrier, CUstream_st* stream) {
  return device::launch("partial_barrier", partial_barrier_kernel, dim3(1), dim3(64), 0, stream, threads_at_barrier);
}

constexpr int kAtomicsThreads = 128;
constexpr int kMaxBins = 256;

__global__ void atomics_kernel(const int32_t* values, int n, int32_t* histogram, int bins, float* sum, int32_t* max) {
  TITANS_SHARED_ARRAY(int32_t, block_histogram, kMaxBins);
  for (int b = threadIdx.x; b < bins; b += blockDim.x) block_histogram[b] = 0;
  __syncthreads();
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    atomicAdd(&block_histogram[values[i]], 1);
    atomicAdd(sum, static_cast<float>(values[i]));
    atomicMax(max, values[i]);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += blockDim.x) atomicAdd(&histogram[b], block_histogram[b]);
}

int atomics(const int32_t* values, int n, int32_t* histogram, int bins, float* sum, int32_t* max, CUstream_st* stream) {
  return device::launch("atomics", atomics_kernel, dim3(2), dim3(kAtomicsThreads), 0, stream, values, n, histogram,
                        bins, sum, max);
}

// Each MMA kind: its K, how a lane builds its A and B registers from fp32 matrices, and the call.
template <MmaKind kKind>
struct MmaCase;

// m16n8k16 with bf16 or fp16 inputs.
template <typename Half>
struct MmaM16N8K16Case {
  static constexpr int kK = 16;
  __device__ static uint32_t a_reg(const float* a, int lane, int r) {
    const device::FragmentCoord lo = device::mma_m16n8k16_a_coord(lane, 2 * r);
    const device::FragmentCoord hi = device::mma_m16n8k16_a_coord(lane, 2 * r + 1);
    return device::pack_half2<Half>(a[lo.row * kK + lo.col], a[hi.row * kK + hi.col]);
  }
  __device__ static uint32_t b_reg(const float* b, int lane, int r) {
    const device::FragmentCoord lo = device::mma_m16n8k16_b_coord(lane, 2 * r);
    const device::FragmentCoord hi = device::mma_m16n8k16_b_coord(lane, 2 * r + 1);
    return device::pack_half2<Half>(b[lo.row * 8 + lo.col], b[hi.row * 8 + hi.col]);
  }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
    if constexpr (std::is_same<Half, device::bf16>::value) {
      device::mma_m16n8k16_bf16(d, a, b, c);
    } else {
      device::mma_m16n8k16_fp16(d, a, b, c);
    }
  }
};
template <>
struct MmaCase<MmaKind::kM16N8K16Bf16> : MmaM16N8K16Case<device::bf16> {};
template <>
struct MmaCase<MmaKind::kM16N8K16Fp16> : MmaM16N8K16Case<device::fp16> {};

template <>
struct MmaCase<MmaKind::kM16N8K8Tf32> {
  static constexpr int kK = 8;
  __device__ static uint32_t a_reg(const float* a, int lane, int r) {
    const device::FragmentCoord at = device::mma_m16n8k8_tf32_a_coord(lane, r);
    return device::float_to_tf32_rna(a[at.row * kK + at.col]);
  }
  __device__ static uint32_t b_reg(const float* b, int lane, int r) {
    const device::FragmentCoord at = device::mma_m16n8k8_tf32_b_coord(lane, r);
    return device::float_to_tf32_rna(b[at.row * 8 + at.col]);
  }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
    device::mma_m16n8k8_tf32(d, a, b, c);
  }
};

template <MmaKind kKind>
__global__ void mma_kernel(const float* a, const float* b, const float* c, float* d) {
  using Case = MmaCase<kKind>;
  const int lane = device::lane_id();
  uint32_t a_regs[4], b_regs[2];
  float c_regs[4], d_regs[4];
  for (int r = 0; r < 4; ++r) a_regs[r] = Case::a_reg(a, lane, r);
  for (int r = 0; r < 2; ++r) b_regs[r] = Case::b_reg(b, lane, r);
  for (int i = 0; i < 4; ++i) {
    const device::FragmentCoord at = device::mma_m16n8_c_coord(lane, i);
    c_regs[i] = c[at.row * 8 + at.col];
  }
  Case::mma(d_regs, a_regs, b_regs, c_regs);
  for (int i = 0; i < 4; ++i) {
    const device::FragmentCoord at = device::mma_m16n8_c_coord(lane, i);
    d[at.row * 8 + at.col] = d_regs[i];
  }
}

int mma(MmaKind kind, const float* a, const float* b, const float* c, float* d, CUstream_st* stream) {
  switch (kind) {
    case MmaKind::kM16N8K16Bf16:
      return device::launch("mma_m16n8k16_bf16", mma_kernel<MmaKind::kM16N8K16Bf16>, dim3(1), dim3(32), 0, stream, a,
                            b, c, d);
    case MmaKind::kM16N8K16Fp16:
      return device::launch("mma_m16n8k16_fp16", mma_kernel<MmaKind::kM16N8K16Fp16>, dim3(1), dim3(32), 0, stream, a,
                            b, c, d);
    case MmaKind::kM16N8K8Tf32:
      return device::launch("mma_m16n8k8_tf32", mma_kernel<MmaKind::kM16N8K8Tf32>, dim3(1), dim3(32), 0, stream, a, b,
                            c, d);
  }
  return -1;
}

// The ldmatrix wrapper for a matrix count, with or without .trans.
template <int kMatrices>
__device__ void ldmatrix_xn(uint32_t (&r)[kMatrices], device::SharedPtr<uint16_t> row, bool trans) {
  if constexpr (kMatrices == 1) {
    trans ? device::ldmatrix_x1_trans(r, row) : device::ldmatrix_x1(r, row);
  } else if constexpr (kMatrices == 2) {
    trans ? device::ldmatrix_x2_trans(r, row) : device::ldmatrix_x2(r, row);
  } else {
    trans ? device::ldmatrix_x4_trans(r, row) : device::ldmatrix_x4(r, row);
  }
}

template <int kMatrices>
__global__ void ldmatrix_kernel(const uint16_t* tile_in, const int32_t* row_offsets, bool trans, uint32_t* out) {
  TITANS_SHARED_ARRAY(uint16_t, tile, kLdmatrixTileElems);
  const int lane = device::lane_id();
  for (int i = lane; i < kLdmatrixTileElems; i += device::kWarpSize) tile[i] = tile_in[i];
  __syncwarp();
  uint32_t r[kMatrices];
  ldmatrix_xn(r, tile + row_offsets[lane], trans);
  for (int i = 0; i < kMatrices; ++i) out[lane * kMatrices + i] = r[i];
}

int ldmatrix(const uint16_t* tile, const int32_t* row_offsets, int matrices, bool trans, uint32_t* out,
             CUstream_st* stream) {
  switch (matrices) {
    case 1:
      return device::launch("ldmatrix_x1", ldmatrix_kernel<1>, dim3(1), dim3(32), 0, stream, tile, row_offsets, trans,
                            out);
    case 2:
      return device::launch("ldmatrix_x2", ldmatrix_kernel<2>, dim3(1), dim3(32), 0, stream, tile, row_offsets, trans,
                            out);
    case 4:
      return device::launch("ldmatrix_x4", ldmatrix_kernel<4>, dim3(1), dim3(32), 0, stream, tile, row_offsets, trans,
                            out);
  }
  return -1;
}

__global__ void ldmatrix_mma_bf16_kernel(const float* a, const float* b, float* d) {
  TITANS_SHARED_ARRAY(device::bf16, a_tile, 16 * 16);
  TITANS_SHARED_ARRAY(device::bf16, b_tile, 16 * 8);
  const int lane = device::lane_id();
  for (int i = lane; i < 16 * 16; i += device::kWarpSize) a_tile[i] = device::cast<device::bf16>(a[i]);
  for (int i = lane; i < 16 * 8; i += device::kWarpSize) b_tile[i] = device::cast<device::bf16>(b[i]);
  __syncwarp();
  uint32_t a_regs[4], b_regs[2];
  // A's 8x8 quarters in fragment register order: rows 0-7 and 8-15 of columns 0-7 (lanes 0-15),
  // then of columns 8-15 (lanes 16-31).
  device::ldmatrix_x4(a_regs, a_tile + (lane % 16) * 16 + lane / 16 * 8);
  // B is stored [K, N] row-major but the MMA takes it column-major, hence .trans; lanes 0-15
  // address rows k = 0..15 (x2 ignores the other lanes' addresses).
  device::ldmatrix_x2_trans(b_regs, b_tile + (lane % 16) * 8);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  device::mma_m16n8k16_bf16(acc, a_regs, b_regs, acc);
  for (int i = 0; i < 4; ++i) {
    const device::FragmentCoord at = device::mma_m16n8_c_coord(lane, i);
    d[at.row * 8 + at.col] = acc[i];
  }
}

int ldmatrix_mma_bf16(const float* a, const float* b, float* d, CUstream_st* stream) {
  return device::launch("ldmatrix_mma_bf16", ldmatrix_mma_bf16_kernel, dim3(1), dim3(32), 0, stream, a, b, d);
}

// The cp.async wrapper of a copy size.
template <int kBytes>
__device__ void cp_async_bytes(device::SharedPtr<float> dst, const float* src) {
  if constexpr (kBytes == 16) {
    device::cp_async_16(dst, src);
  } else if constexpr (kBytes == 8) {
    device::cp_async_8(dst, src);
  } else {
    device::cp_async_4(dst, src);
  }
}

constexpr int kCpAsyncThreads = 64;

template <int kBytes>
__global__ void cp_async_pipeline_kernel(const float* x, float* out, int chunks, bool with_wait,
                                         bool with_refill_barrier) {
  TITANS_SHARED_ARRAY(float, stage, 2 * kCpAsyncChunk);
  constexpr int kFloats = kBytes / sizeof(float);
  const int tid = threadIdx.x;
  const auto load = [&](int chunk) {
    for (int i = tid * kFloats; i < kCpAsyncChunk; i += blockDim.x * kFloats)
      cp_async_bytes<kBytes>(stage + chunk % 2 * kCpAsyncChunk + i, x + chunk * kCpAsyncChunk + i);
  };
  load(0);
  device::cp_async_commit();
  for (int c = 0; c < chunks; ++c) {
    if (c + 1 < chunks) load(c + 1);
    // Committed even when empty on the last chunk, so the newest group is never chunk c's.
    device::cp_async_commit();
    if (with_wait) device::cp_async_wait<1>();
    __syncthreads();
    // Reversed: each thread reads elements that other threads copied.
    for (int i = tid; i < kCpAsyncChunk; i += blockDim.x)
      out[c * kCpAsyncChunk + i] = stage[c % 2 * kCpAsyncChunk + kCpAsyncChunk - 1 - i];
    // The next iteration refills this buffer: every thread must be done reading it.
    if (with_refill_barrier) __syncthreads();
  }
  // A thread must not exit with copies in flight.
  device::cp_async_wait<0>();
}

int cp_async_pipeline(const float* x, float* out, int chunks, int bytes, bool with_wait, bool with_refill_barrier,
                      CUstream_st* stream) {
  switch (bytes) {
    case 4:
      return device::launch("cp_async_pipeline_4", cp_async_pipeline_kernel<4>, dim3(1), dim3(kCpAsyncThreads), 0,
                            stream, x, out, chunks, with_wait, with_refill_barrier);
    case 8:
      return device::launch("cp_async_pipeline_8", cp_async_pipeline_kernel<8>, dim3(1), dim3(kCpAsyncThreads), 0,
                            stream, x, out, chunks, with_wait, with_refill_barrier);
    case 16:
      return device::launch("cp_async_pipeline_16", cp_async_pipeline_kernel<16>, dim3(1), dim3(kCpAsyncThreads), 0,
                            stream, x, out, chunks, with_wait, with_refill_barrier);
  }
  return -1;
}

constexpr int kOneGroupFloats = 4 * device::kWarpSize;
constexpr int kOneGroupMaxOffset = 4;

__global__ void cp_async_one_group_kernel(const float* x, float* out, int src_offset, int dst_offset, bool commit,
                                          bool wait) {
  TITANS_SHARED_ARRAY(float, stage, kOneGroupFloats + kOneGroupMaxOffset);
  const int lane = device::lane_id();
  device::cp_async_16(stage + 4 * lane + dst_offset, x + 4 * lane + src_offset);
  if (commit) device::cp_async_commit();
  if (wait) device::cp_async_wait<0>();
  __syncthreads();
  for (int i = lane; i < kOneGroupFloats; i += device::kWarpSize) out[i] = stage[dst_offset + i];
}

int cp_async_one_group(const float* x, float* out, int src_offset, int dst_offset, bool commit, bool wait,
                       CUstream_st* stream) {
  return device::launch("cp_async_one_group", cp_async_one_group_kernel, dim3(1), dim3(device::kWarpSize), 0, stream,
                        x, out, src_offset, dst_offset, commit, wait);
}

__global__ void warp_shared_exchange_kernel(const float* x, float* out, WarpOrdering ordering) {
  TITANS_SHARED_ARRAY(float, staged, device::kWarpSize);
  const int lane = device::lane_id();
  staged[lane] = x[lane];
  int neighbour = (lane + 1) % device::kWarpSize;
  switch (ordering) {
    case WarpOrdering::kSyncwarp:
      __syncwarp();
      break;
    // The collectives wait for every lane, but the stores above need not be visible after them.
    case WarpOrdering::kShuffle:
      neighbour = __shfl_sync(device::kFullWarpMask, lane, lane + 1);
      break;
    case WarpOrdering::kBallot:
      neighbour = (lane + 1) % __popc(__ballot_sync(device::kFullWarpMask, 1));
      break;
  }
  out[lane] = staged[neighbour];
}

int warp_shared_exchange(const float* x, float* out, WarpOrdering ordering, CUstream_st* stream) {
  return device::launch("warp_shared_exchange", warp_shared_exchange_kernel, dim3(1), dim3(device::kWarpSize), 0,
                        stream, x, out, ordering);
}

// sums[b] = the sum of block b's slice of x (a block is one warp).
__device__ void store_block_sum(const float* x, float* sums) {
  const float sum = device::warp_reduce_sum(x[blockIdx.x * device::kWarpSize + threadIdx.x]);
  if (threadIdx.x == 0) sums[blockIdx.x] = sum;
}

__global__ void block_sum_kernel(const float* x, float* sums) { store_block_sum(x, sums); }

// out[b] = sums[b] + sums[b - 1]; with `own_sum` the block first writes its own sums[b].
__global__ void block_chain_kernel(const float* x, float* sums, float* out, bool own_sum) {
  if (own_sum) store_block_sum(x, sums);
  if (threadIdx.x == 0) out[blockIdx.x] = sums[blockIdx.x] + (blockIdx.x > 0 ? sums[blockIdx.x - 1] : 0.f);
}

int block_chain(const float* x, float* sums, float* out, int blocks, bool one_launch, CUstream_st* stream) {
  if (!one_launch) {
    const int error = device::launch("block_sum", block_sum_kernel, dim3(blocks), dim3(device::kWarpSize), 0, stream,
                                     x, sums);
    if (error != device::kSuccess) return error;
  }
  return device::launch("block_chain", block_chain_kernel, dim3(blocks), dim3(device::kWarpSize), 0, stream, x, sums,
                        out, one_launch);
}

template <typename Half>
__global__ void half_round_trip_kernel(const float* x, uint16_t* bits, float* back, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const Half h = device::cast<Half>(x[i]);
  bits[i] = device::bits_of(h);
  back[i] = device::cast<float>(h);
}

int half_round_trip(HalfKind kind, const float* x, uint16_t* bits, float* back, int n, CUstream_st* stream) {
  const int threads = 128, blocks = (n + threads - 1) / threads;
  if (kind == HalfKind::kBFloat16)
    return device::launch("half_round_trip_bf16", half_round_trip_kernel<device::bf16>, dim3(blocks), dim3(threads), 0,
                          stream, x, bits, back, n);
  return device::launch("half_round_trip_fp16", half_round_trip_kernel<device::fp16>, dim3(blocks), dim3(threads), 0,
                        stream, x, bits, back, n);
}

int mma_fragment_layout(MmaKind kind, int operand, int32_t* out) {
  const bool tf32 = kind == MmaKind::kM16N8K8Tf32;
  const int elements = operand == 2 ? 4 : operand == 0 ? (tf32 ? 4 : 8) : (tf32 ? 2 : 4);
  for (int lane = 0; lane < device::kWarpSize; ++lane)
    for (int i = 0; i < elements; ++i) {
      const device::FragmentCoord at =
          operand == 2 ? device::mma_m16n8_c_coord(lane, i)
          : operand == 0 ? (tf32 ? device::mma_m16n8k8_tf32_a_coord(lane, i) : device::mma_m16n8k16_a_coord(lane, i))
                         : (tf32 ? device::mma_m16n8k8_tf32_b_coord(lane, i) : device::mma_m16n8k16_b_coord(lane, i));
      out[(lane * elements + i) * 2] = at.row;
      out[(lane * elements + i) * 2 + 1] = at.col;
    }
  return elements;
}

}  // namespace selftest
}  // namespace titans
