// The CUDA decode-step kernels (csrc/cuda/memory_step.cuh) under the CPU SIMT emulation, as
// titans_emu::linear_memory_step and titans_emu::mlp_memory_step: the schemas and output contracts
// of the titans_ext:: step ops, on CPU tensors. Part of titans_ext._emu, beside ops_emu.cpp.
#include <torch/csrc/stable/library.h>

#include "binding/memory_step_device.h"

namespace titans {
namespace {

// The emulation runs a launch to its end on the calling thread (no stream) and throws on a kernel
// error.
struct EmulatedLauncher {
  explicit EmulatedLauncher(const Tensor& q) {
    STD_TORCH_CHECK(q.is_cpu(), "titans_emu step operators run on CPU tensors, got q on ", device_str(q));
  }

  template <typename Launch>
  void run(const Launch& launch) const {
    launch(nullptr);
  }
};

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(titans_emu, m) {
  define_step_ops(m);
}

// CompositeExplicitAutograd, like the other emulated ops: CPU tensors, no autograd.
STABLE_TORCH_LIBRARY_IMPL(titans_emu, CompositeExplicitAutograd, m) { impl_step_ops<DeviceStep<EmulatedLauncher>>(m); }

}  // namespace titans
