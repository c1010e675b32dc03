// Memory for the CPU forwards' saved chunk-start states (chunk_states), reused across calls.
//
// chunk_states is the largest output of a CPU forward (the MLP memory's is ~20 times its o) and is
// freed after each backward. Fresh from the C library each call, every page of it is faulted in
// and zeroed by the OS before the kernel writes it: on a 2-core KVM guest that took 15-50 ms of
// CPU per 2-thread MLP forward at the benchmark shape, a forward that takes 30-40 ms without it.
// The cache keeps released buffers and hands them to the next forward asking for the same size,
// so a training loop faults its states in once.
//
// It never holds more memory than the largest amount of saved states that were alive at once
// (a miss evicts the oldest cached buffers first), so its peak is the peak the program had without
// it. docs/cpu_state_cache.md says more; the Python functions are in titans_ext/ops/state_cache.py.
#pragma once

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/HeaderOnlyArrayRef.h>

namespace titans {

// An uninitialized contiguous CPU tensor for chunk_states, from the cache when it is enabled.
torch::stable::Tensor cached_cpu_empty(torch::headeronly::IntHeaderOnlyArrayRef sizes,
                                       torch::headeronly::ScalarType dtype);

}  // namespace titans
