"""Timing helpers shared by the benchmarks: warm-up, then the median of several runs."""

import statistics
import time

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, warmup=2, repeats=7, min_seconds=0.0):
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` calls.

    Runs at least ``repeats`` times, and keeps going until ``min_seconds`` have passed so
    that fast functions are sampled enough.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
