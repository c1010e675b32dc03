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
// x rounded to bf16 / fp16 (raw bits) and back to fp32.
int half_round_trip(HalfKind kind, const float* x, uint16_t* bits, float* back, int n, CUstream_st* stream);

// The fragment layout tables of MmaKind `kind` as [32 lanes][elements][row, col] for operand
// 0 = A, 1 = B, 2 = C/D; returns the number of elements per lane.
int mma_fragment_layout(MmaKind kind, int operand, int32_t* out);

}  // namespace selftest
}  // namespace titans
