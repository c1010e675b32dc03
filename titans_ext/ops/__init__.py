"""The public ops: argument checks, fake kernels and autograd over the compiled operators."""

from .linear_memory import linear_memory
from .mlp_memory import mlp_memory

__all__ = ["linear_memory", "mlp_memory"]
