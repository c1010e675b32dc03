"""The public ops: argument checks, fake kernels and autograd over the compiled operators, the
switch of the CPU kernels' instruction-set variant and the cache of their saved states."""

from .isa import CPU_ISAS, cpu_isa, set_cpu_isa, supported_cpu_isas
from .linear_memory import linear_memory
from .mlp_memory import mlp_memory
from .read import linear_memory_read, mlp_memory_read
from .state_cache import cpu_state_cache_info, empty_cpu_state_cache, set_cpu_state_cache
from .step import (ChunkStartState, empty_chunk_state, linear_memory_step, linear_memory_step_, mlp_memory_step,
                   mlp_memory_step_)

__all__ = ["CPU_ISAS", "ChunkStartState", "cpu_isa", "cpu_state_cache_info", "empty_chunk_state",
           "empty_cpu_state_cache", "linear_memory", "linear_memory_read",
           "linear_memory_step", "linear_memory_step_", "mlp_memory", "mlp_memory_read", "mlp_memory_step",
           "mlp_memory_step_", "set_cpu_isa", "set_cpu_state_cache", "supported_cpu_isas"]
