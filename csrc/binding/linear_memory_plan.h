// The launch plans of the CUDA linear_memory kernels for a shape and dtype, as JSON: what each
// kernel moves through global memory, its grid and shared memory, and the buffers each direction
// requests (checkpoints, group cotangents). Built by the same plan functions the launchers use, so
// the figures hold for the launches; registered as titans_ext::linear_memory_plan (the current
// CUDA device) and titans_emu::linear_memory_plan (the emulated device). g++ only, stable ABI only.
#pragma once

#include <cstdint>
#include <sstream>
#include <string>

#include "binding/linear_memory_device.h"

namespace titans {

inline void write_plan_json(std::ostringstream& out, const LaunchPlan& plan) {
  out << "{\"fits\": " << (plan.fits ? "true" : "false") << ", \"kernels\": [";
  for (int i = 0; i < plan.n_kernels; ++i) {
    const KernelPlan& k = plan.kernels[i];
    out << (i ? ", " : "") << "{\"name\": \"" << k.name << "\", \"blocks\": " << k.blocks << ", \"threads\": " << k.threads
        << ", \"smem_bytes\": " << k.smem_bytes << ", \"bytes_read\": " << k.bytes_read
        << ", \"bytes_written\": " << k.bytes_written << "}";
  }
  out << "], \"buffers\": [";
  for (int i = 0; i < plan.n_buffers; ++i)
    out << (i ? ", " : "") << "{\"name\": \"" << plan.buffers[i].name << "\", \"bytes\": " << plan.buffers[i].bytes << "}";
  out << "]";
}

// The forward's plan (saving checkpoints or not), and with save_states the backward's, for the
// objective's code (titans_params.h's ObjectiveKind: the backward of a non-l2 one takes no scan);
// n_seqs > 0: with cu_seqlens of n_seqs sequences (batch 1).
inline std::string linear_memory_plan_json(int64_t batch, int64_t seqlen, int64_t heads, int64_t dk, int64_t dv,
                                           int64_t chunk_size, ScalarType dtype, bool read_token,
                                           bool save_states, bool has_initial_state, bool has_final_cotangent,
                                           int64_t objective, int64_t n_seqs, int64_t retention,
                                           const DeviceLimits& device) {
  STD_TORCH_CHECK(batch >= 0 && seqlen >= 0 && heads >= 0 && dk >= 1 && dv >= 1,
                  "linear_memory_plan: sizes must be >= 0 (B, T, H) and >= 1 (Dk, Dv)");
  STD_TORCH_CHECK(chunk_size >= 1 && chunk_size <= kCudaMaxChunkSize && dk <= kCudaMaxKeyDim,
                  "linear_memory_plan: the CUDA kernels take chunk_size 1..", kCudaMaxChunkSize, " and Dk <= ",
                  kCudaMaxKeyDim);
  STD_TORCH_CHECK(objective >= 0 && objective <= int64_t(ObjectiveKind::yaad), "linear_memory_plan: unknown objective "
                  "code ", objective);
  STD_TORCH_CHECK(retention >= 0 && retention <= int64_t(RetentionKind::kl), "linear_memory_plan: unknown retention "
                  "code ", retention);
  LinearMemoryParams p;
  p.miras.objective = ObjectiveKind(objective);
  p.miras.retention = RetentionKind(retention);
  p.batch = int(batch), p.seqlen = int(seqlen), p.heads = int(heads), p.dk = int(dk), p.dv = int(dv);
  p.chunk_size = int(chunk_size), p.n_chunks = int((seqlen + chunk_size - 1) / chunk_size), p.read_token = read_token;
  STD_TORCH_CHECK(n_seqs >= 0 && (n_seqs == 0 || batch == 1),
                  "linear_memory_plan: n_seqs must be >= 0, and with n_seqs > 0 (packed sequences) batch 1");
  // The plans read no pointer, only whether cu_seqlens is set (sequences.h).
  static const int64_t kOffsetsNotRead[1] = {0};
  p.cu_seqlens = n_seqs > 0 ? kOffsetsNotRead : nullptr;
  p.n_seqs = int(n_seqs > 0 ? n_seqs : batch);
  const InputType type = input_type(dtype);
  std::ostringstream out;
  out << "{\"device\": {\"sm_count\": " << device.sm_count << ", \"max_shared_bytes\": " << device.max_shared_bytes
      << ", \"shared_bytes_per_sm\": " << device.shared_bytes_per_sm << "}, \"forward\": ";
  const LinearMemoryFwdPlan fwd = linear_memory_fwd_plan(p, type, device, save_states, has_initial_state);
  write_plan_json(out, fwd);
  out << ", \"tile_v\": " << fwd.tile_v << ", \"block_tiles\": " << fwd.block_tiles << "}";
  if (save_states) {
    const LinearMemoryBwdPlan bwd = linear_memory_bwd_plan(p, type, device, has_final_cotangent);
    out << ", \"backward\": ";
    write_plan_json(out, bwd);
    out << ", \"group\": " << bwd.group << ", \"n_groups\": " << bwd.n_groups << ", \"slice\": " << bwd.slice
        << ", \"scan_tile\": " << bwd.scan_tile << ", \"global_carry\": " << (bwd.global_carry ? "true" : "false")
        << "}";
  }
  out << "}";
  return out.str();
}

// The schema of both registrations.
#define TITANS_LINEAR_MEMORY_PLAN_SCHEMA                                                                        \
  "linear_memory_plan(int batch, int seqlen, int heads, int dk, int dv, int chunk_size, ScalarType dtype, "     \
  "bool read_token, bool save_states, bool has_initial_state=False, bool has_final_cotangent=False, "          \
  "int objective=0, int n_seqs=0, int retention=0) -> str"

}  // namespace titans
