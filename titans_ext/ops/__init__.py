"""The public ops: argument checks, fake kernels and autograd over the compiled operators, and
the switch of the CPU kernels' instruction-set variant."""

from .isa import CPU_ISAS, cpu_isa, set_cpu_isa, supported_cpu_isas
from .linear_memory import linear_memory
from .mlp_memory import mlp_memory

__all__ = ["CPU_ISAS", "cpu_isa", "linear_memory", "mlp_memory", "set_cpu_isa", "supported_cpu_isas"]
