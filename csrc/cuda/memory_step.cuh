// CUDA decode-step kernels of the linear and the MLP memory, written only against the device layer
// (device/device.h), so the emulation runs this exact source in CI. Included by exactly one TU per
// build. Semantics: step_params.h and csrc/cpu/memory_step.cpp, whose CPU kernels compute the same.
//
// One block per (head, batch) does the whole token in one launch: it reads the running and the
// chunk-start state once or twice from global memory (no staging: each element is used by one
// thread per pass) and writes the states after the token. The token's vectors (q, k, v, errors,
// hidden activations) sit in shared memory. Rows of the weight matrices go to warps (lanes over the
// row's columns, a warp sum per row product); the decision whether the token starts a chunk is read
// from the position on the device, so the launch is the same at every token (a CUDA graph replays it).
//   linear:  [lq at a chunk start: rho = ||A||_q^(2-q), a block sum]
//            r = W0 k - v                                   warp per row of W0
//            e = f(r)                                      (yaad: ||r|| by a block sum)
//            S', M' and the chunk-start state, and o      warp per row of M (kl lag: a row softmax)
//   MLP:     z = W1_0 k, h = act(z)                         warp per row of W1_0 (read chunk_start: R1 q)
//            r = k + W2_0 h - v, e = f(r)                   warp per row of W2_0 (read chunk_start: o)
//            dz = (W2_0^T e) .* act'(z)                     thread per hidden unit
//            W1', S1' (u1 = dz k^T), token read's act(rho1 W1' q)   warp per row of W1
//            W2', S2' (u2 = e h^T), token read's o         warp per row of W2
#pragma once

#include <limits>
#include <type_traits>

#include "activations.h"
#include "cuda/memory_step.h"
#include "device/device.h"
#include "objectives.h"

namespace titans {
namespace step_kernels {

constexpr int kWarps = kStepThreads / device::kWarpSize;

template <typename T>
__device__ __forceinline__ const T* head_vector(const HeadTensor& x, int b, int h) {
  return static_cast<const T*>(x.ptr) + b * x.batch_stride + h * x.head_stride;
}

// Block-wide sum, in one order on every thread. scratch: kWarps elements of shared memory. Every
// thread of the block must call it.
template <typename T, typename Shared>
__device__ T block_sum(T value, Shared scratch) {
  value = device::warp_reduce_sum(value);
  __syncthreads();  // the previous call's readers are done with scratch
  if (device::lane_id() == 0) scratch[device::warp_id()] = value;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

// One weight matrix of one head in a step (each pointer at this head's block; null inputs as in
// step_params.h) and the chunk-start decision.
template <typename T>
struct StepWeight {
  int rows, cols;
  const T* w;  // running weights (null: w_default)
  const T* s;  // running momentum (null: zeros)
  T w_default;
  const T* chunk_w;
  const T* chunk_read;  // null: the read weights are chunk_w
  T* w_out;
  T* s_out;
  T* chunk_w_out;     // null with mid_chunk (then the token does not start a chunk)
  T* chunk_read_out;  // null unless read "chunk_start" with kl, and with mid_chunk
  bool start;         // the token starts a chunk
  T rho;              // the chunk's lq scale (1 otherwise)

  __device__ __forceinline__ T running(index_t i) const { return w ? w[i] : w_default; }
  // The weights the chunk's inner gradients are taken at (before a kl lag token's update).
  __device__ __forceinline__ T learning(index_t i) const { return start ? rho * running(i) : chunk_w[i]; }
  // The weights read "chunk_start" reads.
  __device__ __forceinline__ T start_read(index_t i) const {
    return start ? rho * running(i) : chunk_read ? chunk_read[i] : chunk_w[i];
  }

  // sum |A|^q over the running weights: the lq scale's power sum (a block sum).
  template <typename Shared>
  __device__ T power_sum(T q, Shared scratch) const {
    T sum = 0;
    if (w)
      for (index_t i = threadIdx.x; i < index_t(rows) * cols; i += blockDim.x) sum += std::pow(std::fabs(w[i]), q);
    return block_sum(sum, scratch);
  }

  // Row i of the token's update with the inner gradient u = x_i y^T, run by one warp: writes the
  // row of the running and the chunk-start state after the token and returns the warp's sum over the
  // row of the read weights times read_vec: the new weights (read_token) or the chunk_start read
  // weights. lag: the kl lag token (a softmax over the row).
  template <typename Shared>
  __device__ T update_row(int i, T x_i, Shared y, T theta, T eta, T beta, bool lag, bool read_token,
                          Shared read_vec) const {
    const int lane = device::lane_id();
    const index_t row = index_t(i) * cols;
    T dot = 0, row_max = -std::numeric_limits<T>::infinity();
    for (int j = lane; j < cols; j += device::kWarpSize) {
      const index_t ij = row + j;
      const T w_old = running(ij);
      const T s_new = (s ? eta * s[ij] : T(0)) - theta * x_i * y[j];
      s_out[ij] = s_new;
      // A lag token overwrites it with its result below.
      if (chunk_w_out) chunk_w_out[ij] = start ? rho * w_old : chunk_w[ij];
      if (chunk_read_out) chunk_read_out[ij] = start_read(ij);
      if (!read_token) dot += start_read(ij) * read_vec[j];
      if (lag) {
        const T logit = beta * std::log(w_old > T(kKlLogFloor) ? w_old : T(kKlLogFloor)) + s_new;
        w_out[ij] = logit;
        row_max = logit > row_max ? logit : row_max;
      } else {
        const T w_new = beta * w_old + s_new;
        w_out[ij] = w_new;
        if (read_token) dot += w_new * read_vec[j];
      }
    }
    if (lag) {  // w_out holds this lane's logits: softmax over the row
      row_max = device::warp_reduce_max(row_max);
      T total = 0;
      for (int j = lane; j < cols; j += device::kWarpSize) {
        const T e = std::exp(w_out[row + j] - row_max);
        w_out[row + j] = e;
        total += e;
      }
      total = device::warp_reduce_sum(total);
      for (int j = lane; j < cols; j += device::kWarpSize) {
        const T w_new = w_out[row + j] / total;
        w_out[row + j] = w_new;
        if (chunk_w_out) chunk_w_out[row + j] = w_new;
        if (read_token) dot += w_new * read_vec[j];
      }
    }
    return device::warp_reduce_sum(dot);
  }
};

template <typename T>
__device__ StepWeight<T> step_weight(int rows, int cols, index_t bh, const void* w, const void* s, T w_default,
                                     const void* chunk_w, const void* chunk_read, void* w_out, void* s_out,
                                     void* chunk_w_out, void* chunk_read_out, bool start) {
  const index_t base = bh * rows * cols;
  const auto in = [&](const void* x) { return x ? static_cast<const T*>(x) + base : nullptr; };
  const auto out = [&](void* x) { return x ? static_cast<T*>(x) + base : nullptr; };
  return {rows,        cols,           in(w),       in(s),         w_default,
          in(chunk_w), in(chunk_read), out(w_out),  out(s_out),    out(chunk_w_out),
          out(chunk_read_out), start, T(1)};
}

// The lq scale of a weight at a chunk start (else the given one): rho = (sum |A|^q)^((2-q)/q), 1 for
// A = 0. Every thread of the block must call it.
template <typename T, typename Shared>
__device__ T chunk_scale(const StepWeight<T>& weight, const MirasParams& miras, const T* scale_in, Shared scratch) {
  if (!weight.start) return *scale_in;
  if (miras.retention != RetentionKind::lq) return T(1);
  const T q = T(miras.q);
  const T sum = weight.power_sum(q, scratch);
  return sum == T(0) ? T(1) : std::pow(sum, (T(2) - q) / q);
}

// The objective's residual norm (yaad) over n residuals in shared memory; 0 when unused. Every
// thread of the block must call it.
template <typename Objective, typename T, typename Shared>
__device__ T residual_norm(Shared r, int n, Shared scratch) {
  if (!Objective::kUsesRowNorm) return T(0);
  T part = 0;
  for (int j = threadIdx.x; j < n; j += blockDim.x) part += r[j] * r[j];
  return std::sqrt(block_sum(part, scratch));
}

__device__ __forceinline__ bool starts_chunk(const StepParams& p, const void* chunk_state, int b) {
  return !chunk_state || p.position_ptr[b * p.position_stride] % p.chunk_size == 0;
}

// Loads x [n] (input_t) into shared memory as T.
template <typename T, typename input_t, typename Shared>
__device__ void load_vector(const input_t* x, int n, Shared out) {
  for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = device::cast<T>(x[i]);
}

template <typename input_t, typename T, typename Objective>
__global__ void __launch_bounds__(kStepThreads) linear_memory_step_kernel(LinearMemoryStepParams p, Objective objective) {
  const int h = blockIdx.x, b = blockIdx.y, warp = device::warp_id();
  const int dk = p.dk, dv = p.dv;
  const index_t bh = index_t(b) * p.heads + h;
  TITANS_DYNAMIC_SHARED(T, smem);
  const auto q = smem, k = q + dk, v = k + dk, r = v + dv, delta = r + dv, scratch = delta + dv;
  load_vector<T>(head_vector<input_t>(p.q, b, h), dk, q);
  load_vector<T>(head_vector<input_t>(p.k, b, h), dk, k);
  load_vector<T>(head_vector<input_t>(p.v, b, h), dv, v);
  if (Objective::kUsesDelta) load_vector<T>(static_cast<const T*>(p.miras.delta_ptr) + bh * dv, dv, delta);
  const T theta = *head_vector<T>(p.theta, b, h), eta = *head_vector<T>(p.eta, b, h);
  const T beta = T(1) - *head_vector<T>(p.alpha, b, h);
  const bool kl = p.miras.retention == RetentionKind::kl;
  const bool start = starts_chunk(p, p.chunk_weights_ptr, b), lag = kl && start;
  StepWeight<T> m = step_weight<T>(dv, dk, bh, p.m_ptr, p.s_ptr, kl ? T(1) / T(dk) : T(0), p.chunk_weights_ptr,
                                   p.chunk_read_ptr, p.m_out_ptr, p.s_out_ptr, p.chunk_weights_out_ptr,
                                   p.chunk_read_out_ptr, start);
  m.rho = chunk_scale(m, p.miras, p.chunk_scale_ptr ? static_cast<const T*>(p.chunk_scale_ptr) + bh : nullptr, scratch);
  if (threadIdx.x == 0 && p.chunk_scale_out_ptr) static_cast<T*>(p.chunk_scale_out_ptr)[bh] = m.rho;
  __syncthreads();

  // r = W0 k - v at the chunk-start weights.
  for (int j = warp; j < dv; j += kWarps) {
    T acc = 0;
    for (int d = device::lane_id(); d < dk; d += device::kWarpSize) acc += m.learning(index_t(j) * dk + d) * k[d];
    acc = device::warp_reduce_sum(acc);
    if (device::lane_id() == 0) r[j] = acc - v[j];
  }
  __syncthreads();
  const T norm = residual_norm<Objective, T>(r, dv, scratch);

  // The update with u = e k^T, e = f(r), and the read.
  auto* o = static_cast<input_t*>(p.o_ptr) + bh * dv;
  for (int j = warp; j < dv; j += kWarps) {
    const T e = objective.error(r[j], Objective::kUsesDelta ? delta[j] : T(0), norm);
    const T dot = m.update_row(j, e, k, theta, eta, beta, lag, p.read_token, q);
    if (device::lane_id() == 0) o[j] = device::cast<input_t>(p.read_token ? m.rho * dot : dot);
  }
}

template <typename input_t, typename T, typename Objective>
__global__ void __launch_bounds__(kStepThreads) mlp_memory_step_kernel(MlpMemoryStepParams p, Objective objective) {
  const int h = blockIdx.x, b = blockIdx.y, warp = device::warp_id(), lane = device::lane_id();
  const int D = p.dim, N = p.hidden;
  const index_t bh = index_t(b) * p.heads + h;
  TITANS_DYNAMIC_SHARED(T, smem);
  // hidden: act(z); slope: act'(z), then dz; hq: the query path's act(zq).
  const auto q = smem, k = q + D, v = k + D, e = v + D, delta = e + D, hidden = delta + D, slope = hidden + N,
             hq = slope + N, scratch = hq + N;
  load_vector<T>(head_vector<input_t>(p.q, b, h), D, q);
  load_vector<T>(head_vector<input_t>(p.k, b, h), D, k);
  load_vector<T>(head_vector<input_t>(p.v, b, h), D, v);
  if (Objective::kUsesDelta) load_vector<T>(static_cast<const T*>(p.miras.delta_ptr) + bh * D, D, delta);
  const T theta = *head_vector<T>(p.theta, b, h), eta = *head_vector<T>(p.eta, b, h);
  const T beta = T(1) - *head_vector<T>(p.alpha, b, h);
  const bool start = starts_chunk(p, p.chunk_w1_ptr, b);
  const bool lag = p.miras.retention == RetentionKind::kl && start;
  StepWeight<T> w1 = step_weight<T>(N, D, bh, p.w1_ptr, p.s1_ptr, T(0), p.chunk_w1_ptr, p.chunk_read_w1_ptr,
                                    p.w1_out_ptr, p.s1_out_ptr, p.chunk_w1_out_ptr, p.chunk_read_w1_out_ptr, start);
  StepWeight<T> w2 = step_weight<T>(D, N, bh, p.w2_ptr, p.s2_ptr, T(0), p.chunk_w2_ptr, p.chunk_read_w2_ptr,
                                    p.w2_out_ptr, p.s2_out_ptr, p.chunk_w2_out_ptr, p.chunk_read_w2_out_ptr, start);
  const T* scale_in = p.chunk_scale_ptr ? static_cast<const T*>(p.chunk_scale_ptr) + 2 * bh : nullptr;
  w1.rho = chunk_scale(w1, p.miras, scale_in, scratch);
  w2.rho = chunk_scale(w2, p.miras, scale_in ? scale_in + 1 : nullptr, scratch);
  if (threadIdx.x == 0 && p.chunk_scale_out_ptr) {
    static_cast<T*>(p.chunk_scale_out_ptr)[2 * bh] = w1.rho;
    static_cast<T*>(p.chunk_scale_out_ptr)[2 * bh + 1] = w2.rho;
  }
  __syncthreads();

  // z = W1_0 k, h = act(z); read "chunk_start": act(R1 q).
  for (int i = warp; i < N; i += kWarps) {
    T z = 0, zq = 0;
    for (int d = lane; d < D; d += device::kWarpSize) {
      z += w1.learning(index_t(i) * D + d) * k[d];
      if (!p.read_token) zq += w1.start_read(index_t(i) * D + d) * q[d];
    }
    z = device::warp_reduce_sum(z);
    zq = device::warp_reduce_sum(zq);
    if (lane == 0) {
      const ActivationValue<T> a = activation_value(p.activation, z);
      hidden[i] = a.value;
      slope[i] = a.slope;
      if (!p.read_token) hq[i] = activation_value(p.activation, zq).value;
    }
  }
  __syncthreads();

  // r = k + W2_0 h - v; read "chunk_start": o = q + R2 act(R1 q).
  auto* o = static_cast<input_t*>(p.o_ptr) + bh * D;
  for (int j = warp; j < D; j += kWarps) {
    T acc = 0, read = 0;
    for (int i = lane; i < N; i += device::kWarpSize) {
      acc += w2.learning(index_t(j) * N + i) * hidden[i];
      if (!p.read_token) read += w2.start_read(index_t(j) * N + i) * hq[i];
    }
    acc = device::warp_reduce_sum(acc);
    read = device::warp_reduce_sum(read);
    if (lane == 0) {
      e[j] = k[j] + acc - v[j];
      if (!p.read_token) o[j] = device::cast<input_t>(q[j] + read);
    }
  }
  __syncthreads();
  const T norm = residual_norm<Objective, T>(e, D, scratch);
  __syncthreads();  // every thread has read the residuals
  for (int j = threadIdx.x; j < D; j += blockDim.x)
    e[j] = objective.error(e[j], Objective::kUsesDelta ? delta[j] : T(0), norm);
  __syncthreads();

  // dz = (W2_0^T e) .* act'(z), in place of act'(z).
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    T g = 0;
    for (int j = 0; j < D; ++j) g += w2.learning(index_t(j) * N + i) * e[j];
    slope[i] *= g;
  }
  __syncthreads();

  // W1 with u1 = dz k^T; the token read's hidden layer act(rho1 W1' q).
  for (int i = warp; i < N; i += kWarps) {
    const T zq = w1.update_row(i, slope[i], k, theta, eta, beta, lag, p.read_token, q);
    if (p.read_token && lane == 0) hq[i] = activation_value(p.activation, w1.rho * zq).value;
  }
  __syncthreads();

  // W2 with u2 = e h^T; the token read o = q + rho2 W2' act(rho1 W1' q).
  for (int j = warp; j < D; j += kWarps) {
    const T read = w2.update_row(j, e[j], hidden, theta, eta, beta, lag, p.read_token, hq);
    if (p.read_token && lane == 0) o[j] = device::cast<input_t>(q[j] + w2.rho * read);
  }
}

template <typename input_t, typename T, typename Params, typename Kernel>
int launch_step(const char* name, const Params& p, size_t smem_bytes, CUstream_st* stream, const Kernel& kernel_for) {
  int status = 0;
  dispatch_objective<T>(p.miras, [&](const auto& objective) {
    status = int(device::launch(name, kernel_for(objective), dim3(p.heads, p.batch), dim3(kStepThreads), smem_bytes,
                                stream, p, objective));
  });
  return status;
}

template <typename input_t, typename T>
int linear_step_launch(const LinearMemoryStepParams& p, size_t smem_bytes, CUstream_st* stream) {
  return launch_step<input_t, T>("linear_memory_step_kernel", p, smem_bytes, stream, [](const auto& objective) {
    return &linear_memory_step_kernel<input_t, T, std::decay_t<decltype(objective)>>;
  });
}

template <typename input_t, typename T>
int mlp_step_launch(const MlpMemoryStepParams& p, size_t smem_bytes, CUstream_st* stream) {
  return launch_step<input_t, T>("mlp_memory_step_kernel", p, smem_bytes, stream, [](const auto& objective) {
    return &mlp_memory_step_kernel<input_t, T, std::decay_t<decltype(objective)>>;
  });
}

// Calls fn(input_t{}, compute_t{}) for the input type.
template <typename Fn>
int dispatch_input_type(InputType type, const Fn& fn) {
  switch (type) {
    case InputType::kFloat64: return fn(double{}, double{});
    case InputType::kBFloat16: return fn(device::bf16{}, float{});
    case InputType::kFloat16: return fn(device::fp16{}, float{});
    default: return fn(float{}, float{});
  }
}

inline size_t compute_bytes(InputType type) { return type == InputType::kFloat64 ? sizeof(double) : sizeof(float); }

}  // namespace step_kernels

size_t linear_memory_step_smem_bytes(const LinearMemoryStepParams& p, InputType input_type) {
  return (2 * size_t(p.dk) + 3 * size_t(p.dv) + step_kernels::kWarps) * step_kernels::compute_bytes(input_type);
}

size_t mlp_memory_step_smem_bytes(const MlpMemoryStepParams& p, InputType input_type) {
  return (5 * size_t(p.dim) + 3 * size_t(p.hidden) + step_kernels::kWarps) * step_kernels::compute_bytes(input_type);
}

int linear_memory_step_launch(const LinearMemoryStepParams& params, InputType input_type, CUstream_st* stream) {
  const size_t smem = linear_memory_step_smem_bytes(params, input_type);
  return step_kernels::dispatch_input_type(input_type, [&](auto input, auto compute) {
    return step_kernels::linear_step_launch<decltype(input), decltype(compute)>(params, smem, stream);
  });
}

int mlp_memory_step_launch(const MlpMemoryStepParams& params, InputType input_type, CUstream_st* stream) {
  const size_t smem = mlp_memory_step_smem_bytes(params, input_type);
  return step_kernels::dispatch_input_type(input_type, [&](auto input, auto compute) {
    return step_kernels::mlp_step_launch<decltype(input), decltype(compute)>(params, smem, stream);
  });
}

}  // namespace titans
