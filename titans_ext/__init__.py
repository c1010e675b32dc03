"""titans_ext: fast kernels for Titans-style neural long-term memory.

Ops: :func:`linear_memory` (matrix memory) and :func:`mlp_memory` (deep memory), with a C++ CPU
path and CUDA kernels; their decode steps :func:`linear_memory_step` and :func:`mlp_memory_step`
(one token at O(state) cost), and :func:`linear_memory_step_` / :func:`mlp_memory_step_` on a
decode state the caller owns, updated in place; :func:`cpu_isa` / :func:`set_cpu_isa` show and switch the
instruction-set variant of the CPU kernels (environment variable ``TITANS_EXT_CPU_ISA`` at import);
:func:`set_cpu_state_cache`, :func:`empty_cpu_state_cache` and :func:`cpu_state_cache_info` control the
cache of the CPU forwards' saved states (``TITANS_EXT_CPU_STATE_CACHE=0`` at import turns it off).
References (plain PyTorch, for tests and benchmarks): :mod:`titans_ext.reference`.
Model API (layers, Titans blocks, a language model): :mod:`titans_ext.model`.
Context parallel (one sequence split across processes): :mod:`titans_ext.distributed`.
Demo: ``python -m titans_ext demo``.
"""

import torch

from ._compat import INSTALL_HINT, check_installed_torch

try:
    from . import _build_info
except ImportError:  # pragma: no cover - depends on the installation
    raise ImportError("titans_ext is not built (no titans_ext/_build_info.py, which the build writes): "
                      f"{INSTALL_HINT}") from None
# Before any library is loaded, so a build for another torch gives one readable error.
check_installed_torch(_build_info, torch)

try:
    from . import _C  # noqa: F401  (loading the library registers the titans_ext:: operators)
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(f"titans_ext's compiled library could not be loaded ({exc}); rebuild it: {INSTALL_HINT}") from exc

import os

from .ops import (CPU_ISAS, ChunkStartState, cpu_isa, cpu_state_cache_info, empty_chunk_state, empty_cpu_state_cache,
                  linear_memory, linear_memory_step, linear_memory_step_, mlp_memory, mlp_memory_step, mlp_memory_step_,
                  set_cpu_isa, set_cpu_state_cache, supported_cpu_isas)
from .model import (LMMBlock, MACBlock, MAGBlock, MALBlock, MemoryState, NeuralMemory, SWABlock, TitansLM,
                    detach_state)
from . import distributed

if os.environ.get("TITANS_EXT_CPU_ISA"):
    try:
        set_cpu_isa(os.environ["TITANS_EXT_CPU_ISA"])
    except ValueError as exc:
        raise ValueError(f"environment variable TITANS_EXT_CPU_ISA: {exc}") from None
_state_cache_env = os.environ.get("TITANS_EXT_CPU_STATE_CACHE")
if _state_cache_env is not None:
    if _state_cache_env not in ("0", "1"):
        raise ValueError(f"environment variable TITANS_EXT_CPU_STATE_CACHE: expected 0 (off) or 1 (on), "
                         f"got {_state_cache_env!r}")
    set_cpu_state_cache(_state_cache_env == "1")

__version__ = "0.1.0"
__all__ = ["ChunkStartState", "empty_chunk_state", "linear_memory", "linear_memory_step", "linear_memory_step_",
           "mlp_memory", "mlp_memory_step", "mlp_memory_step_", "cpu_isa",
           "set_cpu_isa", "supported_cpu_isas", "CPU_ISAS", "set_cpu_state_cache", "empty_cpu_state_cache",
           "cpu_state_cache_info", "LMMBlock",
           "MACBlock", "MAGBlock", "MALBlock", "MemoryState", "NeuralMemory", "SWABlock", "TitansLM", "detach_state"]
