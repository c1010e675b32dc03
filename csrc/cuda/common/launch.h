// What a CUDA launcher is told of the inputs and of the device: shared by every kernel family
// (linear memory, MLP memory) and by both bindings. Torch-free and free of CUDA headers.
#pragma once

#include <cstddef>
#include <cstdint>

namespace titans {

// The dtype of a kernel's per-token inputs (q, k, v, dO); outputs of the same role take it too.
enum class InputType { kFloat32, kFloat64, kBFloat16, kFloat16 };

// What the launchers are told of the device.
struct DeviceLimits {
  int64_t sm_count;
  size_t max_shared_bytes;     // dynamic shared memory one block may opt in to
  size_t shared_bytes_per_sm;  // shared memory of one SM, shared by its resident blocks
};

}  // namespace titans
