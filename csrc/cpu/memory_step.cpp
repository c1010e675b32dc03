// CPU kernels of the decode step: one token of the linear memory and of the MLP memory per (batch,
// head), O(state) work, with every MIRAS objective and retention (docs/miras.md §2). The semantics
// are those of the chunked ops at the token's position in its chunk (step_params.h):
//   at a chunk start   rho = lq_scale(A) (lq; else 1), the chunk-start weights W0 = rho A (the memory
//                      itself but for lq) and the chunk_start read weights R0 = W0;
//   every token        e = f(W0(k) - v) at W0 (backpropagated through the MLP to both weights), per
//                      weight  S' = eta S - theta u,  W' = (1 - alpha) W + S';
//                      o = the memory at the weights rho W' (read "token") or R0 (read "chunk_start");
//   kl, chunk start    W' = rowsoftmax((1 - alpha) log max(W, floor) + S') instead (the lag token),
//                      and the chunk-start weights become W' (R0 stays the memory before it).
// The states come in through one set of pointers and go out through another; the in-place step
// (titans_ext::linear_memory_step_) passes the same pointer for both, so every output element is
// written after its input element is read, and a chunk-start state kept in place is not copied.
#include "cpu/memory_step.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/activation.h"
#include "cpu/isa_kernels.h"
#include "cpu/kernel_utils.h"
#include "cpu/miras_rows.h"
#include "objectives.h"

namespace titans::cpu {
namespace {

template <typename T>
const T* head_vector(const HeadTensor& x, index_t b, index_t h) {
  return static_cast<const T*>(x.ptr) + b * x.batch_stride + h * x.head_stride;
}

template <typename T>
T head_scalar(const HeadTensor& x, index_t b, index_t h) {
  return *head_vector<T>(x, b, h);
}

// Whether batch row b's token starts a chunk.
inline bool starts_chunk(const StepParams& p, const void* chunk_state, index_t b) {
  return !chunk_state || p.position_ptr[b * p.position_stride] % p.chunk_size == 0;
}

// One weight matrix of one head in a step: where its states come from and go to (each pointer at
// this head's block; null inputs as in step_params.h).
template <typename T>
struct StepWeight {
  index_t rows, cols;
  const T* w;  // running weights (null: w_default everywhere)
  const T* s;  // running momentum (null: zeros)
  T w_default;
  const T* chunk_w;     // chunk-start weights (null: start a chunk)
  const T* chunk_read;  // chunk_start read weights (null: they are chunk_w)
  T* w_out;
  T* s_out;
  T* chunk_w_out;     // null with mid_chunk (then the token does not start a chunk)
  T* chunk_read_out;  // null unless read "chunk_start" with kl, and with mid_chunk

  index_t size() const { return rows * cols; }

  // Writes the chunk-start state after the token but the kl lag token's weights (written by
  // update) and returns its scale: from the running state at a chunk start, else a copy of the
  // given one (none with mid_chunk). From here on the chunk's weights are weights() and its read
  // weights read().
  T begin(bool start, const MirasParams& miras, const T* scale_in) const {
    if (!start) {
      copy(chunk_w, chunk_w_out);
      copy(chunk_read, chunk_read_out);
      return *scale_in;
    }
    if (w) std::memcpy(chunk_w_out, w, size() * sizeof(T));
    else std::fill(chunk_w_out, chunk_w_out + size(), w_default);
    const T rho = miras.retention == RetentionKind::lq ? lq_scale(chunk_w_out, size(), T(miras.q)) : T(1);
    if (rho != T(1))
      for (index_t i = 0; i < size(); ++i) chunk_w_out[i] *= rho;
    if (chunk_read_out) std::memcpy(chunk_read_out, chunk_w_out, size() * sizeof(T));
    return rho;
  }

  const T* weights() const { return chunk_w_out ? chunk_w_out : chunk_w; }
  const T* read() const {
    if (chunk_read_out) return chunk_read_out;
    return chunk_w_out ? chunk_w_out : chunk_read ? chunk_read : chunk_w;
  }

  // The token's update with the inner gradient u = x y^T (x: rows, y: cols); lag: the kl lag token.
  // With read_vec given, also read_out [rows] = read_scale W' read_vec (the read of the new weights).
  void update(const T* x, const T* y, T theta, T eta, T alpha, bool lag, const T* read_vec, T read_scale,
              T* read_out) const {
    const T beta = T(1) - alpha;
    const StepKernels<T>& kernels = isa_kernels().step<T>();
    if (lag) {
      load(w, w_default, w_out);
      load(s, T(0), s_out);
      kl_step(w_out, s_out, int(rows), int(cols), x, y, theta, eta, beta);
      std::memcpy(chunk_w_out, w_out, size() * sizeof(T));
      if (read_vec) kernels.matvec(w_out, rows, cols, read_vec, read_scale, read_out);
      return;
    }
    kernels.update({rows, cols, w, s, w_default, x, y, theta, eta, beta, w_out, s_out, read_vec, read_scale, read_out});
  }

 private:
  // dst = src unless absent or in place.
  void copy(const T* src, T* dst) const {
    if (dst && dst != src) std::memcpy(dst, src, size() * sizeof(T));
  }
  void load(const T* src, T fill, T* dst) const {
    if (src) copy(src, dst);
    else std::fill(dst, dst + size(), fill);
  }
};

// out [rows] = scale * W x for W [rows, cols].
template <typename T>
void matvec(const T* W, index_t rows, index_t cols, const T* x, T scale, T* out) {
  isa_kernels().step<T>().matvec(W, rows, cols, x, scale, out);
}

template <typename T>
const T* at_head(const void* base, index_t bh, index_t size) {
  return base ? static_cast<const T*>(base) + bh * size : nullptr;
}

template <typename T>
T* at_head(void* base, index_t bh, index_t size) {
  return base ? static_cast<T*>(base) + bh * size : nullptr;
}

template <typename T, typename Objective>
void linear_step_head(const LinearMemoryStepParams& p, const Objective& objective, index_t bh, std::vector<T>& e) {
  const index_t b = bh / p.heads, h = bh % p.heads, n = index_t(p.dv) * p.dk;
  const T* q = head_vector<T>(p.q, b, h);
  const T* k = head_vector<T>(p.k, b, h);
  const T* v = head_vector<T>(p.v, b, h);
  const T* delta = at_head<T>(p.miras.delta_ptr, bh, p.dv);
  const T theta = head_scalar<T>(p.theta, b, h), eta = head_scalar<T>(p.eta, b, h), alpha = head_scalar<T>(p.alpha, b, h);
  const bool kl = p.miras.retention == RetentionKind::kl;
  const StepWeight<T> m{p.dv, p.dk,
                        at_head<T>(p.m_ptr, bh, n), at_head<T>(p.s_ptr, bh, n),
                        kl ? T(1) / T(p.dk) : T(0),
                        at_head<T>(p.chunk_weights_ptr, bh, n), at_head<T>(p.chunk_read_ptr, bh, n),
                        at_head<T>(p.m_out_ptr, bh, n), at_head<T>(p.s_out_ptr, bh, n),
                        at_head<T>(p.chunk_weights_out_ptr, bh, n), at_head<T>(p.chunk_read_out_ptr, bh, n)};
  const bool start = starts_chunk(p, p.chunk_weights_ptr, b);
  const T rho = m.begin(start, p.miras, at_head<T>(p.chunk_scale_ptr, bh, 1));
  if (p.chunk_scale_out_ptr) static_cast<T*>(p.chunk_scale_out_ptr)[bh] = rho;

  // e = f(W0 k - v), at the chunk-start weights.
  matvec(m.weights(), p.dv, p.dk, k, T(1), e.data());
  for (int j = 0; j < p.dv; ++j) e[j] -= v[j];
  objective_error_row(objective, e.data(), delta, p.dv, e.data());
  T* o = static_cast<T*>(p.o_ptr) + bh * p.dv;
  m.update(e.data(), k, theta, eta, alpha, kl && start, p.read_token ? q : nullptr, rho, o);
  if (!p.read_token) matvec(m.read(), p.dv, p.dk, q, T(1), o);
}

// Scratch of one head's MLP step: the hidden vectors of the key and query paths and the output-side
// residual.
template <typename T>
struct MlpStepScratch {
  std::vector<T> z_act, z_slope, dz, zq, r;
  MlpStepScratch(int D, int N) : z_act(N), z_slope(N), dz(N), zq(N), r(D) {}
};

template <typename T, typename Objective>
void mlp_step_head(const MlpMemoryStepParams& p, const Objective& objective, index_t bh, MlpStepScratch<T>& ws) {
  const int D = p.dim, N = p.hidden;
  const index_t b = bh / p.heads, h = bh % p.heads, n = index_t(N) * D;
  const T* q = head_vector<T>(p.q, b, h);
  const T* k = head_vector<T>(p.k, b, h);
  const T* v = head_vector<T>(p.v, b, h);
  const T* delta = at_head<T>(p.miras.delta_ptr, bh, D);
  const T theta = head_scalar<T>(p.theta, b, h), eta = head_scalar<T>(p.eta, b, h), alpha = head_scalar<T>(p.alpha, b, h);
  const bool kl = p.miras.retention == RetentionKind::kl;
  const auto weight = [&](int rows, int cols, const void* w, const void* s, const void* chunk_w, const void* chunk_read,
                          void* w_out, void* s_out, void* chunk_w_out, void* chunk_read_out) {
    // A kl weight needs a positive entry per row; the MLP op has no default weights.
    return StepWeight<T>{rows, cols, at_head<T>(w, bh, n), at_head<T>(s, bh, n), T(0),
                         at_head<T>(chunk_w, bh, n), at_head<T>(chunk_read, bh, n), at_head<T>(w_out, bh, n),
                         at_head<T>(s_out, bh, n), at_head<T>(chunk_w_out, bh, n), at_head<T>(chunk_read_out, bh, n)};
  };
  const StepWeight<T> w1 = weight(N, D, p.w1_ptr, p.s1_ptr, p.chunk_w1_ptr, p.chunk_read_w1_ptr, p.w1_out_ptr,
                                  p.s1_out_ptr, p.chunk_w1_out_ptr, p.chunk_read_w1_out_ptr);
  const StepWeight<T> w2 = weight(D, N, p.w2_ptr, p.s2_ptr, p.chunk_w2_ptr, p.chunk_read_w2_ptr, p.w2_out_ptr,
                                  p.s2_out_ptr, p.chunk_w2_out_ptr, p.chunk_read_w2_out_ptr);
  const bool start = starts_chunk(p, p.chunk_w1_ptr, b);
  const T* scale_in = at_head<T>(p.chunk_scale_ptr, bh, 2);
  const T rho1 = w1.begin(start, p.miras, scale_in);
  const T rho2 = w2.begin(start, p.miras, scale_in ? scale_in + 1 : nullptr);
  if (p.chunk_scale_out_ptr) {
    T* scale_out = static_cast<T*>(p.chunk_scale_out_ptr) + bh * 2;
    scale_out[0] = rho1, scale_out[1] = rho2;
  }

  // Key path at the chunk-start weights: z = W1 k, h = act(z), r = k + W2 h - v, e = f(r),
  // dz = (W2^T e) .* act'(z); the inner gradients are u1 = dz k^T and u2 = e h^T.
  T* hidden = ws.z_act.data();
  T* e = ws.r.data();
  matvec(w1.weights(), N, D, k, T(1), hidden);
  // The activations of the chunked CPU op (cpu/activation.h), vectorized, in place.
  activation(p.activation, N, hidden, hidden, ws.z_slope.data(), static_cast<T*>(nullptr));
  matvec(w2.weights(), D, N, hidden, T(1), e);
  for (int j = 0; j < D; ++j) e[j] += k[j] - v[j];
  objective_error_row(objective, e, delta, D, e);
  isa_kernels().step<T>().matvec_transposed(w2.weights(), D, N, e, ws.z_slope.data(), ws.dz.data());

  // The read o = q + rho2 W2 act(rho1 W1 q): of the new weights (read "token") as the updates write
  // them, else of the chunk_start read weights.
  T* o = static_cast<T*>(p.o_ptr) + bh * D;
  T* hidden_q = ws.zq.data();
  const bool lag = kl && start;
  const T* read_q = p.read_token ? q : nullptr;
  w1.update(ws.dz.data(), k, theta, eta, alpha, lag, read_q, rho1, hidden_q);
  if (!p.read_token) matvec(w1.read(), N, D, q, T(1), hidden_q);
  activation(p.activation, N, hidden_q, hidden_q, static_cast<T*>(nullptr), static_cast<T*>(nullptr));
  w2.update(e, hidden, theta, eta, alpha, lag, p.read_token ? hidden_q : nullptr, rho2, o);
  if (!p.read_token) matvec(w2.read(), D, N, hidden_q, T(1), o);
  for (int j = 0; j < D; ++j) o[j] += q[j];
}

}  // namespace

template <typename T>
void linear_memory_step(const LinearMemoryStepParams& params, int64_t bh_begin, int64_t bh_end) {
  std::vector<T> e(params.dv);
  dispatch_objective<T>(params.miras, [&](const auto& objective) {
    for (int64_t bh = bh_begin; bh < bh_end; ++bh) linear_step_head<T>(params, objective, bh, e);
  });
}

template <typename T>
void mlp_memory_step(const MlpMemoryStepParams& params, int64_t bh_begin, int64_t bh_end) {
  MlpStepScratch<T> ws(params.dim, params.hidden);
  dispatch_objective<T>(params.miras, [&](const auto& objective) {
    for (int64_t bh = bh_begin; bh < bh_end; ++bh) mlp_step_head<T>(params, objective, bh, ws);
  });
}

template void linear_memory_step<float>(const LinearMemoryStepParams&, int64_t, int64_t);
template void linear_memory_step<double>(const LinearMemoryStepParams&, int64_t, int64_t);
template void mlp_memory_step<float>(const MlpMemoryStepParams&, int64_t, int64_t);
template void mlp_memory_step<double>(const MlpMemoryStepParams&, int64_t, int64_t);

}  // namespace titans::cpu
