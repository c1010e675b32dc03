// Packed variable-length sequences in the CUDA kernels, device side (the sizes and why they need no
// host sync: sequences.h). A block that works on sequence i sees it through a sequence view: the
// params of a batch of one row holding just its tokens, with every per-token pointer advanced to
// its first token and every per-sequence one to its state row, so that the kernels' chunk math is
// that of the unpacked path (its chunks count from its first token, docs/design.md §6). Without
// cu_seqlens the view of block z is the params themselves and the block's batch row is z.
//
// Offsets that the value check would refuse (it is off by default on a GPU) are clamped into
// [0, T] and each sequence's end to at least its start: the results are wrong then, but no access
// leaves its buffer and the entries of sequence_units stay in bounds.
#pragma once

#include "cuda/common/sequences.h"
#include "device/device.h"
#include "titans_params.h"

namespace titans {
namespace kernel {

// Tokens [begin, begin + length) of the packed row.
struct SequenceSpan {
  int begin = 0, length = 0;
};

__device__ __forceinline__ SequenceSpan packed_sequence(const SequenceParams& p, int i) {
  const int64_t T = p.seqlen, first = p.cu_seqlens[i], last = p.cu_seqlens[i + 1];
  const int64_t begin = first < 0 ? 0 : first > T ? T : first;
  const int64_t end = last < begin ? begin : last > T ? T : last;
  return {int(begin), int(end - begin)};
}

// The batch row of block z's tokens in its view: z, or 0 (the view's one row).
__device__ __forceinline__ int batch_row(const SequenceParams& p, int z) { return p.cu_seqlens ? 0 : z; }

// Sequence i's first entry in a buffer of sequence_units(p, unit) entries per head (packed only).
__device__ __forceinline__ index_t first_unit(const SequenceParams& p, int i, int unit) {
  return packed_sequence(p, i).begin / (index_t(p.chunk_size) * unit) + i;
}

// The sequence whose entries hold `entry` (packed only): the last i with first_unit(i) <= entry,
// 0 when there is none (offsets the value check refuses). first_unit increases with i.
__device__ __forceinline__ int sequence_of_unit(const SequenceParams& p, index_t entry, int unit) {
  int lo = 0, hi = p.n_seqs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (first_unit(p, mid, unit) <= entry)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// A pointer to T (null stays null) advanced by `elements`.
template <typename T>
__device__ __forceinline__ void advance(const void*& ptr, index_t elements) {
  if (ptr) ptr = static_cast<const T*>(ptr) + elements;
}
template <typename T>
__device__ __forceinline__ void advance(void*& ptr, index_t elements) {
  if (ptr) ptr = static_cast<T*>(ptr) + elements;
}

// Each pointer advanced by `elements`.
template <typename T, typename... Ptrs>
__device__ __forceinline__ void advance_all(index_t elements, Ptrs&... ptrs) {
  (advance<T>(ptrs, elements), ...);
}

// `x` from token `begin` of batch row 0 on.
template <typename T>
__device__ __forceinline__ void advance_tokens(TokenTensor& x, int begin) {
  advance<T>(x.ptr, index_t(begin) * x.seq_stride);
}

// The fields of SequenceParams in sequence i's view (packed; the caller advances its own fields):
// per-token inputs q, k, v (input_t) and gates (compute_t), the MIRAS delta ([B, T, H, dv]),
// T, the chunk count. Returns the sequence's span.
template <typename input_t, typename compute_t>
__device__ __forceinline__ SequenceSpan view_sequence(SequenceParams& p, int i, int dv) {
  const SequenceSpan s = packed_sequence(p, i);
  advance_tokens<input_t>(p.q, s.begin);
  advance_tokens<input_t>(p.k, s.begin);
  advance_tokens<input_t>(p.v, s.begin);
  advance_tokens<compute_t>(p.theta, s.begin);
  advance_tokens<compute_t>(p.eta, s.begin);
  advance_tokens<compute_t>(p.alpha, s.begin);
  advance_all<compute_t>(index_t(s.begin) * p.heads * dv, p.miras.delta_ptr);
  p.batch = 1;
  p.seqlen = s.length;
  p.n_chunks = (s.length + p.chunk_size - 1) / p.chunk_size;
  return s;
}

// The fields of SequenceGradParams in the view of the sequence whose span is s: dO, the per-token
// gradients dq, dk [.., Dk] and dv [.., Dv] (input_t), the gates' and d_delta [.., Dv] (compute_t).
template <typename input_t, typename compute_t>
__device__ __forceinline__ void view_sequence_grads(SequenceGradParams& g, SequenceSpan s, int heads, int dk,
                                                    int dv) {
  const index_t token = index_t(s.begin) * heads;
  advance_tokens<input_t>(g.d_o, s.begin);
  advance_all<input_t>(token * dk, g.dq_ptr, g.dk_ptr);
  advance_all<input_t>(token * dv, g.dv_ptr);
  advance_all<compute_t>(token, g.dtheta_ptr, g.deta_ptr, g.dalpha_ptr);
  advance_all<compute_t>(token * dv, g.d_delta_ptr);
}

}  // namespace kernel
}  // namespace titans
