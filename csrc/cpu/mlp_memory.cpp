// CPU kernels of the deep memory M(x) = x + W2 act(W1 x): the chunked dual form of
// docs/mlp_dual_form.md (§3 forward, §4 backward), one (sequence, head) at a time, with
// the MIRAS objectives and retentions of docs/miras.md §2.
//
// Per chunk of L tokens, from the chunk-start weights W1 [N, D], W2 [D, N] and momenta S1, S2
// (rows = tokens, `x * A` scales row t of A by x_t):
//   key path    Z = K W1^T, H = act(Z), R = K + H W2^T - V, E = f(R), G = E W2, DZ = G .* act'(Z)
//               (row t of DZ, E: the errors at the hidden and output layer of token t's loss;
//               f = 2r for the l2 objective, objectives.h)
//   read token  Zq = a * (Q W1^T) + g * (Q S1^T) + ((Q K^T) .* c) DZ,   Hq = act(Zq)
//               O  = Q + a * (Hq W2^T) + g * (Hq S2^T) + ((Hq H^T) .* c) E
//   read start  O  = Q + act(Q W1^T) W2^T
//   chunk end   W1' = a_L W1 + g_L S1 + (m * DZ)^T K,   S1' = p_L S1 + (s * DZ)^T K
//               W2' = a_L W2 + g_L S2 + (m * E)^T H,    S2' = p_L S2 + (s * E)^T H
// with a, g, c, P and sig the gate tables of chunk_gates.h and m, s their last rows. The
// retention acts at the chunk start (chunk_loop.h) on W1 and W2 separately: "lq" takes the key
// path at rho1 W1, rho2 W2 and the reads at rho1 [W1; S1], rho2 [W2; S2] with the masked products
// of Zq and O scaled by rho1 and rho2 (W1, W2 are the accumulators: token t reads rho1 W1_t,
// rho2 W2_t), "kl" runs the chunk's first token as Memora's softmax step on each (per row) and the
// rest as an ordinary chunk.
//
// A state (and its cotangent) is one buffer [W1 | S1 | W2 | S2] of four N * D blocks, so that
// [W1; S1] is one [2N, D] and [W2; S2] one [2D, N] matrix and one product serves both halves.
//
// The forward keeps two of each chunk's intermediates after its start state, for the backward
// (mlp_memory_slot_size): the residuals R (C x D), whose H W2^T is one of the 43 N D
// multiply-adds per token of a chunk's forward and backward at C = N = 4D, and with read "token"
// Zq (C x N), without which the backward would recompute Q [W1; S1]^T and the masked product of
// Zq, 2.5 more (the cotangents of a and g come from dZq [W1; S1] instead, a product the backward
// computes for dQ anyway). They are 31 % more saved values per chunk at C = N = 4D; the rest of
// the key path (Z, G) would cost as much memory per multiply-add saved as the state itself.
#include "cpu/mlp_memory.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/activation.h"
#include "cpu/chunk_gates.h"
#include "cpu/chunk_loop.h"
#include "cpu/kernel_utils.h"
#include "cpu/masked_product.h"
#include "cpu/matmul.h"
#include "cpu/miras_rows.h"
#include "objectives.h"

namespace titans::cpu {
namespace {

// out = [x * A | y * A] (L x 2W, row stride 2W) from A (L x W, row stride lda).
template <typename T>
void scale_rows_pair(int L, int W, const T* A, index_t lda, const T* x, const T* y, T* out) {
  for (int t = 0; t < L; ++t)
    for (int j = 0; j < W; ++j) {
      out[t * 2 * W + j] = x[t] * A[t * lda + j];
      out[t * 2 * W + W + j] = y[t] * A[t * lda + j];
    }
}

// out = beta * out + x * A_left + y * A_right, with A = [A_left | A_right] (L x 2W, row stride
// 2W) and out L x W (row stride ldo). beta == 0 overwrites out without reading it.
template <typename T>
void combine_pair(int L, int W, const T* A, const T* x, const T* y, T beta, T* out, index_t ldo) {
  for (int t = 0; t < L; ++t)
    for (int j = 0; j < W; ++j) {
      const T sum = x[t] * A[t * 2 * W + j] + y[t] * A[t * 2 * W + W + j];
      out[t * ldo + j] = beta == T(0) ? sum : beta * out[t * ldo + j] + sum;
    }
}

// Per-thread scratch (carve_buffer), sized once per kernel call for chunks of up to C tokens. The buffers
// marked (backward) are empty in the forward.
template <typename T>
struct Workspace {
  T *theta, *eta, *alpha, *a, *g, *P;  // [C]: gates and gate tables of the chunk
  T *c, *sig;                          // [C * C] gate tables
  T *QK, *QKc, *HH, *HHc;              // [C * C]: Q K^T, Hq H^T and their products with c
  T *Z, *H, *G, *DZ, *act1;            // [C, N] key path; act1 = act'(Z)
  T *R, *E;                            // [C, D]: residuals M(k) - v and errors f(R)
  T *X, *wide;                         // [C, 2N]: [Q W1^T | Q S1^T] (forward); pair products
  T *Zq, *Hq;                          // [C, N] query path
  T *state;                            // [4, N * D]: the state (forward), its cotangent (backward)
  T *start;                            // [4, N * D]: chunk_loop.h's scratch state
  T *act2, *actq1;                     // [C, N] (backward): act''(Z), act'(Zq)
  T *dE, *dH, *dDZ, *dHq, *dA;         // [C, D], [C, N] x 3, [C * C] (backward)
  T *coef_grad, *gate_scratch;         // d_a, d_g, d_sig_last [C] x 3 + d_c [C * C]; [2 (C + 2)]
  T *start_grad;                       // [4, N * D] (backward with "lq"): chunk_loop.h's scratch cotangent

  Workspace(int C, int D, int N, bool backward, bool lq) {
    const size_t c1 = C, CC = c1 * C, CN = c1 * N, CD = c1 * D, bwd = backward ? 1 : 0, S4 = 4 * size_t(N) * D;
    const size_t sizes[] = {c1, c1, c1, c1, c1, c1, CC, CC, CC, CC, CC, CC, CN, CN, CN, CN, CN, CD, CD,
                            (1 - bwd) * 2 * CN, 2 * CN, CN, CN, S4, S4, bwd * CN, bwd * CN, bwd * CD, bwd * CN,
                            bwd * CN, bwd * CN, bwd * CC, bwd * (3 * c1 + CC), bwd * 2 * (c1 + 2),
                            backward && lq ? S4 : 0};
    T** const slots[] = {&theta, &eta, &alpha, &a,     &g,     &P,    &c,   &sig, &QK,  &QKc,      &HH,
                         &HHc,   &Z,   &H,     &G,     &DZ,    &act1, &R,   &E,   &X,   &wide,     &Zq,
                         &Hq,    &state, &start, &act2, &actq1, &dE,  &dH,  &dDZ, &dHq, &dA, &coef_grad,
                         &gate_scratch, &start_grad};
    carve_buffer(sizes, slots);
  }
};

// What a chunk's forward keeps for its backward, after the chunk-start state in its saved slot:
// R [C, D], then with read "token" Zq [C, N] (mlp_memory_slot_size).
template <typename T>
struct KeptRows {
  T* R;
  T* Zq;
  KeptRows(const MlpMemoryParams& p, T* kept)
      : R(kept), Zq(kept ? kept + index_t(p.chunk_size) * p.dim : nullptr) {}
};

// Key path: Z, H, act'(Z), the residuals R = K + H W2^T - V, the errors E = f(R) (the objective),
// G and DZ (and act''(Z) for the backward) at the chunk-start weights, for tokens 0..L-1 of x.
// kept_R: R as the forward computed it (nullptr: computed here).
template <typename T, typename Objective>
void key_path(const MlpMemoryParams& p, const Objective& objective, int L, const HeadInputs<T>& x,
              const T* state, Workspace<T>& ws, bool for_backward, const T* kept_R = nullptr) {
  const int D = p.dim, N = p.hidden;
  const T* W1 = state;
  const T* W2 = state + 2 * index_t(N) * D;
  matmul(false, true, L, N, D, T(1), x.k.ptr, x.k.stride, W1, D, T(0), ws.Z, N);
  activation(p.activation, index_t(L) * N, ws.Z, ws.H, ws.act1, for_backward ? ws.act2 : nullptr);
  if (kept_R) {
    std::memcpy(ws.R, kept_R, index_t(L) * D * sizeof(T));
  } else {
    matmul(false, true, L, D, N, T(1), ws.H, N, W2, N, T(0), ws.R, D);
    for (int t = 0; t < L; ++t) {
      T* r = ws.R + t * D;
      const T* k = x.k.row(t);
      const T* v = x.v.row(t);
      for (int j = 0; j < D; ++j) r[j] += k[j] - v[j];
    }
  }
  for (int t = 0; t < L; ++t)
    objective_error_row(objective, ws.R + t * D, x.delta.ptr ? x.delta.row(t) : nullptr, D, ws.E + t * D);
  matmul(false, false, L, N, D, T(1), ws.E, D, W2, N, T(0), ws.G, N);
  for (index_t i = 0; i < index_t(L) * N; ++i) ws.DZ[i] = ws.G[i] * ws.act1[i];
}

// Backward of key_path, from the cotangents of DZ (ws.dDZ), E (ws.dE) and H (ws.dH), all consumed:
// sets dV and d delta, adds to dK and to the chunk-start state's cotangent dstate.
template <typename T, typename Objective>
void key_path_backward(const MlpMemoryParams& p, const Objective& objective, int L, const HeadInputs<T>& x,
                       const HeadGrads<T>& grads, const T* state, T* dstate, Workspace<T>& ws) {
  const int D = p.dim, N = p.hidden;
  const index_t block = index_t(N) * D;
  const T* W1 = state;
  const T* W2 = state + 2 * block;
  T* dW1 = dstate;
  T* dW2 = dstate + 2 * block;
  // DZ = G .* act'(Z): G becomes dG and dDZ becomes dZ (its act'' part).
  T* dG = ws.G;
  T* dZ = ws.dDZ;
  for (index_t i = 0; i < index_t(L) * N; ++i) {
    const T d = ws.dDZ[i];
    dZ[i] = d * ws.G[i] * ws.act2[i];
    dG[i] = d * ws.act1[i];
  }
  matmul(false, true, L, D, N, T(1), dG, N, W2, N, T(1), ws.dE, D);
  matmul(true, false, D, N, L, T(1), ws.E, D, dG, N, T(1), dW2, N);
  // E = f(R), R = K + H W2^T - V: dE becomes dR = dE .* f'(R) (objective_error_row_backward).
  T* dR = ws.dE;
  for (int t = 0; t < L; ++t) {
    T* dr = dR + t * D;
    objective_error_row_backward(objective, ws.R + t * D, x.delta.ptr ? x.delta.row(t) : nullptr, D, dr,
                                 grads.d_delta.ptr ? grads.d_delta.row(t) : nullptr);
    T* dk = grads.dk.row(t);
    T* dv = grads.dv.row(t);
    for (int j = 0; j < D; ++j) {
      dv[j] = -dr[j];
      dk[j] += dr[j];
    }
  }
  matmul(false, false, L, N, D, T(1), dR, D, W2, N, T(1), ws.dH, N);
  matmul(true, false, D, N, L, T(1), dR, D, ws.H, N, T(1), dW2, N);
  for (index_t i = 0; i < index_t(L) * N; ++i) dZ[i] += ws.dH[i] * ws.act1[i];
  matmul(false, false, L, D, N, T(1), dZ, N, W1, D, T(1), grads.dk.ptr, grads.dk.stride);
  matmul(true, false, N, D, L, T(1), dZ, N, x.k.ptr, x.k.stride, T(1), dW1, D);
}

// The masked product Q K^T .* c of read "token", with its unmasked factor. c is zero above the
// diagonal, so the products are causal: only the lower triangles of Q K^T (here) and Hq H^T
// (token_hidden_path) are computed, and the masked products skip the zero part.
template <typename T>
void query_key_product(int L, int D, const HeadInputs<T>& x, Workspace<T>& ws) {
  matmul(false, true, L, L, D, T(1), x.q.ptr, x.q.stride, x.k.ptr, x.k.stride, T(0), ws.QK, L, Triangular::kLowerC);
  causal_mask(L, ws.QK, ws.c, ws.QKc);
}

// Query pre-activations of read "token" (the dual form), into Zq (L x N): rho1 scales the masked
// product (chunk_loop.h's ChunkScale). Also sets Q K^T and its masked product.
template <typename T>
void token_query_path(const MlpMemoryParams& p, int L, const HeadInputs<T>& x, const T* state, T rho1,
                      Workspace<T>& ws, T* Zq) {
  const int D = p.dim, N = p.hidden;
  matmul(false, true, L, 2 * N, D, T(1), x.q.ptr, x.q.stride, state, D, T(0), ws.X, 2 * N);
  query_key_product(L, D, x, ws);
  combine_pair(L, N, ws.X, ws.a, ws.g, T(0), Zq, N);
  matmul(false, false, L, N, L, rho1, ws.QKc, L, ws.DZ, N, T(1), Zq, N, Triangular::kLowerA);
}

// Hq = act(Zq) (and act'(Zq) for the backward) and the masked product Hq H^T .* c, with its
// unmasked factor.
template <typename T>
void token_hidden_path(const MlpMemoryParams& p, int L, const T* Zq, Workspace<T>& ws, bool for_backward) {
  const int N = p.hidden;
  activation(p.activation, index_t(L) * N, Zq, ws.Hq, for_backward ? ws.actq1 : nullptr, static_cast<T*>(nullptr));
  matmul(false, true, L, L, N, T(1), ws.Hq, N, ws.H, N, T(0), ws.HH, L, Triangular::kLowerC);
  causal_mask(L, ws.HH, ws.c, ws.HHc);
}

// Read "token": O = Q + a * (Hq W2^T) + g * (Hq S2^T) + rho2 ((Hq H^T) .* c) E, after token_hidden_path.
template <typename T>
void token_read(const MlpMemoryParams& p, int L, const TokenRows<const T>& Q, const T* state, T rho2,
                Workspace<T>& ws, const TokenRows<T>& O) {
  const int D = p.dim, N = p.hidden;
  for (int t = 0; t < L; ++t) std::memcpy(O.row(t), Q.row(t), D * sizeof(T));
  matmul(false, true, L, 2 * D, N, T(1), ws.Hq, N, state + 2 * index_t(N) * D, N, T(0), ws.wide, 2 * D);
  combine_pair(L, D, ws.wide, ws.a, ws.g, T(1), O.ptr, O.stride);
  matmul(false, false, L, D, L, rho2, ws.HHc, L, ws.E, D, T(1), O.ptr, O.stride, Triangular::kLowerA);
}

// Zq = Q W1^T, Hq = act(Zq) (and act'(Zq) for the backward) at the weights of state.
template <typename T>
void plain_query_path(const MlpMemoryParams& p, int L, const TokenRows<const T>& Q, const T* state, Workspace<T>& ws,
                      bool for_backward) {
  const int D = p.dim, N = p.hidden;
  matmul(false, true, L, N, D, T(1), Q.ptr, Q.stride, state, D, T(0), ws.Zq, N);
  activation(p.activation, index_t(L) * N, ws.Zq, ws.Hq, for_backward ? ws.actq1 : nullptr, static_cast<T*>(nullptr));
}

// O = Q + act(Q W1^T) W2^T at the weights of state: read "chunk_start", and a kl lag token's read.
template <typename T>
void plain_read(const MlpMemoryParams& p, int L, const TokenRows<const T>& Q, const T* state, Workspace<T>& ws,
                const TokenRows<T>& O) {
  const int D = p.dim, N = p.hidden;
  plain_query_path(p, L, Q, state, ws, false);
  for (int t = 0; t < L; ++t) std::memcpy(O.row(t), Q.row(t), D * sizeof(T));
  matmul(false, true, L, D, N, T(1), ws.Hq, N, state + 2 * index_t(N) * D, N, T(1), O.ptr, O.stride);
}

// Backward of plain_read: sets dQ, adds to the cotangent dstate of the weights read.
template <typename T>
void plain_read_backward(const MlpMemoryParams& p, int L, const TokenRows<const T>& Q, const TokenRows<const T>& dO,
                         const TokenRows<T>& dQ, const T* state, T* dstate, Workspace<T>& ws) {
  const int D = p.dim, N = p.hidden;
  const index_t block = index_t(N) * D;
  plain_query_path(p, L, Q, state, ws, true);
  T* dZq = ws.dHq;  // dHq becomes dZq = dHq .* act'(Zq) in place
  matmul(false, false, L, N, D, T(1), dO.ptr, dO.stride, state + 2 * block, N, T(0), ws.dHq, N);
  matmul(true, false, D, N, L, T(1), dO.ptr, dO.stride, ws.Hq, N, T(1), dstate + 2 * block, N);
  for (index_t i = 0; i < index_t(L) * N; ++i) dZq[i] = ws.dHq[i] * ws.actq1[i];
  for (int t = 0; t < L; ++t) std::memcpy(dQ.row(t), dO.row(t), D * sizeof(T));
  matmul(false, false, L, D, N, T(1), dZq, N, state, D, T(1), dQ.ptr, dQ.stride);
  matmul(true, false, N, D, L, T(1), dZq, N, Q.ptr, Q.stride, T(1), dstate, D);
}

// The chunk-end state, in place.
template <typename T>
void update_state(const MlpMemoryParams& p, int L, const TokenRows<const T>& K, T* state, Workspace<T>& ws) {
  const int D = p.dim, N = p.hidden;
  const index_t block = index_t(N) * D;
  const T* m = ws.c + (L - 1) * L;
  const T* s = ws.sig + (L - 1) * L;
  const T a_L = ws.a[L - 1], g_L = ws.g[L - 1], p_L = ws.P[L - 1];
  for (T* W : {state, state + 2 * block}) {
    T* S = W + block;
    for (index_t i = 0; i < block; ++i) {
      W[i] = a_L * W[i] + g_L * S[i];
      S[i] = p_L * S[i];
    }
  }
  scale_rows_pair(L, N, ws.DZ, index_t(N), m, s, ws.wide);
  matmul(true, false, 2 * N, D, L, T(1), ws.wide, 2 * N, K.ptr, K.stride, T(1), state, D);
  scale_rows_pair(L, D, ws.E, index_t(D), m, s, ws.wide);
  matmul(true, false, 2 * D, N, L, T(1), ws.wide, 2 * D, ws.H, N, T(1), state + 2 * block, N);
}

// One chunk of L tokens (tokens 0..L-1 of x) from state: its token reads (when token_reads) and
// its end state, written over state. The retention step happened before; the key path and the
// reads see scale (chunk_loop.h). kept: where R and Zq are kept for the backward (KeptRows; the
// rows past L zero; nullptr: not kept).
template <typename T, typename Objective>
void chunk_forward(const MlpMemoryParams& p, const Objective& objective, const HeadInputs<T>& x, int L,
                   bool token_reads, const TokenRows<T>& O, T* state, const ChunkScale<T>& scale, T* kept,
                   Workspace<T>& ws) {
  const KeptRows<T> keep(p, kept);
  load_chunk_gates(x.theta, x.eta, x.alpha, L, ws);
  key_path(p, objective, L, x, scale.scaled, ws, false);
  if (kept) {
    std::memcpy(keep.R, ws.R, index_t(L) * p.dim * sizeof(T));
    std::fill(keep.R + index_t(L) * p.dim, keep.R + index_t(p.chunk_size) * p.dim, T(0));
    if (token_reads) std::fill(keep.Zq + index_t(L) * p.hidden, keep.Zq + index_t(p.chunk_size) * p.hidden, T(0));
  }
  if (token_reads) {
    T* Zq = kept ? keep.Zq : ws.Zq;
    token_query_path(p, L, x, scale.scaled, scale.rho[0], ws, Zq);
    token_hidden_path(p, L, Zq, ws, false);
    token_read(p, L, x.q, scale.scaled, scale.rho[1], ws, O);
  }
  update_state(p, L, x.k, state, ws);
}

// Backward of chunk_forward (docs/mlp_dual_form.md §4): dstate, the cotangent of the chunk-end state,
// becomes in place that of the chunk-start state through the end-state paths; dscale accumulates
// the cotangents of the scaled state and of rho from the key path and the token reads (after
// dstate's transform: dscale.scaled may be dstate). Writes the gradients of tokens 0..L-1 (dQ
// only with token_reads). kept: what the forward kept (KeptRows).
template <typename T, typename Objective>
void chunk_backward(const MlpMemoryParams& p, const Objective& objective, const HeadInputs<T>& x,
                    const TokenRows<const T>& dO, const HeadGrads<T>& grads, int L, bool token_reads,
                    const T* state, const ChunkScale<T>& scale, const T* kept, T* dstate,
                    const ChunkScaleGrad<T>& dscale, Workspace<T>& ws) {
  const int C = p.chunk_size, D = p.dim, N = p.hidden;
  const index_t block = index_t(N) * D;
  const T* W1 = state;
  const T* S1 = state + block;
  const T* W2 = state + 2 * block;
  const T* S2 = state + 3 * block;
  T* dW1 = dstate;
  T* dW2 = dstate + 2 * block;
  // The scaled [W1; S1] and [W2; S2] (chunk_loop.h), which the key path and the reads see.
  const T* V1 = scale.scaled;
  const T* V2 = scale.scaled + 2 * block;
  T* dV1 = dscale.scaled;
  T* dV2 = dscale.scaled + 2 * block;
  const TokenRows<const T>& Q = x.q;
  const TokenRows<const T>& K = x.k;
  T* dK = grads.dk.ptr;
  const index_t dks = grads.dk.stride;
  T* d_a = ws.coef_grad;
  T* d_g = d_a + C;
  T* d_sig_last = d_g + C;
  T* d_c = d_sig_last + C;

  // Recompute the chunk's activations from its start state and what the forward kept.
  const KeptRows<const T> keep(p, kept);
  load_chunk_gates(x.theta, x.eta, x.alpha, L, ws);
  key_path(p, objective, L, x, scale.scaled, ws, true, keep.R);
  if (token_reads) {
    query_key_product(L, D, x, ws);
    token_hidden_path(p, L, keep.Zq, ws, true);
  }
  std::fill(d_a, d_a + 3 * C + C * C, T(0));
  const T* m = ws.c + (L - 1) * L;
  const T* s = ws.sig + (L - 1) * L;
  T* d_c_last = d_c + (L - 1) * L;

  // End-state paths, from the cotangent of the chunk-end state (still in dstate).
  // [K dW1'^T | K dS1'^T] gives dDZ and the c, sig cotangents of row L.
  matmul(false, true, L, 2 * N, D, T(1), K.ptr, K.stride, dstate, D, T(0), ws.wide, 2 * N);
  combine_pair(L, N, ws.wide, m, s, T(0), ws.dDZ, N);
  for (int t = 0; t < L; ++t) {
    d_c_last[t] += dot(ws.DZ + t * N, ws.wide + t * 2 * N, N);
    d_sig_last[t] += dot(ws.DZ + t * N, ws.wide + t * 2 * N + N, N);
  }
  // [H dW2'^T | H dS2'^T] gives dE.
  matmul(false, true, L, 2 * D, N, T(1), ws.H, N, dstate + 2 * block, N, T(0), ws.wide, 2 * D);
  combine_pair(L, D, ws.wide, m, s, T(0), ws.dE, D);
  for (int t = 0; t < L; ++t) {
    d_c_last[t] += dot(ws.E + t * D, ws.wide + t * 2 * D, D);
    d_sig_last[t] += dot(ws.E + t * D, ws.wide + t * 2 * D + D, D);
  }
  // dK = [m * DZ | s * DZ] [dW1'; dS1'],  dH = [m * E | s * E] [dW2'; dS2'].
  scale_rows_pair(L, N, ws.DZ, index_t(N), m, s, ws.wide);
  matmul(false, false, L, D, 2 * N, T(1), ws.wide, 2 * N, dstate, D, T(0), dK, dks);
  scale_rows_pair(L, D, ws.E, index_t(D), m, s, ws.wide);
  matmul(false, false, L, N, 2 * D, T(1), ws.wide, 2 * D, dstate + 2 * block, N, T(0), ws.dH, N);
  d_a[L - 1] += dot(dW1, W1, block) + dot(dW2, W2, block);
  d_g[L - 1] += dot(dW1, S1, block) + dot(dW2, S2, block);
  const T d_P_last = dot(dW1 + block, S1, block) + dot(dW2 + block, S2, block);
  // From here dstate is the cotangent of the chunk-start state (its end-state paths).
  const T a_L = ws.a[L - 1], g_L = ws.g[L - 1], p_L = ws.P[L - 1];
  for (T* dW : {dW1, dW2}) {
    T* dS = dW + block;
    for (index_t i = 0; i < block; ++i) {
      dS[i] = g_L * dW[i] + p_L * dS[i];
      dW[i] = a_L * dW[i];
    }
  }

  // Token read-out paths; dHq becomes dZq = dHq .* act'(Zq) in place.
  if (token_reads) {
    T* dQ = grads.dq.ptr;
    const index_t dqs = grads.dq.stride;
    const T* dOp = dO.ptr;
    const index_t dos = dO.stride;
    T* dZq = ws.dHq;
    for (int t = 0; t < L; ++t) std::memcpy(dQ + t * dqs, dOp + t * dos, D * sizeof(T));
    // [dO W2 | dO S2] (scaled) gives dHq and, against Hq, the a and g cotangents.
    matmul(false, false, L, N, D, T(1), dOp, dos, V2, N, T(0), ws.wide, 2 * N);
    matmul(false, false, L, N, D, T(1), dOp, dos, V2 + block, N, T(0), ws.wide + N, 2 * N);
    for (int t = 0; t < L; ++t) {
      d_a[t] += dot(ws.Hq + t * N, ws.wide + t * 2 * N, N);
      d_g[t] += dot(ws.Hq + t * N, ws.wide + t * 2 * N + N, N);
    }
    combine_pair(L, N, ws.wide, ws.a, ws.g, T(0), ws.dHq, N);
    // [dW2; dS2] += [a * dO | g * dO]^T Hq.
    scale_rows_pair(L, D, dOp, dos, ws.a, ws.g, ws.wide);
    matmul(true, false, 2 * D, N, L, T(1), ws.wide, 2 * D, ws.Hq, N, T(1), dV2, N);
    // Masked product rho2 (Hq H^T .* c) E.
    dscale.rho[1] += masked_product_backward<T>(L, N, D, scale.rho[1], ws.c, ws.HH, ws.HHc, {dOp, dos}, {ws.E, D},
                                                {ws.Hq, N}, {ws.H, N}, d_c, {ws.dE, D}, {ws.dHq, N}, {ws.dH, N}, ws.dA);
    for (index_t i = 0; i < index_t(L) * N; ++i) dZq[i] = ws.dHq[i] * ws.actq1[i];
    // Zq = a * (Q W1^T) + g * (Q S1^T) + ...: with Y = [dZq W1 | dZq S1], dQ += a * Y1 + g * Y2
    // and the a, g cotangents are the rows of Y against those of Q (Q W1^T itself is not kept);
    // [dW1; dS1] += [a * dZq | g * dZq]^T Q.
    T* Y = ws.wide;
    matmul(false, false, L, D, N, T(1), dZq, N, V1, D, T(0), Y, 2 * D);
    matmul(false, false, L, D, N, T(1), dZq, N, V1 + block, D, T(0), Y + D, 2 * D);
    for (int t = 0; t < L; ++t) {
      d_a[t] += dot(Q.row(t), Y + t * 2 * D, D);
      d_g[t] += dot(Q.row(t), Y + t * 2 * D + D, D);
    }
    combine_pair(L, D, Y, ws.a, ws.g, T(1), dQ, dqs);
    scale_rows_pair(L, N, dZq, index_t(N), ws.a, ws.g, ws.wide);
    matmul(true, false, 2 * N, D, L, T(1), ws.wide, 2 * N, Q.ptr, Q.stride, T(1), dV1, D);
    // Masked product rho1 (Q K^T .* c) DZ.
    dscale.rho[0] += masked_product_backward<T>(L, D, N, scale.rho[0], ws.c, ws.QK, ws.QKc, {dZq, N}, {ws.DZ, N}, Q,
                                                K, d_c, {ws.dDZ, N}, {dQ, dqs}, {dK, dks}, ws.dA);
  }

  key_path_backward(p, objective, L, x, grads, scale.scaled, dscale.scaled, ws);
  chunk_gate_backward(L, ws.eta, ws.alpha, ws.a, ws.g, ws.P, ws.c, ws.sig, d_a, d_g, d_c, d_sig_last, d_P_last,
                      ws.gate_scratch, grads.dtheta.ptr, grads.deta.ptr, grads.dalpha.ptr, grads.dtheta.stride);
}

// ---- Retention "kl": Memora's lag token (token 0 of x) on each weight with its momentum, in
// place (kl_step with the inner gradients u1 = dz k^T and u2 = e h^T at the previous weights).

template <typename T, typename Objective>
void kl_lag_step(const MlpMemoryParams& p, const Objective& objective, const HeadInputs<T>& x, T* state,
                 Workspace<T>& ws) {
  const int D = p.dim, N = p.hidden;
  const index_t block = index_t(N) * D;
  key_path(p, objective, 1, x, state, ws, false);
  const T theta = *x.theta.row(0), eta = *x.eta.row(0), beta = T(1) - *x.alpha.row(0);
  kl_step(state, state + block, N, D, ws.DZ, x.k.row(0), theta, eta, beta);
  kl_step(state + 2 * block, state + 3 * block, D, N, ws.E, ws.H, theta, eta, beta);
}

// Backward of kl_lag_step. state_prev: its input; state1: its output; dstate: the output's
// cotangent, turned in place into the input's. Writes token 0's gradients except dq.
template <typename T, typename Objective>
void kl_lag_step_backward(const MlpMemoryParams& p, const Objective& objective, const HeadInputs<T>& x,
                          const HeadGrads<T>& grads, const T* state_prev, const T* state1, T* dstate,
                          Workspace<T>& ws) {
  const int D = p.dim, N = p.hidden;
  const index_t block = index_t(N) * D;
  key_path(p, objective, 1, x, state_prev, ws, true);
  const T theta = *x.theta.row(0), eta = *x.eta.row(0), beta = T(1) - *x.alpha.row(0);
  T* dk = grads.dk.row(0);
  std::fill(dk, dk + D, T(0));
  std::fill(ws.dDZ, ws.dDZ + N, T(0));
  std::fill(ws.dE, ws.dE + D, T(0));
  std::fill(ws.dH, ws.dH + N, T(0));
  KlGateGrads<T> gate_grads;
  kl_step_backward(state_prev, state_prev + block, state1, N, D, ws.DZ, x.k.row(0), theta, eta, beta, dstate,
                   dstate + block, ws.dDZ, dk, gate_grads);
  kl_step_backward(state_prev + 2 * block, state_prev + 3 * block, state1 + 2 * block, D, N, ws.E, ws.H, theta, eta,
                   beta, dstate + 2 * block, dstate + 3 * block, ws.dE, ws.dH, gate_grads);
  *grads.dalpha.row(0) = -gate_grads.beta;
  *grads.deta.row(0) = gate_grads.eta;
  *grads.dtheta.row(0) = gate_grads.theta;
  key_path_backward(p, objective, 1, x, grads, state_prev, dstate, ws);
}

// ---- Whole sequences of one work item (a (sequence, head) pair, kernel_utils.h's Head).

// The MLP memory's chunk algebra on a state [W1 | S1 | W2 | S2], for chunk_loop.h: two weights,
// each with its own lq scale.
template <typename T, typename Objective>
struct MlpSteps {
  static constexpr int n_weights = 2;
  const MlpMemoryParams& p;
  const Objective& objective;
  Workspace<T>& ws;
  int Dk, Dv;                        // both D
  index_t weight_block, state_size, slot_size;  // N * D, 4 N * D, mlp_memory_slot_size

  MlpSteps(const MlpMemoryParams& p_, const Objective& objective_, Workspace<T>& ws_)
      : p(p_), objective(objective_), ws(ws_), Dk(p_.dim), Dv(p_.dim), weight_block(index_t(p_.hidden) * p_.dim),
        state_size(4 * weight_block), slot_size(mlp_memory_slot_size(p_)) {}

  void lag_step(const HeadInputs<T>& x, T* state) const { kl_lag_step(p, objective, x, state, ws); }
  void lag_step_backward(const HeadInputs<T>& x, const HeadGrads<T>& grads, const T* state_prev, const T* state1,
                         T* dstate) const {
    kl_lag_step_backward(p, objective, x, grads, state_prev, state1, dstate, ws);
  }
  void read(const HeadInputs<T>& x, int L, const T* state, const TokenRows<T>& O) const {
    plain_read(p, L, x.q, state, ws, O);
  }
  void read_backward(const HeadInputs<T>& x, const TokenRows<const T>& dO, const HeadGrads<T>& grads, int L,
                     const T* state, T* dstate) const {
    plain_read_backward(p, L, x.q, dO, grads.dq, state, dstate, ws);
  }
  void chunk(const HeadInputs<T>& x, int L, bool token_reads, const TokenRows<T>& O, T* state,
             const ChunkScale<T>& scale, T* kept) const {
    chunk_forward(p, objective, x, L, token_reads, O, state, scale, kept, ws);
  }
  void chunk_backward(const HeadInputs<T>& x, const TokenRows<const T>& dO, const HeadGrads<T>& grads, int L,
                      bool token_reads, const T* state, const ChunkScale<T>& scale, const T* kept, T* dstate,
                      const ChunkScaleGrad<T>& dscale) const {
    cpu::chunk_backward(p, objective, x, dO, grads, L, token_reads, state, scale, kept, dstate, dscale, ws);
  }
};

// The four blocks of a state in [W1 | S1 | W2 | S2] order: from the work item at element
// offset of four [B, H, ...] tensors (nullptr: zeros), or into them (nullptr: not wanted).
template <typename T>
void load_state(const void* const (&blocks)[4], index_t offset, index_t block, T* state) {
  for (int i = 0; i < 4; ++i) {
    T* dst = state + i * block;
    if (blocks[i]) std::memcpy(dst, static_cast<const T*>(blocks[i]) + offset, block * sizeof(T));
    else std::fill(dst, dst + block, T(0));
  }
}

template <typename T>
void store_state(const T* state, index_t offset, index_t block, void* const (&blocks)[4]) {
  for (int i = 0; i < 4; ++i)
    if (blocks[i]) std::memcpy(static_cast<T*>(blocks[i]) + offset, state + i * block, block * sizeof(T));
}

// The backward cannot rebuild chunk-start states from the end state (the chunk map is nonlinear
// in the weights), so all of them are kept, with R and Zq: 4 N D + C (D + N) values per chunk
// (5.25 KB per token-head in fp32 at D = 64, E = 4, C = 64). Saving every n-th state and
// re-running the forward of the chunks in between is the next step.
template <typename T, typename Objective>
void forward_head(const MlpMemoryParams& p, const Objective& objective, const Head<T>& head, Workspace<T>& ws) {
  const index_t block = index_t(p.hidden) * p.dim, offset = head.state_row * block;
  load_state<T>({p.w1_0_ptr, p.s1_0_ptr, p.w2_0_ptr, p.s2_0_ptr}, offset, block, ws.state);
  forward_chunks(p, MlpSteps<T, Objective>(p, objective, ws), head, head.contiguous(static_cast<T*>(p.o_ptr), p, p.dim),
                 ws.state, ws.start);
  store_state(ws.state, offset, block, {p.w1_final_ptr, p.s1_final_ptr, p.w2_final_ptr, p.s2_final_ptr});
}

// Reverse pass, carrying the state cotangent [dW1 | dS1 | dW2 | dS2] (docs/mlp_dual_form.md §4).
template <typename T, typename Objective>
void backward_head(const MlpMemoryBwdParams& p, const Objective& objective, const Head<T>& head, Workspace<T>& ws) {
  const index_t block = index_t(p.hidden) * p.dim, offset = head.state_row * block;
  T* dstate = ws.state;
  load_state<T>({p.d_w1_final_ptr, p.d_s1_final_ptr, p.d_w2_final_ptr, p.d_s2_final_ptr}, offset, block, dstate);
  backward_chunks(p, MlpSteps<T, Objective>(p, objective, ws), head, head.rows(p.d_o),
                  head_grads<T>(p, head, p.dim, p.dim), dstate, ws.start, ws.start_grad);
  store_state(dstate, offset, block, {p.dw1_0_ptr, p.ds1_0_ptr, p.dw2_0_ptr, p.ds2_0_ptr});
}

}  // namespace

int64_t mlp_memory_slot_size(const MlpMemoryParams& params) {
  const int64_t hidden = params.hidden, dim = params.dim, chunk = params.chunk_size;
  return 4 * hidden * dim + chunk * dim + (params.read_token ? chunk * hidden : 0);
}

template <typename T>
void mlp_memory_fwd(const MlpMemoryParams& params, int64_t item_begin, int64_t item_end) {
  Workspace<T> ws(params.chunk_size, params.dim, params.hidden, false, false);
  dispatch_objective<T>(params.miras, [&](const auto& objective) {
    for (int64_t item = item_begin; item < item_end; ++item)
      forward_head<T>(params, objective, Head<T>(params, item, params.dim), ws);
  });
}

template <typename T>
void mlp_memory_bwd(const MlpMemoryBwdParams& params, int64_t item_begin, int64_t item_end) {
  Workspace<T> ws(params.chunk_size, params.dim, params.hidden, true,
                  params.miras.retention == RetentionKind::lq);
  dispatch_objective<T>(params.miras, [&](const auto& objective) {
    for (int64_t item = item_begin; item < item_end; ++item)
      backward_head<T>(params, objective, Head<T>(params, item, params.dim), ws);
  });
}

template void mlp_memory_fwd<float>(const MlpMemoryParams&, int64_t, int64_t);
template void mlp_memory_fwd<double>(const MlpMemoryParams&, int64_t, int64_t);
template void mlp_memory_bwd<float>(const MlpMemoryBwdParams&, int64_t, int64_t);
template void mlp_memory_bwd<double>(const MlpMemoryBwdParams&, int64_t, int64_t);

}  // namespace titans::cpu
