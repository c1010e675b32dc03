// Entry points of the CUDA mlp_memory kernels (mlp_memory_fwd.cuh, mlp_memory_bwd.cuh). The same
// sources are built by nvcc into titans_ext._C (csrc/cuda/*.cu) and by the host compiler into the
// CPU emulation titans_ext._emu (csrc/emu/*_emu.cpp). Torch-free and free of CUDA headers, so both
// bindings can include it.
//
// How the state is held (the numbers are per (batch, head), D = 64, E = 4, N = E D = 256, C = 64,
// fp32 state): W1, S1, W2, S2 are 4 N D x 4 B = 256 KiB (1 MiB at D = 128), more than the 227 KiB
// of shared memory an H100 block may have. One block per (batch, head) walks the chunks and keeps
// the fp32 state in global memory (the final-state outputs serve as the working copy, so the
// forward needs no scratch); each chunk streams it through shared memory in blocks of NB hidden
// units (rows [n0, n0 + NB) of W1, S1 and the same columns of W2, S2), since every quantity with a
// hidden index is local to its block and only two C x D sums and one C x C sum cross blocks:
//   pass 1 (W1, W2 block):          Z = K W1^T, H = act(Z), Y += H W2^T        -> E = f(K + Y - V)
//   pass 2 (W1, S1, W2, S2 block):  Z, H again; DZ = (E W2) .* act'(Z); the token read's Zq, Hq;
//                                   O += a (Hq W2^T) + g (Hq S2^T), Hq H^T summed into C x C;
//                                   the block's chunk-end W1, S1, W2, S2, written back
// Bytes moved per chunk (through L2; the whole state of 32 heads is 8 MiB, L2 is 50 MiB): reads
// 2 N D + 4 N D, writes 4 N D fp32 = 40 N D B = 640 KiB, i.e. 10 KiB per token at C = 64, against
// 442 kFLOP per token of products (docs/mlp_dual_form.md §5): ~43 FLOP per byte, about the balance of
// one SM (~5 TFLOP/s of mma.sync against ~64 B/clk, ~115 GB/s, of L2 bandwidth), so the next
// block's state is loaded with cp.async while the current one is computed on. Recomputing Z in
// pass 2 (1 u of the 11 u per token) costs less than holding C x N of it on chip.
// Barriers per chunk: 3 per pass-1 block, 5 per pass-2 block and ~6 per chunk, so ~70 at
// N / NB = 8. The alternative that keeps the state on chip, a cluster of 2-8 blocks sharing the
// hidden dimension with the two C x D sums reduced through distributed shared memory (docs/kernels.md
// §6.3 stage B), moves no state bytes but needs clusters, which the emulation does not model yet.
//
// The backward walks the chunks in reverse with the same blocking (three passes per chunk: the
// key path's Y, then every term with a hidden index, then the terms that need the full dE),
// carrying the state cotangent in the fp32 gradient outputs; the forward saves each chunk's start
// state in the inputs' dtype (bf16 for bf16 inputs: the products read the state as bf16 operands
// anyway), and nothing under no_grad.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/common/launch.h"  // InputType, DeviceLimits
#include "cuda/common/sequences.h"
#include "titans_params.h"

struct CUstream_st;  // cudaStream_t is a CUstream_st*

namespace titans {

// Limits: the chunk's tiles (q, k, dO and the C x D and C x C sums) live in shared memory.
constexpr int kCudaMlpMaxChunkSize = 64;
constexpr int kCudaMlpMaxDim = 128;

// Hidden units per streamed block, largest first: the launchers take the first whose shared memory
// fits the device (wider blocks mean fewer barriers per chunk).
constexpr int kMlpHiddenBlocks[] = {64, 32, 16, 8};

// Scratch of the backward:
//   hidden_grads: [B, H, C, N], compute dtype: the part of dZ known after pass 2 (pass 3 adds
//                 dR W2 .* act'(Z));
//   token_grads:  [B, H, 2, C, D], compute dtype: the chunk's dK and dQ sums;
//   start_state:  [B, H, 4, N D], the inputs' dtype (as the saved states): the state the chunk
//                 proper starts from after the retention step (kl's lag token), recomputed from the
//                 saved chunk-start state; empty unless the retention is "kl".
struct MlpMemoryBwdWorkspace {
  void* hidden_grads = nullptr;
  void* token_grads = nullptr;
  void* start_state = nullptr;
};

struct MlpMemoryBwdWorkspaceSizes {
  int64_t hidden_grads, token_grads, start_state;  // elements
};

// Per block, one block per (sequence, head).
inline MlpMemoryBwdWorkspaceSizes mlp_memory_bwd_workspace_sizes(const MlpMemoryParams& p) {
  const int64_t heads = int64_t(sequence_rows(p)) * p.heads;
  return {heads * p.chunk_size * p.hidden, heads * 2 * p.chunk_size * p.dim,
          p.miras.retention == RetentionKind::kl ? heads * 4 * int64_t(p.hidden) * p.dim : 0};
}

// The hidden block the launchers use on `device` (0: none fits; mlp_memory_*_smem_bytes(..., 8)
// then gives the bytes the smallest block needs).
int mlp_memory_fwd_hidden_block(const MlpMemoryParams& params, InputType input_type, const DeviceLimits& device);
int mlp_memory_bwd_hidden_block(const MlpMemoryParams& params, InputType input_type, const DeviceLimits& device);

// Dynamic shared memory of the kernels with hidden block `block`.
size_t mlp_memory_fwd_smem_bytes(const MlpMemoryParams& params, InputType input_type, int block);
size_t mlp_memory_bwd_smem_bytes(const MlpMemoryParams& params, InputType input_type, int block);

// Fills o, the final state and (if chunk_states_ptr, [B, H, sequence_units(params, 1), 4, N D] in
// the input dtype: ceil(T / C) entries, or with cu_seqlens the bound of sequences.h) the
// chunk-start states of `params`. The final-state outputs are required: they hold the working
// state. Returns the launch's cudaError_t; the emulation returns 0 and throws
// device::emu::KernelError on a kernel error.
int mlp_memory_fwd_launch(const MlpMemoryParams& params, InputType input_type, int block, CUstream_st* stream);

// Fills every gradient of `params` (dq, dk, dv in the input dtype, everything else in the compute
// dtype) from the saved chunk-start states. The initial-state gradient outputs are required: they
// carry the state cotangent.
int mlp_memory_bwd_launch(const MlpMemoryBwdParams& params, const MlpMemoryBwdWorkspace& workspace,
                          InputType input_type, int block, CUstream_st* stream);

}  // namespace titans
