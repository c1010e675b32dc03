// Emulation side of the device layer: CUDA's names, defined for the host compiler on top of the
// fiber runtime (runtime.h). Only what our kernels use; extend it when a kernel needs more.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <utility>

#include "device/emu/numeric.h"
#include "device/emu/runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

#define threadIdx (::titans::device::emu::current_thread().thread_idx)
#define blockIdx (::titans::device::emu::current_thread().block_idx)
#define blockDim (::titans::device::emu::current_thread().block_dim)
#define gridDim (::titans::device::emu::current_thread().grid_dim)
#define __syncthreads() ::titans::device::emu::sync_block(__FILE__, __LINE__)

#define TITANS_SHARED_ARRAY(T, name, n)                                                                   \
  ::titans::device::SharedPtr<T> name(                                                                    \
      static_cast<T*>(::titans::device::emu::shared_static(sizeof(T) * (n), #name, __FILE__, __LINE__)), \
      (n), #name)
#define TITANS_DYNAMIC_SHARED(T, name) ::titans::device::SharedPtr<T> name = ::titans::device::emu::dynamic_shared<T>(#name)

struct CUstream_st;  // cudaStream_t is a CUstream_st*; the emulation runs synchronously and ignores it

namespace titans {
namespace device {

using Stream = CUstream_st*;
using Error = int;  // the emulation reports errors by throwing emu::KernelError
constexpr Error kSuccess = 0;

// A bounds-checked pointer into shared memory: p[i] and p + n, as kernels use raw pointers.
// Under set_write_visibility p[i] is the thread's private copy of the element, valid until the
// thread's next synchronization point (do not keep the reference across one).
template <typename T>
class SharedPtr {
 public:
  SharedPtr(T* base, std::ptrdiff_t size, const char* name, std::ptrdiff_t offset = 0)
      : base_(base), size_(size), name_(name), offset_(offset) {}
  T& operator[](std::ptrdiff_t i) const {
    if (i < 0 || i >= size_) out_of_bounds(i);
    return *static_cast<T*>(emu::shared_element(base_ + i, sizeof(T)));
  }
  SharedPtr operator+(std::ptrdiff_t n) const {
    if (n < 0 || n > size_) out_of_bounds(n);
    return SharedPtr(base_ + n, size_ - n, name_, offset_ + n);
  }
  // The address of elements [0, count), bounds-checked once, for the wrappers that move whole
  // rows or vectors as raw bytes (ldmatrix, cp.async; they read through emu::load_shared).
  T* span(std::ptrdiff_t count) const {
    if (count > size_) out_of_bounds(count - 1);
    return base_;
  }
  // "name[index]" of element i, for error messages.
  std::string element_name(std::ptrdiff_t i) const {
    return std::string(name_) + "[" + std::to_string(offset_ + i) + "]";
  }

 private:
  [[noreturn]] void out_of_bounds(std::ptrdiff_t i) const {
    emu::fail("shared memory out of bounds: " + element_name(i) + ", valid indices 0.." +
              std::to_string(offset_ + size_ - 1));
  }
  T* base_;
  std::ptrdiff_t size_;
  const char* name_;
  std::ptrdiff_t offset_;  // of base_ from the start of the named array, for the message
};

namespace emu {

template <typename T>
SharedPtr<T> dynamic_shared(const char* name) {
  size_t bytes = 0;
  T* base = static_cast<T*>(shared_dynamic(&bytes));
  return SharedPtr<T>(base, static_cast<std::ptrdiff_t>(bytes / sizeof(T)), name);
}

// A warp shuffle: every lane of `mask` publishes `value` and reads the one of `src_lane`.
template <typename T>
T shuffle(unsigned mask, T value, int src_lane) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= kWarpSlotBytes, "shuffle of this type");
  const unsigned char* slots = warp_exchange(mask, &value, sizeof(T));
  if (src_lane != current_thread().lane && !((mask >> src_lane) & 1u))
    fail("warp shuffle reads lane " + std::to_string(src_lane) + ", which is not in the mask");
  T out;
  std::memcpy(&out, slots + src_lane * kWarpSlotBytes, sizeof(T));
  return out;
}

// Shared memory is 16-byte aligned in the emulation as on the GPU (runtime.cpp), so host
// addresses have the alignment that the instruction's shared or global address would have.
inline void require_aligned(const void* address, size_t alignment, const std::string& what) {
  if (reinterpret_cast<uintptr_t>(address) % alignment != 0)
    fail(what + " is not " + std::to_string(alignment) + "-byte aligned");
}

inline int segment_start(int width) {
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
    fail("warp shuffle width " + std::to_string(width) + " is not a power of two in 1..32");
  return current_thread().lane / width * width;
}

}  // namespace emu
}  // namespace device
}  // namespace titans

// Warp shuffles, with CUDA's rules for width segments (a source outside the caller's segment
// returns the caller's own value).
template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32) {
  const int start = titans::device::emu::segment_start(width);
  return titans::device::emu::shuffle(mask, var, start + (src_lane % width + width) % width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  const int start = titans::device::emu::segment_start(width);
  const int lane = titans::device::emu::current_thread().lane;
  return titans::device::emu::shuffle(mask, var, lane - start >= static_cast<int>(delta) ? lane - static_cast<int>(delta) : lane);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  const int start = titans::device::emu::segment_start(width);
  const int lane = titans::device::emu::current_thread().lane;
  return titans::device::emu::shuffle(mask, var, lane - start + static_cast<int>(delta) < width ? lane + static_cast<int>(delta) : lane);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  const int start = titans::device::emu::segment_start(width);
  const int lane = titans::device::emu::current_thread().lane;
  const int src = lane ^ lane_mask;
  return titans::device::emu::shuffle(mask, var, src < start + width ? src : lane);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  const int mine = predicate != 0;
  const unsigned char* slots = titans::device::emu::warp_exchange(mask, &mine, sizeof(mine));
  unsigned ballot = 0;
  for (int lane = 0; lane < 32; ++lane) {
    int vote;
    std::memcpy(&vote, slots + lane * titans::device::emu::kWarpSlotBytes, sizeof(vote));
    if (((mask >> lane) & 1u) && vote) ballot |= 1u << lane;
  }
  return ballot;
}

inline void __syncwarp(unsigned mask = 0xffffffffu) { titans::device::emu::sync_warp(mask); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }

// Atomics on global and shared memory (fibers switch only at synchronization points and the
// blocks of a launch run on one OS thread, but the builtins keep them atomic should blocks ever
// run in parallel). They act on memory itself, also under set_write_visibility.
template <typename T>
T atomicAdd(T* address, T val) {
  static_assert(std::is_arithmetic<T>::value, "atomicAdd of this type");
  address = static_cast<T*>(titans::device::emu::atomic_address(address));
  if constexpr (std::is_integral<T>::value) {
    return __atomic_fetch_add(address, val, __ATOMIC_RELAXED);
  } else {
    T old;
    __atomic_load(address, &old, __ATOMIC_RELAXED);
    T desired = old + val;
    while (!__atomic_compare_exchange(address, &old, &desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
      desired = old + val;
    return old;
  }
}
template <typename T>
T atomicMax(T* address, T val) {
  static_assert(std::is_integral<T>::value, "atomicMax of this type");
  address = static_cast<T*>(titans::device::emu::atomic_address(address));
  T old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (old < val && !__atomic_compare_exchange_n(address, &old, val, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
template <typename T>
T atomicCAS(T* address, T compare, T val) {
  static_assert(std::is_integral<T>::value, "atomicCAS of this type");
  address = static_cast<T*>(titans::device::emu::atomic_address(address));
  __atomic_compare_exchange_n(address, &compare, val, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  return compare;
}

namespace titans {
namespace device {

// The one launch helper; in the emulation it runs the whole grid before returning.
template <typename... KernelArgs, typename... Args>
inline Error launch(const char* kernel_name, void (*kernel)(KernelArgs...), dim3 grid, dim3 block,
                    size_t smem_bytes, Stream /*stream*/, Args&&... args) {
  emu::run_grid({kernel_name, grid, block, smem_bytes}, [&] { kernel(args...); });
  return kSuccess;
}

}  // namespace device
}  // namespace titans
