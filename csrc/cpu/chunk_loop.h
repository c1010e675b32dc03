// The loop over the chunks of one (batch, head) sequence, shared by the CPU memory kernels: the
// chunk-start states saved for the backward and the MIRAS retention step at each chunk start
// (shared/design/miras.md §2.3), around a memory's own chunk algebra.
//
// Per chunk, from the carried state (the un-normalized accumulator, which is what is saved):
//   "l2"  the chunk runs from the state;
//   "lq"  the weights are rescaled (rescale), then the chunk runs from them;
//   "kl"  token 0 takes Memora's softmax step (lag_step) and is read after it with read "token";
//         tokens 1.. are an ordinary chunk from its result.
// read "chunk_start" reads every token of the chunk with the weights before the chunk (after the
// lq rescale, before the kl lag token).
//
// Steps is the memory's (torch-free) chunk algebra on a state buffer of Steps::state_size elements
// (weights and momenta), for tokens 0..L-1 of x (HeadInputs shifted to the first token):
//   rescale(state)                                the lq rescale of the weights, in place
//   rescale_backward(state, dstate)               dstate: cotangent of the rescaled state -> of state
//   lag_step(x, state)                            the kl lag token, in place
//   lag_step_backward(x, grads, prev, lagged, dstate)  dstate: of lagged -> of prev; token 0's
//                                                 gradients except dq
//   read(x, L, state, O)                          O = M(q) at the weights of state
//   read_backward(x, dO, grads, L, state, dstate) sets dq, adds to dstate
//   chunk(x, L, token_reads, O, state)            the chunk: token reads (if token_reads), end state
//                                                 written over state
//   chunk_backward(x, dO, grads, L, token_reads, state, dstate)  dstate: of the end state -> of
//                                                 state; every gradient of the tokens (dq only
//                                                 with token_reads)
// and Steps::Dk, Steps::Dv, the widths of the token rows of q, k and of v, o (for prefetching).
#pragma once

#include <algorithm>
#include <cstring>

#include "cpu/kernel_utils.h"
#include "titans_params.h"

namespace titans::cpu {

// The saved chunk-start state n of head bh: [B, H, n_chunks, state_size] (titans_params.h).
template <typename T, typename Params>
T* saved_chunk_state(const Params& p, index_t bh, int n, index_t state_size) {
  return static_cast<T*>(p.chunk_states_ptr) + (bh * p.n_chunks + n) * state_size;
}

// Before the forward of the heads [bh_begin, bh_end) writes their saved chunk-start states: asks
// for huge pages under them (advise_huge_pages). They are one fresh allocation per call (for the
// MLP memory 4 KB per token and head in fp32 at D = 64, E = 4), whose 4 KB page faults were a
// quarter of its forward at the benchmark shape.
template <typename T, typename Params>
void advise_saved_states(const Params& p, index_t state_size, index_t bh_begin, index_t bh_end) {
  if (!p.chunk_states_ptr || bh_end <= bh_begin) return;
  advise_huge_pages(saved_chunk_state<T>(p, bh_begin, 0, state_size),
                    size_t(bh_end - bh_begin) * p.n_chunks * state_size * sizeof(T));
}

// Forward over the chunks of x, from and into state; scratch: state_size elements.
template <typename T, typename Params, typename Steps>
void forward_chunks(const Params& p, const Steps& steps, const HeadInputs<T>& inputs, index_t bh,
                    const TokenRows<T>& o, T* state, T* scratch) {
  const index_t size = steps.state_size;
  const RetentionKind retention = p.miras.retention;
  for (int n = 0; n < p.n_chunks; ++n) {
    const int t0 = n * p.chunk_size, L = std::min(p.chunk_size, p.seqlen - t0);
    if (n + 1 < p.n_chunks) {
      const int next = t0 + p.chunk_size, next_L = std::min(p.chunk_size, p.seqlen - next);
      inputs.at(next).prefetch(next_L, steps.Dk, steps.Dv);
      prefetch_rows(o.from(next), next_L, steps.Dv, true);
    }
    if (p.chunk_states_ptr) std::memcpy(saved_chunk_state<T>(p, bh, n, size), state, size * sizeof(T));
    const HeadInputs<T> x = inputs.at(t0);
    const TokenRows<T> O = o.from(t0);
    const T* chunk_weights = state;  // what read "chunk_start" reads
    int lag = 0;
    if (retention == RetentionKind::lq) {
      steps.rescale(state);
    } else if (retention == RetentionKind::kl) {
      std::memcpy(scratch, state, size * sizeof(T));
      chunk_weights = scratch;
      steps.lag_step(x, state);
      if (p.read_token) steps.read(x, 1, state, O);
      lag = 1;
    }
    if (!p.read_token) steps.read(x, L, chunk_weights, O);
    if (L > lag) steps.chunk(x.at(lag), L - lag, p.read_token, O.from(lag), state);
  }
}

// Reverse pass over the chunks, carrying dstate (the cotangent of the chunk-end state, in the
// end that of the initial state); the chunk-start states come from the saved ones. scratch:
// state_size elements.
template <typename T, typename Params, typename Steps>
void backward_chunks(const Params& p, const Steps& steps, const HeadInputs<T>& inputs, index_t bh,
                     const TokenRows<const T>& d_o, const HeadGrads<T>& all_grads, T* dstate, T* scratch) {
  const index_t size = steps.state_size;
  const RetentionKind retention = p.miras.retention;
  for (int n = p.n_chunks - 1; n >= 0; --n) {
    const int t0 = n * p.chunk_size, L = std::min(p.chunk_size, p.seqlen - t0);
    if (n > 0) {
      const int previous = t0 - p.chunk_size;
      inputs.at(previous).prefetch(p.chunk_size, steps.Dk, steps.Dv);
      prefetch_rows(d_o.from(previous), p.chunk_size, steps.Dv);
      all_grads.at(previous).prefetch(p.chunk_size, steps.Dk, steps.Dv);
    }
    const T* saved = saved_chunk_state<T>(p, bh, n, size);
    const HeadInputs<T> x = inputs.at(t0);
    const TokenRows<const T> dO = d_o.from(t0);
    const HeadGrads<T> grads = all_grads.at(t0);
    // Recompute the state the chunk algebra starts from and the weights read "chunk_start" reads.
    const T* start = saved;
    const T* chunk_weights = saved;
    int lag = 0;
    if (retention != RetentionKind::l2) {
      std::memcpy(scratch, saved, size * sizeof(T));
      start = scratch;
    }
    if (retention == RetentionKind::lq) {
      steps.rescale(scratch);
      chunk_weights = scratch;
    } else if (retention == RetentionKind::kl) {
      steps.lag_step(x, scratch);
      lag = 1;
    }
    if (L > lag) steps.chunk_backward(x.at(lag), dO.from(lag), grads.at(lag), L - lag, p.read_token, start, dstate);
    if (retention == RetentionKind::kl) {
      if (p.read_token) steps.read_backward(x, dO, grads, 1, start, dstate);
      steps.lag_step_backward(x, grads, saved, start, dstate);
    }
    if (!p.read_token) steps.read_backward(x, dO, grads, L, chunk_weights, dstate);
    if (retention == RetentionKind::lq) steps.rescale_backward(saved, dstate);
  }
}

}  // namespace titans::cpu
