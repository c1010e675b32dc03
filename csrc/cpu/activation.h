// The MLP memory's activations (exact GELU, SiLU) and their derivatives, elementwise (torch-free),
// in the instruction-set variant in use (activation_kernel.h, cpu_isa.h).
#pragma once

#include "cpu/isa_kernels.h"
#include "titans_params.h"

namespace titans::cpu {

// value = act(x), first = act'(x), second = act''(x) over n values; first and second may be
// nullptr (not needed; second only with first). The backward needs act'' only at the key
// pre-activations Z (docs/mlp_dual_form.md §4).
template <typename T>
void activation(MlpActivation kind, index_t n, const T* x, T* value, T* first, T* second) {
  isa_kernels().activation<T>()(kind, n, x, value, first, second);
}

}  // namespace titans::cpu
