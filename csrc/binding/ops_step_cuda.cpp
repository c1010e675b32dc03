// CUDA implementations of the decode-step operators (schemas in ops_step.cpp): one fused kernel
// launch per call on torch's current stream (csrc/cuda/memory_step.cuh, backend in
// memory_step_device.h). Nothing here reads a tensor value on the host, so a step never
// synchronizes and can be captured in a CUDA graph. Compiled by g++, not nvcc, like ops_cuda.cpp.
#include <torch/csrc/stable/library.h>

#include "binding/cuda_launch.h"
#include "binding/memory_step_device.h"

namespace titans {
namespace {

// Launches on torch's current stream of q's device, under a guard of that device.
struct CudaStreamLauncher {
  CudaLaunchContext context;

  explicit CudaStreamLauncher(const Tensor& q) : context(q) {}

  template <typename Launch>
  void run(const Launch& launch) const {
    STD_CUDA_CHECK(static_cast<cudaError_t>(launch(context.stream())));
  }
};

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(titans_ext, CUDA, m) { impl_step_ops<DeviceStep<CudaStreamLauncher>>(m); }

}  // namespace titans
