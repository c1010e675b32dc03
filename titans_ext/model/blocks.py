"""The Titans blocks (Titans Sec. 4): memory as context (MAC), as a gate (MAG), as a layer (MAL),
the memory alone (LMM), and sliding-window attention alone (SWA, the no-memory baseline).

Every block maps ``x [B, T, dim] -> x [B, T, dim]`` with pre-norm residual branches and a
feed-forward, and streams: ``forward(x, state=None) -> (x, state)``, where feeding a sequence
in pieces with the state carried gives the outputs of one call.
"""

from dataclasses import dataclass

import torch
from torch import nn

from .attention import Attention, AttentionCache, SlidingWindowAttention
from .checks import check_input, check_positive_int
from .memory import MemoryState, NeuralMemory


class FeedForward(nn.Module):
    """``x [B, T, dim] -> [B, T, dim]``: Linear, GELU, Linear (hidden ``expansion * dim``)."""

    def __init__(self, dim, expansion=4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, expansion * dim), nn.GELU(), nn.Linear(expansion * dim, dim))

    def forward(self, x):
        return self.net(x)


class _Block(nn.Module):
    """Shared parts: width, the closing feed-forward branch, argument checks."""

    def __init__(self, dim):
        super().__init__()
        check_positive_int("dim", dim)
        self.dim = dim
        self.ff_norm = nn.RMSNorm(dim)
        self.ff = FeedForward(dim)

    def feed_forward(self, x):
        return x + self.ff(self.ff_norm(x))


class _MixerBlock(_Block):
    """``x + mixer(norm(x))``, then the feed-forward; the state is the mixer's."""

    def __init__(self, dim, mixer):
        super().__init__(dim)
        self.norm = nn.RMSNorm(dim)
        self.mixer = mixer

    def initial_state(self, batch_size, dtype=torch.float32, device=None):
        return self.mixer.initial_state(batch_size, dtype, device)

    def forward(self, x, state=None):
        check_input("x", x, self.dim)
        y, state = self.mixer(self.norm(x), state)
        return self.feed_forward(x + y), state


class LMMBlock(_MixerBlock):
    """The memory alone (LMM): ``x + NeuralMemory(norm(x))``, then the feed-forward.

    State: a :class:`MemoryState`. ``memory_options``: a dict of :class:`NeuralMemory` arguments
    (the same in the other blocks).
    """

    def __init__(self, dim, memory_options=None):
        super().__init__(dim, NeuralMemory(dim, **(memory_options or {})))


class SWABlock(_MixerBlock):
    """Sliding-window attention with persistent tokens, then the feed-forward; no memory.

    The baseline a Titans block is compared with. State: an :class:`AttentionCache`.
    """

    def __init__(self, dim, heads=4, window=64, persistent_tokens=4):
        super().__init__(dim, SlidingWindowAttention(dim, heads, window, persistent_tokens))


@dataclass
class HybridState:
    """Streaming state of a block with a memory and a sliding-window attention (MAG, MAL)."""

    memory: MemoryState
    attention: AttentionCache


class _HybridBlock(_Block):
    """A memory and a sliding-window attention side by side in one block (MAG, MAL)."""

    def __init__(self, dim, heads, window, persistent_tokens, memory_options):
        super().__init__(dim)
        self.memory = NeuralMemory(dim, **(memory_options or {}))
        self.attention = SlidingWindowAttention(dim, heads, window, persistent_tokens)

    def initial_state(self, batch_size, dtype=torch.float32, device=None):
        return HybridState(self.memory.initial_state(batch_size, dtype, device),
                           self.attention.initial_state(batch_size, dtype, device))


class MALBlock(_HybridBlock):
    """Memory as a layer (MAL): ``x + NeuralMemory(norm(x))``, then sliding-window attention
    with persistent tokens on the result, then the feed-forward. State: :class:`HybridState`.
    """

    def __init__(self, dim, heads=4, window=64, persistent_tokens=4, memory_options=None):
        super().__init__(dim, heads, window, persistent_tokens, memory_options)
        self.memory_norm = nn.RMSNorm(dim)
        self.attention_norm = nn.RMSNorm(dim)

    def forward(self, x, state=None):
        check_input("x", x, self.dim)
        state = self.initial_state(x.shape[0], x.dtype, x.device) if state is None else state
        m, memory_state = self.memory(self.memory_norm(x), state.memory)
        x = x + m
        y, attention_cache = self.attention(self.attention_norm(x), state.attention)
        return self.feed_forward(x + y), HybridState(memory_state, attention_cache)


class MAGBlock(_HybridBlock):
    """Memory as a gate (MAG): sliding-window attention with persistent tokens and the memory
    read the same normalized input side by side; the branch adds ``RMSNorm(attn) *
    sigmoid(RMSNorm(memory))`` (learned per-channel norm weights) to the residual, then the
    feed-forward. State: :class:`HybridState`.
    """

    def __init__(self, dim, heads=4, window=64, persistent_tokens=4, memory_options=None):
        super().__init__(dim, heads, window, persistent_tokens, memory_options)
        self.norm = nn.RMSNorm(dim)
        self.attention_out_norm = nn.RMSNorm(dim)
        self.memory_out_norm = nn.RMSNorm(dim)

    def forward(self, x, state=None):
        check_input("x", x, self.dim)
        state = self.initial_state(x.shape[0], x.dtype, x.device) if state is None else state
        h = self.norm(x)
        y, attention_cache = self.attention(h, state.attention)
        m, memory_state = self.memory(h, state.memory)
        gated = self.attention_out_norm(y) * torch.sigmoid(self.memory_out_norm(m))
        return self.feed_forward(x + gated), HybridState(memory_state, attention_cache)


@dataclass
class MACState:
    """Streaming state of a :class:`MACBlock`.

    Attributes:
        memory: the memory's state (written with the attention outputs).
        segment_memory: the memory (op state format) at the start of the current segment, which
            every token of the segment reads.
        retrieve_conv_cache: convolution history of the memory's reads of the block input.
        attention: keys and values of the current segment so far (retrieved tokens and input
            tokens); ``attention.position`` counts the tokens seen.
    """

    memory: MemoryState
    segment_memory: tuple
    retrieve_conv_cache: torch.Tensor
    attention: AttentionCache


class MACBlock(_Block):
    """Memory as context (MAC), Titans Sec. 4.1, on segments of ``segment_size`` tokens.

    For each segment S (block input normalized), with M the memory at the segment start::

        h = M(S)                                  # read, no write
        y = Attn([persistent | h | S])            # causal: token i sees h_j and S_j for j <= i
        M <- M written with y;  m = M(y)          # token reads after each token's update
        x <- x + y * sigmoid(m)                   # output gated by the memory read of y

    then the feed-forward. ``segment_size`` must be a multiple of the memory's chunk size, so a
    segment starts at a chunk boundary of the memory. State: :class:`MACState`.
    """

    def __init__(self, dim, heads=4, segment_size=64, persistent_tokens=4, memory_options=None):
        super().__init__(dim)
        check_positive_int("segment_size", segment_size)
        self.segment_size = segment_size
        self.norm = nn.RMSNorm(dim)
        self.attention = Attention(dim, heads, persistent_tokens)
        self.memory = NeuralMemory(dim, **(memory_options or {}))
        if segment_size % self.memory.chunk_size:
            raise ValueError(f"segment_size: expected a multiple of the memory's chunk_size "
                             f"{self.memory.chunk_size}, got {segment_size}")

    def initial_state(self, batch_size, dtype=torch.float32, device=None):
        memory_state = self.memory.initial_state(batch_size, dtype, device)
        attention = self.attention
        cache = AttentionCache.empty(batch_size, attention.heads, attention.head_dim, dtype,
                                     memory_state.conv_cache.device)
        return MACState(memory_state, memory_state.memory, memory_state.conv_cache, cache)

    def _segment_piece(self, h, state):
        """One piece inside one segment: ``h [B, n, dim]`` -> (branch output, state)."""
        cache = state.attention
        offset = cache.position % self.segment_size
        segment_memory, keys, values, key_positions = (
            state.segment_memory, cache.keys, cache.values, cache.key_positions)
        if offset == 0:  # a new segment: read the memory as it is now, at a chunk boundary
            segment_memory = state.memory.memory
            keys, values, key_positions = keys[:, :, :0], values[:, :, :0], key_positions[:0]
        retrieved, retrieve_conv_cache = self.memory.retrieve(h, segment_memory, state.retrieve_conv_cache)
        positions = torch.arange(offset, offset + h.shape[1], device=h.device)
        for tokens in (retrieved, h):
            k, v = self.attention.keys_values(tokens, positions)
            keys, values = torch.cat([keys, k], dim=2), torch.cat([values, v], dim=2)
            key_positions = torch.cat([key_positions, positions])
        mask = key_positions[None, :] <= positions[:, None]
        y = self.attention.attend(self.attention.queries(h, positions), keys, values, mask)
        m, memory_state = self.memory(y, state.memory)
        cache = AttentionCache(keys, values, key_positions, cache.position + h.shape[1])
        return y * torch.sigmoid(m), MACState(memory_state, segment_memory, retrieve_conv_cache, cache)

    def forward(self, x, state=None):
        check_input("x", x, self.dim)
        state = self.initial_state(x.shape[0], x.dtype, x.device) if state is None else state
        h = self.norm(x)
        outputs, start = [], 0
        while start < x.shape[1]:
            length = min(x.shape[1] - start, self.segment_size - state.attention.position % self.segment_size)
            branch, state = self._segment_piece(h[:, start:start + length], state)
            outputs.append(branch)
            start += length
        branch = torch.cat(outputs, dim=1) if outputs else torch.zeros_like(x)
        return self.feed_forward(x + branch), state


BLOCKS = {"mac": MACBlock, "mag": MAGBlock, "mal": MALBlock, "lmm": LMMBlock, "swa": SWABlock}


def make_block(kind, dim, heads, window, persistent_tokens, memory_options):
    """A block by name: ``window`` is the attention window (MAG, MAL, SWA) or the segment (MAC)."""
    if kind == "mac":
        return MACBlock(dim, heads, window, persistent_tokens, memory_options)
    if kind in ("mag", "mal"):
        return BLOCKS[kind](dim, heads, window, persistent_tokens, memory_options)
    if kind == "lmm":
        return LMMBlock(dim, memory_options)
    if kind == "swa":
        return SWABlock(dim, heads, window, persistent_tokens)
    raise ValueError(f"block: expected one of {tuple(BLOCKS)}, got {kind!r}")


__all__ = ["BLOCKS", "FeedForward", "HybridState", "LMMBlock", "MACBlock", "MACState", "MAGBlock", "MALBlock",
           "SWABlock", "make_block"]
