// Entry points of the CUDA decode-step kernels (memory_step.cuh), one fused kernel per memory type.
// Built by nvcc into titans_ext._C (csrc/cuda/memory_step.cu) and by the host compiler into the CPU
// emulation titans_ext._emu (csrc/emu/memory_step_emu.cpp). Torch-free and free of CUDA headers.
#pragma once

#include <cstddef>

#include "cuda/linear_memory_fwd.h"  // InputType
#include "step_params.h"

struct CUstream_st;  // cudaStream_t is a CUstream_st*

namespace titans {

// One block of kStepThreads threads per (head, batch): grid (H, B).
constexpr int kStepThreads = 128;
constexpr int64_t kStepMaxBatch = 65535;  // the grid's y dimension
// The kernels keep the token's vectors (q, k, v, the errors, the hidden activations) in static-size
// dynamic shared memory, under the 48 KiB every block may take without opting in.
constexpr size_t kStepMaxSharedBytes = 48 * 1024;

size_t linear_memory_step_smem_bytes(const LinearMemoryStepParams& params, InputType input_type);
size_t mlp_memory_step_smem_bytes(const MlpMemoryStepParams& params, InputType input_type);

// Launch one token's step on `stream`. Return the launch's cudaError_t; the emulation returns 0 and
// throws device::emu::KernelError on a kernel error.
int linear_memory_step_launch(const LinearMemoryStepParams& params, InputType input_type, CUstream_st* stream);
int mlp_memory_step_launch(const MlpMemoryStepParams& params, InputType input_type, CUstream_st* stream);

}  // namespace titans
