// Parameter structs of the decode-step kernels (titans_ext.linear_memory_step and
// titans_ext.mlp_memory_step; CPU, CUDA and the CUDA emulation), in the style of titans_params.h:
// raw pointers and strides (in elements), no torch.
//
// A step is one token per (batch, head). Within a chunk every token's inner gradient is taken at
// the chunk-start memory, so a token needs only two states (docs/design.md §2):
//   the running state     the memory and momentum after the previous token, as the chunked ops
//                         carry them (the lq accumulator A for retention lq);
//   the chunk-start state what the current chunk's tokens learn and read with, fixed at its start:
//                         the weights the inner gradients are taken at (rho0 A0 for lq, the memory
//                         after the lag token for kl, else the memory before the chunk), lq's scale
//                         rho0 of the token reads (1 otherwise) and, for read "chunk_start" with
//                         kl, the memory before the lag token, which that read reads (for the other
//                         retentions it equals the weights).
// The kernel starts a chunk (computes the chunk-start state from the running state before the
// token) when the token's position is a multiple of chunk_size, or when no chunk-start state is
// given; otherwise it reads the given one. The chunk-start state is written out (a copy when the
// chunk goes on), so a step reads its inputs and writes its outputs, never in place; but with the
// operators' mid_chunk (no token of the call starts a chunk, the caller keeps the chunk-start state
// it passed) its output pointers are nullptr and nothing is written for it.
#pragma once

#include "titans_params.h"

namespace titans {

// One token's [B, H, D] tensor (or [B, H] when D == 1): base pointer and strides, feature
// dimension contiguous.
struct HeadTensor {
  void* ptr = nullptr;
  index_t batch_stride = 0;
  index_t head_stride = 0;
};

// What both memories' steps share.
struct StepParams {
  int batch = 0, heads = 0;
  int chunk_size = 0;
  bool read_token = true;

  // The token's q, k [B, H, Dk], v [B, H, Dv], gates theta, eta, alpha [B, H].
  HeadTensor q, k, v, theta, eta, alpha;

  // The token's position in the stream, int64, read on the device: batch row b is at
  // position_ptr[b * position_stride] (stride 0: one position for every row). Positions are >= 0.
  const int64_t* position_ptr = nullptr;
  index_t position_stride = 0;

  // delta_ptr, when the objective has one: contiguous [B, H, Dv] (the token's thresholds).
  MirasParams miras;
};

// Linear memory M, S: [B, H, Dv, Dk].
struct LinearMemoryStepParams : StepParams {
  int dk = 0, dv = 0;

  // Running state in, contiguous [B, H, Dv, Dk]; nullptr: the chunked op's initial default (M
  // zeros, uniform 1/Dk with retention kl; S zeros).
  const void* m_ptr = nullptr;
  const void* s_ptr = nullptr;
  // Chunk-start state in: weights [B, H, Dv, Dk], scale [B, H], read weights [B, H, Dv, Dk] (only
  // with read "chunk_start" and retention kl, else nullptr). chunk_weights_ptr == nullptr: none,
  // the token starts a chunk whatever its position.
  const void* chunk_weights_ptr = nullptr;
  const void* chunk_scale_ptr = nullptr;
  const void* chunk_read_ptr = nullptr;

  // Outputs, contiguous: o [B, H, Dv] (q's dtype), the running state and the chunk-start state
  // after the token, laid out like the inputs (chunk_read_out_ptr exactly when read "chunk_start"
  // with retention kl; the chunk-start outputs nullptr with mid_chunk).
  void* o_ptr = nullptr;
  void* m_out_ptr = nullptr;
  void* s_out_ptr = nullptr;
  void* chunk_weights_out_ptr = nullptr;
  void* chunk_scale_out_ptr = nullptr;
  void* chunk_read_out_ptr = nullptr;
};

// MLP memory M(x) = x + W2 act(W1 x): W1, S1 [B, H, N, D], W2, S2 [B, H, D, N] (N = hidden).
struct MlpMemoryStepParams : StepParams {
  int dim = 0, hidden = 0;
  MlpActivation activation = MlpActivation::kGelu;

  // Running state in, contiguous; the momenta may be nullptr (zeros).
  const void* w1_ptr = nullptr;
  const void* w2_ptr = nullptr;
  const void* s1_ptr = nullptr;
  const void* s2_ptr = nullptr;
  // Chunk-start state in: weights W1, W2 like the running ones, scale [B, H, 2] (rho1, rho2), read
  // weights W1, W2 (only with read "chunk_start" and retention kl). chunk_w1_ptr == nullptr: none.
  const void* chunk_w1_ptr = nullptr;
  const void* chunk_w2_ptr = nullptr;
  const void* chunk_scale_ptr = nullptr;
  const void* chunk_read_w1_ptr = nullptr;
  const void* chunk_read_w2_ptr = nullptr;

  // Outputs, contiguous: o [B, H, D] (q's dtype), then the states after the token like the inputs
  // (the chunk-start outputs nullptr with mid_chunk).
  void* o_ptr = nullptr;
  void* w1_out_ptr = nullptr;
  void* w2_out_ptr = nullptr;
  void* s1_out_ptr = nullptr;
  void* s2_out_ptr = nullptr;
  void* chunk_w1_out_ptr = nullptr;
  void* chunk_w2_out_ptr = nullptr;
  void* chunk_scale_out_ptr = nullptr;
  void* chunk_read_w1_out_ptr = nullptr;
  void* chunk_read_w2_out_ptr = nullptr;
};

}  // namespace titans
