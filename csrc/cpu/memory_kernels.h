// The chunked kernels of the memories (linear_memory_kernel.h, mlp_memory_kernel.h), compiled once
// per instruction-set variant (cpu_isa.h) as one table of function pointers per variant
// (memory_kernels_<variant>.cpp), and the table of the variant in use (torch-free).
//
// The chunk algebra around the products (gate tables, row scalings, masks, reductions, error rows)
// was first compiled once for the baseline: for AVX2 it ran only 3-5 % faster while Python's
// -fwrapv kept most of its loops scalar. Once the build passed -fno-wrapv (docs/build.md §2) they
// vectorize, and compiled for AVX2 that part runs 27 % fewer instructions (callgrind, one fp32
// fwd+bwd, B=1, T=512, H=4, D=64, chunk 64: 13.6 M -> 9.9 M next to the products' 51 M; MLP E=4
// at T=256: 40 M -> 30 M next to 217 M).
//
// A variant file defines TITANS_ISA_TARGET, its target attribute, and TITANS_ISA_FLATTEN, the
// attribute of the kernels' entry points: [[gnu::flatten]] in the x86 variants, so that the shared
// helpers are inlined and compiled for the variant; empty in the default variant, which is the
// baseline already (flattened, its file took 2.4 min of compiler CPU time instead of 25 s).
#pragma once

#include <cstdint>

#include "cpu/isa_kernels.h"
#include "titans_params.h"

namespace titans::cpu {

// A memory's forward and backward over the work items [item_begin, item_end) (linear_memory.h,
// mlp_memory.h), for one dtype.
template <typename Params, typename BwdParams>
struct MemoryKernels {
  void (*forward)(const Params& params, int64_t item_begin, int64_t item_end);
  void (*backward)(const BwdParams& params, int64_t item_begin, int64_t item_end);
};
using LinearKernels = MemoryKernels<LinearMemoryParams, LinearMemoryBwdParams>;
using MlpKernels = MemoryKernels<MlpMemoryParams, MlpMemoryBwdParams>;

struct MemoryKernelTable {
  LinearKernels linear_f32;
  LinearKernels linear_f64;
  MlpKernels mlp_f32;
  MlpKernels mlp_f64;

  template <typename T>
  const LinearKernels& linear() const {
    if constexpr (sizeof(T) == sizeof(float)) return linear_f32;
    else return linear_f64;
  }
  template <typename T>
  const MlpKernels& mlp() const {
    if constexpr (sizeof(T) == sizeof(float)) return mlp_f32;
    else return mlp_f64;
  }
};

extern const MemoryKernelTable kMemoryKernelsDefault;
#if TITANS_CPU_X86_VARIANTS
extern const MemoryKernelTable kMemoryKernelsAvx2;
extern const MemoryKernelTable kMemoryKernelsAvx512;
#endif

// The kernels of the variant in use (cpu_isa()).
const MemoryKernelTable& memory_kernels();

}  // namespace titans::cpu
