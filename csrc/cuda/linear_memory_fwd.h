// Entry points of the CUDA linear_memory kernels (linear_memory_fwd.cuh, linear_memory_bwd.cuh).
// The same sources are built by nvcc into titans_ext._C (csrc/cuda/*.cu) and by the host compiler
// into the CPU emulation titans_ext._emu (csrc/emu/*_emu.cpp). Torch-free and free of CUDA
// headers, so both bindings can include it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "titans_params.h"

struct CUstream_st;  // cudaStream_t is a CUstream_st*

namespace titans {

// q, k, v's dtype; o is written in it. Gates and states are fp64 for kFloat64 inputs, else fp32.
enum class InputType { kFloat32, kFloat64, kBFloat16, kFloat16 };

// Limits of the CUDA kernels: one chunk's tiles and the block's rows of the state live in shared
// memory, sized by the chunk and by Dk (Dv is split into value tiles, so it is not limited).
constexpr int kCudaMaxChunkSize = 64;
constexpr int kCudaMaxKeyDim = 128;
constexpr int64_t kCudaMaxGridYZ = 65535;  // heads and batch index the grid's y and z

// What the launchers are told of the device.
struct DeviceLimits {
  int64_t sm_count;
  size_t max_shared_bytes;     // dynamic shared memory one block may opt in to
  size_t shared_bytes_per_sm;  // shared memory of one SM, shared by its resident blocks
};

// Value features (rows of M and S) per block, for the sequential and for the parallel kernels.
// - Sequential: each chunk step is a chain of products over the block's rows, so a narrower tile
//   shortens the chain; while the device holds every block at once (B * H * ceil(Dv / 16) blocks,
//   at most 4 per SM and as many as the SM's shared memory takes) they take 16 rows, beyond that
//   32, which halves the per-block overhead (staging the chunk's keys, barriers), for Dk <= 64
//   and not fp64.
// - Parallel: every tile recomputes its chunk's Q K^T and gate tables, so wider is cheaper: 32
//   where the kernels' shared memory fits the device at 32 (Dk <= 64, not fp64), else 16.
// linear_memory_fwd_tiles / linear_memory_bwd_tiles choose them (they know the kernels' shared
// memory); the shared memory of each kernel then follows from the tiles.
struct ValueTiles {
  int state, parallel;
};

// What the sequential passes need of each chunk's gate tables (docs/backward_linear.md §0), written by
// a parallel kernel before them so that no gate recurrence sits on their chain: per chunk, in the
// compute dtype, m_end [C] | s_end [C] | a [C] | g [C] | a_L, g_L, p (and one pad, so that every
// chunk's rows start 16-byte aligned).
constexpr int linear_memory_gate_rows_size(int chunk) { return 4 * chunk + 4; }

// Scratch of the forward, in the compute dtype:
//   gate_rows: [B, H, n_chunks, linear_memory_gate_rows_size(C)].
struct LinearMemoryFwdWorkspace {
  void* gate_rows = nullptr;
};

inline int64_t linear_memory_gate_rows_elems(const LinearMemoryParams& p) {
  return int64_t(p.batch) * p.heads * p.n_chunks * linear_memory_gate_rows_size(p.chunk_size);
}

// Fills o, m_final, s_final and chunk_states of `params`; chunk_states ([B, H, n_chunks, 2, Dv,
// Dk], compute dtype) is required: the output kernel reads the chunk-start states from it. Returns
// the launch's cudaError_t; the emulation returns 0 and throws device::emu::KernelError on a
// kernel error.
ValueTiles linear_memory_fwd_tiles(const LinearMemoryParams& params, InputType input_type, const DeviceLimits& device);

int linear_memory_fwd_launch(const LinearMemoryParams& params, const LinearMemoryFwdWorkspace& workspace,
                             InputType input_type, const ValueTiles& tiles, CUstream_st* stream);

// Dynamic shared memory of the forward's largest block (the binding checks it against the device).
size_t linear_memory_fwd_smem_bytes(const LinearMemoryParams& params, InputType input_type, const ValueTiles& tiles);

}  // namespace titans
