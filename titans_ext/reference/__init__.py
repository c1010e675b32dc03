"""Plain-PyTorch references of the ops, used by tests and benchmarks (the ops never import them).

- :mod:`.recurrent`: the token-by-token recurrence, the oracle.
- :mod:`.chunked`: the kernels' chunk algorithm written with torch ops.
"""

from .chunked import chunk_gate_coefficients, linear_memory_chunked, mlp_memory_chunked
from .recurrent import linear_memory_recurrent, mlp_memory_recurrent

__all__ = [
    "chunk_gate_coefficients",
    "linear_memory_chunked",
    "linear_memory_recurrent",
    "mlp_memory_chunked",
    "mlp_memory_recurrent",
]
