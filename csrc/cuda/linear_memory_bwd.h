// Entry point of the CUDA linear_memory backward (linear_memory_bwd.cuh). Torch-free and free of
// CUDA headers, so both bindings (CUDA and emulation) can include it.
#pragma once

#include "cuda/linear_memory_fwd.h"
#include "titans_params.h"

namespace titans {

// Value features (rows of M and S) per block, for the sequential and for the parallel kernels.
// - Sequential: each chunk step is a chain of products over the block's rows, so a narrower tile
//   shortens the chain; while the device holds every block at once (B * H * ceil(Dv / 16) blocks,
//   at most 4 per SM and as many as the SM's shared memory takes) they take 16 rows, beyond that
//   32, which halves the per-block overhead (staging the chunk's keys, barriers), for Dk <= 64
//   and not fp64.
// - Parallel: every tile recomputes its chunk's Q K^T and gate tables, so wider is cheaper: 32
//   where the kernels' shared memory fits the device at 32 (Dk <= 64, not fp64), else 16.
// linear_memory_fwd_tiles / linear_memory_bwd_tiles choose them (they know the kernels' shared
// memory); the shared memory of each kernel then follows from the tiles.
struct ValueTiles {
  int state, parallel;
};

// What the sequential passes need of each chunk's gate tables (backward_linear.md §0), written by
// a parallel kernel before them so that no gate recurrence sits on their chain: per chunk, in the
// compute dtype, m_end [C] | s_end [C] | a [C] | g [C] | a_L, g_L, p (and one pad, so that every
// chunk's rows start 16-byte aligned).
constexpr int linear_memory_gate_rows_size(int chunk) { return 4 * chunk + 4; }

// Scratch of the forward, in the compute dtype:
//   gate_rows: [B, H, n_chunks, linear_memory_gate_rows_size(C)].
struct LinearMemoryFwdWorkspace {
  void* gate_rows = nullptr;
};

inline int64_t linear_memory_gate_rows_elems(const LinearMemoryParams& p) {
  return int64_t(p.batch) * p.heads * p.n_chunks * linear_memory_gate_rows_size(p.chunk_size);
}


// Scratch the backward needs beside its outputs, in the compute dtype (fp32; fp64 for fp64
// inputs).
//   gate_rows:        [B, H, n_chunks, linear_memory_gate_rows_size(C)], as in the forward;
//   errors_local:     [B, T, H, Dv], U = (Q K^T .* c)^T dO per chunk, the read-out's share of dE
//                     (token read only);
//   chunk_cotangents: [B, H, n_chunks, 2, Dv, Dk], the cotangent (dM, dS) of each chunk's end
//                     state, written by the reverse pass for the parallel chunk kernel.
// The chunk kernel runs per value tile; dQ, dK and the gate-coefficient cotangents are sums over
// Dv, so each tile writes its partial sums and the gate kernel adds them in tile order
// (deterministic, no atomics).
//   dq_part, dk_part: [value_tiles, B, T, H, Dk]; only when value_tiles > 1 (else the chunk
//                     kernel writes dq, dk directly);
//   coef_part:        [value_tiles, B, H, n_chunks, coef_size] with coef_size = C * C + 3 C + 1
//                     (d_c lower triangle, d_a, d_g, d_s, d_p of each chunk).
struct LinearMemoryBwdWorkspace {
  void* gate_rows = nullptr;
  void* errors_local = nullptr;
  void* chunk_cotangents = nullptr;
  void* dq_part = nullptr;
  void* dk_part = nullptr;
  void* coef_part = nullptr;
};

struct LinearMemoryBwdWorkspaceSizes {
  int value_tiles;
  int64_t gate_rows;         // elements of gate_rows
  int64_t errors_local;      // elements of errors_local (0 for the chunk_start read)
  int64_t chunk_cotangents;  // elements of chunk_cotangents
  int64_t dqk_part;          // elements of dq_part and of dk_part each (0 when value_tiles == 1)
  int64_t coef_part;         // elements of coef_part
};

// constexpr: the kernels call it too (nvcc --expt-relaxed-constexpr).
constexpr int linear_memory_coef_size(int chunk) { return chunk * chunk + 3 * chunk + 1; }

// parallel_tile: ValueTiles::parallel.
inline LinearMemoryBwdWorkspaceSizes linear_memory_bwd_workspace_sizes(const LinearMemoryParams& p, int parallel_tile) {
  const int tiles = (p.dv + parallel_tile - 1) / parallel_tile;
  const int64_t tokens = int64_t(p.batch) * p.seqlen * p.heads;
  return {tiles, linear_memory_gate_rows_elems(p), p.read_token ? tokens * p.dv : 0,
          int64_t(p.batch) * p.heads * p.n_chunks * 2 * p.dv * p.dk, tiles > 1 ? tiles * tokens * p.dk : 0,
          int64_t(tiles) * p.batch * p.heads * p.n_chunks * linear_memory_coef_size(p.chunk_size)};
}

// Fills every gradient of `params` (dq, dk, dv in the input dtype; dtheta, deta, dalpha, dm0, ds0
// in the compute dtype). Same return convention as linear_memory_fwd_launch.
ValueTiles linear_memory_bwd_tiles(const LinearMemoryParams& params, InputType input_type, const DeviceLimits& device);

int linear_memory_bwd_launch(const LinearMemoryBwdParams& params, const LinearMemoryBwdWorkspace& workspace,
                             InputType input_type, const ValueTiles& tiles, CUstream_st* stream);

// Dynamic shared memory of the backward's largest block (checked like the forward's).
size_t linear_memory_bwd_smem_bytes(const LinearMemoryParams& params, InputType input_type, const ValueTiles& tiles);

}  // namespace titans
