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


def interleaved_samples_ms(fns, device, warmup=1, repeats=5):
    """Wall times of each of ``fns`` in milliseconds, timed in turns: one call of each per round,
    ``repeats`` rounds after ``warmup``, so that a load that drifts during the run (a shared
    machine) weighs on every function alike. Returns one list of ``repeats`` samples per function,
    in round order: samples of the same index come from the same round."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    _sync(device)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples.append((time.perf_counter() - t0) * 1e3)
    return times


def interleaved_medians_ms(fns, device, warmup=1, repeats=5):
    """Median of each function's interleaved_samples_ms: their ratios stay comparable under drift."""
    return [statistics.median(samples) for samples in interleaved_samples_ms(fns, device, warmup, repeats)]


def round_ratios(numerator, denominator):
    """The ratios numerator[r] / denominator[r] of samples timed in the same round r
    (interleaved_samples_ms), sorted: how firm the ratio of their medians is."""
    return sorted(n / d for n, d in zip(numerator, denominator))


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
