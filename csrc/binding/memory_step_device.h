// The backend of the step operators (memory_step.h) for the CUDA kernels of
// csrc/cuda/memory_step.cuh, shared by their two builds: nvcc's, launched on torch's current
// stream (ops_step_cuda.cpp), and the CPU SIMT emulation's (ops_step_emu.cpp). They differ only in
// how a launch gets its stream and reports its status, which the Launcher parameter says.
#pragma once

#include "binding/linear_memory_device.h"  // input_type
#include "binding/memory_step.h"
#include "cuda/memory_step.h"

namespace titans {

// The CUDA kernels read q, k, v in their own dtype (bf16 / fp16 too) and never read a value on the
// host: a step does not synchronize. Launcher: a type with
//   explicit Launcher(const Tensor& q);                     // per call (device guard, stream)
//   template <typename Launch> void run(const Launch&) const;  // calls launch(stream), checks its status
template <typename Launcher>
struct DeviceStep {
  static constexpr bool kInputsInComputeDtype = false;
  static constexpr bool kChecksValues = false;

  Launcher launcher;
  InputType type;

  explicit DeviceStep(const Tensor& q) : launcher(q), type(input_type(q)) {}

  void launch(const LinearMemoryStepParams& params, const StepInputs&) const {
    check_launch("linear_memory_step", params.batch, linear_memory_step_smem_bytes(params, type));
    launcher.run([&](CUstream_st* stream) { return linear_memory_step_launch(params, type, stream); });
  }

  void launch(const MlpMemoryStepParams& params, const StepInputs&) const {
    check_launch("mlp_memory_step", params.batch, mlp_memory_step_smem_bytes(params, type));
    launcher.run([&](CUstream_st* stream) { return mlp_memory_step_launch(params, type, stream); });
  }

 private:
  static void check_launch(const char* op, int64_t batch, size_t smem_bytes) {
    STD_TORCH_CHECK(batch <= kStepMaxBatch, op, " on CUDA: batch up to ", kStepMaxBatch, ", got ", batch);
    STD_TORCH_CHECK(smem_bytes <= kStepMaxSharedBytes, op, " on CUDA: the token's vectors need ", smem_bytes,
                    " bytes of shared memory, more than ", kStepMaxSharedBytes,
                    " (the head or hidden width is too large)");
  }
};

}  // namespace titans
