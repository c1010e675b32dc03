// Entry point of the CUDA linear_memory forward (linear_memory_fwd.cuh). The same source is
// built by nvcc into titans_ext._C (linear_memory_fwd.cu) and by the host compiler into the
// CPU emulation titans_ext._emu (csrc/emu/linear_memory_fwd_emu.cpp). Torch-free and free of
// CUDA headers, so both bindings can include it.
#pragma once

#include "titans_params.h"

struct CUstream_st;  // cudaStream_t is a CUstream_st*

namespace titans {

// q, k, v's dtype; o is written in it. Gates and states are fp64 for kFloat64 inputs, else fp32.
enum class InputType { kFloat32, kFloat64, kBFloat16, kFloat16 };

// Fills o, m_final, s_final and (when non-null) chunk_states of `params`. Returns the launch's
// cudaError_t; the emulation returns 0 and throws device::emu::KernelError on a kernel error.
int linear_memory_fwd_launch(const LinearMemoryParams& params, InputType input_type, CUstream_st* stream);

}  // namespace titans
