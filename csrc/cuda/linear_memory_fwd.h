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
// Dynamic shared memory of one block on an H100 (sm_90); an A100 block has 163 KiB.
constexpr size_t kCudaMaxSharedBytes = 227 * 1024;

// Value features per block of the parallel kernels (Dv is split into tiles; every tile recomputes
// its chunk's Q K^T and gate tables, so wider is cheaper). Smaller tiles for wide keys and for
// fp64 keep the backward's shared memory within an H100 block.
inline int linear_memory_value_tile(int dk, InputType type) {
  return dk <= 64 && type != InputType::kFloat64 ? 32 : 16;
}

// Rows of M and S per block of the sequential passes. Each chunk step is a chain of products over
// the block's rows, so a narrower tile shortens the chain, and as long as the device can hold
// every block at once (B * H * ceil(Dv / 16) <= concurrent_blocks, e.g. 4 per SM) the sequential
// kernels take 16 rows; beyond that, 32 halves the per-block overhead (staging the chunk's keys,
// barriers), where shared memory allows it (Dk <= 64, not fp64).
inline int linear_memory_state_tile(const LinearMemoryParams& p, InputType type, int64_t concurrent_blocks) {
  const int64_t blocks = int64_t(p.batch) * p.heads * ((p.dv + 15) / 16);
  return blocks <= concurrent_blocks || p.dk > 64 || type == InputType::kFloat64 ? 16 : 32;
}

// What the sequential passes need of each chunk's gate tables (backward_linear.md §0), written by
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
// state_tile: linear_memory_state_tile.
int linear_memory_fwd_launch(const LinearMemoryParams& params, const LinearMemoryFwdWorkspace& workspace,
                             InputType input_type, int state_tile, CUstream_st* stream);

// Dynamic shared memory of the forward's largest block (the binding checks it against kCudaMaxSharedBytes).
size_t linear_memory_fwd_smem_bytes(const LinearMemoryParams& params, InputType input_type, int state_tile);

}  // namespace titans
