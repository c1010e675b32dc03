// Self-test kernels of the device layer (selftest_kernels.cuh): entry points the emulation's
// binding calls; the same source is compiled by nvcc in CI to check the CUDA mapping builds.
// Torch-free and device-layer-free, so a binding TU can include it. All pointers are device
// pointers (host memory in the emulation); every entry returns the launch's error code (0 when
// fine; the emulation throws instead).
#pragma once

#include <cstdint>

struct CUstream_st;

namespace titans {
namespace selftest {

enum class ShuffleKind { kIdx = 0, kUp = 1, kDown = 2, kXor = 3 };
enum class MmaKind { kM16N8K16Bf16 = 0, kM16N8K16Fp16 = 1, kM16N8K8Tf32 = 2 };
enum class HalfKind { kBFloat16 = 0, kFloat16 = 1 };
// How warp_shared_exchange orders its lanes' shared-memory writes before their reads: a
// __syncwarp (correct), or a collective used as if it were one (a bug: it orders no memory).
enum class WarpOrdering { kSyncwarp = 0, kShuffle = 1, kBallot = 2 };

// out[b] = sum of x[b * threads .. (b + 1) * threads), a tree in dynamic shared memory with barriers.
int block_reduce_sum(const float* x, float* out, int n, int threads, CUstream_st* stream);
// Per lane of `threads` lanes (one or more warps): out[i] = the shuffle of x with `arg` and `width`.
int warp_shuffle(const float* x, float* out, int threads, ShuffleKind kind, int arg, int width, CUstream_st* stream);
// Per lane: sum[i], max[i] = the warp reductions of x over its warp; ballot[i] = the ballot of x > 0.
int warp_reduce(const float* x, float* sum, float* max, int32_t* ballot, int threads, CUstream_st* stream);
// 256 threads stage 2 * x in shared memory and read their left neighbour's value, with or
// without the barrier in between (the missing-barrier demo).
int neighbour_exchange(const float* x, float* out, bool with_barrier, CUstream_st* stream);
// 64 threads fill a 64-element shared array, then read element thread + shift.
int shared_read_shifted(float* out, int shift, CUstream_st* stream);
// Threads below `threads_at_barrier` call __syncthreads(), the others return (an error).
int partial_barrier(int threads_at_barrier, CUstream_st* stream);
// A histogram of values in [0, bins) through shared-memory atomics, plus global float sum and int max.
int atomics(const int32_t* values, int n, int32_t* histogram, int bins, float* sum, int32_t* max, CUstream_st* stream);
// One warp: D = A B + C with A [16, K] and B [K, 8] row-major fp32 (rounded to the MMA's input
// type while the fragments are built lane by lane), C and D [16, 8] fp32.
int mma(MmaKind kind, const float* a, const float* b, const float* c, float* d, CUstream_st* stream);
// One warp: lane l passes row address tile + row_offsets[l] (in elements) of a shared copy of the
// kLdmatrixTileElems 16-bit elements of `tile` to ldmatrix .x`matrices` (1, 2 or 4), .trans if
// `trans`; out[l * matrices + i] = its register i.
constexpr int kLdmatrixTileElems = 512;
int ldmatrix(const uint16_t* tile, const int32_t* row_offsets, int matrices, bool trans, uint32_t* out,
             CUstream_st* stream);
// One warp: D = A B with A [16, 16] and B [16, 8] row-major fp32, stored as bf16 in shared memory
// and loaded with ldmatrix_x4 (A) and ldmatrix_x2_trans (B); D [16, 8] fp32.
int ldmatrix_mma_bf16(const float* a, const float* b, float* d, CUstream_st* stream);
// One block streams x [chunks * kCpAsyncChunk] through two shared buffers with cp.async copies of
// `bytes` (4, 8 or 16) each, loading chunk c + 1 while it reads chunk c; out = each chunk
// reversed. Without the wait<1> in the loop no copy has landed when the block reads; without the
// refill barrier at the end of an iteration a thread refills the buffer other threads may still
// be reading.
constexpr int kCpAsyncChunk = 256;
int cp_async_pipeline(const float* x, float* out, int chunks, int bytes, bool with_wait, bool with_refill_barrier,
                      CUstream_st* stream);
// One warp: lane l copies x[4 l + src_offset ..) to a shared stage at 4 l + dst_offset with
// cp_async_16, then commits if `commit` and waits for every committed group if `wait`; after a
// barrier out[0..128) = stage[dst_offset ..). x holds 128 + src_offset floats.
int cp_async_one_group(const float* x, float* out, int src_offset, int dst_offset, bool commit, bool wait,
                       CUstream_st* stream);
// One warp: lane l stores x[l] in shared memory, passes `ordering`, and reads the element of
// lane (l + 1) % 32, which it finds with that collective (shuffle: the neighbour's lane id;
// ballot: the warp's lane count): out[l] = x[(l + 1) % 32].
int warp_shared_exchange(const float* x, float* out, WarpOrdering ordering, CUstream_st* stream);
// Blocks of 32 threads: sums[b] = the sum of x[32 b, 32 b + 32), out[b] = sums[b] + sums[b - 1]
// (out[0] = sums[0]). one_launch: each block reads sums[b - 1] in the same launch, as if block
// b - 1 had finished before it (no block order is guaranteed: a bug); otherwise a second launch
// adds them. sums must start as NaN.
int block_chain(const float* x, float* sums, float* out, int blocks, bool one_launch, CUstream_st* stream);
// x rounded to bf16 / fp16 (raw bits) and back to fp32.
int half_round_trip(HalfKind kind, const float* x, uint16_t* bits, float* back, int n, CUstream_st* stream);

// The fragment layout tables of MmaKind `kind` as [32 lanes][elements][row, col] for operand
// 0 = A, 1 = B, 2 = C/D; returns the number of elements per lane.
int mma_fragment_layout(MmaKind kind, int operand, int32_t* out);

}  // namespace selftest
}  // namespace titans
