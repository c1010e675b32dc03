// The launch configuration the backward kernels were written against; removed with them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "cuda/common/launch.h"
#include "cuda/common/operands.cuh"
#include "cuda/legacy_tiles.cuh"
#include "cuda/linear_memory_bwd.h"
#include "device/device.h"
#include "titans_params.h"

namespace titans {
namespace lm {

// Threads per block; the warps share each product's 16x8 tiles. A sequential kernel's chunk step
// is a short chain of small products separated by barriers, which four warps keep cheap; the
// parallel kernels are throughput work whose shared memory allows one or two blocks per SM, so
// they take eight warps to hide latency.
constexpr int kSequentialThreads = 128, kParallelThreads = 256;

// Compile-time configuration of a linear_memory kernel.
template <typename input_t_, int kTileV_, int kNThreads_>
struct Traits {
  using input_t = input_t_;
  // fp64 inputs are computed, and their gates and state kept, in fp64; all others in fp32.
  using compute_t = kernel::compute_type<input_t>;
  using Policy = typename kernel::LegacyPolicy<input_t>::type;
  static constexpr int kNThreads = kNThreads_;
  static constexpr int kWarps = kNThreads / device::kWarpSize;
  // Blocks each SM should hold (__launch_bounds__): four sequential blocks (the state tile's rule),
  // two parallel ones. It caps registers at 128 per thread; without it ptxas caps them at 64 and
  // spills.
  static constexpr int kMinBlocksPerSm = kNThreads == kSequentialThreads ? 4 : 2;
  static constexpr int kTileV = kTileV_;  // rows of M and S (value features) per block
};

// Whether a kernel reads its MMA fragments with ldmatrix (kernel::mma_bf16_tiles): bf16 inputs
// whose key dimension and chunk are whole 16-element k-steps.
template <typename Ktraits>
__host__ __device__ constexpr bool uses_fragments(int dk, int chunk) {
  return std::is_same<typename Ktraits::Policy, kernel::Bf16Operands>::value && dk % 16 == 0 && chunk % 16 == 0;
}

// Host side: calls f(Traits<input_t, kTileV, kNThreads>{}) for the runtime input type and value
// tile (16 or 32), so each launch is written once for every instantiation.
template <int kNThreads, class F>
auto dispatch(InputType type, int tile_v, const F& f) {
  const auto with_tile = [&](auto tag) {
    using input_t = decltype(tag);
    return tile_v == 32 ? f(Traits<input_t, 32, kNThreads>{}) : f(Traits<input_t, 16, kNThreads>{});
  };
  switch (type) {
    case InputType::kFloat64: return with_tile(double{});
    case InputType::kBFloat16: return with_tile(device::bf16{});
    case InputType::kFloat16: return with_tile(device::fp16{});
    case InputType::kFloat32: break;
  }
  return with_tile(float{});
}

// Host side: blocks of Ktraits::kTileV value features covering Dv.
template <typename Ktraits>
int value_tiles(const LinearMemoryParams& p) {
  return (p.dv + Ktraits::kTileV - 1) / Ktraits::kTileV;
}

// Host side: the value tiles of ValueTiles' rule, given smem(tile), the largest dynamic shared
// memory of the sequential (state_smem) and of the parallel (parallel_smem) kernels for a tile.
template <class StateSmem, class ParallelSmem>
ValueTiles choose_tiles(const LinearMemoryParams& params, InputType type, const DeviceLimits& device,
                        const StateSmem& state_smem, const ParallelSmem& parallel_smem) {
  constexpr size_t kReservedPerBlock = 1024;  // shared memory the runtime keeps per resident block
  const bool narrow_only = params.dk > 64 || type == InputType::kFloat64;
  const int64_t per_sm = device.shared_bytes_per_sm / (state_smem(16) + kReservedPerBlock);
  const int64_t resident = device.sm_count * (per_sm < 4 ? per_sm : 4);
  const int64_t blocks = int64_t(params.batch) * params.heads * ((params.dv + 15) / 16);
  const bool wide_state = !narrow_only && blocks > resident && state_smem(32) <= device.max_shared_bytes;
  const bool wide_parallel = !narrow_only && parallel_smem(32) <= device.max_shared_bytes;
  return {wide_state ? 32 : 16, wide_parallel ? 32 : 16};
}

}  // namespace lm
}  // namespace titans
