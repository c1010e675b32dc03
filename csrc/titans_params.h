// Parameter structs shared by every titans_ext kernel (CPU, CUDA and the CUDA emulation).
//
// Kernels see only these plain structs: raw pointers, sizes and strides. No torch header is
// included here or in any kernel file; the binding layer (csrc/binding/) fills the structs.
// All strides are in elements, not bytes. The innermost (feature) dimension of every
// per-token tensor is contiguous (stride 1); the binding enforces it.
#pragma once

#include <cstdint>

namespace titans {

using index_t = int64_t;

// A [B, T, H, D] (or [B, T, H] when D == 1) per-token tensor: base pointer and strides.
struct TokenTensor {
  void* ptr = nullptr;
  index_t batch_stride = 0;
  index_t seq_stride = 0;
  index_t head_stride = 0;
};

// MIRAS options (docs/miras.md §2). The codes are also those of titans_ext/ops/checks.py
// (OBJECTIVES, RETENTIONS).
enum class ObjectiveKind : int { l2 = 0, lp = 1, huber = 2, pseudo_huber = 3, yaad = 4 };
enum class RetentionKind : int { l2 = 0, lq = 1, kl = 2 };

// Whether the objective reads the thresholds delta (MirasParams::delta_ptr).
constexpr bool objective_has_delta(ObjectiveKind objective) {
  return objective == ObjectiveKind::huber || objective == ObjectiveKind::pseudo_huber ||
         objective == ObjectiveKind::yaad;
}

// Entries of a "kl" memory are clamped to this before the log (KL_LOG_FLOOR in checks.py).
constexpr double kKlLogFloor = 1e-6;

struct MirasParams {
  // The error map f(r) that replaces 2r (objectives.h); p, eps: lp's exponent and smoothing.
  ObjectiveKind objective = ObjectiveKind::l2;
  double p = 2, eps = 0;
  // huber, pseudo_huber, yaad: the threshold, contiguous [B, T, H, Dv]; nullptr otherwise.
  const void* delta_ptr = nullptr;
  // l2: the forget gate only. lq: the state M is the accumulator A; each chunk learns and reads with
  // rho0 A, rho0 = ||A||_q^(2-q) at the chunk start (docs/miras.md §2.3). kl: the chunk's first
  // token takes Memora's step M <- rowsoftmax((1 - alpha) log max(M, kKlLogFloor) + S).
  RetentionKind retention = RetentionKind::l2;
  double q = 2;
};

// What every memory's params share: sizes, chunking, read mode, the per-token inputs and the
// MIRAS options (the flash-attention habit of a base struct per family of fields).
struct SequenceParams {
  int batch = 0, seqlen = 0, heads = 0;
  int chunk_size = 0;
  // Saved chunk-start state slots per (batch, head): ceil(seqlen / chunk_size), or with
  // cu_seqlens (seqlen + n_seqs (chunk_size - 1)) / chunk_size, the most chunks any split of the
  // seqlen tokens into n_seqs sequences has, so that no shape depends on the offsets' values. The
  // CUDA kernels keep ceil(seqlen / chunk_size) with cu_seqlens too (the longest sequence's
  // chunks) and size their buffers by cuda/common/sequences.h.
  int n_chunks = 0;
  bool read_token = true;

  // Packed variable-length sequences (FlashAttention's cu_seqlens, docs/design.md §6). nullptr:
  // every batch row is one sequence (n_seqs == batch). Else batch == 1 and cu_seqlens holds
  // n_seqs + 1 non-decreasing token offsets from 0 to seqlen: sequence i is tokens
  // cu_seqlens[i] .. cu_seqlens[i + 1] - 1, run from its own initial state with its chunks counted
  // from its first token; initial and final states are [n_seqs, H, ...]. chunk_offsets (the CPU
  // kernels'; n_seqs + 1 entries, set with cu_seqlens): sequence i's chunk-start states are saved
  // in the slots chunk_offsets[i] .. chunk_offsets[i + 1] - 1 of each head.
  const int64_t* cu_seqlens = nullptr;
  const int64_t* chunk_offsets = nullptr;
  int n_seqs = 0;

  // Inputs: q, k [B, T, H, Dk], v [B, T, H, Dv], gates theta, eta, alpha [B, T, H].
  TokenTensor q, k, v, theta, eta, alpha;

  MirasParams miras;
};

// What every memory's backward shares: the output cotangent and the per-token input gradients.
struct SequenceGradParams {
  // d_o strided like o ([B, T, H, Dv]).
  TokenTensor d_o;
  // All contiguous: dq, dk [B, T, H, Dk], dv [B, T, H, Dv], dtheta, deta, dalpha [B, T, H],
  // d_delta like miras.delta_ptr (set when delta_ptr is).
  void* dq_ptr = nullptr;
  void* dk_ptr = nullptr;
  void* dv_ptr = nullptr;
  void* dtheta_ptr = nullptr;
  void* deta_ptr = nullptr;
  void* dalpha_ptr = nullptr;
  void* d_delta_ptr = nullptr;
};

// Linear memory M: [B, H, Dv, Dk], momentum S of the same shape (docs/design.md §2):
//   E = f(K M0^T - V) at the chunk-start memory (f(r) = 2r for the l2 objective),
//   S_t = eta_t S_{t-1} - theta_t e_t k_t^T,
//   M_t = (1 - alpha_t) M_{t-1} + S_t, o_t = M_t q_t ("token") or M0 q_t ("chunk_start").
struct LinearMemoryParams : SequenceParams {
  int dk = 0, dv = 0;

  // Initial state, contiguous [n_seqs, H, Dv, Dk] (n_seqs == B without cu_seqlens); nullptr means
  // zeros (a uniform 1/Dk memory with retention kl).
  // Not __restrict__: nothing stops a caller from passing the same buffer for both.
  const void* m0_ptr = nullptr;
  const void* s0_ptr = nullptr;

  // Outputs. o: contiguous [B, T, H, Dv]. m_final, s_final: contiguous [n_seqs, H, Dv, Dk].
  void* o_ptr = nullptr;
  void* m_final_ptr = nullptr;
  void* s_final_ptr = nullptr;
  // The chunk-start states the backward needs: contiguous [B, H, n_chunks, 2, Dv, Dk]
  // (index 0: M, index 1: S; with cu_seqlens only the sequences' slots are written; the CUDA
  // kernels' layout: cuda/linear_memory_fwd.h).
  // nullptr when no backward will run.
  void* chunk_states_ptr = nullptr;
};

struct LinearMemoryBwdParams : LinearMemoryParams, SequenceGradParams {
  // Cotangents of the final state, contiguous [n_seqs, H, Dv, Dk], or nullptr (zero cotangent).
  const void* d_m_final_ptr = nullptr;
  const void* d_s_final_ptr = nullptr;
  // Gradients of the initial state, contiguous [n_seqs, H, Dv, Dk].
  void* dm0_ptr = nullptr;
  void* ds0_ptr = nullptr;
};

// Deep memory M(x) = x + W2 act(W1 x) with W1: [N, D], W2: [D, N] (N = E * D) and a momentum
// per weight, S1 and S2 (docs/mlp_dual_form.md). Every token's gradient of the
// objective's loss at M(k_t) - v_t (||.||^2 for l2) is taken at the chunk-start weights; both
// weights share the gates:
//   S_t = eta_t S_{t-1} - theta_t u_t,  W_t = (1 - alpha_t) W_{t-1} + S_t   (each of W1, W2)
//   o_t = M_t(q_t) ("token") or M_{chunk start}(q_t) ("chunk_start").
// The objective's delta is [B, T, H, D]; the retention acts on W1 and W2 separately ("kl": a
// softmax over each row), never on the momenta.
enum class MlpActivation : int {
  kGelu = 0,  // exact (erf) GELU
  kSilu = 1,
};

struct MlpMemoryParams : SequenceParams {
  int dim = 0;     // D: head dim of q, k, v (Dk == Dv)
  int hidden = 0;  // N = E * D: hidden width
  MlpActivation activation = MlpActivation::kGelu;

  // Initial state, contiguous: w1_0, s1_0 [n_seqs, H, N, D]; w2_0, s2_0 [n_seqs, H, D, N]. The momenta
  // may be nullptr (zeros). Not __restrict__: a caller may pass one buffer twice.
  const void* w1_0_ptr = nullptr;
  const void* w2_0_ptr = nullptr;
  const void* s1_0_ptr = nullptr;
  const void* s2_0_ptr = nullptr;

  // Outputs. o: contiguous [B, T, H, D]; final state contiguous like the initial one.
  void* o_ptr = nullptr;
  void* w1_final_ptr = nullptr;
  void* w2_final_ptr = nullptr;
  void* s1_final_ptr = nullptr;
  void* s2_final_ptr = nullptr;
  // The chunk-start states the backward needs: contiguous [B, H, n_chunks, 4, N * D], index
  // 0..3: W1 [N, D], S1 [N, D], W2 [D, N], S2 [D, N]. nullptr when no backward will run.
  void* chunk_states_ptr = nullptr;
};

struct MlpMemoryBwdParams : MlpMemoryParams, SequenceGradParams {
  // Cotangents of the final state, contiguous like it, or nullptr (zero cotangent).
  const void* d_w1_final_ptr = nullptr;
  const void* d_w2_final_ptr = nullptr;
  const void* d_s1_final_ptr = nullptr;
  const void* d_s2_final_ptr = nullptr;
  // Gradients of the initial state: dw1_0, ds1_0 [n_seqs, H, N, D], dw2_0, ds2_0 [n_seqs, H, D, N].
  void* dw1_0_ptr = nullptr;
  void* dw2_0_ptr = nullptr;
  void* ds1_0_ptr = nullptr;
  void* ds2_0_ptr = nullptr;
};

}  // namespace titans
