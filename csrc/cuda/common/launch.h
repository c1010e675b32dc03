// What a CUDA launcher is told of the inputs and of the device, and what it reports of a launch:
// shared by every kernel family (linear memory, MLP memory) and by both bindings. Torch-free and
// free of CUDA headers.
#pragma once

#include <cstddef>
#include <cstdint>

namespace titans {

// The dtype of a kernel's per-token inputs (q, k, v, dO); outputs of the same role take it too.
enum class InputType { kFloat32, kFloat64, kBFloat16, kFloat16 };

inline int input_type_bytes(InputType type) {
  return type == InputType::kFloat64 ? 8 : type == InputType::kFloat32 ? 4 : 2;
}
// Gates, states and accumulators: fp64 for fp64 inputs, else fp32.
inline int compute_type_bytes(InputType type) { return type == InputType::kFloat64 ? 8 : 4; }

// What the launchers are told of the device.
struct DeviceLimits {
  int64_t sm_count;
  size_t max_shared_bytes;     // dynamic shared memory one block may opt in to
  size_t shared_bytes_per_sm;  // shared memory of one SM, shared by its resident blocks
};

// One kernel of a launch and the global memory it moves: each tensor it reads or writes is counted
// once (blocks that read the same tile run close together and share it through L2), so the figure
// is what Nsight Compute's dram__bytes measures when L2 serves the re-reads.
struct KernelPlan {
  const char* name = "";
  int64_t blocks = 0;
  int threads = 0;
  size_t smem_bytes = 0;
  int64_t bytes_read = 0, bytes_written = 0;
};

// A buffer a launch needs beside its inputs and ordinary outputs (scratch, or the checkpoints a
// forward keeps for its backward), with its size.
struct BufferPlan {
  const char* name = "";
  int64_t bytes = 0;
};

// The kernels of a launch in order, and its buffers. `fits` is false when some kernel needs more
// shared memory than the device allows (smem_bytes then says how much).
struct LaunchPlan {
  static constexpr int kMaxKernels = 4, kMaxBuffers = 4;
  KernelPlan kernels[kMaxKernels];
  int n_kernels = 0;
  BufferPlan buffers[kMaxBuffers];
  int n_buffers = 0;
  bool fits = true;

  KernelPlan& add_kernel(const char* name) {
    KernelPlan& k = kernels[n_kernels++];
    k.name = name;
    return k;
  }
  void add_buffer(const char* name, int64_t bytes) { buffers[n_buffers++] = {name, bytes}; }
  size_t smem_bytes() const {
    size_t most = 0;
    for (int i = 0; i < n_kernels; ++i) most = kernels[i].smem_bytes > most ? kernels[i].smem_bytes : most;
    return most;
  }
  int64_t buffer_bytes() const {
    int64_t sum = 0;
    for (int i = 0; i < n_buffers; ++i) sum += buffers[i].bytes;
    return sum;
  }
};

}  // namespace titans
