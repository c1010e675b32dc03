// CPU kernels of the decode step (torch-free): one token of the linear and of the MLP memory from
// the running and the chunk-start state (step_params.h). Each call handles the (batch, head) pairs
// bh in [bh_begin, bh_end), bh = b * heads + h, so the caller can split B * H over threads. Inputs
// and outputs are in the compute dtype T.
#pragma once

#include <cstdint>

#include "step_params.h"

namespace titans::cpu {

template <typename T>
void linear_memory_step(const LinearMemoryStepParams& params, int64_t bh_begin, int64_t bh_end);

template <typename T>
void mlp_memory_step(const MlpMemoryStepParams& params, int64_t bh_begin, int64_t bh_end);

}  // namespace titans::cpu
