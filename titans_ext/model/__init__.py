"""Model API over the memory ops: the memory layer, the Titans blocks and a language model."""

from .memory import MemoryState, NeuralMemory, detach_state

__all__ = ["MemoryState", "NeuralMemory", "detach_state"]
