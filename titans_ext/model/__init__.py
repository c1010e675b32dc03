"""Model API over the memory ops: the memory layer, the Titans blocks and a language model.

- :class:`NeuralMemory` (+ :class:`MemoryState`): the long-term memory layer, streaming.
- :class:`MACBlock`, :class:`MAGBlock`, :class:`MALBlock`, :class:`LMMBlock`: the Titans blocks;
  :class:`SWABlock`: sliding-window attention without memory (the baseline).
- :class:`TitansLM`: embeddings, blocks, tied head, cached ``generate()``.

Each takes packed documents, ``forward(x, cu_seqlens=...)`` (:mod:`titans_ext.model.packed`).
"""

from .attention import Attention, AttentionCache, SlidingWindowAttention
from .blocks import HybridState, LMMBlock, MACBlock, MACState, MAGBlock, MALBlock, SWABlock
from .lm import TitansLM
from .memory import MemoryState, NeuralMemory, chunk_stability_edge, detach_state, stable_max_lr

__all__ = [
    "Attention", "AttentionCache", "HybridState", "LMMBlock", "MACBlock", "MACState", "MAGBlock", "MALBlock",
    "MemoryState", "NeuralMemory", "SWABlock", "SlidingWindowAttention", "TitansLM", "chunk_stability_edge", "detach_state",
    "stable_max_lr",
]
