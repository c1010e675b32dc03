// CPU kernels of the linear memory: the chunk algebra of docs/design.md §2 (forward) and
// docs/backward_linear.md (backward), one (sequence, head) at a time, with the MIRAS
// objectives and retentions of docs/miras.md §2.
//
// Per chunk of L tokens with chunk-start state (M0, S0), both Dv x Dk, kept together as one
// [2, Dv, Dk] block "MS" so that one product updates both:
//   R   = K M0^T - V,  E = f(R)                                residuals and errors at M0
//   O   = diag(a) Q M0^T + diag(g) Q S0^T + ((Q K^T) .* c) E        (read "token")
//   O   = Q M0^T                                                    (read "chunk_start")
//   M_L = a_L M0 + g_L S0 + (diag(m) E)^T K,  S_L = p S0 + (diag(s) E)^T K
// with m, s the last rows of the gate tables c, sig (chunk_gates.h) and f the objective
// (objectives.h). The retention acts at the chunk start only (chunk_loop.h): "lq" takes the
// errors at rho M0 and scales the reads by rho (M is the accumulator: token t reads rho M_t),
// "kl" runs the chunk's first token as Memora's exact softmax step and the rest as an ordinary chunk.
#include "cpu/linear_memory.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/chunk_gates.h"
#include "cpu/chunk_loop.h"
#include "cpu/kernel_utils.h"
#include "cpu/masked_product.h"
#include "cpu/matmul.h"
#include "cpu/miras_rows.h"
#include "objectives.h"

namespace titans::cpu {
namespace {

// Per-thread scratch (carve_buffer), sized once per kernel call for chunks of up to C tokens.
template <typename T>
struct Workspace {
  int C, Dk, Dv;
  T *theta, *eta, *alpha;         // [C] gates of the chunk
  T *a, *g, *P, *c, *sig;         // gate tables: [C] x 3, [C * C] x 2
  T *R, *E;                       // residuals and errors: [C, Dv] each
  T *state, *start;               // [2, Dv, Dk] each: carried state or its cotangent; chunk_loop.h's scratch
  T *wide, *square, *square2;     // [C, 2 Dv], [C, C], [C, C]
  T *square3;                     // [C, C] (backward)
  T *narrow, *narrow2;            // [C, Dv], [C, Dk]  (backward)
  T *coef_grad, *gate_scratch;    // d_a, d_g, d_sig_last, d_c: [3 C + C * C]; [2 (C + 2)]
  T *start_grad;                  // [2, Dv, Dk] (backward with "lq"): chunk_loop.h's scratch cotangent

  Workspace(int C_, int Dk_, int Dv_, bool lq_backward) : C(C_), Dk(Dk_), Dv(Dv_) {
    const size_t CC = size_t(C) * C, sq = size_t(Dv) * Dk, CDv = size_t(C) * Dv;
    const size_t sizes[] = {size_t(C), size_t(C), size_t(C), size_t(C), size_t(C), size_t(C), CC, CC, CDv, CDv,
                            2 * sq, 2 * sq, 2 * CDv, CC, CC, CC, CDv, size_t(C) * Dk, 3 * size_t(C) + CC,
                            2 * size_t(C + 2), lq_backward ? 2 * sq : 0};
    T** const slots[] = {&theta, &eta, &alpha, &a,      &g,     &P,      &c,       &sig,      &R,        &E,
                         &state, &start, &wide, &square, &square2, &square3, &narrow, &narrow2, &coef_grad, &gate_scratch,
                         &start_grad};
    carve_buffer(sizes, slots);
  }
};

// R = K M0^T - V and E = f(R) for tokens 0..L-1 of x (L x Dv each).
template <typename T, typename Objective>
void chunk_errors(const Objective& objective, const HeadInputs<T>& x, int L, int Dk, int Dv, const T* M0, T* R,
                  T* E) {
  matmul(false, true, L, Dv, Dk, T(1), x.k.ptr, x.k.stride, M0, Dk, T(0), R, Dv);
  for (int t = 0; t < L; ++t) {
    T* r = R + t * Dv;
    const T* v = x.v.row(t);
    for (int j = 0; j < Dv; ++j) r[j] -= v[j];
    objective_error_row(objective, r, x.delta.ptr ? x.delta.row(t) : nullptr, Dv, E + t * Dv);
  }
}

// Backward of chunk_errors (step D of docs/backward_linear.md §1): dR = dE .* f'(R) in place of dE,
// then dV = -dR, dK += dR M0, dM0 += dR^T K and d delta = dE .* df/d delta.
template <typename T, typename Objective>
void chunk_errors_backward(const Objective& objective, const HeadInputs<T>& x, const HeadGrads<T>& grads, int L,
                           int Dk, int Dv, const T* M0, const T* R, T* dE, T* dM0) {
  for (int t = 0; t < L; ++t) {
    T* dr = dE + t * Dv;
    objective_error_row_backward(objective, R + t * Dv, x.delta.ptr ? x.delta.row(t) : nullptr, Dv, dr,
                                 grads.d_delta.ptr ? grads.d_delta.row(t) : nullptr);
    T* dv = grads.dv.row(t);
    for (int j = 0; j < Dv; ++j) dv[j] = -dr[j];
  }
  matmul(false, false, L, Dk, Dv, T(1), dE, Dv, M0, Dk, T(1), grads.dk.ptr, grads.dk.stride);
  matmul(true, false, Dv, Dk, L, T(1), dE, Dv, x.k.ptr, x.k.stride, T(1), dM0, Dk);
}

// O = Q M^T for tokens 0..L-1 (the chunk_start read, and the read of a kl lag token).
template <typename T>
void read_state(const HeadInputs<T>& x, int L, int Dk, int Dv, const T* M, const TokenRows<T>& O) {
  matmul(false, true, L, Dv, Dk, T(1), x.q.ptr, x.q.stride, M, Dk, T(0), O.ptr, O.stride);
}

// Backward of read_state: dQ = dO M, dM += dO^T Q.
template <typename T>
void read_state_backward(const HeadInputs<T>& x, const TokenRows<const T>& dO, const HeadGrads<T>& grads, int L,
                         int Dk, int Dv, const T* M, T* dM) {
  matmul(false, false, L, Dk, Dv, T(1), dO.ptr, dO.stride, M, Dk, T(0), grads.dq.ptr, grads.dq.stride);
  matmul(true, false, Dv, Dk, L, T(1), dO.ptr, dO.stride, x.q.ptr, x.q.stride, T(1), dM, Dk);
}

// ---- Retention "kl": Memora's lag token (token 0 of x) from MS = [M; S], in place (kl_step
// with the inner gradient e k^T, e = f(M k - v)).

template <typename T, typename Objective>
void kl_lag_step(const Objective& objective, const HeadInputs<T>& x, int Dk, int Dv, T* MS, Workspace<T>& ws) {
  chunk_errors(objective, x, 1, Dk, Dv, MS, ws.R, ws.E);
  kl_step(MS, MS + index_t(Dv) * Dk, Dv, Dk, ws.E, x.k.row(0), *x.theta.row(0), *x.eta.row(0),
          T(1) - *x.alpha.row(0));
}

// Backward of kl_lag_step. MS_prev: its input; MS1: its output; dMS: the output's cotangent,
// turned in place into the input's. Writes token 0's gradients except dq.
template <typename T, typename Objective>
void kl_lag_step_backward(const Objective& objective, const HeadInputs<T>& x, const HeadGrads<T>& grads, int Dk,
                          int Dv, const T* MS_prev, const T* MS1, T* dMS, Workspace<T>& ws) {
  const index_t state_size = index_t(Dv) * Dk;
  chunk_errors(objective, x, 1, Dk, Dv, MS_prev, ws.R, ws.E);
  T* dk = grads.dk.row(0);
  T* de = ws.narrow;  // [Dv]: cotangent of the lag token's error
  std::fill(dk, dk + Dk, T(0));
  std::fill(de, de + Dv, T(0));
  KlGateGrads<T> gate_grads;
  kl_step_backward(MS_prev, MS_prev + state_size, MS1, Dv, Dk, ws.E, x.k.row(0), *x.theta.row(0), *x.eta.row(0),
                   T(1) - *x.alpha.row(0), dMS, dMS + state_size, de, dk, gate_grads);
  *grads.dalpha.row(0) = -gate_grads.beta;
  *grads.deta.row(0) = gate_grads.eta;
  *grads.dtheta.row(0) = gate_grads.theta;
  chunk_errors_backward(objective, x, grads, 1, Dk, Dv, MS_prev, ws.R, de, dMS);
}

// ---- One chunk of L tokens (tokens 0..L-1 of x) from MS = [M0; S0]: errors, token reads (when
// token_reads) and the end state, written over MS. The retention step happened before; the
// errors and the reads see scale (chunk_loop.h): with [W0; V0] = scale.scaled = rho [M0; S0],
//   E = f(K W0^T - V),   O = diag(a) Q W0^T + diag(g) Q V0^T + rho ((Q K^T) .* c) E.

template <typename T, typename Objective>
void chunk_forward(const Objective& objective, const HeadInputs<T>& x, int L, int Dk, int Dv, bool token_reads,
                   const TokenRows<T>& O, T* MS, const ChunkScale<T>& scale, Workspace<T>& ws) {
  const index_t state_size = index_t(Dv) * Dk;
  T* M = MS;
  T* S = MS + state_size;
  load_chunk_gates(x.theta, x.eta, x.alpha, L, ws);
  chunk_errors(objective, x, L, Dk, Dv, scale.scaled, ws.R, ws.E);
  if (token_reads) {
    // [Q W0^T | Q V0^T] in one product against the stacked scaled state.
    T* QMS = ws.wide;
    matmul(false, true, L, 2 * Dv, Dk, T(1), x.q.ptr, x.q.stride, scale.scaled, Dk, T(0), QMS, 2 * Dv);
    T* W = ws.square;
    matmul(false, true, L, L, Dk, T(1), x.q.ptr, x.q.stride, x.k.ptr, x.k.stride, T(0), W, L, Triangular::kLowerC);
    causal_mask(L, W, ws.c, W);
    for (int t = 0; t < L; ++t)
      for (int j = 0; j < Dv; ++j) O.row(t)[j] = ws.a[t] * QMS[t * 2 * Dv + j] + ws.g[t] * QMS[t * 2 * Dv + Dv + j];
    matmul(false, false, L, Dv, L, scale.rho[0], W, L, ws.E, Dv, T(1), O.ptr, O.stride, Triangular::kLowerA);
  }
  // Chunk end: rows of [diag(m) E | diag(s) E] feed one product that updates M and S.
  const T* m = ws.c + (L - 1) * L;
  const T* s = ws.sig + (L - 1) * L;
  T* ES = ws.wide;
  for (int t = 0; t < L; ++t)
    for (int j = 0; j < Dv; ++j) {
      ES[t * 2 * Dv + j] = m[t] * ws.E[t * Dv + j];
      ES[t * 2 * Dv + Dv + j] = s[t] * ws.E[t * Dv + j];
    }
  const T a_L = ws.a[L - 1], g_L = ws.g[L - 1], p_L = ws.P[L - 1];
  for (index_t i = 0; i < state_size; ++i) {
    M[i] = a_L * M[i] + g_L * S[i];
    S[i] = p_L * S[i];
  }
  matmul(true, false, 2 * Dv, Dk, L, T(1), ES, 2 * Dv, x.k.ptr, x.k.stride, T(1), MS, Dk);
}

// Backward of chunk_forward: dMS, the end-state cotangent, becomes in place the start-state
// cotangent of the end-state paths; dscale accumulates the cotangents of the scaled state and
// rho from the errors and the token reads (after dMS's transform: dscale.scaled may be dMS).
// Writes the gradients of tokens 0..L-1. Steps A-E of docs/backward_linear.md §1.
template <typename T, typename Objective>
void chunk_backward(const Objective& objective, const HeadInputs<T>& x, const TokenRows<const T>& dO,
                    const HeadGrads<T>& grads, int L, int Dk, int Dv, bool token_reads, const T* MS0,
                    const ChunkScale<T>& scale, T* dMS, const ChunkScaleGrad<T>& dscale, Workspace<T>& ws) {
  const int C = ws.C;
  const index_t state_size = index_t(Dv) * Dk;
  const T* M0 = MS0;
  const T* S0 = MS0 + state_size;
  const T* W0 = scale.scaled;  // [W0; V0] = rho [M0; S0]: what the errors and the token reads see
  const T* V0 = W0 + state_size;
  T* dW0V0 = dscale.scaled;
  T* dM = dMS;
  T* dS = dMS + state_size;
  const T* Q = x.q.ptr;
  const T* K = x.k.ptr;
  const index_t qs = x.q.stride, ks = x.k.stride;
  T* d_a = ws.coef_grad;
  T* d_g = d_a + C;
  T* d_sig_last = d_g + C;
  T* d_c = d_sig_last + C;

  // A. Recompute the residuals, errors and gate tables.
  load_chunk_gates(x.theta, x.eta, x.alpha, L, ws);
  T* E = ws.E;
  chunk_errors(objective, x, L, Dk, Dv, W0, ws.R, E);
  std::fill(d_a, d_a + 3 * C + C * C, T(0));
  const T* m = ws.c + (L - 1) * L;
  const T* s = ws.sig + (L - 1) * L;

  // B. End-state paths: [X | Y] = K [dM; dS]^T, dE = diag(m) X + diag(s) Y,
  //    dK = [diag(m) E | diag(s) E] [dM; dS].
  T* XY = ws.wide;
  matmul(false, true, L, 2 * Dv, Dk, T(1), K, ks, dMS, Dk, T(0), XY, 2 * Dv);
  T* dE = ws.narrow;
  T* d_c_last = d_c + (L - 1) * L;
  for (int t = 0; t < L; ++t) {
    const T* xr = XY + t * 2 * Dv;
    const T* yr = xr + Dv;
    const T* e = E + t * Dv;
    for (int j = 0; j < Dv; ++j) dE[t * Dv + j] = m[t] * xr[j] + s[t] * yr[j];
    d_c_last[t] += dot(e, xr, Dv);
    d_sig_last[t] = dot(e, yr, Dv);
  }
  T* ES = ws.wide;  // X, Y are consumed: reuse the buffer
  for (int t = 0; t < L; ++t)
    for (int j = 0; j < Dv; ++j) {
      ES[t * 2 * Dv + j] = m[t] * E[t * Dv + j];
      ES[t * 2 * Dv + Dv + j] = s[t] * E[t * Dv + j];
    }
  matmul(false, false, L, Dk, 2 * Dv, T(1), ES, 2 * Dv, dMS, Dk, T(0), grads.dk.ptr, grads.dk.stride);
  const T a_L = ws.a[L - 1], g_L = ws.g[L - 1], p_L = ws.P[L - 1];
  d_a[L - 1] += dot(dM, M0, state_size);
  d_g[L - 1] += dot(dM, S0, state_size);
  const T d_P_last = dot(dS, S0, state_size);
  // From here dMS is the cotangent of the chunk-start state (its end-state paths).
  for (index_t i = 0; i < state_size; ++i) {
    dS[i] = g_L * dM[i] + p_L * dS[i];
    dM[i] = a_L * dM[i];
  }

  // C. Token read-out paths.
  if (token_reads) {
    const index_t dos = dO.stride;
    T* dQ = grads.dq.ptr;
    const index_t dqs = grads.dq.stride;
    // R = dO W0, U = dO V0 (L x Dk each): dQ = diag(a) R + diag(g) U, then the masked product's part.
    T* RU = ws.narrow2;
    matmul(false, false, L, Dk, Dv, T(1), dO.ptr, dos, W0, Dk, T(0), RU, Dk);
    for (int t = 0; t < L; ++t) {
      d_a[t] += dot(RU + t * Dk, Q + t * qs, Dk);
      for (int j = 0; j < Dk; ++j) dQ[t * dqs + j] = ws.a[t] * RU[t * Dk + j];
    }
    matmul(false, false, L, Dk, Dv, T(1), dO.ptr, dos, V0, Dk, T(0), RU, Dk);
    for (int t = 0; t < L; ++t) {
      d_g[t] += dot(RU + t * Dk, Q + t * qs, Dk);
      for (int j = 0; j < Dk; ++j) dQ[t * dqs + j] += ws.g[t] * RU[t * Dk + j];
    }
    // rho (Q K^T .* c) E: dE, dQ, dK and the cotangents of c and rho.
    T* G = ws.square;
    T* W = ws.square2;
    matmul(false, true, L, L, Dk, T(1), Q, qs, K, ks, T(0), G, L, Triangular::kLowerC);
    causal_mask(L, G, ws.c, W);
    dscale.rho[0] += masked_product_backward<T>(L, Dk, Dv, scale.rho[0], ws.c, G, W, {dO.ptr, dos}, {E, Dv}, {Q, qs},
                                                {K, ks}, d_c, {dE, Dv}, {dQ, dqs}, {grads.dk.ptr, grads.dk.stride},
                                                ws.square3);
    // [dW0 | dV0] += [diag(a) dO | diag(g) dO]^T Q.
    T* AG = ws.wide;
    for (int t = 0; t < L; ++t)
      for (int j = 0; j < Dv; ++j) {
        AG[t * 2 * Dv + j] = ws.a[t] * dO.row(t)[j];
        AG[t * 2 * Dv + Dv + j] = ws.g[t] * dO.row(t)[j];
      }
    matmul(true, false, 2 * Dv, Dk, L, T(1), AG, 2 * Dv, Q, qs, T(1), dW0V0, Dk);
  }

  // D. Through E = f(K W0^T - V).
  chunk_errors_backward(objective, x, grads, L, Dk, Dv, W0, ws.R, dE, dW0V0);

  // E. Gate gradients.
  chunk_gate_backward(L, ws.eta, ws.alpha, ws.a, ws.g, ws.P, ws.c, ws.sig, d_a, d_g, d_c, d_sig_last, d_P_last,
                      ws.gate_scratch, grads.dtheta.ptr, grads.deta.ptr, grads.dalpha.ptr, grads.dtheta.stride);
}

// ---- Whole sequences of one work item (a (sequence, head) pair, kernel_utils.h's Head).

// The linear memory's chunk algebra on a state MS = [M; S], for chunk_loop.h. A chunk keeps
// nothing for its backward: what it recomputes costs fewer multiply-adds per token than a state.
template <typename T, typename Objective>
struct LinearSteps {
  const Objective& objective;
  Workspace<T>& ws;
  int Dk, Dv;
  static constexpr int n_weights = 1;
  index_t weight_block, state_size, slot_size;

  LinearSteps(const LinearMemoryParams& p, const Objective& objective_, Workspace<T>& ws_)
      : objective(objective_), ws(ws_), Dk(p.dk), Dv(p.dv), weight_block(index_t(p.dv) * p.dk),
        state_size(2 * weight_block), slot_size(state_size) {}

  void lag_step(const HeadInputs<T>& x, T* MS) const { kl_lag_step(objective, x, Dk, Dv, MS, ws); }
  void lag_step_backward(const HeadInputs<T>& x, const HeadGrads<T>& grads, const T* MS_prev, const T* MS1,
                         T* dMS) const {
    kl_lag_step_backward(objective, x, grads, Dk, Dv, MS_prev, MS1, dMS, ws);
  }
  void read(const HeadInputs<T>& x, int L, const T* MS, const TokenRows<T>& O) const {
    read_state(x, L, Dk, Dv, MS, O);
  }
  void read_backward(const HeadInputs<T>& x, const TokenRows<const T>& dO, const HeadGrads<T>& grads, int L,
                     const T* MS, T* dMS) const {
    read_state_backward(x, dO, grads, L, Dk, Dv, MS, dMS);
  }
  void chunk(const HeadInputs<T>& x, int L, bool token_reads, const TokenRows<T>& O, T* MS,
             const ChunkScale<T>& scale, T* /*kept*/) const {
    chunk_forward(objective, x, L, Dk, Dv, token_reads, O, MS, scale, ws);
  }
  void chunk_backward(const HeadInputs<T>& x, const TokenRows<const T>& dO, const HeadGrads<T>& grads, int L,
                      bool token_reads, const T* MS, const ChunkScale<T>& scale, const T* /*kept*/, T* dMS,
                      const ChunkScaleGrad<T>& dscale) const {
    cpu::chunk_backward(objective, x, dO, grads, L, Dk, Dv, token_reads, MS, scale, dMS, dscale, ws);
  }
};

template <typename T>
void load_state(const void* src, index_t row, index_t state_size, T fill, T* dst) {
  if (src) std::memcpy(dst, static_cast<const T*>(src) + row * state_size, state_size * sizeof(T));
  else std::fill(dst, dst + state_size, fill);
}

template <typename T>
void store_state(const T* src, index_t row, index_t state_size, void* dst) {
  if (dst) std::memcpy(static_cast<T*>(dst) + row * state_size, src, state_size * sizeof(T));
}

template <typename T, typename Objective>
void forward_head(const LinearMemoryParams& p, const Objective& objective, const Head<T>& head, Workspace<T>& ws) {
  const index_t state_size = index_t(p.dv) * p.dk, row = head.state_row;
  T* MS = ws.state;
  load_state(p.m0_ptr, row, state_size, p.miras.retention == RetentionKind::kl ? T(1) / T(p.dk) : T(0), MS);
  load_state(p.s0_ptr, row, state_size, T(0), MS + state_size);
  forward_chunks(p, LinearSteps<T, Objective>(p, objective, ws), head,
                 head.contiguous(static_cast<T*>(p.o_ptr), p, p.dv), MS, ws.start);
  store_state(MS, row, state_size, p.m_final_ptr);
  store_state(MS + state_size, row, state_size, p.s_final_ptr);
}

template <typename T, typename Objective>
void backward_head(const LinearMemoryBwdParams& p, const Objective& objective, const Head<T>& head, Workspace<T>& ws) {
  const index_t state_size = index_t(p.dv) * p.dk, row = head.state_row;
  T* dMS = ws.state;
  load_state(p.d_m_final_ptr, row, state_size, T(0), dMS);
  load_state(p.d_s_final_ptr, row, state_size, T(0), dMS + state_size);
  backward_chunks(p, LinearSteps<T, Objective>(p, objective, ws), head, head.rows(p.d_o),
                  head_grads<T>(p, head, p.dk, p.dv), dMS, ws.start, ws.start_grad);
  store_state(dMS, row, state_size, p.dm0_ptr);
  store_state(dMS + state_size, row, state_size, p.ds0_ptr);
}

}  // namespace

template <typename T>
void linear_memory_fwd(const LinearMemoryParams& params, int64_t item_begin, int64_t item_end) {
  Workspace<T> ws(params.chunk_size, params.dk, params.dv, false);
  dispatch_objective<T>(params.miras, [&](const auto& objective) {
    for (int64_t item = item_begin; item < item_end; ++item)
      forward_head<T>(params, objective, Head<T>(params, item, params.dv), ws);
  });
}

template <typename T>
void linear_memory_bwd(const LinearMemoryBwdParams& params, int64_t item_begin, int64_t item_end) {
  Workspace<T> ws(params.chunk_size, params.dk, params.dv, params.miras.retention == RetentionKind::lq);
  dispatch_objective<T>(params.miras, [&](const auto& objective) {
    for (int64_t item = item_begin; item < item_end; ++item)
      backward_head<T>(params, objective, Head<T>(params, item, params.dv), ws);
  });
}

template void linear_memory_fwd<float>(const LinearMemoryParams&, int64_t, int64_t);
template void linear_memory_fwd<double>(const LinearMemoryParams&, int64_t, int64_t);
template void linear_memory_bwd<float>(const LinearMemoryBwdParams&, int64_t, int64_t);
template void linear_memory_bwd<double>(const LinearMemoryBwdParams&, int64_t, int64_t);

}  // namespace titans::cpu
