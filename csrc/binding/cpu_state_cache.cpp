// The cache of the CPU forwards' saved chunk-start states (cpu_state_cache.h) and its operators:
// set_cpu_state_cache, empty_cpu_state_cache and cpu_state_cache_info. Stable ABI only.
#include "binding/cpu_state_cache.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <list>
#include <mutex>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/Exception.h>

namespace titans {

using torch::headeronly::DeviceType;
using torch::headeronly::ScalarType;
using torch::stable::Tensor;

namespace {

constexpr size_t kHugePage = size_t(1) << 21;
constexpr size_t kCacheLine = 64;

// A fresh buffer of at least `bytes`. One that spans a 2 MiB page is aligned to it and backed by
// transparent huge pages where the OS offers them on request (Linux "madvise", the common
// default): one fault per 2 MiB on its first use instead of one per 4 KiB, and fewer TLB misses
// when the backward streams it.
void* allocate_fresh(size_t bytes) {
  const size_t align = bytes >= kHugePage ? kHugePage : kCacheLine;
  const size_t rounded = (bytes + align - 1) / align * align;  // aligned_alloc wants a multiple
  void* ptr = std::aligned_alloc(align, rounded);
  STD_TORCH_CHECK(ptr, "titans_ext: out of memory allocating ", bytes, " bytes of CPU saved states");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (align == kHugePage) madvise(ptr, rounded / kHugePage * kHugePage, MADV_HUGEPAGE);
#endif
  return ptr;
}

// Released buffers kept for reuse. Invariant: live + cached <= peak, the largest live seen (or
// since the last empty()). Thread-safe: tensors die on any thread (autograd's, the GC's).
class StateCache {
 public:
  struct Info {
    bool enabled;
    size_t live, cached, peak;
    uint64_t hits, misses;
  };

  // A buffer of exactly `bytes` (its size is the cache's key); `from_cache` says whether it is
  // the cache's (release it with release()) or plain (free it with std::free). Fresh memory is
  // allocated, and evicted buffers freed, outside the lock.
  void* acquire(size_t bytes, bool& from_cache) {
    std::vector<void*> evicted;
    if (void* cached = take(bytes, from_cache, evicted)) return cached;
    for (void* ptr : evicted) std::free(ptr);
    if (!from_cache) return allocate_fresh(bytes);
    try {
      return allocate_fresh(bytes);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      live_ -= bytes;
      throw;
    }
  }

  void release(void* ptr, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_ -= bytes;
      if (enabled_) {
        free_.emplace_front(bytes, ptr);  // most recent first: a loop's next call finds it soonest
        cached_ += bytes;
        return;
      }
    }
    std::free(ptr);
  }

  // Frees the cached buffers; the peak restarts from what is live.
  void empty() {
    std::list<std::pair<size_t, void*>> dropped;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      dropped.swap(free_);
      cached_ = 0;
      peak_ = live_;
    }
    for (const auto& entry : dropped) std::free(entry.second);
  }

  // Disabled, forwards get fresh buffers and released ones are freed; the cached ones stay until
  // empty(), so that a benchmark can time calls without the cache between calls with it.
  void set_enabled(bool enabled) {
    std::lock_guard<std::mutex> lock(mutex_);
    enabled_ = enabled;
  }

  Info info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {enabled_, live_, cached_, peak_, hits_, misses_};
  }

 private:
  // A cached buffer of `bytes`, or nullptr after counting a miss: `bytes` is then live, and
  // `evicted` holds the oldest buffers it would have pushed past the peak (a new size, another
  // shape). Disabled: nullptr and from_cache false.
  void* take(size_t bytes, bool& from_cache, std::vector<void*>& evicted) {
    std::lock_guard<std::mutex> lock(mutex_);
    from_cache = enabled_;
    if (!enabled_) return nullptr;
    for (auto it = free_.begin(); it != free_.end(); ++it)
      if (it->first == bytes) {
        void* ptr = it->second;
        free_.erase(it);
        cached_ -= bytes;
        live_ += bytes;
        ++hits_;
        return ptr;
      }
    ++misses_;
    peak_ = std::max(peak_, live_ + bytes);
    while (!free_.empty() && live_ + cached_ + bytes > peak_) {
      cached_ -= free_.back().first;
      evicted.push_back(free_.back().second);
      free_.pop_back();
    }
    live_ += bytes;
    return nullptr;
  }

  std::mutex mutex_;
  bool enabled_ = true;
  size_t live_ = 0, cached_ = 0, peak_ = 0;
  uint64_t hits_ = 0, misses_ = 0;
  std::list<std::pair<size_t, void*>> free_;  // (bytes, buffer), most recently released first
};

// Never destroyed: tensors holding its buffers may outlive static destruction at exit.
StateCache& state_cache() {
  static StateCache* cache = new StateCache;
  return *cache;
}

size_t element_size(ScalarType dtype) {
  switch (dtype) {
    case ScalarType::Float: return 4;
    case ScalarType::Double: return 8;
    default: STD_TORCH_CHECK(false, "cached_cpu_empty: saved states are float32 or float64");
  }
  return 0;
}

void set_cpu_state_cache(bool enabled) { state_cache().set_enabled(enabled); }

void empty_cpu_state_cache() { state_cache().empty(); }

// [enabled, live bytes, cached bytes, peak bytes, hits, misses]
std::vector<int64_t> cpu_state_cache_info() {
  const StateCache::Info i = state_cache().info();
  return {int64_t(i.enabled), int64_t(i.live), int64_t(i.cached), int64_t(i.peak), int64_t(i.hits),
          int64_t(i.misses)};
}

}  // namespace

Tensor cached_cpu_empty(torch::headeronly::IntHeaderOnlyArrayRef sizes, ScalarType dtype) {
  std::vector<int64_t> strides(sizes.size());
  int64_t numel = 1;
  for (size_t d = sizes.size(); d-- > 0;) {
    strides[d] = numel;
    numel *= sizes[d];
  }
  const size_t bytes = size_t(numel) * element_size(dtype);
  if (bytes == 0) return torch::stable::empty(sizes, dtype, std::nullopt, torch::stable::Device(DeviceType::CPU));
  bool from_cache = false;
  void* data = state_cache().acquire(bytes, from_cache);
  auto deleter = [bytes, from_cache](void* ptr) {
    if (from_cache) state_cache().release(ptr, bytes);
    else std::free(ptr);
  };
  return torch::stable::from_blob(data, sizes, strides, torch::stable::Device(DeviceType::CPU), dtype, deleter);
}

STABLE_TORCH_LIBRARY_FRAGMENT(titans_ext, m) {
  m.def("set_cpu_state_cache(bool enabled) -> ()");
  m.def("empty_cpu_state_cache() -> ()");
  m.def("cpu_state_cache_info() -> int[]");
}

// CompositeExplicitAutograd: the ops take no tensor to dispatch on.
STABLE_TORCH_LIBRARY_IMPL(titans_ext, CompositeExplicitAutograd, m) {
  m.impl("set_cpu_state_cache", TORCH_BOX(&set_cpu_state_cache));
  m.impl("empty_cpu_state_cache", TORCH_BOX(&empty_cpu_state_cache));
  m.impl("cpu_state_cache_info", TORCH_BOX(&cpu_state_cache_info));
}

}  // namespace titans
