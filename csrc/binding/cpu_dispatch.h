// How the CPU bindings run a torch-free kernel: over ranges of (batch, head) pairs on torch's
// intra-op threads, with the kernel instantiated for the compute dtype. Stable ABI only.
#pragma once

#include <cstdint>

#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/core/Dispatch_v2.h>
#include <torch/headeronly/core/ScalarType.h>

namespace titans {

// Calls kernel(scalar_t{}, begin, end) on ranges of [0, pairs), each at least `grain` pairs long
// (fewer pairs run on the calling thread), with scalar_t the compute dtype (fp32 or fp64).
template <typename Kernel>
void run_over_heads(torch::headeronly::ScalarType dtype, int64_t pairs, int64_t grain, const Kernel& kernel) {
  THO_DISPATCH_V2(dtype, "titans_ext CPU kernel", AT_WRAP([&] {
    torch::stable::parallel_for(0, pairs, grain, [&](int64_t begin, int64_t end) { kernel(scalar_t{}, begin, end); });
  }), AT_EXPAND(AT_FLOATING_TYPES));
}

}  // namespace titans
