// The loop over the chunks of one (sequence, head) work item (Head), shared by the CPU memory kernels: the
// chunk-start states saved for the backward and the MIRAS retention at each chunk start
// (docs/miras.md §2.3), around a memory's own chunk algebra.
//
// A state is Steps::n_weights pairs [W_i | S_i] of Steps::weight_block elements each (a weight
// matrix and its momentum). Per chunk, from the carried state (which is what is saved):
//   "l2"  the chunk runs from the state;
//   "lq"  the carried weights are the accumulators A: each weight fixes rho_i = ||A_i||_q^(2-q)
//         (lq_scale) at the chunk start, the chunk's errors and reads see rho_i A_i (with
//         rho_i S_i for the token reads), and the chunk-end state evolves from A, S (ChunkScale);
//   "kl"  token 0 takes Memora's softmax step (lag_step) and is read after it with read "token";
//         tokens 1.. are an ordinary chunk from its result.
// read "chunk_start" reads every token of the chunk with the weights before the chunk (rho A under
// lq, the weights before the kl lag token).
//
// Steps is the memory's (torch-free) chunk algebra on a state buffer of Steps::state_size elements,
// for tokens 0..L-1 of x (HeadInputs shifted to the first token):
//   lag_step(x, state)                            the kl lag token, in place
//   lag_step_backward(x, grads, prev, lagged, dstate)  dstate: of lagged -> of prev; token 0's
//                                                 gradients except dq
//   read(x, L, weights, O)                        O = M(q) at the weights of a state
//   read_backward(x, dO, grads, L, weights, dweights)  sets dq, adds to dweights
//   chunk(x, L, token_reads, O, state, scale, kept)  the chunk: token reads (if token_reads), end
//                                                 state written over state (after scale is read:
//                                                 its scaled state may be state itself); kept:
//                                                 where to keep what its backward reuses
//                                                 (slot_size - state_size elements, all written;
//                                                 nullptr: nothing is kept, no backward follows)
//   chunk_backward(x, dO, grads, L, token_reads, state, scale, kept, dstate, dscale)  dstate: of
//                                                 the end state -> of state, from the end-state
//                                                 paths; dscale: adds those of the errors and reads
//                                                 (after dstate's transform: dscale.scaled may be
//                                                 dstate); every gradient of the tokens (dq only
//                                                 with token_reads)
// and Steps::Dk, Steps::Dv, the widths of the token rows of q, k and of v, o (for prefetching), and
// Steps::slot_size, the elements of a saved slot: the chunk-start state followed by what the
// chunk's forward kept for its backward, values the backward would otherwise recompute at more
// cost than their memory is worth (the MLP memory's residuals and query pre-activations,
// mlp_memory.cpp).
#pragma once

#include <algorithm>
#include <cstring>

#include "cpu/kernel_utils.h"
#include "cpu/miras_rows.h"
#include "titans_params.h"

namespace titans::cpu {

// What a chunk's errors and reads see of its start state (docs/miras.md §2.3). Token t reads the
// weights rho_i W_i,t = a_t (rho_i W_i) + g_t (rho_i S_i) + rho_i sum_{s<=t} c[t, s] u_s: scaled is
// the start state with each pair [W_i | S_i] times rho[i], which the first two terms, read
// "chunk_start" and the errors (at rho_i W_i) see; rho[i] scales the in-chunk sum. Under "lq"
// rho[i] is weight i's lq_scale and W_i its accumulator; otherwise rho = 1 and scaled is the state.
template <typename T>
struct ChunkScale {
  static constexpr int kMaxWeights = 2;
  const T* scaled;
  const T* rho;  // [n_weights]
};

// Its cotangent: scaled (may alias the state's cotangent when scaled is the state) and rho.
template <typename T>
struct ChunkScaleGrad {
  T* scaled;
  T* rho;  // [n_weights]
};

// A saved slot (chunk-start state and what the chunk kept): slot `slot` of [B, H, n_chunks,
// slot_size] (titans_params.h).
template <typename T, typename Params>
T* saved_chunk_state(const Params& p, index_t slot, index_t slot_size) {
  return static_cast<T*>(p.chunk_states_ptr) + slot * slot_size;
}

// "lq": rho[i] = lq_scale of weight i of state, and scaled = state with pair i times rho[i].
template <typename T, typename Steps>
void lq_chunk_scale(const Steps& steps, T q, const T* state, T* rho, T* scaled) {
  const index_t block = steps.weight_block;
  for (int i = 0; i < steps.n_weights; ++i) {
    const T* pair = state + 2 * i * block;
    rho[i] = lq_scale(pair, block, q);
    for (index_t j = 0; j < 2 * block; ++j) scaled[2 * i * block + j] = rho[i] * pair[j];
  }
}

// Backward of lq_chunk_scale: adds to dstate the cotangents d_scaled of scaled and d_rho of rho.
template <typename T, typename Steps>
void lq_chunk_scale_backward(const Steps& steps, T q, const T* state, const T* rho, const T* d_scaled,
                             const T* d_rho, T* dstate) {
  const index_t block = steps.weight_block;
  for (int i = 0; i < steps.n_weights; ++i) {
    const index_t offset = 2 * i * block;
    const T d_rho_total = d_rho[i] + dot(d_scaled + offset, state + offset, 2 * block);
    for (index_t j = 0; j < 2 * block; ++j) dstate[offset + j] += rho[i] * d_scaled[offset + j];
    lq_scale_backward(state + offset, block, q, d_rho_total, dstate + offset);
  }
}

// Forward over the chunks of one work item, from and into state; o: its output rows; scratch:
// state_size elements.
template <typename T, typename Params, typename Steps>
void forward_chunks(const Params& p, const Steps& steps, const Head<T>& head, const TokenRows<T>& o, T* state,
                    T* scratch) {
  static_assert(Steps::n_weights <= ChunkScale<T>::kMaxWeights);
  const index_t size = steps.state_size;
  const RetentionKind retention = p.miras.retention;
  const HeadInputs<T>& inputs = head.inputs;
  for (int n = 0; n < head.n_chunks; ++n) {
    const int t0 = n * p.chunk_size, L = std::min(p.chunk_size, head.seqlen - t0);
    if (n + 1 < head.n_chunks) {
      const int next = t0 + p.chunk_size, next_L = std::min(p.chunk_size, head.seqlen - next);
      inputs.at(next).prefetch(next_L, steps.Dk, steps.Dv);
      prefetch_rows(o.from(next), next_L, steps.Dv, true);
    }
    T* const slot = p.chunk_states_ptr ? saved_chunk_state<T>(p, head.first_slot + n, steps.slot_size) : nullptr;
    if (slot) std::memcpy(slot, state, size * sizeof(T));
    const HeadInputs<T> x = inputs.at(t0);
    const TokenRows<T> O = o.from(t0);
    T rho[ChunkScale<T>::kMaxWeights] = {T(1), T(1)};
    const T* scaled = state;
    const T* chunk_weights = state;  // what read "chunk_start" reads
    int lag = 0;
    if (retention == RetentionKind::lq) {
      lq_chunk_scale(steps, T(p.miras.q), state, rho, scratch);
      scaled = chunk_weights = scratch;
    } else if (retention == RetentionKind::kl) {
      std::memcpy(scratch, state, size * sizeof(T));
      chunk_weights = scratch;
      steps.lag_step(x, state);
      if (p.read_token) steps.read(x, 1, state, O);
      lag = 1;
    }
    if (!p.read_token) steps.read(x, L, chunk_weights, O);
    if (L > lag)
      steps.chunk(x.at(lag), L - lag, p.read_token, O.from(lag), state, ChunkScale<T>{scaled, rho},
                  slot ? slot + size : nullptr);
    else if (slot)  // defined values in every saved element, so that a call's outputs are reproducible
      std::fill(slot + size, slot + steps.slot_size, T(0));
  }
}

// Reverse pass over the chunks of one work item, carrying dstate (the cotangent of the chunk-end
// state, in the end that of the initial state); the chunk-start states come from the saved ones.
// d_o, all_grads: the item's rows. scratch, scratch_grad: state_size elements each (scratch_grad
// is used by "lq" only).
template <typename T, typename Params, typename Steps>
void backward_chunks(const Params& p, const Steps& steps, const Head<T>& head, const TokenRows<const T>& d_o,
                     const HeadGrads<T>& all_grads, T* dstate, T* scratch, T* scratch_grad) {
  static_assert(Steps::n_weights <= ChunkScale<T>::kMaxWeights);
  const index_t size = steps.state_size;
  const RetentionKind retention = p.miras.retention;
  const T q = T(p.miras.q);
  const HeadInputs<T>& inputs = head.inputs;
  for (int n = head.n_chunks - 1; n >= 0; --n) {
    const int t0 = n * p.chunk_size, L = std::min(p.chunk_size, head.seqlen - t0);
    if (n > 0) {
      const int previous = t0 - p.chunk_size;
      inputs.at(previous).prefetch(p.chunk_size, steps.Dk, steps.Dv);
      prefetch_rows(d_o.from(previous), p.chunk_size, steps.Dv);
      all_grads.at(previous).prefetch(p.chunk_size, steps.Dk, steps.Dv);
    }
    const T* saved = saved_chunk_state<T>(p, head.first_slot + n, steps.slot_size);
    const HeadInputs<T> x = inputs.at(t0);
    const TokenRows<const T> dO = d_o.from(t0);
    const HeadGrads<T> grads = all_grads.at(t0);
    // Recompute the state the chunk algebra starts from, its scale and the weights read
    // "chunk_start" reads.
    T rho[ChunkScale<T>::kMaxWeights] = {T(1), T(1)};
    T d_rho[ChunkScale<T>::kMaxWeights] = {T(0), T(0)};
    const T* start = saved;
    const T* scaled = saved;
    const T* chunk_weights = saved;
    T* d_scaled = dstate;
    int lag = 0;
    if (retention == RetentionKind::lq) {
      lq_chunk_scale(steps, q, saved, rho, scratch);
      scaled = chunk_weights = scratch;
      d_scaled = scratch_grad;
      std::fill(d_scaled, d_scaled + size, T(0));
    } else if (retention == RetentionKind::kl) {
      std::memcpy(scratch, saved, size * sizeof(T));
      steps.lag_step(x, scratch);
      start = scaled = scratch;
      lag = 1;
    }
    if (L > lag)
      steps.chunk_backward(x.at(lag), dO.from(lag), grads.at(lag), L - lag, p.read_token, start,
                           ChunkScale<T>{scaled, rho}, saved + size, dstate, ChunkScaleGrad<T>{d_scaled, d_rho});
    if (retention == RetentionKind::kl) {
      if (p.read_token) steps.read_backward(x, dO, grads, 1, start, dstate);
      steps.lag_step_backward(x, grads, saved, start, dstate);
    }
    if (!p.read_token) steps.read_backward(x, dO, grads, L, chunk_weights, d_scaled);
    if (retention == RetentionKind::lq) lq_chunk_scale_backward(steps, q, saved, rho, d_scaled, d_rho, dstate);
  }
}

}  // namespace titans::cpu
