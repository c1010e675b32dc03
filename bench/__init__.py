"""Benchmarks (not installed): run from the repository root, e.g. ``python -m bench.cpu``."""
