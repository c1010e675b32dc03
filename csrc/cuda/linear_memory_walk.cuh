// What the two kernels that walk the chunks of a sequence in order over value tiles share: the
// forward (linear_memory_fwd.cuh, walking forward with the state [M; S]) and the backward's reverse
// scan (linear_memory_bwd_scan.cuh, walking back with the cotangent [dM; dS]). Both keep their
// tile's rows of a two-part stack on chip, stage q, k and one per-value-row input (v, or dO) a
// chunk ahead of the products and the gates a chunk further, and build each chunk's gate tables
// while the previous chunk's step runs.
#pragma once

#include "cuda/common/smem.cuh"
#include "cuda/common/staging.cuh"
#include "cuda/linear_memory_chunk.cuh"
#include "cuda/linear_memory_gates.cuh"
#include "cuda/linear_memory_launch.cuh"

namespace titans {
namespace lm {

// The front of a walking kernel's shared memory (byte offsets; tiles are PaddedTiles); the
// kernel's own layout derives from it and carves its working tiles after it.
template <typename input_t, int kTileV>
struct WalkLayout {
  using T = Types<input_t>;
  kernel::SmemLayout smem;
  int chunk16, dk16;          // the chunk and Dk rounded to whole k-steps
  int master;                 // compute_t [2 kTileV, dk16]: the stack (kSeparateMaster only)
  kernel::TileSlot stack;     // 2 x operand_t [2 kTileV, Dk]: the stack's operand copy, alternating per chunk
  kernel::TileSlot q, k, row_input;  // 2 x input_t [C, Dk], [C, Dk], [C, kTileV]: staged, alternating
  int gates;                  // 3 x ChunkGates: staged one chunk ahead of the tiles
  int rows;                   // 2 x ChunkGateRows: this chunk's and the next's
  int c;                      // compute_t [C, C]: the c table
  __host__ __device__ WalkLayout(int dk, int chunk)
      : chunk16(kernel::round_up(chunk, kernel::kTileGranule)), dk16(kernel::round_up(dk, kernel::kTileGranule)) {
    using compute_t = typename T::compute_t;
    using operand_t = typename T::operand_t;
    master = smem.array<compute_t>(T::kSeparateMaster ? 2 * kTileV * dk16 : 0);
    stack = smem.tiles<operand_t>(2, 2 * kTileV, dk);
    q = smem.tiles<input_t>(2, chunk, dk);
    k = smem.tiles<input_t>(2, chunk, dk);
    row_input = smem.tiles<input_t>(2, chunk, kTileV);
    gates = smem.array<compute_t>(3 * ChunkGates<compute_t>::size(chunk16));
    rows = smem.array<compute_t>(2 * ChunkGateRows<compute_t>::size(chunk16));
    c = smem.array<compute_t>(chunk16 * chunk16);
  }
};

// A walking kernel's view of its WalkLayout. Buffers alternate by step parity; gates and gate rows
// are indexed by step (a ring of three and of two).
template <typename input_t, int kTileV>
struct Walk {
  using T = Types<input_t>;
  using compute_t = typename T::compute_t;
  using operand_t = typename T::operand_t;
  template <typename X>
  using Tile = kernel::PaddedTile<X>;

  const WalkLayout<input_t, kTileV>& at;
  device::SharedPtr<compute_t> master;
  ChunkGateTables<compute_t> tables;  // c only

  __device__ __forceinline__ explicit Walk(const WalkLayout<input_t, kTileV>& layout)
      : at(layout),
        master(kernel::shared_array<compute_t>(layout.master)),
        tables{kernel::shared_array<compute_t>(layout.c), kernel::shared_array<compute_t>(layout.c),
               kernel::shared_array<compute_t>(layout.c), layout.chunk16, false} {}

  __device__ __forceinline__ Tile<operand_t> stack(int i) const { return Tile<operand_t>(at.stack, i); }
  __device__ __forceinline__ Tile<input_t> q(int i) const { return Tile<input_t>(at.q, i); }
  __device__ __forceinline__ Tile<input_t> k(int i) const { return Tile<input_t>(at.k, i); }
  __device__ __forceinline__ Tile<input_t> row_input(int i) const { return Tile<input_t>(at.row_input, i); }
  __device__ __forceinline__ ChunkGates<compute_t> gates(int step) const {
    return ChunkGates<compute_t>(
        kernel::shared_array<compute_t>(at.gates) + step % 3 * ChunkGates<compute_t>::size(at.chunk16), at.chunk16);
  }
  __device__ __forceinline__ ChunkGateRows<compute_t> gate_rows(int step) const {
    return ChunkGateRows<compute_t>(
        kernel::shared_array<compute_t>(at.rows) + step % 2 * ChunkGateRows<compute_t>::size(at.chunk16),
        at.chunk16);
  }

  // Staging writes only the logical part of a tile, so zeros written once stay: every staged tile
  // is zeroed before the walk (a short last chunk re-zeroes its rows, stage_tiles).
  __device__ __forceinline__ void zero_staged() const {
    for (int i = 0; i < 2; ++i) {
      q(i).zero_all();
      k(i).zero_all();
      row_input(i).zero_all();
    }
  }
  // The stack's rows [v0, v0 + rows) from two contiguous compute_t states at `offset` (null: zeros,
  // or first_fill for the first) into the master and operand tile 0.
  __device__ __forceinline__ void load_stack(const void* first, const void* second, index_t offset, int rows,
                                             int dk, compute_t first_fill = 0) const {
    load_state_stack<kTileV, T::kSeparateMaster>(static_cast<const compute_t*>(first),
                                                 static_cast<const compute_t*>(second), offset, rows, dk, at.dk16,
                                                 master, stack(0), first_fill);
  }
  // Element (r, d) of the stack in compute_t, whose operand copy is `tile`.
  __device__ __forceinline__ compute_t value(const Tile<operand_t>& tile, int r, int d) const {
    if constexpr (T::kSeparateMaster)
      return master[r * at.dk16 + d];
    else
      return tile(r, d);
  }
  // Writes element (r, d) of the stack's next value: the master and the operand copy `tile`.
  __device__ __forceinline__ void set(const Tile<operand_t>& tile, int r, int d, compute_t x) const {
    if constexpr (T::kSeparateMaster) master[r * at.dk16 + d] = x;
    tile(r, d) = device::cast<operand_t>(x);
  }
  // Issues the staging of chunk n's q, k (all of Dk) and rows [v0, v0 + rows) of the per-value-row
  // input into buffer `buffer`; a short chunk zeroes its buffer's rows past L.
  __device__ __forceinline__ void stage_tiles(const LinearMemoryParams& p, const TokenTensor& row_input_tensor,
                                              int buffer, int b, int h, int n, int v0, int rows) const {
    const int C = p.chunk_size, L = chunk_length(p, n);
    const Tile<input_t> q_ = q(buffer), k_ = k(buffer), x_ = row_input(buffer);
    kernel::stage_token_rows<input_t>(p.k, b, h, n * C, L, 0, p.dk, k_.ld, k_.data);
    kernel::stage_token_rows<input_t>(p.q, b, h, n * C, L, 0, p.dk, q_.ld, q_.data);
    kernel::stage_token_rows<input_t>(row_input_tensor, b, h, n * C, L, v0, rows, x_.ld, x_.data);
    if (L < C) {  // only the last chunk; its buffer may have held a full chunk before
      q_.zero_outside(L, q_.cols);
      k_.zero_outside(L, k_.cols);
      x_.zero_outside(L, x_.cols);
    }
  }
};

}  // namespace lm
}  // namespace titans
