// Shared-memory carve-up: the same code runs on the host (to size a launch) and on the device (to
// place the arrays), so the two can never disagree. Memory-type agnostic.
#pragma once

#include <cstddef>

#include "device/device.h"

namespace titans {
namespace kernel {

// Leading dimension of a staged [rows, width] tile of T: one 16-byte piece wider than the row,
// so that consecutive rows start in different shared-memory banks.
template <typename T>
__host__ __device__ constexpr int padded(int width) {
  return width + 16 / int(sizeof(T));
}

// Carves the dynamic shared memory into arrays of compute_t followed by arrays of input_t (the
// staged q, k, v, dO tiles keep their own, often narrower, dtype). Offsets are in elements of
// each type; the same code runs on the host (to size the launch) and on the device. Every array
// starts 16-byte aligned (compute_t has at least 4 bytes, input_t at least 2), as 16-byte
// vector accesses and cp.async need.
struct SmemCarver {
  static constexpr int kComputeAlign = 4, kInputAlign = 8;  // elements
  int compute_elems = 0, input_elems = 0;
  __host__ __device__ int compute(int n) {
    const int at = compute_elems;
    compute_elems += (n + kComputeAlign - 1) / kComputeAlign * kComputeAlign;
    return at;
  }
  __host__ __device__ int input(int n) {
    const int at = input_elems;
    input_elems += (n + kInputAlign - 1) / kInputAlign * kInputAlign;
    return at;
  }
  template <typename compute_t, typename input_t>
  __host__ __device__ size_t bytes() const {
    return size_t(compute_elems) * sizeof(compute_t) + size_t(input_elems) * sizeof(input_t);
  }
};

// The launch's dynamic shared memory as an array of T (a function of its own, so that each type's
// extern declaration sits in its own scope).
template <typename T>
__device__ __forceinline__ device::SharedPtr<T> dynamic_shared() {
  TITANS_DYNAMIC_SHARED(T, base);
  return base;
}

// Pointers for a carve-up: compute_t arrays at the start, input_t arrays after them. compute_t is
// a multiple of input_t in size for every dtype pair used.
template <typename compute_t, typename input_t>
struct SmemBase {
  static_assert(sizeof(compute_t) % sizeof(input_t) == 0, "input arrays must stay aligned");
  device::SharedPtr<compute_t> compute_base;
  device::SharedPtr<input_t> input_base;
  int input_start;  // in input_t elements
  __device__ explicit SmemBase(const SmemCarver& carver)
      : compute_base(dynamic_shared<compute_t>()), input_base(dynamic_shared<input_t>()),
        input_start(carver.compute_elems * int(sizeof(compute_t) / sizeof(input_t))) {}
  __device__ device::SharedPtr<compute_t> compute(int offset) const { return compute_base + offset; }
  __device__ device::SharedPtr<input_t> input(int offset) const { return input_base + (input_start + offset); }
};

// Host side: the dynamic shared memory of a kernel's carve-up.
template <typename Ktraits, class Layout>
size_t smem_bytes(const Layout& layout) {
  return layout.carver.template bytes<typename Ktraits::compute_t, typename Ktraits::input_t>();
}

}  // namespace kernel
}  // namespace titans
