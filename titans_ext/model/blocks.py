"""The Titans blocks (Titans Sec. 4): memory as context (MAC), as a gate (MAG), as a layer (MAL),
the memory alone (LMM), and sliding-window attention alone (SWA, the no-memory baseline).

Every block maps ``x [B, T, dim] -> x [B, T, dim]`` with pre-norm residual branches and a
feed-forward, and streams: ``forward(x, state=None) -> (x, state)``, where feeding a sequence
in pieces with the state carried gives the outputs of one call.

``forward(x, cu_seqlens=cu_seqlens)`` runs packed documents (``x [1, T, dim]``, FlashAttention's
offsets, :mod:`titans_ext.model.packed`): the result is each document run alone from the start of
a stream, concatenated. Nothing crosses a document boundary: the memory's chunks and causal
convolutions restart at each document, the attention windows and MAC segments count from its
first token. Such a call takes no state and returns None as its state.
"""

from dataclasses import dataclass

import torch
from torch import nn

from .attention import Attention, AttentionCache, SlidingWindowAttention
from .checks import check_input, check_positive_int
from .memory import MemoryState, NeuralMemory, decoding_in_place, map_tensors
from .packed import check_packed, run_in_rounds


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

    def forward(self, x, state=None, cu_seqlens=None):
        check_input("x", x, self.dim)
        if cu_seqlens is not None:
            check_packed(x, state, cu_seqlens)  # the block's argument is "state" whatever the mixer calls it
        y, state = self.mixer(self.norm(x), state, cu_seqlens)
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

    def part_states(self, x, state, cu_seqlens):
        """The memory's and the attention's state for a call on ``x`` (None for packed documents)."""
        if cu_seqlens is not None:
            check_packed(x, state, cu_seqlens)
            return None, None
        state = self.initial_state(x.shape[0], x.dtype, x.device) if state is None else state
        return state.memory, state.attention


class MALBlock(_HybridBlock):
    """Memory as a layer (MAL): ``x + NeuralMemory(norm(x))``, then sliding-window attention
    with persistent tokens on the result, then the feed-forward. State: :class:`HybridState`.
    """

    def __init__(self, dim, heads=4, window=64, persistent_tokens=4, memory_options=None):
        super().__init__(dim, heads, window, persistent_tokens, memory_options)
        self.memory_norm = nn.RMSNorm(dim)
        self.attention_norm = nn.RMSNorm(dim)

    def forward(self, x, state=None, cu_seqlens=None):
        check_input("x", x, self.dim)
        memory_state, attention_cache = self.part_states(x, state, cu_seqlens)
        m, memory_state = self.memory(self.memory_norm(x), memory_state, cu_seqlens)
        x = x + m
        y, attention_cache = self.attention(self.attention_norm(x), attention_cache, cu_seqlens)
        return self.feed_forward(x + y), None if cu_seqlens is not None else HybridState(memory_state, attention_cache)


class MAGBlock(_HybridBlock):
    """Memory as a gate (MAG), Titans Sec. 4.2 (eqs. 26-28): sliding-window attention with
    persistent tokens and the memory read the same normalized input side by side::

        h = norm(x)
        y = Attn(h);  m = NeuralMemory(h)                    # eqs. 26-27
        x <- x + RMSNorm(y) * sigmoid(RMSNorm(m)) + m        # eq. 28's gate, plus the read

    then the feed-forward. The gate is the paper's: both outputs normalized with learned
    per-channel weights, the memory's through a sigmoid. State: :class:`HybridState`.

    One departure, deliberate (the one :class:`MACBlock` makes for the same reason): the memory's
    read ``m`` is also added to the residual stream, where eq. 28's output is the gated attention
    output alone. Through the gate a recalled value reaches the loss only as a factor of the
    attention output and of ``sigmoid'``, and the block's memory learned recall beyond the window
    late or not at all: on MQAR with every fact beyond the window (``bench/recall.py``'s default
    setting, issue 16; ``bench/results/recall.md``) the gate alone was still at the training loss
    of chance at step 200 of 600 (4.18) and reached 5.0 % recall at seed 0, where with ``m``
    added the loss was 2.58 at step 175 and recall reached 53.0 / 40.8 / 52.8 % at seeds
    0 / 1 / 2 (MAL 57.5 / 24.7 / 64.6 %).
    """

    def __init__(self, dim, heads=4, window=64, persistent_tokens=4, memory_options=None):
        super().__init__(dim, heads, window, persistent_tokens, memory_options)
        self.norm = nn.RMSNorm(dim)
        self.attention_out_norm = nn.RMSNorm(dim)
        self.memory_out_norm = nn.RMSNorm(dim)

    def forward(self, x, state=None, cu_seqlens=None):
        check_input("x", x, self.dim)
        memory_state, attention_cache = self.part_states(x, state, cu_seqlens)
        h = self.norm(x)
        y, attention_cache = self.attention(h, attention_cache, cu_seqlens)
        m, memory_state = self.memory(h, memory_state, cu_seqlens)
        gated = self.attention_out_norm(y) * torch.sigmoid(self.memory_out_norm(m))
        return (self.feed_forward(x + gated + m),
                None if cu_seqlens is not None else HybridState(memory_state, attention_cache))


@dataclass
class MACState:
    """Streaming state of a :class:`MACBlock`.

    Attributes:
        memory: the memory's state (written with the block input).
        segment_memory: the memory (op state format) at the start of the current segment, which
            every token of the segment reads.
        retrieve_conv_cache: history ``[B, conv_kernel - 1, H * D]`` of the convolution of the
            memory's read queries of the block input.
        attention: keys and values of the current segment so far (retrieved tokens and input
            tokens); ``attention.position`` counts the tokens seen.
    """

    memory: MemoryState
    segment_memory: tuple
    retrieve_conv_cache: torch.Tensor
    attention: AttentionCache


class MACBlock(_Block):
    """Memory as context (MAC), Titans Sec. 4.1 (eqs. 21-25), on segments of ``segment_size`` tokens.

    For each segment S of the block input, with M the memory at the segment start::

        h = norm(M(norm(S)))                      # eq. 21: read with the memory's queries of S, no write
        y = Attn([persistent | h | norm(S)])      # eqs. 22-23; causal: token i sees h_j and S_j, j <= i
        u = norm(S)                               # what the memory writes (eq. 24 writes y, see below)
        M <- M written with u;  m = M(u)          # eq. 24; each token reads after its own write
        x <- x + y + m                            # eq. 25 gates y with m instead, see below

    then the feed-forward. ``M(.)`` is the memory layer's read (its query projection and
    convolution, the op, its output norm, gate and projection, :class:`NeuralMemory`); keys and
    values of the write are the memory's projections of ``u``. State: :class:`MACState`.

    Two departures from the paper, deliberate, both measured on MQAR with every fact segments
    back (``bench/recall.py``'s default setting, issue 16; ``bench/results/recall.md``):

    - What the memory writes: the segment's input S (through its own RMSNorm), where eq. 24 writes
      the attention output ``y``. The segment read (eq. 21) queries the memory with projections of
      S, so the keys it must meet are written from the same stream, as in MAL, where the memory
      reads and writes one stream. On MQAR with 4 facts writing ``y`` stayed at chance (1.4 %,
      seed 0, the former default ``max_lr``); at seeds 0 / 1 / 2 and today's default ``max_lr``
      (``docs/design.md`` §4.1), writing the residual stream after the attention, ``S + y``, reached
      53.0 / 46.4 / 28.1 % recall beyond the window, and its recall of the first question asked,
      27 / 20 / 7 %, shows that the memory held the facts' values but not which key held which: the
      rest came from leaving out the values already answered (``bench/recall.py``'s question table);
      writing S reached 97.5 / 82.1 / 37.2 % (first question 98 / 74 / 23 %; MAL
      89.0 / 50.0 / 57.9 %). The attention's output at a fact averages the segment around it, so
      keys written from ``S + y`` carry the fact's neighbours, and queries at a question carry other
      neighbours.
    - The output: the memory's read after the write, ``m``, is added to the residual stream
      beside the attention output, where eq. 25 gates ``y`` with it (``o = y ⊗ M*(y)``;
      implemented as ``y * sigmoid(m)``). Through the gate a recalled value reaches the loss
      only as a factor of ``y`` and of ``sigmoid'``: at initialization the loss's gradient into
      the memory's projections was a third of MAL's (layer 0: 1.4 against 4.3), and the segment
      read (eq. 21), the other path, reaches the output only through the attention, which gives
      a question token's own read 3.5 % of its weight. MAC with the gate reached 14.8 % recall
      beyond the window where MAL reached 72.3 % (seed 0; training loss 3.77 at step 200 of
      600, MAL 3.76). With ``m`` added, the gradient is on par with MAL's, the training loss
      was 1.97 at step 200, and MAC reached 52.6 / 51.8 / 19.6 % at seeds 0 / 1 / 2 (MAL 72.0 /
      33.3 / 67.8 %: MAC's mean, 41.3 %, is still below MAL's). The segment read still enters the
      attention as context (eqs. 21-23), which is what makes the block MAC: the attention sees
      what the memory held at the segment start next to the segment's own tokens.

    Choices the paper leaves open, made here:

    - Causal reads inside the segment: token i attends the retrieved h_j only for j <= i. h_j is
      read with token j's query, so a full view of h (as drawn in the paper's Figure 3a) would let
      a token see the next ones.
    - Scale: the retrieved tokens enter the attention through an RMSNorm, as the input tokens do
      (pre-norm, as in the other blocks). Without it they enter at about a fifth of the input's
      scale, and at initialization the loss reached the facts of earlier segments far more
      weakly than in MAL.
    - Positions: rotary positions restart at every segment; h_j takes the position of token j.
    - The segment read is the memory at the segment start, a chunk boundary of the memory
      (``segment_size`` must be a multiple of its ``chunk_size``); the memory's momentum carries
      across segments.

    Only the read, the attention and the write depend on the previous segment; the projections
    of the block input and the output transform of the reads after the writes run once per call.
    """

    def __init__(self, dim, heads=4, segment_size=64, persistent_tokens=4, memory_options=None):
        super().__init__(dim)
        check_positive_int("segment_size", segment_size)
        self.segment_size = segment_size
        self.norm = nn.RMSNorm(dim)
        self.retrieved_norm = nn.RMSNorm(dim)
        self.memory_norm = nn.RMSNorm(dim)
        self.attention = Attention(dim, heads, persistent_tokens)
        self.memory = NeuralMemory(dim, **(memory_options or {}))
        if segment_size % self.memory.chunk_size:
            raise ValueError(f"segment_size: expected a multiple of the memory's chunk_size "
                             f"{self.memory.chunk_size}, got {segment_size}")

    def initial_state(self, batch_size, dtype=torch.float32, device=None):
        memory_state = self.memory.initial_state(batch_size, dtype, device)
        attention, memory = self.attention, self.memory
        device = memory_state.conv_cache.device
        cache = AttentionCache.empty(batch_size, attention.heads, attention.head_dim, dtype, device)
        retrieve_conv_cache = torch.zeros(batch_size, memory.qkv_conv.kernel_size - 1, memory.heads * memory.head_dim,
                                          dtype=dtype, device=device)
        return MACState(memory_state, memory_state.memory, retrieve_conv_cache, cache)

    def forward(self, x, state=None, cu_seqlens=None):
        check_input("x", x, self.dim)
        if cu_seqlens is not None:
            check_packed(x, state, cu_seqlens)
            # The segments of all documents that reach segment j run as one padded batch (the
            # loop below runs segments in order anyway), not one document after another.
            return run_in_rounds(self, x, cu_seqlens, self.segment_size), None
        B, T, _ = x.shape
        state = self.initial_state(B, x.dtype, x.device) if state is None else state
        h = self.norm(x)
        start = state.attention.position
        positions = torch.arange(start, start + T, device=x.device) % self.segment_size  # inside the segment
        read_queries, retrieve_conv_cache = self.memory.queries(h, state.retrieve_conv_cache)
        queries = self.attention.queries(h, positions)
        input_keys, input_values = self.attention.keys_values(h, positions)
        memory_state, segment_memory, cache = state.memory, state.segment_memory, state.attention
        pieces, piece_start = [], 0  # up to each segment's end
        while piece_start < T:
            offset = (start + piece_start) % self.segment_size
            pieces.append(slice(piece_start, min(T, piece_start + self.segment_size - offset)))
            piece_start = pieces[-1].stop
        # Split once along time: a slice per piece would cost the backward a zero-filled gradient of
        # the whole tensor per piece.
        lengths = [piece.stop - piece.start for piece in pieces]
        written = self.memory_norm(x)
        written_pieces, h_pieces, read_query_pieces = (t.split(lengths, dim=1) for t in (written, h, read_queries))
        query_pieces, key_pieces, value_pieces = (t.split(lengths, dim=2) for t in (queries, input_keys, input_values))
        ys, reads = [], []
        for i, piece in enumerate(pieces):
            offset = (start + piece.start) % self.segment_size
            if offset == 0:  # a new segment: read the memory as it is now, at a chunk boundary
                segment_memory = memory_state.memory
                if decoding_in_place():  # the segment's steps will overwrite the running memory
                    segment_memory = map_tensors(torch.clone, segment_memory)
                cache = AttentionCache(cache.keys[:, :, :0], cache.values[:, :, :0], cache.key_positions[:0],
                                       cache.position)
            retrieved = self.memory.output(self.memory.lookup(read_query_pieces[i], segment_memory), h_pieces[i])
            retrieved = self.retrieved_norm(retrieved)
            retrieved_keys, retrieved_values = self.attention.keys_values(retrieved, positions[piece])
            keys = torch.cat([cache.keys, retrieved_keys, key_pieces[i]], dim=2)
            values = torch.cat([cache.values, retrieved_values, value_pieces[i]], dim=2)
            key_positions = torch.cat([cache.key_positions, positions[piece], positions[piece]])
            mask = key_positions[None, :] <= positions[piece, None]
            y = self.attention.attend(query_pieces[i], keys, values, mask)
            read, memory_state = self.memory.update(written_pieces[i], memory_state)
            ys.append(y)
            reads.append(read)
            cache = AttentionCache(keys, values, key_positions, cache.position + y.shape[1])
        state = MACState(memory_state, segment_memory, retrieve_conv_cache, cache)
        if not ys:
            return self.feed_forward(x), state
        m = self.memory.output(torch.cat(reads, dim=1), written)
        return self.feed_forward(x + torch.cat(ys, dim=1) + m), state


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
