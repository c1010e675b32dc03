// Entry points of the CUDA linear_memory kernels (linear_memory_fwd.cuh, linear_memory_bwd.cuh).
// The same sources are built by nvcc into titans_ext._C (csrc/cuda/*.cu) and by the host compiler
// into the CPU emulation titans_ext._emu (csrc/emu/*_emu.cpp). Torch-free and free of CUDA
// headers, so both bindings can include it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/common/launch.h"
#include "cuda/common/sequences.h"
#include "titans_params.h"

struct CUstream_st;  // cudaStream_t is a CUstream_st*

namespace titans {

// Limits of the CUDA kernels: one chunk's tiles and the block's rows of the state live in shared
// memory, sized by the chunk and by Dk (Dv is split into value tiles, so it is not limited).
constexpr int kCudaMaxChunkSize = 64;
constexpr int kCudaMaxKeyDim = 128;
constexpr int64_t kCudaMaxGridYZ = 65535;  // heads and batch (or sequences) index the grid's y and z

// The MIRAS options whose chunk start reads more than a value row: objective "yaad" (its switch
// reads each token's residual norm over all of Dv) and retention "lq" (rho0 = ||A0||_q^(2-q) over the
// whole Dv x Dk state). Their forward runs one block over all of Dv: one value tile, or past
// kWideTile rows tiles of kWideTile in turn with the state in global memory between them; their
// backward walks each sequence in one block (docs/kernels.md §6.1.12).
constexpr int kWideTile = 64;
constexpr bool linear_memory_whole_state(const MirasParams& m) {
  return m.objective == ObjectiveKind::yaad || m.retention == RetentionKind::lq;
}

// The checkpoints the forward keeps for the backward: chunk_states [B, H, checkpoints, 2, Dv, Dk]
// in the input dtype, the start states (M, S) of each sequence's chunks 0, stride, 2 stride, ...
// 16-bit inputs keep every other one (the backward recomputes the others, one chunk step from the
// one before), fp32 and fp64 inputs every one, and so does every dtype under a whole-state option
// (whose recomputed step would need the chunk before's whole-state reduction first) and under the
// kl retention (whose recomputed step would need the chunk before's lag token first).
// checkpoints: ceil(n_chunks / stride), or with cu_seqlens the bound of sequences.h (the entries no
// sequence uses are left as the buffer was). input_bytes: the input dtype's size.
constexpr int linear_memory_checkpoint_stride(int input_bytes, const MirasParams& m) {
  return input_bytes == 2 && !linear_memory_whole_state(m) && m.retention != RetentionKind::kl ? 2 : 1;
}
inline int64_t linear_memory_checkpoints(const SequenceParams& p, InputType type) {
  return sequence_units(p, linear_memory_checkpoint_stride(input_type_bytes(type), p.miras));
}

// The forward's launch: one kernel (linear_memory_fwd.cuh) over value tiles of tile_v rows. Its
// buffer is the checkpoints when saving them; without them the forward needs no memory beyond its
// inputs and outputs.
struct LinearMemoryFwdPlan : LaunchPlan {
  int tile_v = 16;
  int block_tiles = 1;  // value tiles a block walks per chunk (whole-state options past kWideTile)
  bool save_states = false;
};

// The plan for `params`' sizes (pointers are not read): the value tile (see the .cuh), the
// kernel's shared memory and traffic. has_initial_state: whether M0, S0 are read.
LinearMemoryFwdPlan linear_memory_fwd_plan(const LinearMemoryParams& params, InputType input_type,
                                           const DeviceLimits& device, bool save_states, bool has_initial_state);

// Fills o, m_final, s_final and, when chunk_states_ptr is set (the plan's save_states), the
// checkpoints. Returns the launch's cudaError_t; the emulation returns 0 and throws
// device::emu::KernelError on a kernel error.
int linear_memory_fwd_launch(const LinearMemoryParams& params, InputType input_type, const LinearMemoryFwdPlan& plan,
                             CUstream_st* stream);

}  // namespace titans
