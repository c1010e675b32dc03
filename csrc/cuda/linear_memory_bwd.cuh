// CUDA backward of the linear memory, written only against the device layer, so the emulation runs
// this exact source in CI. Included by exactly one TU per build. Formulas: docs/backward_linear.md
// §1 (steps A-E), §2 (gate gradients), §3 (reverse pass, Dv split).
//
// Two kernels (the launch rule below picks the group size):
// - linear_memory_bwd_chunks (linear_memory_bwd_chunks.cuh): one block per (group of consecutive
//   chunks, head, batch) over all of Dv, every gradient of its chunks, carrying the cotangent
//   across them on chip and keeping every sum over Dv on chip;
// - linear_memory_bwd_scan (linear_memory_bwd_scan.cuh), only when a sequence has several groups:
//   the reverse pass over value tiles that stores each group's end cotangent, before it.
// With one group per sequence the backward moves its inputs, the checkpoints and the gradients and
// nothing else; with smaller groups it trades the scan's pass over q, k, dO and the stored group
// cotangents for the parallelism of more blocks.
#pragma once

#include <algorithm>

#include "cuda/common/launch.cuh"
#include "cuda/linear_memory_bwd.h"
#include "cuda/linear_memory_bwd_chunks.cuh"
#include "cuda/linear_memory_bwd_scan.cuh"
#include "cuda/linear_memory_launch.cuh"

namespace titans {
namespace lm {

// Estimated MMAs of the chunk kernel on one chunk (token read; chunk_start drops W, U, dW, dG).
inline double chunks_chunk_work(const LinearMemoryParams& p, InputType type) {
  const int C = p.chunk_size, dk = p.dk, dv = p.dv;
  double work = 3 * mma_work(type, C, dv, dk)                 // E, X | Y
                + mma_work(type, C, dk, 2 * dv) + mma_work(type, C, dk, 3 * dv)  // dQ, dK
                + mma_work(type, dv, dk, 3 * C);                // the carry
  if (p.read_token)
    work += 2 * mma_work(type, C, dv, dk) + mma_work(type, C, dv, C)  // Q M0^T | Q S0^T, U
            + mma_work(type, C, C, dv) + mma_work(type, C, C, dk)     // dW, G
            + 2 * mma_work(type, C, dk, C);                            // dG K, dG^T Q
  return work;
}

// Estimated MMAs of a scan block on one chunk, and its carried chain (k-steps).
inline double scan_chunk_work(const LinearMemoryParams& p, InputType type, int tile) {
  const int C = p.chunk_size, dk = p.dk;
  double work = 2 * mma_work(type, C, tile, dk) + 3 * mma_work(type, tile, dk, C);
  if (p.read_token) work += mma_work(type, C, C, dk) + mma_work(type, C, tile, C);
  return work;
}

}  // namespace lm

// The group size: the candidate (1, 2, 4, ... chunks, and the whole sequence; more than one only
// where the carried cotangent of all Dv fits beside the kernel's tiles) whose launches take the
// fewest cycles by the cost model of linear_memory_launch.cuh: the chunk kernel's waves times its
// chunks per block times a chunk's MMAs (it runs one block per SM, throughput-bound), plus the
// scan's waves times its chunks times its step when there are several groups. Ties go to the larger
// group, which moves less. At B * H = 128, T = 8192, D = 64 on an H100 it takes the whole sequence
// (128 blocks, one wave, no scan); when B * H leaves most SMs idle it takes smaller groups. A
// non-l2 objective or retention takes the whole sequence: the scan carries the cotangent through the
// l2 error map and retention only (its f' would need each chunk's start state, a pass over the
// checkpoints, and lq's rho0 terms a sum over all of Dv); where its
// carry does not fit in shared memory beside the chunk, the carry goes through dm0 / ds0 (the
// block's own rows, mostly in L2), which costs a read of them twice and a write per chunk.
LinearMemoryBwdPlan linear_memory_bwd_plan(const LinearMemoryParams& p, InputType type, const DeviceLimits& device,
                                           bool has_final_cotangent) {
  LinearMemoryBwdPlan plan;
  // n: the chunks of a sequence (with cu_seqlens, of the longest one possible, ceil(T / C)).
  const int n = p.n_chunks;
  const int64_t heads = int64_t(sequence_rows(p)) * p.heads;
  // The chunk kernel's blocks for a group size (with cu_seqlens its grid's bound, sequences.h).
  const auto chunk_blocks = [&](int group, int n_groups) {
    return p.cu_seqlens ? sequence_units(p, group) * p.heads : int64_t(n_groups > 0 ? n_groups : 1) * heads;
  };
  double best = -1;
  size_t smallest_smem = 0;
  const bool whole_sequence = p.miras.objective != ObjectiveKind::l2 || p.miras.retention != RetentionKind::l2;
  for (int group = whole_sequence && n > 1 ? n : 1;; group = group * 2 < n ? group * 2 : n) {
    const bool carry = group > 1;
    int slice = 0;
    bool global_carry = false;
    for (const bool in_global : {false, true}) {
      if (in_global && !(carry && whole_sequence)) break;
      for (const int s : {32, 16}) {
        if (s == 32 && type == InputType::kFloat64) continue;  // lm::has_wide_slice
        const size_t smem = lm::chunks_smem_bytes(p, type, s, carry && !in_global);
        if (smallest_smem == 0 || smem < smallest_smem) smallest_smem = smem;  // reported when nothing fits
        if (smem <= device.max_shared_bytes) {
          slice = s;
          break;
        }
      }
      if (slice > 0) {
        global_carry = in_global;
        break;
      }
    }
    if (slice > 0) {
      const int n_groups = n > 0 ? (n + group - 1) / group : 0;
      const int64_t blocks = chunk_blocks(group, n_groups);
      // A chunk: its MMAs on the SM, or its barriers and the chain of its slices' products.
      const int slices = (p.dv + slice - 1) / slice;
      const double chain = slices * double(kernel::round_up(p.dk, 16) / 16 + kernel::round_up(3 * slice, 16) / 16);
      // Chunks one SM walks: every block walks `group`, in waves; with cu_seqlens a block walks at
      // most `group` of its sequence's and all blocks together at most T / C + N per head
      // (sequences.h), so the larger of that spread over the SMs and one block's walk.
      const int64_t sms = device.sm_count > 0 ? device.sm_count : 1;
      const double packed_spread = double(sequence_units(p, 1) * p.heads) / double(std::min(blocks, sms));
      const double chunks_per_sm = p.cu_seqlens ? std::max(packed_spread, double(group))
                                                : double(kernel::waves(blocks, 1, device)) * group;
      double cost = chunks_per_sm * lm::step_cycles(lm::chunks_chunk_work(p, type), 1, chain, 3 * slices + 5);
      int scan_tile = 16;
      if (n_groups > 1) {
        double scan_best = -1;
        for (const int tile : {16, 32}) {
          const size_t scan_smem = lm::scan_smem_bytes(p, type, tile);
          if (scan_smem > device.max_shared_bytes) continue;
          const int64_t scan_blocks = int64_t((p.dv + tile - 1) / tile) * heads;
          const int64_t resident = kernel::resident_blocks_per_sm(scan_smem, device, 2);
          const int64_t per_sm = (scan_blocks + sms - 1) / sms;
          const double chain = double(2 * kernel::round_up(p.dk, 16) / 16 + kernel::round_up(p.chunk_size, 16) / 16);
          const double scan_cost = double(kernel::waves(scan_blocks, resident, device)) * (n - group) *
                                   lm::step_cycles(lm::scan_chunk_work(p, type, tile),
                                                   per_sm < resident ? per_sm : resident, chain, 2);
          if (scan_best < 0 || scan_cost < scan_best) scan_best = scan_cost, scan_tile = tile;
        }
        cost = scan_best < 0 ? -1 : cost + scan_best;
      }
      if (cost >= 0 && (best < 0 || cost <= best)) {
        best = cost;
        plan.group = group, plan.n_groups = n_groups, plan.slice = slice, plan.scan_tile = scan_tile;
        plan.carry = carry, plan.global_carry = global_carry;
      }
    }
    if (group >= n) break;
  }
  plan.fits = best >= 0;

  const int64_t tokens = int64_t(p.batch) * p.seqlen * p.heads;
  const int64_t state = int64_t(sequence_rows(p)) * p.heads * p.dv * p.dk;
  const int64_t row_states = int64_t(p.batch) * p.heads * p.dv * p.dk;  // a state per (batch row, head)
  const int in = input_type_bytes(type), cmp = compute_type_bytes(type);
  const int64_t final_cotangent = has_final_cotangent ? 2 * state * cmp : 0;
  const int64_t delta = objective_has_delta(p.miras.objective) ? tokens * p.dv * cmp : 0;  // read, and d_delta written
  const int64_t group_slots = p.cu_seqlens ? sequence_units(p, plan.group) : plan.n_groups - 1;
  const int64_t group_cotangents = plan.n_groups > 1 ? group_slots * 2 * row_states * in : 0;
  if (plan.n_groups > 1) {
    KernelPlan& scan = plan.add_kernel("linear_memory_bwd_scan");
    scan.threads = lm::kScanThreads;
    scan.smem_bytes = lm::scan_smem_bytes(p, type, plan.scan_tile);
    scan.blocks = int64_t((p.dv + plan.scan_tile - 1) / plan.scan_tile) * heads;
    scan.bytes_read = tokens * ((2 * p.dk + p.dv) * in + 3 * cmp) + final_cotangent;
    scan.bytes_written = group_cotangents;
    plan.add_buffer("group cotangents", group_cotangents);
  }
  KernelPlan& chunks = plan.add_kernel("linear_memory_bwd_chunks");
  chunks.threads = lm::kChunkThreads;
  chunks.smem_bytes =
      plan.fits ? lm::chunks_smem_bytes(p, type, plan.slice, plan.carry && !plan.global_carry) : smallest_smem;
  chunks.blocks = chunk_blocks(plan.group, plan.n_groups);
  chunks.bytes_read = tokens * (2 * (p.dk + p.dv) * in + 3 * cmp) +
                      linear_memory_checkpoints(p, type) * 2 * row_states * in + group_cotangents + final_cotangent +
                      delta;
  chunks.bytes_written = tokens * ((2 * p.dk + p.dv) * in + 3 * cmp) + 2 * state * cmp + delta;
  if (linear_memory_whole_state(p.miras) || p.miras.retention == RetentionKind::kl) {
    // The chunk's setup and lq's tail re-read its checkpoint's M over all of Dv (lq twice, yaad
    // once), kl's lag backward its M and S, and yaad's setup the chunk's values: re-reads of what
    // the slices stage, mostly from L2. Under kl, yaad's setup lags every row first: the lag
    // token's residuals (M) and the lag step (M and S) are two more passes, and token 0's values
    // two more reads per chunk.
    const bool yaad = p.miras.objective == ObjectiveKind::yaad, kl = p.miras.retention == RetentionKind::kl;
    const int64_t chunk_rows = linear_memory_checkpoints(p, type) * row_states / p.dk;  // a value row per chunk
    const int64_t passes = (p.miras.retention == RetentionKind::lq ? 2 : kl ? 2 : 0) + yaad + (yaad && kl ? 2 : 0);
    chunks.bytes_read += passes * linear_memory_checkpoints(p, type) * row_states * in +
                         (yaad ? tokens * p.dv * in : 0) + (yaad && kl ? 2 * chunk_rows * in : 0);
  }
  if (plan.global_carry) {
    // Every chunk of every (sequence, head) walked: with cu_seqlens at most T / C + N per head.
    const int64_t chunk_states =
        (p.cu_seqlens ? sequence_units(p, 1) : int64_t(p.batch) * n) * p.heads * p.dv * p.dk;
    chunks.bytes_read += chunk_states * 2 * 2 * cmp;
    chunks.bytes_written += chunk_states * 2 * cmp;
  }
  return plan;
}

int linear_memory_bwd_launch(const LinearMemoryBwdParams& params, InputType input_type,
                             const LinearMemoryBwdPlan& plan, const LinearMemoryBwdWorkspace& workspace,
                             CUstream_st* stream) {
  if (sequence_rows(params) == 0 || params.heads == 0 || params.dv == 0) return device::kSuccess;
  return static_cast<int>(kernel::dispatch_input_type(input_type, [&](auto input) {
    using input_t = decltype(input);
    device::Error err = device::kSuccess;
    int next = 0;
    if (plan.n_groups > 1) {
      err = lm::dispatch_scan_tile(plan.scan_tile, [&](auto tile) {
        constexpr int kTile = decltype(tile)::value;
        return device::launch("linear_memory_bwd_scan", lm::linear_memory_bwd_scan_kernel<input_t, kTile>,
                              dim3((params.dv + kTile - 1) / kTile, params.heads, sequence_rows(params)),
                              dim3(lm::kScanThreads), plan.kernels[next].smem_bytes, stream, params, workspace,
                              plan.group);
      });
      ++next;
      if (err != device::kSuccess) return err;
    }
    return lm::dispatch_slice<input_t>(plan.slice, [&](auto slice) {
      constexpr int kSlice = decltype(slice)::value;
      return device::launch("linear_memory_bwd_chunks", lm::linear_memory_bwd_chunks_kernel<input_t, kSlice>,
                            params.cu_seqlens ? dim3(unsigned(sequence_units(params, plan.group)), params.heads, 1)
                                              : dim3(plan.n_groups > 0 ? plan.n_groups : 1, params.heads, params.batch),
                            dim3(lm::kChunkThreads), plan.kernels[next].smem_bytes, stream, params, workspace,
                            plan.group, plan.carry, plan.global_carry);
    });
  }));
}

}  // namespace titans
