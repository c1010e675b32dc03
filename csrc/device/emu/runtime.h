// The CPU SIMT emulation runtime: runs a kernel's grid; each block's threads run as fibers on the
// calling OS thread.
//
// A fiber runs until it reaches a synchronization point (__syncthreads, a warp collective), then
// the scheduler picks the next runnable fiber. By default everything happens in the most orderly
// way CUDA allows: threads in thread order, blocks one after another in grid order, shared-memory
// writes visible at once, cp.async copies landing exactly at the wait that covers them. Four
// hazard modes take the freedoms the GPU has instead, so that code relying on an order it never
// enforced gives wrong results under test. Each takes a seed: seed >= 0 turns it on (runs are
// reproducible per seed), seed < 0 turns it off (the default):
//   set_schedule: the next fiber is a seeded random runnable one (a missing __syncthreads).
//   set_copy_landing: each cp.async copy lands (reads its source, writes its destination) at a
//     seeded random moment between its issue and the cp_async_wait that covers it (a buffer
//     refilled while other threads still read it).
//   set_write_visibility: a thread's shared-memory writes stay private to it until its next
//     memory fence (__syncthreads, __syncwarp, its exit), and at each of its warp collectives
//     (shuffles, ballots, MMA, ldmatrix exchange registers but order no memory) they become
//     visible with probability 1/2 (a collective used as if it were a __syncwarp).
//   set_block_interleaving: up to kResidentBlocks blocks run at once, started in a seeded random
//     order, their fibers' steps interleaved at random (blocks that communicate within a launch).
// Errors (a barrier not every thread reaches, different barriers, inconsistent warp masks, shared
// memory out of bounds, deadlock) are thrown from the launch as KernelError naming the kernel,
// the block and the thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>

// CUDA's dim3, for kernels and launches compiled by the host compiler.
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace titans {
namespace device {
namespace emu {

struct KernelError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// What kernel code sees of the thread it runs as.
struct ThreadContext {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  int lane = 0;
  int warp = 0;
};

struct GridLaunch {
  const char* kernel_name;
  dim3 grid, block;
  size_t dynamic_smem_bytes;
};

// Runs thread_body once per thread of the grid; returns when every block has finished.
void run_grid(const GridLaunch& launch, const std::function<void()>& thread_body);

// The hazard modes (see above); seed < 0 turns a mode off.
void set_schedule(int64_t seed);
void set_copy_landing(int64_t seed);
void set_write_visibility(int64_t seed);
void set_block_interleaving(int64_t seed);
constexpr int kResidentBlocks = 4;

// --- Called from kernel code (through the macros and templates in emu.h). ---
const ThreadContext& current_thread();
void sync_block(const char* file, int line);
void sync_warp(unsigned mask);
// A warp collective: writes `bytes` of `value` to this lane's slot, waits for the lanes of
// `mask`, and returns the warp's 32 slots (kWarpSlotBytes apart), valid until this lane's next
// collective.
constexpr size_t kWarpSlotBytes = 64;
const unsigned char* warp_exchange(unsigned mask, const void* value, size_t bytes);
// cp.async, per thread as on the GPU: async_copy queues a copy; async_commit closes the queued
// copies into a group (an empty group if none), and async_wait(n) completes the copies of every
// committed group but the newest n. Copies not yet committed are not waited for (PTX
// cp.async.wait_group). A copy lands at its wait, or earlier under set_copy_landing. A thread
// that exits with copies not waited for is reported as an error: on the GPU nothing would order
// them with any read of their destination, so they are a missing commit or wait.
void async_copy(void* dst, const void* src, size_t bytes);
void async_commit();
void async_wait(int pending_groups);
// Raises an error for the current thread (an exception that the launch rethrows as KernelError).
[[noreturn]] void fail(const std::string& what);
// Shared memory of the current block: a static array (one per declaration site, the same
// memory for every thread of the block) and the dynamic buffer of the launch.
void* shared_static(size_t bytes, const char* name, const char* file, int line);
void* shared_dynamic(size_t* bytes);
// Where the current thread reads and writes the shared-memory element at `address` (`bytes`
// long): the element itself, or under set_write_visibility the thread's private copy of it,
// valid until the thread's next fence or collective.
void* shared_element(void* address, size_t bytes);
// Copies `bytes` of shared memory at `address` as the current thread sees them (its own pending
// writes included), for the wrappers that read raw rows (ldmatrix).
void load_shared(void* out, const void* address, size_t bytes);
// The address an atomic must act on: `address` itself, or for the current thread's private copy
// of a shared element the element, after the thread's pending writes to it became visible.
void* atomic_address(void* address);

}  // namespace emu
}  // namespace device
}  // namespace titans
