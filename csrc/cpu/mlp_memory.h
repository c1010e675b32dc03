// CPU kernels of the deep (MLP) memory (torch-free). Each call handles the (batch, head) pairs
// bh in [bh_begin, bh_end), bh = b * heads + h, so the caller can split B * H over threads.
#pragma once

#include <cstdint>

#include "titans_params.h"

namespace titans::cpu {

// Forward: o, the final state and (if chunk_states_ptr) the chunk-start states.
template <typename T>
void mlp_memory_fwd(const MlpMemoryParams& params, int64_t bh_begin, int64_t bh_end);

// Backward from the saved chunk-start states: every gradient of MlpMemoryBwdParams.
template <typename T>
void mlp_memory_bwd(const MlpMemoryBwdParams& params, int64_t bh_begin, int64_t bh_end);

}  // namespace titans::cpu
