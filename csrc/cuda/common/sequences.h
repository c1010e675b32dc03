// Packed variable-length sequences (cu_seqlens, docs/design.md §6) in the CUDA kernels: the sizes
// their launches and buffers take. Torch-free and free of CUDA headers (both bindings include it);
// the device side is sequences.cuh.
//
// No launch reads the offsets on the host (that would sync the host with the device), so no grid
// and no buffer may depend on their values, only on T and N. Kernels that walk whole sequences run
// one block per (.., sequence); a buffer with an entry per `unit` consecutive chunks of a sequence
// (the checkpoints, the backward's group cotangents) and a kernel with a block per such unit are
// sized by sequence_units: sequence i's entries are first_unit(i) = cu_seqlens[i] / (C unit) + i
// onwards. Since floor(b / U) + ceil((e - b) / U) <= floor(e / U) + 1 for b <= e, sequence i's
// entries end before sequence i + 1's first, and the last sequence's by T / (C unit) + N, for every
// split of T tokens into N sequences; a block finds its sequence by a binary search over the
// offsets, so no kernel needs a prefix sum over the sequences (the CPU kernels' chunk_offsets).
// The cost: entries no sequence uses, up to N per head against the exact count of a split (about
// N / C + 1 more than the CPU layout's bound for unit 1), zeroed once by the binding where they
// are an output, and the blocks a kernel runs on them, which exit at once.
#pragma once

#include <cstdint>

#include "titans_params.h"

namespace titans {

// The sequences the kernels walk, each from its own state row: B, or N with cu_seqlens.
constexpr int sequence_rows(const SequenceParams& p) { return p.cu_seqlens ? p.n_seqs : p.batch; }

// Entries per (batch row, head) of a buffer with one entry per `unit` consecutive chunks of a
// sequence: ceil(n_chunks / unit) per batch row, or with cu_seqlens T / (C unit) + N for the row.
constexpr int64_t sequence_units(const SequenceParams& p, int unit) {
  return p.cu_seqlens ? int64_t(p.seqlen) / (int64_t(p.chunk_size) * unit) + p.n_seqs
                      : (int64_t(p.n_chunks) + unit - 1) / unit;
}

}  // namespace titans
