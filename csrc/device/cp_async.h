// cp.async: per-thread asynchronous copies from global to shared memory (sm_80+), for
// pipelines that load tile n + 1 while computing on tile n.
//
// A thread issues copies (cp_async_16 / _8 / _4; source and destination aligned to the copy's
// size), closes them into a group with cp_async_commit() (a commit with no copies makes an empty
// group, which still counts), and cp_async_wait<n>() blocks until at most its n most recently
// committed groups are pending, i.e. every older group has landed (n = 0: all committed groups).
// Copies issued after the last commit are not waited for. A landed copy is visible to the
// issuing thread; other threads see it only after a barrier that follows the wait, as for any
// shared-memory write (PTX ISA, "cp.async", "cp.async.commit_group", "cp.async.wait_group").
//
// The emulation is strict, so that pipeline bugs change results under test: by default a copy
// is only queued when issued and performed when its thread's cp_async_wait covers its group
// (reads of the destination before that see the old contents); under emu::set_copy_landing it
// lands at a seeded random moment between issue and that wait, as on the GPU, so a buffer that
// is refilled while other threads still read it gives wrong results. A thread that exits with
// copies not waited for is an error (emu/runtime.h).
#pragma once

#include <cstdint>

namespace titans {
namespace device {

#if defined(__CUDACC__)

// .cg (L2 only): 16-byte copies stream tiles that the block reads from shared memory anyway.
template <typename T>
__device__ __forceinline__ void cp_async_16(SharedPtr<T> dst, const T* src) {
  static_assert(16 % sizeof(T) == 0, "cp.async copies whole elements");
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(dst)), "l"(src));
}
// .ca: 4- and 8-byte copies (.cg takes 16 bytes only).
template <typename T>
__device__ __forceinline__ void cp_async_8(SharedPtr<T> dst, const T* src) {
  static_assert(8 % sizeof(T) == 0, "cp.async copies whole elements");
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(shared_address(dst)), "l"(src));
}
template <typename T>
__device__ __forceinline__ void cp_async_4(SharedPtr<T> dst, const T* src) {
  static_assert(4 % sizeof(T) == 0, "cp.async copies whole elements");
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(shared_address(dst)), "l"(src));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// The "memory" clobber keeps the compiler from moving shared-memory reads above the wait.
template <int kPendingGroups>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPendingGroups) : "memory");
}

#else  // emulation

namespace emu {

template <int kBytes, typename T>
void cp_async(SharedPtr<T> dst, const T* src) {
  static_assert(kBytes % sizeof(T) == 0, "cp.async copies whole elements");
  T* to = dst.span(kBytes / sizeof(T));
  require_aligned(to, kBytes, "cp.async destination " + dst.element_name(0));
  require_aligned(src, kBytes, "cp.async source (global memory)");
  async_copy(to, src, kBytes);
}

}  // namespace emu

template <typename T>
inline void cp_async_16(SharedPtr<T> dst, const T* src) { emu::cp_async<16>(dst, src); }
template <typename T>
inline void cp_async_8(SharedPtr<T> dst, const T* src) { emu::cp_async<8>(dst, src); }
template <typename T>
inline void cp_async_4(SharedPtr<T> dst, const T* src) { emu::cp_async<4>(dst, src); }

inline void cp_async_commit() { emu::async_commit(); }

template <int kPendingGroups>
inline void cp_async_wait() {
  static_assert(kPendingGroups >= 0, "cp.async.wait_group takes a count of groups");
  emu::async_wait(kPendingGroups);
}

#endif

}  // namespace device
}  // namespace titans
