"""titans_ext: fast kernels for Titans-style neural long-term memory.

Ops: :func:`linear_memory` (matrix memory) and :func:`mlp_memory` (deep memory), with a C++ CPU
path and CUDA kernels.
References (plain PyTorch, for tests and benchmarks): :mod:`titans_ext.reference`.
Model API (layers, Titans blocks, a language model): :mod:`titans_ext.model`.
Context parallel (one sequence split across processes): :mod:`titans_ext.distributed`.
Demo: ``python -m titans_ext demo``.
"""

import torch

try:
    from . import _C  # noqa: F401  (loading the library registers the titans_ext:: operators)
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"titans_ext's compiled library could not be loaded ({exc}). It must be built against the "
        f"installed torch ({torch.__version__}): pip install --no-build-isolation --no-deps -e ."
    ) from exc

from .ops import linear_memory, mlp_memory
from .model import (LMMBlock, MACBlock, MAGBlock, MALBlock, MemoryState, NeuralMemory, SWABlock, TitansLM,
                    detach_state)
from . import distributed

__version__ = "0.1.0"
__all__ = ["linear_memory", "mlp_memory", "LMMBlock", "MACBlock", "MAGBlock", "MALBlock", "MemoryState",
           "NeuralMemory", "SWABlock", "TitansLM", "detach_state"]
