// The decode-step operators titans_ext::linear_memory_step and titans_ext::mlp_memory_step: their
// schemas (memory_step.h) and the CPU backend, which runs the torch-free kernels of
// csrc/cpu/memory_step.cpp over (batch, head) pairs. The CUDA backend is in ops_step_cuda.cpp.
// Part of titans_ext._C, beside ops.cpp.
#include <algorithm>

#include <torch/csrc/stable/library.h>

#include "binding/cpu_dispatch.h"
#include "binding/memory_step.h"
#include "cpu/memory_step.h"

namespace titans {
namespace {

// A step's work per (batch, head) is a few passes over its state. Handing a task to another thread
// costs microseconds on an idle core and can cost milliseconds when the cores are shared (the
// worker waits for a time slice while the caller waits for the worker), so a task must be long
// against that: at least this many state elements, about 4 MLP heads at D = 64, E = 4. Smaller
// steps (a decode of B = 1 with a few heads) run on the calling thread.
constexpr int64_t kStepElementsPerTask = 1 << 17;

int64_t step_grain(int64_t state_elements_per_head) {
  return std::max<int64_t>(1, kStepElementsPerTask / std::max<int64_t>(1, state_elements_per_head));
}

// The CPU backend of the step operators (memory_step.h): the kernels read every input in the
// compute dtype, and the values are checked on the host.
struct CpuStep {
  static constexpr bool kInputsInComputeDtype = true;
  static constexpr bool kChecksValues = true;

  explicit CpuStep(const Tensor&) {}

  void launch(const LinearMemoryStepParams& params, const StepInputs& in) const {
    run_over_heads(in.dtype, int64_t(params.batch) * params.heads, step_grain(int64_t(params.dk) * params.dv),
                   [&](auto zero, int64_t begin, int64_t end) {
                     cpu::linear_memory_step<decltype(zero)>(params, begin, end);
                   });
  }

  void launch(const MlpMemoryStepParams& params, const StepInputs& in) const {
    run_over_heads(in.dtype, int64_t(params.batch) * params.heads,
                   step_grain(2 * int64_t(params.dim) * params.hidden), [&](auto zero, int64_t begin, int64_t end) {
                     cpu::mlp_memory_step<decltype(zero)>(params, begin, end);
                   });
  }
};

}  // namespace

STABLE_TORCH_LIBRARY_FRAGMENT(titans_ext, m) {
  define_step_ops(m);
}

STABLE_TORCH_LIBRARY_IMPL(titans_ext, CPU, m) { impl_step_ops<CpuStep>(m); }

}  // namespace titans
