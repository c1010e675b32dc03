"""The public ops: argument checks, fake kernels and autograd over the compiled operators."""

from .linear_memory import linear_memory
from .mlp_memory import mlp_memory
from .read import linear_memory_read, mlp_memory_read

__all__ = ["linear_memory", "linear_memory_read", "mlp_memory", "mlp_memory_read"]
