"""The public ops: argument checks, fake kernels and autograd over the compiled operators."""

from .linear_memory import linear_memory
from .mlp_memory import mlp_memory
from .step import ChunkStartState, linear_memory_step, mlp_memory_step

__all__ = ["ChunkStartState", "linear_memory", "linear_memory_step", "mlp_memory", "mlp_memory_step"]
