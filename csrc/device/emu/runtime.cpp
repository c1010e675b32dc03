// The fiber scheduler behind the CPU SIMT emulation (see runtime.h).
#include "device/emu/runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <deque>
#include <memory>
#include <random>
#include <sstream>
#include <vector>

// ---------------------------------------------------------------------------------------------
// Context switch. On x86-64 a hand-written switch of the callee-saved registers (glibc's
// swapcontext makes a signal-mask system call per switch, ~15x slower); elsewhere ucontext.
// A new fiber starts in fiber_entry() on its own stack and never returns from it.
#if defined(__x86_64__)

extern "C" void titans_emu_switch(void** save_sp, void* load_sp);
extern "C" void titans_emu_fiber_start();

// switch: push the callee-saved registers, MXCSR and the x87 control word, save rsp, load the
// other fiber's rsp and pop its state. fiber_start: the first "return address" of a new fiber;
// calls the entry function kept in r12 with a 16-byte aligned stack.
asm(R"(
  .text
  .globl titans_emu_switch
  .hidden titans_emu_switch
  .type titans_emu_switch, @function
titans_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size titans_emu_switch, .-titans_emu_switch

  .globl titans_emu_fiber_start
  .hidden titans_emu_fiber_start
  .type titans_emu_fiber_start, @function
titans_emu_fiber_start:
  callq *%r12
  ud2
  .size titans_emu_fiber_start, .-titans_emu_fiber_start
)");

namespace {

struct Context {
  void* sp = nullptr;
};

void context_init(Context& ctx, void* stack_base, size_t stack_bytes, void (*entry)()) {
  // The frame titans_emu_switch pops, from the saved rsp upwards: MXCSR + x87 control word,
  // r15, r14, r13, r12 (= entry), rbx, rbp, return address (= fiber_start). After the return
  // rsp is 16-byte aligned, as a call instruction expects.
  auto* top = reinterpret_cast<uint64_t*>((reinterpret_cast<uintptr_t>(stack_base) + stack_bytes) & ~uintptr_t{15}) - 2;
  uint64_t* frame = top - 8;
  uint32_t mxcsr;
  uint16_t x87_control;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(x87_control));
  std::memset(frame, 0, 8 * sizeof(uint64_t));
  std::memcpy(frame, &mxcsr, sizeof(mxcsr));
  std::memcpy(reinterpret_cast<char*>(frame) + 4, &x87_control, sizeof(x87_control));
  frame[4] = reinterpret_cast<uint64_t>(entry);                    // r12
  frame[7] = reinterpret_cast<uint64_t>(&titans_emu_fiber_start);  // return address
  ctx.sp = frame;
}

void context_switch(Context& from, Context& to) { titans_emu_switch(&from.sp, to.sp); }

}  // namespace

#else

#include <ucontext.h>

namespace {

struct Context {
  ucontext_t uc;
};

void context_init(Context& ctx, void* stack_base, size_t stack_bytes, void (*entry)()) {
  getcontext(&ctx.uc);
  ctx.uc.uc_stack.ss_sp = stack_base;
  ctx.uc.uc_stack.ss_size = stack_bytes;
  ctx.uc.uc_link = nullptr;
  makecontext(&ctx.uc, entry, 0);
}

void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

}  // namespace

#endif

namespace titans {
namespace device {
namespace emu {
namespace {

constexpr size_t kFiberStackBytes = 256 * 1024;
// Shared memory limits of the GPUs we build for: 48 KiB static, 227 KiB per block in all (H100).
constexpr size_t kMaxStaticSharedBytes = 48 * 1024;
constexpr size_t kMaxSharedBytes = 227 * 1024;
// Fresh shared memory is filled with 0xff bytes (a NaN as float, -1 as int), so a read before
// any write in the block shows up instead of reading the previous block's values.
constexpr unsigned char kSharedPoison = 0xff;
// The block's shared memory is one heap buffer; ldmatrix and cp.async check their shared
// addresses' alignment on the host address, so the buffer must be as aligned as the GPU's.
static_assert(__STDCPP_DEFAULT_NEW_ALIGNMENT__ >= 16, "operator new must return 16-byte aligned memory");

std::atomic<int64_t> g_schedule_seed{-1};

// A fiber stack with an inaccessible guard page below it, so an overflow faults at once.
class Stack {
 public:
  Stack() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    bytes_ = kFiberStackBytes + page;
    void* mem = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) throw KernelError("titans emulation: cannot map a fiber stack");
    mprotect(mem, page, PROT_NONE);
    mem_ = mem;
    base_ = static_cast<char*>(mem) + page;
  }
  ~Stack() { munmap(mem_, bytes_); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  void* base() const { return base_; }

 private:
  void* mem_;
  void* base_;
  size_t bytes_;
};

enum class FiberState { kRunnable, kAtBlockBarrier, kAtWarpSync, kDone };

struct AsyncCopy {
  void* dst;
  const void* src;
  size_t bytes;
};

struct Fiber {
  ThreadContext thread;
  Context context;
  FiberState state = FiberState::kRunnable;
  const char* barrier_file = nullptr;  // where it waits at __syncthreads
  int barrier_line = 0;
  unsigned warp_mask = 0;  // the mask it waits with at a warp collective
  // Its cp.async copies not yet performed: those issued since the last commit, and the
  // committed groups, oldest first.
  std::vector<AsyncCopy> uncommitted_copies;
  std::vector<std::vector<AsyncCopy>> copy_groups;

  size_t pending_copies() const {
    size_t n = uncommitted_copies.size();
    for (const std::vector<AsyncCopy>& group : copy_groups) n += group.size();
    return n;
  }
};

struct Warp {
  unsigned arrived = 0;  // lanes waiting at the current collective
  unsigned mask = 0;     // its mask
  int parity = 0;        // which slot buffer the current collective writes
  unsigned char slots[2][32][kWarpSlotBytes];
};

struct StaticShared {
  const char* name;
  const char* file;
  int line;
  size_t offset;
};

std::string format_dim(const dim3& d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

// One block in flight on this OS thread.
class Block {
 public:
  Block(const GridLaunch& launch, const std::function<void()>& body, dim3 block_idx,
        std::vector<std::unique_ptr<Stack>>& stacks)
      : launch_(launch),
        body_(body),
        block_idx_(block_idx),
        fibers_(stacks.size()),
        warps_((stacks.size() + 31) / 32),
        shared_(launch.dynamic_smem_bytes + kMaxStaticSharedBytes, kSharedPoison),
        static_used_(0) {
    const dim3 bd = launch.block;
    for (size_t i = 0; i < fibers_.size(); ++i) {
      Fiber& f = fibers_[i];
      const unsigned rank = static_cast<unsigned>(i);
      f.thread = {dim3(rank % bd.x, rank / bd.x % bd.y, rank / (bd.x * bd.y)), block_idx, bd, launch.grid,
                  static_cast<int>(rank % 32), static_cast<int>(rank / 32)};
      context_init(f.context, stacks[i]->base(), kFiberStackBytes, &fiber_entry);
    }
    const int64_t seed = g_schedule_seed.load();
    random_order_ = seed >= 0;
    if (random_order_) {
      const uint64_t block_rank = block_idx.x + uint64_t{launch.grid.x} * (block_idx.y + uint64_t{launch.grid.y} * block_idx.z);
      rng_.seed(static_cast<uint64_t>(seed) * 0x9e3779b97f4a7c15ull + block_rank);
    }
  }

  void run();

  // --- called on a fiber ---
  static Block& current() { return *t_block; }
  Fiber& fiber() { return *t_fiber; }
  std::string where(const Fiber& f) const {
    return "titans emulation: kernel '" + std::string(launch_.kernel_name) + "', block " + format_dim(block_idx_) +
           ", thread " + format_dim(f.thread.thread_idx);
  }
  void wait_at_barrier(const char* file, int line) {
    Fiber& f = fiber();
    f.state = FiberState::kAtBlockBarrier;
    f.barrier_file = file;
    f.barrier_line = line;
    yield();
  }
  void wait_at_warp(unsigned mask) {
    Fiber& f = fiber();
    if (!((mask >> f.thread.lane) & 1u)) fail("__syncwarp/warp collective with a mask that does not name this lane");
    f.state = FiberState::kAtWarpSync;
    f.warp_mask = mask;
    yield();
  }
  Warp& warp() { return warps_[fiber().thread.warp]; }
  void* static_shared(size_t bytes, const char* name, const char* file, int line) {
    for (const StaticShared& s : statics_)
      if (s.line == line && std::strcmp(s.file, file) == 0 && std::strcmp(s.name, name) == 0)
        return shared_.data() + launch_.dynamic_smem_bytes + s.offset;
    const size_t offset = (static_used_ + 15) / 16 * 16;
    if (offset + bytes > kMaxStaticSharedBytes)
      fail("static shared memory of the block exceeds 48 KiB at '" + std::string(name) + "'");
    statics_.push_back({name, file, line, offset});
    static_used_ = offset + bytes;
    return shared_.data() + launch_.dynamic_smem_bytes + offset;
  }
  void* dynamic_shared(size_t* bytes) {
    *bytes = launch_.dynamic_smem_bytes;
    return shared_.data();
  }
  void record_error(const std::string& message) { error_ = message; }

  static thread_local Block* t_block;
  static thread_local Fiber* t_fiber;

 private:
  static void fiber_entry();
  void yield() { context_switch(fiber().context, scheduler_); }
  void after_switch(Fiber& f);
  void on_warp_arrival(Fiber& f);
  void check_warp_lanes_alive(const Warp& w, int warp_index);
  [[noreturn]] void deadlock();
  [[noreturn]] void error(const Fiber& f, const std::string& what) const { throw KernelError(where(f) + ": " + what); }
  void make_runnable(int index) {
    fibers_[index].state = FiberState::kRunnable;
    ready_.push_back(index);
  }
  int pick() {
    size_t at = 0;
    if (random_order_) {
      at = std::uniform_int_distribution<size_t>(0, ready_.size() - 1)(rng_);
      std::swap(ready_[at], ready_.front());
    }
    const int index = ready_.front();
    ready_.pop_front();
    return index;
  }

  const GridLaunch& launch_;
  const std::function<void()>& body_;
  dim3 block_idx_;
  std::vector<Fiber> fibers_;
  std::vector<Warp> warps_;
  std::vector<unsigned char> shared_;  // dynamic bytes, then the static arrays
  size_t static_used_;
  std::vector<StaticShared> statics_;
  Context scheduler_;
  std::deque<int> ready_;
  bool random_order_ = false;
  std::mt19937_64 rng_;
  int at_barrier_ = 0;
  int exited_ = 0;
  std::string error_;
};

thread_local Block* Block::t_block = nullptr;
thread_local Fiber* Block::t_fiber = nullptr;

void Block::fiber_entry() {
  Block& block = *t_block;
  try {
    block.body_();
  } catch (const std::exception& e) {
    block.record_error(block.where(*t_fiber) + ": " + e.what());
  } catch (...) {
    block.record_error(block.where(*t_fiber) + ": unknown exception");
  }
  // Outside the handler: the C++ runtime's "current exception" is per OS thread, not per fiber.
  t_fiber->state = FiberState::kDone;
  block.yield();
}

void Block::run() {
  for (size_t i = 0; i < fibers_.size(); ++i) ready_.push_back(static_cast<int>(i));
  t_block = this;
  struct Reset {
    ~Reset() { t_block = nullptr, t_fiber = nullptr; }
  } reset;
  while (!ready_.empty()) {
    Fiber& f = fibers_[pick()];
    t_fiber = &f;
    context_switch(scheduler_, f.context);
    t_fiber = nullptr;
    if (!error_.empty()) throw KernelError(error_);
    after_switch(f);
  }
  if (exited_ != static_cast<int>(fibers_.size())) deadlock();
}

void Block::after_switch(Fiber& f) {
  const int n = static_cast<int>(fibers_.size());
  switch (f.state) {
    case FiberState::kRunnable:
      break;
    case FiberState::kAtWarpSync:
      on_warp_arrival(f);
      break;
    case FiberState::kDone: {
      ++exited_;
      const Warp& w = warps_[f.thread.warp];
      if (w.arrived != 0 && ((w.mask >> f.thread.lane) & 1u))
        error(f, "exited while its warp waits for it at a warp collective (mask 0x" +
                     [&] { std::ostringstream s; s << std::hex << w.mask; return s.str(); }() + ")");
      if (const size_t pending = f.pending_copies())
        error(f, "exited with cp.async copies not waited for (" + std::to_string(pending) +
                     "; commit them, then cp_async_wait<0>())");
      break;
    }
    case FiberState::kAtBlockBarrier:
      ++at_barrier_;
      break;
  }
  if (at_barrier_ == 0 || at_barrier_ + exited_ != n) return;
  // Every live thread waits at a barrier: release them, unless the barrier is broken.
  const Fiber* waiter = nullptr;
  for (const Fiber& g : fibers_) {
    if (g.state == FiberState::kDone) {
      const Fiber& w = *std::find_if(fibers_.begin(), fibers_.end(),
                                     [](const Fiber& x) { return x.state == FiberState::kAtBlockBarrier; });
      error(g, "exited without reaching the __syncthreads() at " + std::string(w.barrier_file) + ":" +
                   std::to_string(w.barrier_line) + " that thread " + format_dim(w.thread.thread_idx) + " waits at");
    }
    if (waiter && (g.barrier_line != waiter->barrier_line || std::strcmp(g.barrier_file, waiter->barrier_file) != 0))
      error(g, "waits at the __syncthreads() at " + std::string(g.barrier_file) + ":" + std::to_string(g.barrier_line) +
                   " while thread " + format_dim(waiter->thread.thread_idx) + " waits at the one at " +
                   waiter->barrier_file + ":" + std::to_string(waiter->barrier_line));
    waiter = &g;
  }
  at_barrier_ = 0;
  for (int i = 0; i < n; ++i) make_runnable(i);
}

void Block::on_warp_arrival(Fiber& f) {
  Warp& w = warps_[f.thread.warp];
  if (w.arrived != 0 && w.mask != f.warp_mask) {
    std::ostringstream s;
    s << "warp collective with mask 0x" << std::hex << f.warp_mask << " while other lanes of its warp wait with mask 0x"
      << w.mask << " (the emulation needs one mask per warp at a time)";
    error(f, s.str());
  }
  w.mask = f.warp_mask;
  w.arrived |= 1u << f.thread.lane;
  check_warp_lanes_alive(w, f.thread.warp);
  if (w.arrived != w.mask) return;
  w.arrived = 0;
  w.parity ^= 1;
  for (int lane = 0; lane < 32; ++lane)
    if ((w.mask >> lane) & 1u) make_runnable(f.thread.warp * 32 + lane);
}

void Block::check_warp_lanes_alive(const Warp& w, int warp_index) {
  for (int lane = 0; lane < 32; ++lane) {
    if (!((w.mask >> lane) & 1u)) continue;
    const size_t index = static_cast<size_t>(warp_index) * 32 + lane;
    if (index >= fibers_.size() || fibers_[index].state == FiberState::kDone) {
      std::ostringstream s;
      s << "warp collective with mask 0x" << std::hex << w.mask << std::dec << " names lane " << lane
        << (index >= fibers_.size() ? ", which the block does not have" : ", which has exited");
      error(fibers_[static_cast<size_t>(warp_index) * 32 + static_cast<size_t>(__builtin_ctz(w.arrived))], s.str());
    }
  }
}

void Block::deadlock() {
  // Nothing is runnable, yet not every thread has exited: e.g. a warp collective waits for a lane
  // that waits at __syncthreads, or a barrier waits for threads stuck in a warp collective.
  for (const Fiber& f : fibers_) {
    if (f.state == FiberState::kAtWarpSync) {
      std::ostringstream s;
      s << "deadlock: waits at a warp collective (mask 0x" << std::hex << f.warp_mask
        << ") whose other lanes never arrive (they wait at a __syncthreads() or have diverged)";
      error(f, s.str());
    }
  }
  error(fibers_.front(), "deadlock: no thread can run");
}

}  // namespace

// --- runtime.h ---

void set_schedule(int64_t seed) { g_schedule_seed.store(seed < 0 ? -1 : seed); }

void run_grid(const GridLaunch& launch, const std::function<void()>& thread_body) {
  const std::string name = "titans emulation: kernel '" + std::string(launch.kernel_name) + "': ";
  const dim3 g = launch.grid, b = launch.block;
  if (g.x == 0 || g.y == 0 || g.z == 0 || b.x == 0 || b.y == 0 || b.z == 0)
    throw KernelError(name + "empty grid or block " + format_dim(g) + " x " + format_dim(b));
  const size_t threads = size_t{b.x} * b.y * b.z;
  if (threads > 1024 || b.z > 64) throw KernelError(name + "block " + format_dim(b) + " exceeds the GPU's limits");
  if (launch.dynamic_smem_bytes > kMaxSharedBytes)
    throw KernelError(name + std::to_string(launch.dynamic_smem_bytes) +
                      " bytes of dynamic shared memory exceed the 227 KiB of an H100 block");
  if (Block::t_block) throw KernelError(name + "launched from inside a kernel (not supported)");
  std::vector<std::unique_ptr<Stack>> stacks;
  for (size_t i = 0; i < threads; ++i) stacks.push_back(std::make_unique<Stack>());
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x) {
        Block block(launch, thread_body, dim3(x, y, z), stacks);
        block.run();
      }
}

const ThreadContext& current_thread() { return Block::t_fiber->thread; }

void sync_block(const char* file, int line) { Block::current().wait_at_barrier(file, line); }

void sync_warp(unsigned mask) { Block::current().wait_at_warp(mask); }

const unsigned char* warp_exchange(unsigned mask, const void* value, size_t bytes) {
  Block& block = Block::current();
  Warp& w = block.warp();
  const int parity = w.parity;
  std::memcpy(w.slots[parity][block.fiber().thread.lane], value, bytes);
  block.wait_at_warp(mask);
  return &w.slots[parity][0][0];
}

void async_copy(void* dst, const void* src, size_t bytes) {
  Block::current().fiber().uncommitted_copies.push_back({dst, src, bytes});
}

void async_commit() {
  Fiber& f = Block::current().fiber();
  f.copy_groups.push_back(std::move(f.uncommitted_copies));
  f.uncommitted_copies.clear();
}

void async_wait(int pending_groups) {
  Fiber& f = Block::current().fiber();
  const size_t pending = static_cast<size_t>(pending_groups);
  if (f.copy_groups.size() <= pending) return;
  const auto landed = f.copy_groups.end() - static_cast<std::ptrdiff_t>(pending);
  // The source is read only now, the latest moment the GPU may read it.
  for (auto group = f.copy_groups.begin(); group != landed; ++group)
    for (const AsyncCopy& copy : *group) std::memcpy(copy.dst, copy.src, copy.bytes);
  f.copy_groups.erase(f.copy_groups.begin(), landed);
}

void fail(const std::string& what) { throw std::runtime_error(what); }

void* shared_static(size_t bytes, const char* name, const char* file, int line) {
  return Block::current().static_shared(bytes, name, file, line);
}

void* shared_dynamic(size_t* bytes) { return Block::current().dynamic_shared(bytes); }

}  // namespace emu
}  // namespace device
}  // namespace titans
