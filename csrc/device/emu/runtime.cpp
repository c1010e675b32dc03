// The fiber scheduler behind the CPU SIMT emulation (see runtime.h).
#include "device/emu/runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <deque>
#include <memory>
#include <queue>
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
std::atomic<int64_t> g_copy_landing_seed{-1};
std::atomic<int64_t> g_write_visibility_seed{-1};
std::atomic<int64_t> g_block_interleaving_seed{-1};

// One random stream per mode and block, from the mode's seed and the block's rank in the grid.
uint64_t stream_seed(int64_t seed, uint64_t salt, uint64_t block_rank) {
  uint64_t z = static_cast<uint64_t>(seed) * 0x9e3779b97f4a7c15ull + salt;  // splitmix64
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return (z ^ (z >> 31)) + block_rank;
}

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

// A thread's pending shared-memory writes under set_write_visibility: the 16-byte lines of the
// block's shared memory it touched since it last published, each as it was when first touched
// (seen) and with the thread's own writes (mine). The thread reads and writes its lines; other
// threads see shared memory itself. Publishing writes back only the bytes that differ from what
// the thread saw, so threads that write different bytes of one line do not undo each other.
class WriteBuffer {
 public:
  static constexpr size_t kLine = 16;

  // Starts a block whose shared memory is [shared, shared + bytes); the buffer is empty.
  void attach(unsigned char* shared, size_t bytes) {
    shared_ = shared;
    // The previous block's threads published at their exit, which emptied the table.
    const size_t lines = (bytes + kLine - 1) / kLine;
    if (slot_of_line_.size() != lines || used_ != 0) slot_of_line_.assign(lines, kNoSlot);
    used_ = 0;
  }

  unsigned char* element(size_t offset, size_t bytes) {
    if (offset % kLine + bytes > kLine)
      fail("misaligned shared memory access: " + std::to_string(bytes) + " bytes at byte offset " +
           std::to_string(offset));
    const size_t index = offset / kLine;
    int32_t slot = slot_of_line_[index];
    if (slot == kNoSlot) {
      if (used_ == chunks_.size() * kChunkLines) chunks_.push_back(std::make_unique<Line[]>(kChunkLines));
      slot = static_cast<int32_t>(used_++);
      Line& l = line(slot);
      l.index = index;
      std::memcpy(l.seen, shared_ + index * kLine, kLine);
      std::memcpy(l.mine, l.seen, kLine);
      slot_of_line_[index] = slot;
    }
    return line(slot).mine + offset % kLine;
  }

  // Copies [offset, offset + bytes) as this thread sees it.
  void read(void* out, size_t offset, size_t bytes) const {
    auto* to = static_cast<unsigned char*>(out);
    for (size_t b = 0; b < bytes; ++b) {
      const size_t at = offset + b;
      const int32_t slot = slot_of_line_[at / kLine];
      to[b] = slot == kNoSlot ? shared_[at] : line(slot).mine[at % kLine];
    }
  }

  // The byte offset in shared memory of a pointer into one of this buffer's lines, or -1.
  std::ptrdiff_t offset_of(const void* p) const {
    const auto* byte = static_cast<const unsigned char*>(p);
    for (size_t c = 0; c < chunks_.size(); ++c) {
      const auto* first = reinterpret_cast<const unsigned char*>(chunks_[c].get());
      if (byte < first || byte >= first + kChunkLines * sizeof(Line)) continue;
      const size_t slot = c * kChunkLines + static_cast<size_t>(byte - first) / sizeof(Line);
      const Line& l = line(slot);
      const size_t in_line = static_cast<size_t>(byte - l.mine);
      if (slot >= used_ || l.index == kDropped || in_line >= kLine) return -1;
      return static_cast<std::ptrdiff_t>(l.index * kLine + in_line);
    }
    return -1;
  }

  // Makes every pending write visible and empties the buffer.
  void publish() {
    for (size_t slot = 0; slot < used_; ++slot) {
      Line& l = line(slot);
      if (l.index == kDropped) continue;
      write_back(l);
      slot_of_line_[l.index] = kNoSlot;
    }
    used_ = 0;
  }

  // The same for the lines that overlap [offset, offset + bytes) only.
  void publish(size_t offset, size_t bytes) {
    if (used_ == 0 || bytes == 0) return;
    for (size_t index = offset / kLine; index <= (offset + bytes - 1) / kLine; ++index) {
      const int32_t slot = slot_of_line_[index];
      if (slot == kNoSlot) continue;
      Line& l = line(slot);
      write_back(l);
      l.index = kDropped;
      slot_of_line_[index] = kNoSlot;
    }
  }

 private:
  static constexpr int32_t kNoSlot = -1;
  static constexpr size_t kDropped = ~size_t{0};
  static constexpr size_t kChunkLines = 256;
  struct Line {
    size_t index;  // of the line in shared memory, or kDropped
    unsigned char seen[kLine];
    unsigned char mine[kLine];
  };
  Line& line(size_t slot) { return chunks_[slot / kChunkLines][slot % kChunkLines]; }
  const Line& line(size_t slot) const { return chunks_[slot / kChunkLines][slot % kChunkLines]; }
  void write_back(const Line& l) {
    unsigned char* at = shared_ + l.index * kLine;
    for (size_t b = 0; b < kLine; ++b)
      if (l.mine[b] != l.seen[b]) at[b] = l.mine[b];
  }

  unsigned char* shared_ = nullptr;
  std::vector<int32_t> slot_of_line_;
  std::vector<std::unique_ptr<Line[]>> chunks_;  // lines never move, so references stay valid
  size_t used_ = 0;
};

// What one thread of a block needs, kept across the blocks that run in its slot.
struct ThreadResources {
  Stack stack;
  WriteBuffer write_buffer;
};
using BlockResources = std::vector<std::unique_ptr<ThreadResources>>;

// Thread resources of the launches on this OS thread, kept for the next launch: mapping a fresh
// stack per thread and faulting its pages in costs more than a small kernel's whole run.
class ResourcePool {
 public:
  BlockResources take(size_t threads) {
    BlockResources taken;
    while (taken.size() < threads && !spare_.empty()) {
      taken.push_back(std::move(spare_.back()));
      spare_.pop_back();
    }
    while (taken.size() < threads) taken.push_back(std::make_unique<ThreadResources>());
    return taken;
  }
  void give_back(BlockResources& resources) {
    for (std::unique_ptr<ThreadResources>& r : resources)
      if (spare_.size() < kMaxSpare) spare_.push_back(std::move(r));
    resources.clear();
  }

 private:
  static constexpr size_t kMaxSpare = kResidentBlocks * 1024;
  BlockResources spare_;
};
thread_local ResourcePool t_resource_pool;

enum class FiberState { kRunnable, kAtBlockBarrier, kAtWarpSync, kDone };

struct Fiber {
  ThreadContext thread;
  Context context;
  WriteBuffer* write_buffer = nullptr;  // non-null under set_write_visibility
  FiberState state = FiberState::kRunnable;
  const char* barrier_file = nullptr;  // where it waits at __syncthreads
  int barrier_line = 0;
  unsigned warp_mask = 0;  // the mask it waits with at a warp collective
  // Its cp.async copies not waited for (indices into the block's copies): those issued since the
  // last commit, and the committed groups, oldest first.
  std::vector<uint32_t> uncommitted_copies;
  std::deque<std::vector<uint32_t>> copy_groups;

  size_t pending_copies() const {
    size_t n = uncommitted_copies.size();
    for (const std::vector<uint32_t>& group : copy_groups) n += group.size();
    return n;
  }
};

struct AsyncCopy {
  void* dst;
  const void* src;
  size_t bytes;
  uint64_t serial;  // tells a reused slot from the copy a landing time was drawn for
  bool landed;
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

// One block in flight on this OS thread; the grid runner steps it until it has no runnable fiber.
class Block {
 public:
  Block(const GridLaunch& launch, const std::function<void()>& body, dim3 block_idx, BlockResources& resources)
      : launch_(launch),
        body_(body),
        block_idx_(block_idx),
        fibers_(resources.size()),
        warps_((resources.size() + 31) / 32),
        shared_(launch.dynamic_smem_bytes + kMaxStaticSharedBytes, kSharedPoison),
        static_used_(0) {
    const uint64_t block_rank =
        block_idx.x + uint64_t{launch.grid.x} * (block_idx.y + uint64_t{launch.grid.y} * block_idx.z);
    const int64_t schedule_seed = g_schedule_seed.load(), landing_seed = g_copy_landing_seed.load();
    const int64_t visibility_seed = g_write_visibility_seed.load();
    random_order_ = schedule_seed >= 0;
    if (random_order_) rng_.seed(stream_seed(schedule_seed, 1, block_rank));
    early_landing_ = landing_seed >= 0;
    if (early_landing_) landing_rng_.seed(stream_seed(landing_seed, 2, block_rank));
    buffered_writes_ = visibility_seed >= 0;
    if (buffered_writes_) visibility_rng_.seed(stream_seed(visibility_seed, 3, block_rank));
    const dim3 bd = launch.block;
    for (size_t i = 0; i < fibers_.size(); ++i) {
      Fiber& f = fibers_[i];
      const unsigned rank = static_cast<unsigned>(i);
      f.thread = {dim3(rank % bd.x, rank / bd.x % bd.y, rank / (bd.x * bd.y)), block_idx, bd, launch.grid,
                  static_cast<int>(rank % 32), static_cast<int>(rank / 32)};
      context_init(f.context, resources[i]->stack.base(), kFiberStackBytes, &fiber_entry);
      if (buffered_writes_) {
        f.write_buffer = &resources[i]->write_buffer;
        f.write_buffer->attach(shared_.data(), shared_.size());
      }
      ready_.push_back(static_cast<int>(i));
    }
  }

  // Runs one runnable fiber up to its next synchronization point; false when none is runnable
  // (then finish() tells a finished block from a deadlock).
  bool step();
  void finish() {
    if (exited_ != static_cast<int>(fibers_.size())) deadlock();
  }

  // --- called on a fiber ---
  static Block& current() { return *t_block; }
  Fiber& fiber() { return *t_fiber; }
  std::string where(const Fiber& f) const {
    return "titans emulation: kernel '" + std::string(launch_.kernel_name) + "', block " + format_dim(block_idx_) +
           ", thread " + format_dim(f.thread.thread_idx);
  }
  void wait_at_barrier(const char* file, int line) {
    Fiber& f = fiber();
    if (f.write_buffer) f.write_buffer->publish();
    f.state = FiberState::kAtBlockBarrier;
    f.barrier_file = file;
    f.barrier_line = line;
    yield();
  }
  // A warp collective; `fence`: it orders memory (__syncwarp), else it only exchanges values.
  void wait_at_warp(unsigned mask, bool fence) {
    Fiber& f = fiber();
    if (!((mask >> f.thread.lane) & 1u)) fail("__syncwarp/warp collective with a mask that does not name this lane");
    if (f.write_buffer && (fence || visibility_rng_() % 2 == 0)) f.write_buffer->publish();
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
  // Byte offset of an address in this block's shared memory.
  size_t shared_offset(const void* p) const {
    const auto* byte = static_cast<const unsigned char*>(p);
    if (byte < shared_.data() || byte >= shared_.data() + shared_.size())
      fail("an address outside the block's shared memory was used as a shared-memory address");
    return static_cast<size_t>(byte - shared_.data());
  }
  unsigned char* shared_byte(size_t offset) { return shared_.data() + offset; }
  void issue_copy(void* dst, const void* src, size_t bytes);
  void commit_copies();
  void wait_copies(size_t pending_groups);
  void record_error(const std::string& message) { error_ = message; }

  static thread_local Block* t_block;
  static thread_local Fiber* t_fiber;

 private:
  static void fiber_entry();
  void yield() { context_switch(fiber().context, scheduler_); }
  void after_switch(Fiber& f);
  void on_warp_arrival(Fiber& f);
  void check_warp_lanes_alive(const Warp& w, int warp_index);
  void land(uint32_t copy);
  void land_due_copies();
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
  // cp.async copies in flight: slots reused through free_copies_; under set_copy_landing, the
  // scheduler step at which each lands unless its wait comes first (earliest on top).
  std::vector<AsyncCopy> copies_;
  std::vector<uint32_t> free_copies_;
  uint64_t copy_serial_ = 0;
  uint64_t steps_ = 0;
  bool early_landing_ = false;
  std::mt19937_64 landing_rng_;
  struct Landing {
    uint64_t step, serial;
    uint32_t copy;
    bool operator>(const Landing& o) const { return step > o.step; }
  };
  std::priority_queue<Landing, std::vector<Landing>, std::greater<Landing>> landings_;
  bool buffered_writes_ = false;
  std::mt19937_64 visibility_rng_;
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
  if (t_fiber->write_buffer) t_fiber->write_buffer->publish();
  t_fiber->state = FiberState::kDone;
  block.yield();
}

bool Block::step() {
  if (ready_.empty()) return false;
  Fiber& f = fibers_[pick()];
  t_block = this;
  t_fiber = &f;
  ++steps_;
  if (early_landing_) land_due_copies();
  context_switch(scheduler_, f.context);
  t_fiber = nullptr;
  t_block = nullptr;
  if (!error_.empty()) throw KernelError(error_);
  after_switch(f);
  return true;
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

// A copy lands: it reads its source and writes its destination now (at its wait by default, the
// latest moment the GPU may read the source).
void Block::land(uint32_t copy) {
  AsyncCopy& c = copies_[copy];
  if (c.landed) return;
  std::memcpy(c.dst, c.src, c.bytes);
  c.landed = true;
}

void Block::land_due_copies() {
  while (!landings_.empty() && landings_.top().step <= steps_) {
    const Landing due = landings_.top();
    landings_.pop();
    if (copies_[due.copy].serial == due.serial) land(due.copy);
  }
}

void Block::issue_copy(void* dst, const void* src, size_t bytes) {
  Fiber& f = fiber();
  // The thread's own earlier writes to the destination come before the copy.
  if (f.write_buffer) f.write_buffer->publish(shared_offset(dst), bytes);
  uint32_t copy;
  if (free_copies_.empty()) {
    copy = static_cast<uint32_t>(copies_.size());
    copies_.push_back({});
  } else {
    copy = free_copies_.back();
    free_copies_.pop_back();
  }
  copies_[copy] = {dst, src, bytes, ++copy_serial_, false};
  f.uncommitted_copies.push_back(copy);
  if (!early_landing_) return;
  // Any moment up to two rounds of the block's threads ahead (the wait may come first); 0: now.
  const uint64_t delay = std::uniform_int_distribution<uint64_t>(0, 2 * fibers_.size())(landing_rng_);
  if (delay == 0) {
    land(copy);
  } else {
    landings_.push({steps_ + delay, copy_serial_, copy});
  }
}

void Block::commit_copies() {
  Fiber& f = fiber();
  f.copy_groups.push_back(std::move(f.uncommitted_copies));
  f.uncommitted_copies.clear();
}

void Block::wait_copies(size_t pending_groups) {
  Fiber& f = fiber();
  while (f.copy_groups.size() > pending_groups) {
    for (const uint32_t copy : f.copy_groups.front()) {
      land(copy);
      // What the thread itself wrote there before is overwritten; it reads the copy from now on.
      AsyncCopy& c = copies_[copy];
      if (f.write_buffer) f.write_buffer->publish(shared_offset(c.dst), c.bytes);
      c.serial = 0;
      free_copies_.push_back(copy);
    }
    f.copy_groups.pop_front();
  }
}

// Runs every block of a grid: one after another in grid order, or under set_block_interleaving
// up to kResidentBlocks at once, started in a seeded random order, stepped in a random order.
void run_blocks(const GridLaunch& launch, const std::function<void()>& thread_body) {
  const dim3 g = launch.grid;
  std::vector<dim3> order;
  for (unsigned z = 0; z < g.z; ++z)
    for (unsigned y = 0; y < g.y; ++y)
      for (unsigned x = 0; x < g.x; ++x) order.emplace_back(x, y, z);
  const int64_t seed = g_block_interleaving_seed.load();
  std::mt19937_64 rng;
  size_t resident = 1;
  if (seed >= 0) {
    rng.seed(stream_seed(seed, 4, order.size()));
    std::shuffle(order.begin(), order.end(), rng);
    resident = std::min<size_t>(kResidentBlocks, order.size());
  }
  const size_t threads = size_t{launch.block.x} * launch.block.y * launch.block.z;
  // Declared before the blocks, so that they are destroyed first (also when a block throws).
  struct Lease {
    std::vector<BlockResources> slots;
    ~Lease() {
      for (BlockResources& r : slots) t_resource_pool.give_back(r);
    }
  } resources;
  std::vector<std::unique_ptr<Block>> running(resident);
  std::vector<size_t> live;  // slots of running blocks
  size_t next = 0;
  for (size_t slot = 0; slot < resident; ++slot) {
    resources.slots.push_back(t_resource_pool.take(threads));
    running[slot] = std::make_unique<Block>(launch, thread_body, order[next++], resources.slots[slot]);
    live.push_back(slot);
  }
  while (!live.empty()) {
    const size_t at = live.size() == 1 ? 0 : std::uniform_int_distribution<size_t>(0, live.size() - 1)(rng);
    const size_t slot = live[at];
    if (running[slot]->step()) continue;
    running[slot]->finish();
    if (next < order.size()) {
      running[slot] = std::make_unique<Block>(launch, thread_body, order[next++], resources.slots[slot]);
    } else {
      running[slot].reset();
      live.erase(live.begin() + static_cast<std::ptrdiff_t>(at));
    }
  }
}

}  // namespace

// --- runtime.h ---

void set_schedule(int64_t seed) { g_schedule_seed.store(seed < 0 ? -1 : seed); }
void set_copy_landing(int64_t seed) { g_copy_landing_seed.store(seed < 0 ? -1 : seed); }
void set_write_visibility(int64_t seed) { g_write_visibility_seed.store(seed < 0 ? -1 : seed); }
void set_block_interleaving(int64_t seed) { g_block_interleaving_seed.store(seed < 0 ? -1 : seed); }

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
  run_blocks(launch, thread_body);
}

const ThreadContext& current_thread() { return Block::t_fiber->thread; }

void sync_block(const char* file, int line) { Block::current().wait_at_barrier(file, line); }

void sync_warp(unsigned mask) { Block::current().wait_at_warp(mask, true); }

const unsigned char* warp_exchange(unsigned mask, const void* value, size_t bytes) {
  Block& block = Block::current();
  Warp& w = block.warp();
  const int parity = w.parity;
  std::memcpy(w.slots[parity][block.fiber().thread.lane], value, bytes);
  block.wait_at_warp(mask, false);
  return &w.slots[parity][0][0];
}

void async_copy(void* dst, const void* src, size_t bytes) { Block::current().issue_copy(dst, src, bytes); }

void async_commit() { Block::current().commit_copies(); }

void async_wait(int pending_groups) { Block::current().wait_copies(static_cast<size_t>(pending_groups)); }

void fail(const std::string& what) { throw std::runtime_error(what); }

void* shared_static(size_t bytes, const char* name, const char* file, int line) {
  return Block::current().static_shared(bytes, name, file, line);
}

void* shared_dynamic(size_t* bytes) { return Block::current().dynamic_shared(bytes); }

void* shared_element(void* address, size_t bytes) {
  Block& block = Block::current();
  WriteBuffer* buffer = block.fiber().write_buffer;
  if (!buffer) return address;
  return buffer->element(block.shared_offset(address), bytes);
}

void load_shared(void* out, const void* address, size_t bytes) {
  Block& block = Block::current();
  const WriteBuffer* buffer = block.fiber().write_buffer;
  if (!buffer) {
    std::memcpy(out, address, bytes);
  } else {
    buffer->read(out, block.shared_offset(address), bytes);
  }
}

void* atomic_address(void* address) {
  if (!Block::t_fiber || !Block::t_fiber->write_buffer) return address;
  Block& block = Block::current();
  WriteBuffer& buffer = *block.fiber().write_buffer;
  const std::ptrdiff_t offset = buffer.offset_of(address);
  if (offset < 0) return address;  // global memory
  buffer.publish(static_cast<size_t>(offset), 1);
  return block.shared_byte(static_cast<size_t>(offset));
}

}  // namespace emu
}  // namespace device
}  // namespace titans
