// CPU kernels of the deep (MLP) memory (torch-free). Each call handles the work items
// [item_begin, item_end) of the n_seqs * heads (sequence, head) pairs (kernel_utils.h's Head), so
// the caller can split them over threads.
#pragma once

#include <cstdint>

#include "titans_params.h"

namespace titans::cpu {

// Forward: o, the final state and (if chunk_states_ptr) the chunk-start states.
template <typename T>
void mlp_memory_fwd(const MlpMemoryParams& params, int64_t item_begin, int64_t item_end);

// Backward from the saved chunk-start states: every gradient of MlpMemoryBwdParams.
template <typename T>
void mlp_memory_bwd(const MlpMemoryBwdParams& params, int64_t item_begin, int64_t item_end);

}  // namespace titans::cpu
