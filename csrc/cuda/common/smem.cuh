// Shared-memory carve-up and the padded tile. Memory-type agnostic.
//
// A kernel describes its dynamic shared memory once, as a layout struct whose constructor carves
// arrays and tiles out of an SmemLayout; the launcher builds it on the host to size the launch and
// the kernel builds the same struct on the device to place the arrays, so the two never disagree.
#pragma once

#include <cstddef>

#include "cuda/common/operands.cuh"
#include "device/device.h"

namespace titans {
namespace kernel {

__host__ __device__ constexpr int round_up(int x, int to) { return (x + to - 1) / to * to; }

// Leading dimension of a [rows, width] array of T: one 16-byte piece wider than the row, so that
// the 8 rows an ldmatrix reads (or consecutive rows read together) fall in different banks.
template <typename T>
__host__ __device__ constexpr int padded(int width) {
  return width + 16 / int(sizeof(T));
}

// Rows and columns of a tile's storage are whole MMA k-steps (16 covers bf16's k = 16 and tf32's
// and fp64's k = 8), so that no product leaves a tile's storage.
constexpr int kTileGranule = 16;

// Where a padded tile lies in the carve-up (byte offset) and its storage: rows x cols elements
// (both multiples of kTileGranule) with a leading dimension of ld.
struct TileSlot {
  int offset = 0, rows = 0, cols = 0, ld = 0;
};

// Byte offsets of arrays and tiles in the dynamic shared memory; every array starts 16-byte
// aligned (cp.async and ldmatrix rows need it).
struct SmemLayout {
  int bytes = 0;
  template <typename T>
  __host__ __device__ int array(int n) {
    const int at = round_up(bytes, 16);
    bytes = at + n * int(sizeof(T));
    return at;
  }
  // A tile of at least rows x cols, its rows padded.
  template <typename T>
  __host__ __device__ TileSlot tile(int rows, int cols) {
    TileSlot s;
    s.rows = round_up(rows, kTileGranule);
    s.cols = round_up(cols, kTileGranule);
    s.ld = padded<T>(s.cols);
    s.offset = array<T>(s.rows * s.ld);
    return s;
  }
  // count tiles of the same shape, one after another (a ring of buffers, or a stack).
  template <typename T>
  __host__ __device__ TileSlot tiles(int count, int rows, int cols) {
    TileSlot s = tile<T>(rows, cols);
    bytes += (count - 1) * s.rows * s.ld * int(sizeof(T));
    return s;
  }
};

// The launch's dynamic shared memory as an array of T (a function of its own, so that each type's
// extern declaration sits in its own scope).
template <typename T>
__device__ __forceinline__ device::SharedPtr<T> dynamic_shared() {
  TITANS_DYNAMIC_SHARED(T, base);
  return base;
}

// The array of T at a byte offset of the carve-up.
template <typename T>
__device__ __forceinline__ device::SharedPtr<T> shared_array(int offset) {
  return dynamic_shared<T>() + offset / int(sizeof(T));
}

// A matrix of T in shared memory whose storage covers whole MMA k-steps (TileSlot). Products read
// it up to its storage's extent, so it owns one invariant: every element outside the part the
// kernel writes (its logical rows x cols) is zero, because shared memory may hold NaN and 0 * NaN
// is NaN. zero_outside establishes it after the logical part changes size (a short last chunk, a
// partial value tile); staging copies write only the logical part, so zeros once written stay.
template <typename T>
struct PaddedTile {
  device::SharedPtr<T> data;
  int rows, cols, ld;  // storage

  __device__ __forceinline__ PaddedTile(const device::SharedPtr<T>& data_, int rows_, int cols_, int ld_)
      : data(data_), rows(rows_), cols(cols_), ld(ld_) {}
  // Tile `index` of a TileSlot carved with tiles(count, ...).
  __device__ __forceinline__ PaddedTile(const TileSlot& s, int index = 0)
      : data(shared_array<T>(s.offset) + index * s.rows * s.ld), rows(s.rows), cols(s.cols), ld(s.ld) {}

  __device__ __forceinline__ T& operator()(int r, int c) const { return data[r * ld + c]; }
  __device__ __forceinline__ SmemMatrix<T> matrix() const { return {data, ld}; }
  __device__ __forceinline__ SmemMatrix<T, true> transposed() const { return {data, ld}; }
  // Rows r .. of the storage (a stack's parts from r on), as a tile of its own.
  __device__ __forceinline__ PaddedTile rows_from(int r) const { return PaddedTile(data + r * ld, rows - r, cols, ld); }
  // Rows r .. r + count of the storage (one part of a stack), as a tile of its own.
  __device__ __forceinline__ PaddedTile part(int r, int count) const { return PaddedTile(data + r * ld, count, cols, ld); }
  // Columns c .. of the storage (c a multiple of kTileGranule), as a tile of its own.
  __device__ __forceinline__ PaddedTile cols_from(int c) const { return PaddedTile(data + c, rows, cols - c, ld); }

  // Zeros every element at row >= valid_rows or column >= valid_cols (block-wide; the caller's
  // next barrier publishes it). Costs nothing when the logical part fills the storage.
  __device__ __forceinline__ void zero_outside(int valid_rows, int valid_cols) const {
    const T zero = device::cast<T>(0.f);
    for (int idx = valid_rows * cols + threadIdx.x; idx < rows * cols; idx += blockDim.x) data[idx / cols * ld + idx % cols] = zero;
    const int right = cols - valid_cols;
    if (right > 0)
      for (int idx = threadIdx.x; idx < valid_rows * right; idx += blockDim.x)
        data[idx / right * ld + valid_cols + idx % right] = zero;
  }
  __device__ __forceinline__ void zero_all() const { zero_outside(0, 0); }
};

}  // namespace kernel
}  // namespace titans
