// Tensor -> params-struct helpers shared by the CPU and CUDA bindings (g++ only: includes ATen).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "titans_params.h"

namespace titans {

// Kernels index every per-token tensor by (batch, seq, head) strides and read the feature
// dimension contiguously; other layouts (e.g. slices of a larger buffer) are kept as views.
inline at::Tensor with_unit_inner_stride(const at::Tensor& x) {
  return x.size(-1) <= 1 || x.stride(-1) == 1 ? x : x.contiguous();
}

// A [B, T, H, D] or [B, T, H] tensor as the kernels see it.
inline TokenTensor token_tensor(const at::Tensor& x) {
  TokenTensor t;
  t.ptr = const_cast<void*>(x.data_ptr());
  t.batch_stride = x.stride(0);
  t.seq_stride = x.stride(1);
  t.head_stride = x.stride(2);
  return t;
}

inline void check_state(const char* name, const std::optional<at::Tensor>& x, int64_t B, int64_t H, int64_t Dv,
                        int64_t Dk, const at::Device& device) {
  if (!x) return;
  TORCH_CHECK(x->dim() == 4 && x->size(0) == B && x->size(1) == H && x->size(2) == Dv && x->size(3) == Dk, name,
              " must have shape [B, H, Dv, Dk] = [", B, ", ", H, ", ", Dv, ", ", Dk, "], got ", x->sizes());
  TORCH_CHECK(x->device() == device, name, " must be on ", device, ", got ", x->device());
}

inline void check_linear_memory_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& theta, const at::Tensor& eta, const at::Tensor& alpha,
                                     const std::optional<at::Tensor>& m, const std::optional<at::Tensor>& s,
                                     int64_t chunk_size) {
  TORCH_CHECK(q.dim() == 4, "q must be [B, T, H, Dk], got ", q.sizes());
  const auto B = q.size(0), T = q.size(1), H = q.size(2), Dk = q.size(3);
  TORCH_CHECK(k.sizes() == q.sizes(), "k must have the shape of q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.dim() == 4 && v.size(0) == B && v.size(1) == T && v.size(2) == H,
              "v must be [B, T, H, Dv] with B, T, H of q, got ", v.sizes());
  for (const auto* g : {&theta, &eta, &alpha})
    TORCH_CHECK(g->dim() == 3 && g->size(0) == B && g->size(1) == T && g->size(2) == H,
                "gates must be [B, T, H] = [", B, ", ", T, ", ", H, "], got ", g->sizes());
  for (const auto* x : {&k, &v, &theta, &eta, &alpha})
    TORCH_CHECK(x->device() == q.device(), "all inputs must be on the device of q (", q.device(), ")");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "q, k, v must have one dtype");
  TORCH_CHECK(chunk_size >= 1, "chunk_size must be >= 1, got ", chunk_size);
  check_state("initial or final state", m, B, H, v.size(3), Dk, q.device());
  check_state("initial or final state", s, B, H, v.size(3), Dk, q.device());
}

// Sizes and input pointers; outputs are set by the caller. States must be contiguous.
inline LinearMemoryParams linear_memory_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& theta, const at::Tensor& eta,
                                               const at::Tensor& alpha, const std::optional<at::Tensor>& m0,
                                               const std::optional<at::Tensor>& s0, int64_t chunk_size,
                                               bool read_token) {
  LinearMemoryParams p;
  p.batch = int(q.size(0));
  p.seqlen = int(q.size(1));
  p.heads = int(q.size(2));
  p.dk = int(q.size(3));
  p.dv = int(v.size(3));
  p.chunk_size = int(chunk_size);
  p.n_chunks = int((p.seqlen + chunk_size - 1) / chunk_size);
  p.read_token = read_token;
  p.q = token_tensor(q);
  p.k = token_tensor(k);
  p.v = token_tensor(v);
  p.theta = token_tensor(theta);
  p.eta = token_tensor(eta);
  p.alpha = token_tensor(alpha);
  p.m0_ptr = m0 ? m0->data_ptr() : nullptr;
  p.s0_ptr = s0 ? s0->data_ptr() : nullptr;
  return p;
}

}  // namespace titans
