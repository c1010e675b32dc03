// Small helpers shared by the CPU chunk kernels (torch-free): access to one (batch, head)
// sequence of a [B, T, H, ...] tensor, per-thread scratch, a chunk's gate tables, a dot product.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "cpu/chunk_gates.h"
#include "titans_params.h"

namespace titans::cpu {

// Token 0 of head h in batch b; token t's features start t * seq_stride further.
template <typename T>
const T* head_rows(const TokenTensor& x, int b, int h) {
  return static_cast<const T*>(x.ptr) + b * x.batch_stride + h * x.head_stride;
}

// The rows of one per-token tensor for one (batch, head): row t starts at ptr + t * stride.
// from(t) shifts to token t (a chunk's first token); a null ptr stays null (an absent tensor).
template <typename T>
struct TokenRows {
  T* ptr = nullptr;
  index_t stride = 0;
  T* row(int t) const { return ptr + t * stride; }
  TokenRows from(int t) const { return {ptr ? row(t) : nullptr, stride}; }
};

template <typename T>
TokenRows<const T> token_rows(const TokenTensor& x, int b, int h) {
  return {head_rows<T>(x, b, h), x.seq_stride};
}

// Head h of batch b in a contiguous [B, T, H, D] tensor (outputs, gradients, delta) of a
// kernel with params p (seqlen, heads); nullptr stays nullptr.
template <typename P, typename Params>
TokenRows<P> contiguous_rows(P* base, const Params& p, int b, int h, int D) {
  if (!base) return {};
  return {base + (index_t(b) * p.seqlen * p.heads + h) * D, index_t(p.heads) * D};
}

// Starts moving rows 0..L-1 (width elements each) of x into the cache, for reading or (for_write)
// writing; a null x is skipped. The chunk loops call it on the next chunk's rows: a chunk's token
// rows are strided (H * D apart) and fresh from memory, and the hardware prefetchers do not
// reach far enough ahead for them.
template <typename T>
void prefetch_rows(const TokenRows<T>& x, int L, int width, bool for_write = false) {
  if (!x.ptr) return;
  constexpr int kLine = 64 / int(sizeof(T));
  for (int t = 0; t < L; ++t)
    for (int j = 0; j < width; j += kLine) {
      const T* line = x.row(t) + j;
      if (for_write) __builtin_prefetch(line, 1);
      else __builtin_prefetch(line);
      // GCC 12 deletes a loop of prefetches as dead code once it knows the trip count; the
      // empty asm that "uses" the address keeps it.
      asm volatile("" : : "r"(line));
    }
}

// Inputs of one (batch, head) of a memory kernel, shifted with at(t) to a chunk's first token.
// delta (the MIRAS objective's threshold) has a null ptr when the objective has none.
template <typename T>
struct HeadInputs {
  TokenRows<const T> q, k, v, theta, eta, alpha, delta;
  HeadInputs at(int t) const {
    return {q.from(t), k.from(t), v.from(t), theta.from(t), eta.from(t), alpha.from(t), delta.from(t)};
  }
  void prefetch(int L, int dk, int dv) const {
    for (const TokenRows<const T>* x : {&q, &k}) prefetch_rows(*x, L, dk);
    for (const TokenRows<const T>* x : {&v, &delta}) prefetch_rows(*x, L, dv);
    for (const TokenRows<const T>* x : {&theta, &eta, &alpha}) prefetch_rows(*x, L, 1);
  }
};

// One (sequence, head) work item of a kernel call: where its tokens, its state rows and its
// saved chunk-start states are. A sequence is a batch row, or with cu_seqlens (titans_params.h)
// a token range of the one batch row. Items are numbered b * heads + h, or with cu_seqlens
// h * n_seqs + i (head-major), so that a range of items writes one contiguous range of saved
// states and an even split of the items is an even split of the tokens
// whenever the heads outnumber the threads. Params: a memory kernel's params; dv: the width of
// v and delta.
template <typename T>
struct Head {
  int b, h;
  index_t state_row;  // of the [n_seqs, H, ...] initial and final states: sequence * heads + h
  int token0;         // the sequence's first token in batch row b
  int seqlen, n_chunks;
  index_t first_slot;  // its first saved chunk-start state, in units of one state
  HeadInputs<T> inputs;  // from token0

  template <typename Params>
  Head(const Params& p, index_t item, int dv) {
    int sequence;
    if (p.cu_seqlens) {
      h = int(item / p.n_seqs);
      sequence = int(item % p.n_seqs);
      b = 0;
      token0 = int(p.cu_seqlens[sequence]);
      seqlen = int(p.cu_seqlens[sequence + 1]) - token0;
      n_chunks = int(p.chunk_offsets[sequence + 1] - p.chunk_offsets[sequence]);
      first_slot = index_t(h) * p.n_chunks + p.chunk_offsets[sequence];
    } else {
      b = sequence = int(item / p.heads);
      h = int(item % p.heads);
      token0 = 0;
      seqlen = p.seqlen;
      n_chunks = p.n_chunks;
      first_slot = item * p.n_chunks;
    }
    state_row = index_t(sequence) * p.heads + h;
    inputs = HeadInputs<T>{token_rows<T>(p.q, b, h),     token_rows<T>(p.k, b, h),   token_rows<T>(p.v, b, h),
                           token_rows<T>(p.theta, b, h), token_rows<T>(p.eta, b, h), token_rows<T>(p.alpha, b, h),
                           contiguous_rows(static_cast<const T*>(p.miras.delta_ptr), p, b, h, dv)}
                 .at(token0);
  }

  // The sequence's rows of a per-token tensor, strided or contiguous [B, T, H, D].
  TokenRows<const T> rows(const TokenTensor& x) const { return token_rows<T>(x, b, h).from(token0); }
  template <typename P, typename Params>
  TokenRows<P> contiguous(P* base, const Params& p, int D) const {
    return contiguous_rows(base, p, b, h, D).from(token0);
  }
};

// Gradients of one work item's tokens, laid out like HeadInputs (d_delta: null without delta).
template <typename T>
struct HeadGrads {
  TokenRows<T> dq, dk, dv, dtheta, deta, dalpha, d_delta;
  HeadGrads at(int t) const {
    return {dq.from(t), dk.from(t), dv.from(t), dtheta.from(t), deta.from(t), dalpha.from(t), d_delta.from(t)};
  }
  void prefetch(int L, int dk_width, int dv_width) const {
    for (const TokenRows<T>* x : {&dq, &dk}) prefetch_rows(*x, L, dk_width, true);
    for (const TokenRows<T>* x : {&dv, &d_delta}) prefetch_rows(*x, L, dv_width, true);
    for (const TokenRows<T>* x : {&dtheta, &deta, &dalpha}) prefetch_rows(*x, L, 1, true);
  }
};

// The gradients of a work item's tokens; BwdParams: a memory kernel's backward params, whose
// gradients are contiguous [B, T, H, ...].
template <typename T, typename BwdParams>
HeadGrads<T> head_grads(const BwdParams& p, const Head<T>& head, int dk, int dv) {
  return {head.contiguous(static_cast<T*>(p.dq_ptr), p, dk),     head.contiguous(static_cast<T*>(p.dk_ptr), p, dk),
          head.contiguous(static_cast<T*>(p.dv_ptr), p, dv),     head.contiguous(static_cast<T*>(p.dtheta_ptr), p, 1),
          head.contiguous(static_cast<T*>(p.deta_ptr), p, 1),    head.contiguous(static_cast<T*>(p.dalpha_ptr), p, 1),
          head.contiguous(static_cast<T*>(p.d_delta_ptr), p, dv)};
}

// Carves the calling thread's workspace into consecutive zero-filled slots of the given sizes
// (size 0: nullptr), valid until the thread's next carve_buffer of T: one per kernel call. The
// storage is kept between calls (it grows to the largest asked for), so that a call does not map
// fresh pages for its scratch (their faults and unmapping were ~3 % of a one-chunk MLP call, perf).
template <typename T, size_t kSlots>
void carve_buffer(const size_t (&sizes)[kSlots], T** const (&slots)[kSlots]) {
  thread_local std::vector<T> buffer;
  size_t total = 0;
  for (size_t s : sizes) total += s;
  buffer.assign(total, T(0));
  T* next = buffer.data();
  for (size_t i = 0; i < kSlots; ++i) {
    *slots[i] = sizes[i] ? next : nullptr;
    next += sizes[i];
  }
}

// Loads the gates of L tokens (rows 0 .. L-1 of theta, eta, alpha) into ws.theta, ws.eta,
// ws.alpha and builds the chunk's gate tables (chunk_gates.h) in ws.a, ws.g, ws.P, ws.c, ws.sig.
template <typename T, typename Workspace>
void load_chunk_gates(const TokenRows<const T>& theta, const TokenRows<const T>& eta,
                      const TokenRows<const T>& alpha, int L, Workspace& ws) {
  for (int t = 0; t < L; ++t) {
    ws.theta[t] = *theta.row(t);
    ws.eta[t] = *eta.row(t);
    ws.alpha[t] = *alpha.row(t);
  }
  chunk_gate_tables(L, ws.theta, ws.eta, ws.alpha, ws.a, ws.g, ws.P, ws.c, ws.sig);
}

// sum_i x[i] y[i], in kLanes independent partial sums: one running sum is a chain of dependent
// additions the compiler may not reorder, so it neither vectorizes nor overlaps them.
template <typename T>
T dot(const T* x, const T* y, index_t n) {
  constexpr int kLanes = 16;
  T partial[kLanes] = {};
  index_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) partial[j] += x[i + j] * y[i + j];
  T acc = 0;
  for (; i < n; ++i) acc += x[i] * y[i];
  for (int j = 0; j < kLanes; ++j) acc += partial[j];
  return acc;
}

}  // namespace titans::cpu
