// CPU kernels of the deep (MLP) memory (torch-free). Each call handles the work items
// [item_begin, item_end) of the n_seqs * heads (sequence, head) pairs (kernel_utils.h's Head), so
// the caller can split them over threads.
#pragma once

#include <cstdint>

#include "titans_params.h"

namespace titans::cpu {

// Elements of one saved slot of chunk_states (chunk_loop.h): the chunk-start state [W1 | S1 | W2 |
// S2] (4 N D), the chunk's residuals R (C D) and, with read "token", its query pre-activations Zq
// (C N), which the backward would otherwise recompute (mlp_memory.cpp).
int64_t mlp_memory_slot_size(const MlpMemoryParams& params);

// Forward: o, the final state and (if chunk_states_ptr) the saved slots.
template <typename T>
void mlp_memory_fwd(const MlpMemoryParams& params, int64_t item_begin, int64_t item_end);

// Backward from the saved slots: every gradient of MlpMemoryBwdParams.
template <typename T>
void mlp_memory_bwd(const MlpMemoryBwdParams& params, int64_t item_begin, int64_t item_end);

}  // namespace titans::cpu
