// The device layer: the one header a titans_ext CUDA kernel includes.
//
// Kernels are plain CUDA C++ (threadIdx, __syncthreads, __shfl_xor_sync, atomicAdd, ...) plus a
// few names of this layer: TITANS_SHARED_ARRAY / TITANS_DYNAMIC_SHARED for shared memory,
// device::launch, the MMA wrappers (mma.h), ldmatrix (ldmatrix.h), cp.async (cp_async.h) and
// the bf16/fp16 helpers. The same source compiles two ways:
//   - nvcc (__CUDACC__): cuda.h maps everything straight to CUDA, at no cost;
//   - the host compiler: emu/emu.h maps it to the CPU SIMT emulation, which runs every block's
//     threads as fibers with real barrier, warp-collective and bounds-checked shared memory
//     semantics (see emu/runtime.h), so CI without a GPU runs the kernels.
// Never include this header in a TU that includes torch (docs/build.md §3; the emulation defines
// CUDA's names as macros).
#pragma once

#if defined(__CUDACC__)
#include "device/cuda.h"
#else
#include "device/emu/emu.h"
#endif

#include "device/common.h"
#include "device/cp_async.h"
#include "device/ldmatrix.h"
#include "device/mma.h"
