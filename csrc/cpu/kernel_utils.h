// Small helpers shared by the CPU chunk kernels (torch-free): access to one (batch, head)
// sequence of a [B, T, H, ...] tensor, per-thread scratch, a chunk's gate tables, a dot product.
#pragma once

#include <cstddef>
#include <vector>

#include "cpu/chunk_gates.h"
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

// Carves one zero-filled buffer into consecutive slots of the given sizes (size 0: nullptr).
template <typename T, size_t kSlots>
void carve_buffer(std::vector<T>& buffer, const size_t (&sizes)[kSlots], T** const (&slots)[kSlots]) {
  size_t total = 0;
  for (size_t s : sizes) total += s;
  buffer.assign(total, T(0));
  T* next = buffer.data();
  for (size_t i = 0; i < kSlots; ++i) {
    *slots[i] = sizes[i] ? next : nullptr;
    next += sizes[i];
  }
}

// Loads the gates of tokens t0 .. t0 + L - 1 into ws.theta, ws.eta, ws.alpha and builds the
// chunk's gate tables (chunk_gates.h) in ws.a, ws.g, ws.P, ws.c, ws.sig.
template <typename Params, typename Workspace>
void load_chunk_gates(const Params& p, int b, int h, int t0, int L, Workspace& ws) {
  gather_gate(p.theta, b, h, t0, L, ws.theta);
  gather_gate(p.eta, b, h, t0, L, ws.eta);
  gather_gate(p.alpha, b, h, t0, L, ws.alpha);
  chunk_gate_tables(L, ws.theta, ws.eta, ws.alpha, ws.a, ws.g, ws.P, ws.c, ws.sig);
}

template <typename T>
T dot(const T* x, const T* y, index_t n) {
  T acc = 0;
  for (index_t i = 0; i < n; ++i) acc += x[i] * y[i];
  return acc;
}

}  // namespace titans::cpu
