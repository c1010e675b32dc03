// The CPU SIMT emulation runtime: runs a kernel's grid block by block; each block's threads run
// as fibers on the calling OS thread.
//
// A fiber runs until it reaches a synchronization point (__syncthreads, a warp collective), then
// the scheduler picks the next runnable fiber: in thread order (the default, deterministic), or,
// after set_schedule(seed >= 0), a seeded random one, so code that relies on an order it never
// enforced with a barrier gives wrong results under test. Errors (a barrier not every thread
// reaches, different barriers, inconsistent warp masks, shared memory out of bounds, deadlock)
// are thrown from the launch as KernelError naming the kernel, the block and the thread.
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

// Scheduling order: seed < 0 runs threads in order; seed >= 0 picks a seeded random order.
void set_schedule(int64_t seed);

// --- Called from kernel code (through the macros and templates in emu.h). ---
const ThreadContext& current_thread();
void sync_block(const char* file, int line);
void sync_warp(unsigned mask);
// A warp collective: writes `bytes` of `value` to this lane's slot, waits for the lanes of
// `mask`, and returns the warp's 32 slots (kWarpSlotBytes apart), valid until this lane's next
// collective.
constexpr size_t kWarpSlotBytes = 64;
const unsigned char* warp_exchange(unsigned mask, const void* value, size_t bytes);
// cp.async, per thread as on the GPU: async_copy queues a copy without performing it;
// async_commit closes the queued copies into a group (an empty group if none), and
// async_wait(n) performs the copies of every committed group but the newest n. Copies not yet
// committed are not waited for (PTX cp.async.wait_group). A thread that exits with copies
// still queued is reported as an error: on the GPU nothing would order them with any read of
// their destination, so they are a missing commit or wait.
void async_copy(void* dst, const void* src, size_t bytes);
void async_commit();
void async_wait(int pending_groups);
// Raises an error for the current thread (an exception that the launch rethrows as KernelError).
[[noreturn]] void fail(const std::string& what);
// Shared memory of the current block: a static array (one per declaration site, the same
// memory for every thread of the block) and the dynamic buffer of the launch.
void* shared_static(size_t bytes, const char* name, const char* file, int line);
void* shared_dynamic(size_t* bytes);

}  // namespace emu
}  // namespace device
}  // namespace titans
