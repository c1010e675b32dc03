"""Distributed forms of the ops over ``torch.distributed``.

:func:`linear_memory_cp`: the linear memory with one sequence split across the ranks of a
process group (context parallel).
"""

from .context_parallel import linear_memory_cp, segment_map

__all__ = ["linear_memory_cp", "segment_map"]
