// What every CUDA op's binding does around its launch (ops_cuda.cpp, ops_step_cuda.cpp): the device
// guard, torch's current stream and the device's limits, all through torch's stable C shim.
// Compiled by g++ with the CUDA runtime's headers, never by nvcc (docs/build.md §3).
#pragma once

#include <map>
#include <mutex>

#include <cuda_runtime_api.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/macros.h>
#include <torch/csrc/stable/tensor.h>

#include "cuda/linear_memory_fwd.h"  // DeviceLimits

namespace titans {

// A device's SM count and shared memory (per block with opt-in, and per SM), queried once per
// device: the launchers read them on every call.
inline DeviceLimits device_limits(int device) {
  static std::mutex mutex;
  static std::map<int, DeviceLimits> known;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = known.find(device);
  if (found != known.end()) return found->second;
  int sm_count = 0, block_bytes = 0, sm_bytes = 0;
  STD_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  STD_CUDA_CHECK(cudaDeviceGetAttribute(&block_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  STD_CUDA_CHECK(cudaDeviceGetAttribute(&sm_bytes, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  return known.emplace(device, DeviceLimits{sm_count, size_t(block_bytes), size_t(sm_bytes)}).first->second;
}

// What every CUDA op does around its launch: make q's device current (the kernels launch on the
// current device) and run on torch's current stream of that device, so the ops order with the
// caller's work and never synchronize the host.
class CudaLaunchContext {
 public:
  explicit CudaLaunchContext(const torch::stable::Tensor& q)
      : device_(q.get_device_index()), guard_(device_), limits_(device_limits(device_)) {
    void* stream = nullptr;
    STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device_, &stream));
    stream_ = static_cast<cudaStream_t>(stream);
  }

  const DeviceLimits& limits() const { return limits_; }
  cudaStream_t stream() const { return stream_; }

 private:
  torch::stable::accelerator::DeviceIndex device_;
  torch::stable::accelerator::DeviceGuard guard_;
  DeviceLimits limits_;
  cudaStream_t stream_ = nullptr;
};

}  // namespace titans
