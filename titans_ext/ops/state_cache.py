"""The cache of the CPU forwards' saved chunk-start states (csrc/binding/cpu_state_cache.h).

A CPU forward run for a backward saves every chunk's start state (``chunk_states``: for the MLP
memory about 5 KB per token and head in fp32), and the backward frees it. Fresh memory costs a
page fault and the OS zeroing every page before the kernel writes it; the cache keeps the
released buffers and hands them to the next forward asking for the same size, so a training loop
pays that once (docs/cpu_state_cache.md has the measurements).

It never holds more than the largest amount of saved states that were alive at once: a forward
asking for a size it does not hold first frees the oldest cached buffers that would push it past
that peak. :func:`empty_cpu_state_cache` frees what it holds; :func:`set_cpu_state_cache` turns it
off and on (off from the start: environment variable ``TITANS_EXT_CPU_STATE_CACHE=0`` at import). CUDA tensors use
PyTorch's caching allocator and are not concerned.
"""

import torch


def set_cpu_state_cache(enabled):
    """Turns the cache on or off. Off, forwards allocate fresh memory each call and buffers
    released are freed; what the cache holds stays until :func:`empty_cpu_state_cache` (call
    both to give its memory back)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_cpu_state_cache: enabled must be a bool, got {type(enabled).__name__}")
    torch.ops.titans_ext.set_cpu_state_cache(enabled)


def empty_cpu_state_cache():
    """Frees the cached buffers (the saved states of live autograd graphs stay); the peak the
    cache may grow to restarts from what is live."""
    torch.ops.titans_ext.empty_cpu_state_cache()


def cpu_state_cache_info():
    """The cache's state: ``enabled``; ``live_bytes`` (its buffers in use), ``cached_bytes``
    (released, kept), ``peak_bytes`` (the most live at once: live + cached never exceeds it);
    ``hits`` and ``misses`` of the forwards' requests since import."""
    enabled, live, cached, peak, hits, misses = torch.ops.titans_ext.cpu_state_cache_info()
    return {"enabled": bool(enabled), "live_bytes": live, "cached_bytes": cached, "peak_bytes": peak,
            "hits": hits, "misses": misses}
