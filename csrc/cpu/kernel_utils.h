// Small helpers shared by the CPU chunk kernels (torch-free): access to one (batch, head)
// sequence of a [B, T, H, ...] tensor, and a dot product.
#pragma once

#include "titans_params.h"

namespace titans::cpu {

// Token 0 of head h in batch b; token t's features start t * seq_stride further.
template <typename T>
const T* head_rows(const TokenTensor& x, int b, int h) {
  return static_cast<const T*>(x.ptr) + b * x.batch_stride + h * x.head_stride;
}

// Gates of tokens t0 .. t0 + L - 1 of one (batch, head), made contiguous.
template <typename T>
void gather_gate(const TokenTensor& gate, int b, int h, int t0, int L, T* out) {
  const T* base = head_rows<T>(gate, b, h);
  for (int t = 0; t < L; ++t) out[t] = base[(t0 + t) * gate.seq_stride];
}

template <typename T>
T dot(const T* x, const T* y, index_t n) {
  T acc = 0;
  for (index_t i = 0; i < n; ++i) acc += x[i] * y[i];
  return acc;
}

}  // namespace titans::cpu
