// Host-side launch helpers shared by the kernel families: the dispatch from a runtime input type to
// the kernels' template argument, and the residency arithmetic of a launch rule.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/common/launch.h"
#include "device/device.h"

namespace titans {
namespace kernel {

// Calls f(input_t{}) for the runtime input type.
template <class F>
auto dispatch_input_type(InputType type, const F& f) {
  switch (type) {
    case InputType::kFloat64: return f(double{});
    case InputType::kBFloat16: return f(device::bf16{});
    case InputType::kFloat16: return f(device::fp16{});
    case InputType::kFloat32: break;
  }
  return f(float{});
}

// Shared memory the runtime keeps per resident block.
constexpr size_t kReservedSmemPerBlock = 1024;

// Blocks of `smem_bytes` one SM holds at once, at most max_per_sm (what their registers allow).
inline int64_t resident_blocks_per_sm(size_t smem_bytes, const DeviceLimits& device, int max_per_sm) {
  const int64_t by_smem = int64_t(device.shared_bytes_per_sm / (smem_bytes + kReservedSmemPerBlock));
  const int64_t resident = by_smem < max_per_sm ? by_smem : max_per_sm;
  return resident > 0 ? resident : 1;
}

// Waves of a grid: how many times the device must fill up with resident blocks to run it.
inline int64_t waves(int64_t blocks, int64_t resident_per_sm, const DeviceLimits& device) {
  const int64_t at_once = device.sm_count * resident_per_sm;
  return at_once > 0 ? (blocks + at_once - 1) / at_once : blocks;
}

}  // namespace kernel
}  // namespace titans
