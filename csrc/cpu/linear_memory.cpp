// CPU kernels of the linear memory: the chunk algebra of shared/design/README.md §2 (forward)
// and backward_linear.md (backward), one (batch, head) sequence at a time.
//
// Per chunk of L tokens with chunk-start state (M0, S0), both Dv x Dk, kept together as one
// [2, Dv, Dk] block "MS" so that one product updates both:
//   E   = 2 (K M0^T - V)                                   errors at the chunk-start memory
//   O   = diag(a) Q M0^T + diag(g) Q S0^T + ((Q K^T) .* c) E        (read "token")
//   O   = Q M0^T                                                    (read "chunk_start")
//   M_L = a_L M0 + g_L S0 + (diag(m) E)^T K,  S_L = p S0 + (diag(s) E)^T K
// with m, s the last rows of the gate tables c, sig (chunk_gates.h).
#include "cpu/linear_memory.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/chunk_gates.h"
#include "cpu/kernel_utils.h"
#include "cpu/matmul.h"

namespace titans::cpu {
namespace {

// One (batch, head) sequence: its index and the first rows of its q, k, v.
template <typename T>
struct HeadInputs {
  int b, h;
  index_t bh;
  const T *q, *k, *v;

  HeadInputs(const LinearMemoryParams& p, int b_, int h_)
      : b(b_), h(h_), bh(index_t(b_) * p.heads + h_), q(head_rows<T>(p.q, b_, h_)), k(head_rows<T>(p.k, b_, h_)),
        v(head_rows<T>(p.v, b_, h_)) {}
};

// dst = the bh-th [n] block of a contiguous state tensor, or zeros when there is none.
template <typename T>
void load_state(const void* src, index_t bh, index_t n, T* dst) {
  if (src) std::memcpy(dst, static_cast<const T*>(src) + bh * n, n * sizeof(T));
  else std::fill(dst, dst + n, T(0));
}

// Per-thread scratch, sized once per kernel call for chunks of up to C tokens.
template <typename T>
struct Workspace {
  int C, Dk, Dv;
  std::vector<T> buffer;
  T *theta, *eta, *alpha;         // [C] gates of the chunk
  T *a, *g, *P, *c, *sig;         // gate tables: [C] x 3, [C * C] x 2
  T *E, *state, *state_grad;      // [C, Dv], [2, Dv, Dk], [2, Dv, Dk]
  T *wide, *square, *square2;     // [C, 2 Dv], [C, C], [C, C]
  T *narrow, *narrow2;            // [C, Dv], [C, Dk]  (backward)
  T *coef_grad, *gate_scratch;    // d_a, d_g, d_sig_last, d_c: [3 C + C * C]; [2 (C + 2)]

  Workspace(int C_, int Dk_, int Dv_) : C(C_), Dk(Dk_), Dv(Dv_) {
    const size_t CC = size_t(C) * C, sq = size_t(Dv) * Dk;
    const size_t sizes[] = {size_t(C), size_t(C), size_t(C), size_t(C), size_t(C), size_t(C), CC, CC,
                            size_t(C) * Dv, 2 * sq, 2 * sq, size_t(C) * 2 * Dv, CC, CC,
                            size_t(C) * Dv, size_t(C) * Dk, 3 * size_t(C) + CC, 2 * size_t(C + 2)};
    T** const slots[] = {&theta, &eta, &alpha, &a, &g, &P, &c, &sig, &E, &state, &state_grad,
                   &wide, &square, &square2, &narrow, &narrow2, &coef_grad, &gate_scratch};
    carve_buffer(buffer, sizes, slots);
  }
};

// E = 2 (K M0^T - V), L x Dv.
template <typename T>
void chunk_errors(int L, int Dk, int Dv, const T* K, index_t k_stride, const T* V, index_t v_stride, const T* M0,
                  T* E) {
  matmul(false, true, L, Dv, Dk, T(2), K, k_stride, M0, Dk, T(0), E, Dv);
  for (int t = 0; t < L; ++t)
    for (int j = 0; j < Dv; ++j) E[t * Dv + j] -= T(2) * V[t * v_stride + j];
}

template <typename T>
void forward_head(const LinearMemoryParams& p, const HeadInputs<T>& head, Workspace<T>& ws) {
  const int C = p.chunk_size, Dk = p.dk, Dv = p.dv, T_len = p.seqlen;
  const int b = head.b, h = head.h;
  const index_t state_size = index_t(Dv) * Dk, bh = head.bh;
  const index_t o_stride = index_t(p.heads) * Dv;
  T* o = static_cast<T*>(p.o_ptr) + (index_t(b) * T_len * p.heads + h) * Dv;

  T* MS = ws.state;
  T* M = MS;
  T* S = MS + state_size;
  load_state(p.m0_ptr, bh, state_size, M);
  load_state(p.s0_ptr, bh, state_size, S);

  for (int n = 0; n < p.n_chunks; ++n) {
    const int t0 = n * C, L = std::min(C, T_len - t0);
    if (p.chunk_states_ptr) {
      T* saved = static_cast<T*>(p.chunk_states_ptr) + (bh * p.n_chunks + n) * 2 * state_size;
      std::memcpy(saved, MS, 2 * state_size * sizeof(T));
    }
    load_chunk_gates(p, b, h, t0, L, ws);
    const T* Q = head.q + t0 * p.q.seq_stride;
    const T* K = head.k + t0 * p.k.seq_stride;
    const T* V = head.v + t0 * p.v.seq_stride;
    T* O = o + t0 * o_stride;
    chunk_errors(L, Dk, Dv, K, p.k.seq_stride, V, p.v.seq_stride, M, ws.E);

    if (p.read_token) {
      // [Q M0^T | Q S0^T] in one product against the stacked state.
      T* QMS = ws.wide;
      matmul(false, true, L, 2 * Dv, Dk, T(1), Q, p.q.seq_stride, MS, Dk, T(0), QMS, 2 * Dv);
      T* W = ws.square;
      matmul(false, true, L, L, Dk, T(1), Q, p.q.seq_stride, K, p.k.seq_stride, T(0), W, L);
      for (int i = 0; i < L * L; ++i) W[i] *= ws.c[i];
      for (int t = 0; t < L; ++t)
        for (int j = 0; j < Dv; ++j)
          O[t * o_stride + j] = ws.a[t] * QMS[t * 2 * Dv + j] + ws.g[t] * QMS[t * 2 * Dv + Dv + j];
      matmul(false, false, L, Dv, L, T(1), W, L, ws.E, Dv, T(1), O, o_stride);
    } else {
      matmul(false, true, L, Dv, Dk, T(1), Q, p.q.seq_stride, M, Dk, T(0), O, o_stride);
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
    matmul(true, false, 2 * Dv, Dk, L, T(1), ES, 2 * Dv, K, p.k.seq_stride, T(1), MS, Dk);
  }
  if (p.m_final_ptr) std::memcpy(static_cast<T*>(p.m_final_ptr) + bh * state_size, M, state_size * sizeof(T));
  if (p.s_final_ptr) std::memcpy(static_cast<T*>(p.s_final_ptr) + bh * state_size, S, state_size * sizeof(T));
}

// Reverse pass over the chunks of one (batch, head), carrying the state cotangent
// (dM, dS) = dMS. Steps A-E refer to backward_linear.md §1.
template <typename T>
void backward_head(const LinearMemoryBwdParams& p, const HeadInputs<T>& head, Workspace<T>& ws) {
  const int C = p.chunk_size, Dk = p.dk, Dv = p.dv, T_len = p.seqlen;
  const int b = head.b, h = head.h;
  const index_t state_size = index_t(Dv) * Dk, bh = head.bh;
  const T* d_o = head_rows<T>(p.d_o, b, h);
  const index_t qk_stride = index_t(p.heads) * Dk, v_stride = index_t(p.heads) * Dv;
  const index_t gate_offset = index_t(b) * T_len * p.heads + h;
  T* dq = static_cast<T*>(p.dq_ptr) + gate_offset * Dk;
  T* dk = static_cast<T*>(p.dk_ptr) + gate_offset * Dk;
  T* dv = static_cast<T*>(p.dv_ptr) + gate_offset * Dv;
  T* dtheta = static_cast<T*>(p.dtheta_ptr) + gate_offset;
  T* deta = static_cast<T*>(p.deta_ptr) + gate_offset;
  T* dalpha = static_cast<T*>(p.dalpha_ptr) + gate_offset;

  T* dMS = ws.state;  // cotangent of the current chunk's end state
  T* dMS0 = ws.state_grad;  // cotangent of its start state, built during the step
  load_state(p.d_m_final_ptr, bh, state_size, dMS);
  load_state(p.d_s_final_ptr, bh, state_size, dMS + state_size);

  T* d_a = ws.coef_grad;
  T* d_g = d_a + C;
  T* d_sig_last = d_g + C;
  T* d_c = d_sig_last + C;

  for (int n = p.n_chunks - 1; n >= 0; --n) {
    const int t0 = n * C, L = std::min(C, T_len - t0);
    const T* MS0 = static_cast<const T*>(p.chunk_states_ptr) + (bh * p.n_chunks + n) * 2 * state_size;
    const T* M0 = MS0;
    const T* S0 = MS0 + state_size;
    const T* dM = dMS;
    const T* dS = dMS + state_size;
    const T* Q = head.q + t0 * p.q.seq_stride;
    const T* K = head.k + t0 * p.k.seq_stride;
    const T* V = head.v + t0 * p.v.seq_stride;
    const T* dO = d_o + t0 * p.d_o.seq_stride;
    const index_t dos = p.d_o.seq_stride;
    T* dQ = dq + t0 * qk_stride;
    T* dK = dk + t0 * qk_stride;
    T* dV = dv + t0 * v_stride;

    // A. Recompute the errors and gate tables.
    load_chunk_gates(p, b, h, t0, L, ws);
    T* E = ws.E;
    chunk_errors(L, Dk, Dv, K, p.k.seq_stride, V, p.v.seq_stride, M0, E);
    std::fill(d_a, d_a + 3 * C + C * C, T(0));
    const T* m = ws.c + (L - 1) * L;
    const T* s = ws.sig + (L - 1) * L;

    // B. End-state paths: [X | Y] = K [dM; dS]^T, dE = diag(m) X + diag(s) Y,
    //    dK = [diag(m) E | diag(s) E] [dM; dS].
    T* XY = ws.wide;
    matmul(false, true, L, 2 * Dv, Dk, T(1), K, p.k.seq_stride, dMS, Dk, T(0), XY, 2 * Dv);
    T* dE = ws.narrow;
    T* d_c_last = d_c + (L - 1) * L;
    for (int t = 0; t < L; ++t) {
      const T* x = XY + t * 2 * Dv;
      const T* y = x + Dv;
      const T* e = E + t * Dv;
      for (int j = 0; j < Dv; ++j) dE[t * Dv + j] = m[t] * x[j] + s[t] * y[j];
      d_c_last[t] += dot(e, x, Dv);
      d_sig_last[t] = dot(e, y, Dv);
    }
    T* ES = ws.wide;  // X, Y are consumed: reuse the buffer
    for (int t = 0; t < L; ++t)
      for (int j = 0; j < Dv; ++j) {
        ES[t * 2 * Dv + j] = m[t] * E[t * Dv + j];
        ES[t * 2 * Dv + Dv + j] = s[t] * E[t * Dv + j];
      }
    matmul(false, false, L, Dk, 2 * Dv, T(1), ES, 2 * Dv, dMS, Dk, T(0), dK, qk_stride);
    const T a_L = ws.a[L - 1], g_L = ws.g[L - 1], p_L = ws.P[L - 1];
    d_a[L - 1] += dot(dM, M0, int(state_size));
    d_g[L - 1] += dot(dM, S0, int(state_size));
    const T d_P_last = dot(dS, S0, int(state_size));
    for (index_t i = 0; i < state_size; ++i) {
      dMS0[i] = a_L * dM[i];
      dMS0[state_size + i] = g_L * dM[i] + p_L * dS[i];
    }

    // C. Read-out paths.
    if (p.read_token) {
      T* G = ws.square;
      T* dW = ws.square2;
      matmul(false, true, L, L, Dk, T(1), Q, p.q.seq_stride, K, p.k.seq_stride, T(0), G, L);
      matmul(false, true, L, L, Dv, T(1), dO, dos, E, Dv, T(0), dW, L);
      // In place: d_c takes dW .* G first, then G becomes W = G .* c and dW becomes dG = dW .* c.
      for (int t = 0; t < L; ++t)
        for (int i = 0; i < L; ++i) {
          const int ti = t * L + i;
          if (i > t) {  // the read is causal: upper triangles of W and dG are zero
            dW[ti] = G[ti] = T(0);
            continue;
          }
          d_c[ti] += dW[ti] * G[ti];
          G[ti] *= ws.c[ti];
          dW[ti] *= ws.c[ti];
        }
      matmul(true, false, L, Dv, L, T(1), G, L, dO, dos, T(1), dE, Dv);  // dE += W^T dO
      // R = dO M0, U = dO S0 (L x Dk each), then dQ = diag(a) R + diag(g) U + dG K.
      T* R = ws.narrow2;
      matmul(false, false, L, Dk, Dv, T(1), dO, dos, M0, Dk, T(0), R, Dk);
      for (int t = 0; t < L; ++t) {
        d_a[t] += dot(R + t * Dk, Q + t * p.q.seq_stride, Dk);
        for (int j = 0; j < Dk; ++j) dQ[t * qk_stride + j] = ws.a[t] * R[t * Dk + j];
      }
      matmul(false, false, L, Dk, Dv, T(1), dO, dos, S0, Dk, T(0), R, Dk);
      for (int t = 0; t < L; ++t) {
        d_g[t] += dot(R + t * Dk, Q + t * p.q.seq_stride, Dk);
        for (int j = 0; j < Dk; ++j) dQ[t * qk_stride + j] += ws.g[t] * R[t * Dk + j];
      }
      matmul(false, false, L, Dk, L, T(1), dW, L, K, p.k.seq_stride, T(1), dQ, qk_stride);
      matmul(true, false, L, Dk, L, T(1), dW, L, Q, p.q.seq_stride, T(1), dK, qk_stride);
      // [dM0 | dS0] += [diag(a) dO | diag(g) dO]^T Q.
      T* AG = ws.wide;
      for (int t = 0; t < L; ++t)
        for (int j = 0; j < Dv; ++j) {
          AG[t * 2 * Dv + j] = ws.a[t] * dO[t * dos + j];
          AG[t * 2 * Dv + Dv + j] = ws.g[t] * dO[t * dos + j];
        }
      matmul(true, false, 2 * Dv, Dk, L, T(1), AG, 2 * Dv, Q, p.q.seq_stride, T(1), dMS0, Dk);
    } else {
      matmul(false, false, L, Dk, Dv, T(1), dO, dos, M0, Dk, T(0), dQ, qk_stride);
      matmul(true, false, Dv, Dk, L, T(1), dO, dos, Q, p.q.seq_stride, T(1), dMS0, Dk);
    }

    // D. Through E = 2 (K M0^T - V).
    for (int t = 0; t < L; ++t)
      for (int j = 0; j < Dv; ++j) dV[t * v_stride + j] = T(-2) * dE[t * Dv + j];
    matmul(false, false, L, Dk, Dv, T(2), dE, Dv, M0, Dk, T(1), dK, qk_stride);
    matmul(true, false, Dv, Dk, L, T(2), dE, Dv, K, p.k.seq_stride, T(1), dMS0, Dk);

    // E. Gate gradients.
    const index_t gate_at = index_t(t0) * p.heads;
    chunk_gate_backward(L, ws.eta, ws.alpha, ws.a, ws.g, ws.P, ws.c, ws.sig, d_a, d_g, d_c, d_sig_last, d_P_last,
                        ws.gate_scratch, dtheta + gate_at, deta + gate_at, dalpha + gate_at, index_t(p.heads));
    std::swap(dMS, dMS0);
  }
  std::memcpy(static_cast<T*>(p.dm0_ptr) + bh * state_size, dMS, state_size * sizeof(T));
  std::memcpy(static_cast<T*>(p.ds0_ptr) + bh * state_size, dMS + state_size, state_size * sizeof(T));
}

}  // namespace

template <typename T>
void linear_memory_fwd(const LinearMemoryParams& params, int64_t bh_begin, int64_t bh_end) {
  Workspace<T> ws(params.chunk_size, params.dk, params.dv);
  for (int64_t bh = bh_begin; bh < bh_end; ++bh)
    forward_head<T>(params, HeadInputs<T>(params, int(bh / params.heads), int(bh % params.heads)), ws);
}

template <typename T>
void linear_memory_bwd(const LinearMemoryBwdParams& params, int64_t bh_begin, int64_t bh_end) {
  Workspace<T> ws(params.chunk_size, params.dk, params.dv);
  for (int64_t bh = bh_begin; bh < bh_end; ++bh)
    backward_head<T>(params, HeadInputs<T>(params, int(bh / params.heads), int(bh % params.heads)), ws);
}

template void linear_memory_fwd<float>(const LinearMemoryParams&, int64_t, int64_t);
template void linear_memory_fwd<double>(const LinearMemoryParams&, int64_t, int64_t);
template void linear_memory_bwd<float>(const LinearMemoryBwdParams&, int64_t, int64_t);
template void linear_memory_bwd<double>(const LinearMemoryBwdParams&, int64_t, int64_t);

}  // namespace titans::cpu
