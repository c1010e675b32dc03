"""Attention for the Titans blocks: multi-head attention with persistent memory tokens, and a
sliding-window attention with a key/value cache for streaming.

Attention itself is PyTorch's ``scaled_dot_product_attention`` with a boolean mask (True: may
attend); positions enter through rotary embeddings.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_input, check_nonnegative_int, check_positive_int
from .packed import check_packed, document_positions


def rotate(x, positions, base=10000.0):
    """Rotary position embedding of ``x [B, H, T, Dh]`` (Dh even) at integer ``positions [T]``."""
    half = x.shape[-1] // 2
    freqs = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[:, None] * freqs[None, :]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    # [x1 cos - x2 sin, x1 sin + x2 cos] as x [cos, cos] + [x2, x1] [-sin, sin]: three passes over x
    # and none over slices of it (whose gradients autograd zero-fills to x's size); the same
    # values up to the rounding of a fused multiply-add.
    return torch.addcmul(x * torch.cat([cos, cos], dim=-1), x.roll(half, dims=-1), torch.cat([-sin, sin], dim=-1))


@dataclass
class AttentionCache:
    """Keys and values an attention keeps between calls.

    Attributes:
        keys, values: ``[B, H, n, Dh]`` (rotary embedding applied to the keys).
        key_positions: ``[n]`` (int64), the position of each cached key.
        position: tokens seen so far by the owner of the cache.
    """

    keys: torch.Tensor
    values: torch.Tensor
    key_positions: torch.Tensor
    position: int = 0

    @staticmethod
    def empty(batch_size, heads, head_dim, dtype, device, position=0):
        kv = torch.zeros(batch_size, heads, 0, head_dim, dtype=dtype, device=device)
        return AttentionCache(kv, kv, torch.zeros(0, dtype=torch.long, device=device), position)


class Attention(nn.Module):
    """Multi-head attention with ``persistent_tokens`` learned tokens prepended to the keys.

    The persistent tokens (Titans "persistent memory") are input-independent rows of width
    ``dim``, projected to keys and values like any token and visible to every query.
    The parts are separate so that callers choose the keys and the mask.
    """

    def __init__(self, dim, heads, persistent_tokens=4):
        super().__init__()
        check_positive_int("heads", heads)
        check_nonnegative_int("persistent_tokens", persistent_tokens)
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"heads: dim={dim} must split into {heads} heads of even width (rotary embedding)")
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=False)
        self.out_proj = nn.Linear(dim, dim, bias=False)
        self.persistent = nn.Parameter(torch.randn(persistent_tokens, dim) * 0.02)

    def _split_heads(self, x):
        B, T, _ = x.shape
        return x.view(B, T, self.heads, self.head_dim).transpose(1, 2)

    def queries(self, x, positions):
        """``x [B, T, dim]`` -> ``[B, H, T, Dh]`` at ``positions [T]``."""
        return rotate(self._split_heads(self.q_proj(x)), positions)

    def keys_values(self, x, positions):
        """``x [B, T, dim]`` -> keys and values ``[B, H, T, Dh]`` at ``positions [T]``."""
        k, v = self.kv_proj(x).chunk(2, dim=-1)
        return rotate(self._split_heads(k), positions), self._split_heads(v)

    def attend(self, q, keys, values, mask):
        """Attention of ``q [B, H, Tq, Dh]`` over [persistent | keys] -> ``[B, Tq, dim]``.

        ``keys, values [B, H, Tk, Dh]``; ``mask [Tq, Tk]`` or ``[B, 1, Tq, Tk]`` (True: may
        attend); the persistent tokens are visible to every query.
        """
        B = q.shape[0]
        k_p, v_p = (self._split_heads(t).expand(B, -1, -1, -1)
                    for t in self.kv_proj(self.persistent.to(q.dtype).unsqueeze(0)).chunk(2, dim=-1))
        keys, values = torch.cat([k_p, keys], dim=2), torch.cat([v_p, values], dim=2)
        mask = torch.cat([mask.new_ones(*mask.shape[:-1], self.persistent.shape[0]), mask], dim=-1)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self.out_proj(y.transpose(1, 2).reshape(B, -1, self.dim))


class SlidingWindowAttention(nn.Module):
    """Causal sliding-window attention with persistent tokens (Titans "SW-Attn*").

    A token at position t attends the persistent tokens and the tokens ``t - window + 1 .. t``.
    ``forward(x [B, T, dim], cache=None, cu_seqlens=None) -> (y [B, T, dim], cache)``, with
    ``cache`` an :class:`AttentionCache` of the last ``window - 1`` keys, so pieces of any length
    give the outputs of one call. With ``cu_seqlens`` (packed documents, ``x [1, T, dim]``,
    :mod:`titans_ext.model.packed`) a token attends only its own document, positions count from
    the document's start, ``cache`` must be None and None is returned.
    """

    # Query tiles of packed calls hold at least this many tokens (fewer, larger batched products
    # when the window is short).
    MIN_TILE = 64

    def __init__(self, dim, heads, window, persistent_tokens=4):
        super().__init__()
        check_positive_int("window", window)
        self.window = window
        self.attention = Attention(dim, heads, persistent_tokens)

    def initial_state(self, batch_size, dtype=torch.float32, device=None):
        device = self.attention.q_proj.weight.device if device is None else device
        return AttentionCache.empty(batch_size, self.attention.heads, self.attention.head_dim, dtype, device)

    def forward(self, x, cache=None, cu_seqlens=None):
        check_input("x", x, self.attention.dim)
        B, T, _ = x.shape
        if cu_seqlens is not None:
            return self._forward_packed(x, cache, cu_seqlens), None
        if cache is None:
            cache = self.initial_state(B, x.dtype, x.device)
        positions = torch.arange(cache.position, cache.position + T, device=x.device)
        k, v = self.attention.keys_values(x, positions)
        keys = torch.cat([cache.keys, k], dim=2)
        values = torch.cat([cache.values, v], dim=2)
        key_positions = torch.cat([cache.key_positions, positions])
        distance = positions[:, None] - key_positions[None, :]
        mask = (distance >= 0) & (distance < self.window)
        y = self.attention.attend(self.attention.queries(x, positions), keys, values, mask)
        keep = max(keys.shape[2] - (self.window - 1), 0)
        cache = AttentionCache(keys[:, :, keep:], values[:, :, keep:], key_positions[keep:], cache.position + T)
        return y, cache

    def _forward_packed(self, x, cache, cu_seqlens):
        """Packed documents in one call: the block-diagonal causal window mask, evaluated in tiles
        of queries against the keys that can reach them (the tile and the ``window - 1`` tokens
        before it), all tiles as one batch. The work grows as ``T * window``, where one mask over
        all T tokens costs ``T^2`` and one call per document costs a call per document. Measured
        on the CPU (one thread, dim 256, 4 heads, no autograd; T = 2048 with window 64 and
        T = 4096 with window 256; documents of 2-16, 16-256 and 64-2048 tokens): the tiles took
        4-6x less time than one mask at every mix and 2-11x less than one call per document,
        except with window 256 and documents of 16 tokens or more, where the two took the same
        time (within 5 %)."""
        check_packed(x, cache, cu_seqlens, "cache")
        T, W = x.shape[1], self.window
        document, positions = document_positions(cu_seqlens, T)
        attention = self.attention
        k, v = attention.keys_values(x, positions)
        q = attention.queries(x, positions)
        tile = max(W, self.MIN_TILE)
        n_tiles = max(-(-T // tile), 1)
        tail = n_tiles * tile - T
        span = tile + W - 1

        def key_tiles(t):  # [1, H, T, Dh] -> [n_tiles, H, span, Dh], the W - 1 tokens before a tile first
            return F.pad(t, (0, 0, W - 1, tail)).unfold(2, span, tile)[0].permute(1, 0, 3, 2)

        query_tiles = F.pad(q, (0, 0, 0, tail))[0].unflatten(1, (n_tiles, tile)).transpose(0, 1)
        # Padding is a document of its own (-1): a padding query sees itself, never a real token.
        index = torch.arange(-(W - 1), T + tail, device=x.device)
        padded_document = F.pad(document, (W - 1, tail), value=-1)
        key_document, key_index = padded_document.unfold(0, span, tile), index.unfold(0, span, tile)
        query_document, query_index = padded_document[W - 1:].view(n_tiles, tile), index[W - 1:].view(n_tiles, tile)
        distance = query_index[:, :, None] - key_index[:, None, :]
        mask = (query_document[:, :, None] == key_document[:, None, :]) & (distance >= 0) & (distance < W)
        y = attention.attend(query_tiles, key_tiles(k), key_tiles(v), mask[:, None])
        return y.reshape(1, n_tiles * tile, -1)[:, :T]
