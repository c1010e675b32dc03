// Entry points of the CUDA linear_memory backward (linear_memory_bwd.cuh). Torch-free and free of
// CUDA headers, so both bindings (CUDA and emulation) can include it.
#pragma once

#include "cuda/linear_memory_fwd.h"
#include "titans_params.h"

namespace titans {

// The backward's launch (linear_memory_bwd.cuh): the chunk kernel, one block per (group of
// `group` consecutive chunks, head, batch) covering all of Dv in value slices of `slice` rows,
// preceded, when a sequence has more than one group, by the reverse scan (value tiles of
// `scan_tile` rows) that stores the cotangent of each group's end state. Its one buffer is that
// store, [B, H, n_groups - 1, 2, Dv, Dk] in the input dtype; with one group per sequence the
// backward needs no memory beyond its inputs and gradients.
struct LinearMemoryBwdPlan : LaunchPlan {
  int group = 1, n_groups = 0, slice = 16, scan_tile = 16;
  bool carry = false;  // whether the chunk kernel carries the cotangent across the chunks of a group
  // whether it carries it in dm0 / ds0 rather than in shared memory (where that does not fit: only a
  // non-l2 objective's whole-sequence group, whose carry cannot shrink to a smaller group)
  bool global_carry = false;
};

struct LinearMemoryBwdWorkspace {
  void* group_cotangents = nullptr;
};

// The plan for `params`' sizes (pointers are not read). has_final_cotangent: whether the
// cotangents of the final state are read.
LinearMemoryBwdPlan linear_memory_bwd_plan(const LinearMemoryParams& params, InputType input_type,
                                           const DeviceLimits& device, bool has_final_cotangent);

// Fills every gradient of `params` (dq, dk, dv in the input dtype; dtheta, deta, dalpha, dm0, ds0
// in the compute dtype) from the checkpoints (chunk_states_ptr, the forward's, in the input
// dtype). Same return convention as linear_memory_fwd_launch.
int linear_memory_bwd_launch(const LinearMemoryBwdParams& params, InputType input_type,
                             const LinearMemoryBwdPlan& plan, const LinearMemoryBwdWorkspace& workspace,
                             CUstream_st* stream);

}  // namespace titans
