"""``TitansLM``: a language model of Titans blocks, with streaming (cached) generation."""

import contextlib

import torch
from torch import nn

from .blocks import BLOCKS, make_block
from .checks import check_choice, check_nonnegative_int, check_positive_int, check_tokens
from .memory import owned_copy, owned_decode_states
from .packed import check_packed


class TitansLM(nn.Module):
    """Token embeddings, ``depth`` blocks (pre-norm residual), a final norm and a tied output head.

    ``forward(tokens [B, T] int, state=None) -> (logits [B, T, vocab_size] in the parameters'
    dtype, state)``; ``state`` is a list with one state per block (None: the start of a
    stream). Feeding a sequence in pieces with the state carried gives the logits of one call.

    ``forward(tokens [1, T], cu_seqlens=cu_seqlens)`` runs packed documents (FlashAttention's
    offsets ``[N + 1]``, int32 or int64): the logits are those of each document run alone,
    concatenated; nothing crosses a document boundary (see :mod:`titans_ext.model.blocks`). Such a
    call starts every document at the beginning of a stream: ``state`` must be None, and the
    returned state is None (the documents stand at different positions, a state has one;
    :mod:`titans_ext.model.packed`).

    Args:
        vocab_size: number of token ids.
        dim: model width.
        depth: number of blocks.
        block: ``"mac"``, ``"mag"``, ``"mal"``, ``"lmm"`` (Titans variants) or ``"swa"`` (sliding
            window attention only: the same model without memory, the baseline).
        heads: attention heads.
        window: attention window (MAG, MAL, SWA) or segment length (MAC).
        persistent_tokens: learned persistent-memory tokens prepended to each attention.
        memory: ``"linear"`` or ``"mlp"`` (default ``"linear"``, or the preset's); memory_heads /
            memory_head_dim: its heads and head width (default ``heads`` and ``dim // memory_heads``);
            chunk_size: the memory op's chunk (default 16, NeuralMemory's; ``window`` must be a
            multiple of it for MAC); expansion: the MLP memory's hidden width factor;
            memory_options: any other :class:`~titans_ext.model.NeuralMemory` arguments (e.g.
            ``max_lr``, or ``preset="moneta"`` for a MIRAS memory).
    """

    def __init__(self, vocab_size, dim=64, depth=2, block="mag", heads=4, window=64, persistent_tokens=4,
                 memory=None, memory_heads=None, memory_head_dim=None, chunk_size=16, expansion=2,
                 **memory_options):
        super().__init__()
        check_positive_int("vocab_size", vocab_size)
        check_positive_int("dim", dim)
        check_positive_int("depth", depth)
        check_choice("block", block, tuple(BLOCKS))
        check_nonnegative_int("persistent_tokens", persistent_tokens)
        self.vocab_size, self.dim, self.block_kind = vocab_size, dim, block
        memory_options = dict(memory_options, heads=heads if memory_heads is None else memory_heads,
                              head_dim=memory_head_dim, memory=memory, chunk_size=chunk_size, expansion=expansion)
        self.embedding = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embedding.weight, std=dim ** -0.5)
        self.blocks = nn.ModuleList(
            make_block(block, dim, heads, window, persistent_tokens, memory_options) for _ in range(depth))
        self.norm = nn.RMSNorm(dim)

    def initial_state(self, batch_size, device=None):
        """One state per block, for a stream of ``batch_size`` sequences."""
        dtype = self.embedding.weight.dtype
        return [block.initial_state(batch_size, dtype, device) for block in self.blocks]

    def forward(self, tokens, state=None, cu_seqlens=None):
        check_tokens("tokens", tokens, self.vocab_size)
        if cu_seqlens is not None:
            check_packed(tokens, state, cu_seqlens)
        elif state is not None and (not isinstance(state, list) or len(state) != len(self.blocks)):
            raise ValueError(f"state: expected a list of {len(self.blocks)} block states (from a previous call) "
                             f"or None, got {type(state).__name__}")
        return self._run(tokens, state, cu_seqlens)

    def _run(self, tokens, state, cu_seqlens=None):
        """``forward`` on checked arguments (``generate`` feeds its own tokens and states)."""
        x = self.embedding(tokens)
        states = [None] * len(self.blocks) if state is None else state
        new_states = []
        for block, block_state in zip(self.blocks, states):
            x, block_state = block(x, block_state, cu_seqlens)
            new_states.append(block_state)
        return self.norm(x) @ self.embedding.weight.t(), None if cu_seqlens is not None else new_states

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens, *, temperature=0.0, use_cache=True, generator=None):
        """Continues ``prompt [B, T0]`` by ``max_new_tokens`` tokens -> ``[B, T0 + max_new_tokens]``.

        ``temperature=0`` picks the most likely token; otherwise tokens are sampled from
        ``softmax(logits / temperature)`` with ``generator``. With ``use_cache`` the prompt is read
        once and each new token is fed alone with the streaming state; without it every step
        reruns the whole sequence (same result, for checking).
        """
        check_tokens("prompt", prompt, self.vocab_size)
        check_nonnegative_int("max_new_tokens", max_new_tokens)
        if prompt.shape[1] == 0:
            raise ValueError("prompt: expected at least one token, got shape " + str(list(prompt.shape)))
        if not temperature >= 0:
            raise ValueError(f"temperature: expected a number >= 0, got {temperature}")
        tokens = prompt
        logits, state = self(prompt, None)
        if use_cache:  # the states are generate's own from here on: its decode steps update them in place
            state = owned_copy(state)
        with owned_decode_states() if use_cache else contextlib.nullcontext():
            for _ in range(max_new_tokens):
                last = logits[:, -1].float()
                if temperature == 0:
                    next_token = last.argmax(dim=-1, keepdim=True)
                else:
                    probs = torch.softmax(last / temperature, dim=-1)
                    next_token = torch.multinomial(probs, 1, generator=generator)
                tokens = torch.cat([tokens, next_token], dim=1)
                # Ids picked from the logits and the states of the last call need no checks: each token
                # costs the model's work only (the ids' value check would be a host sync on a GPU).
                logits, state = self._run(next_token, state) if use_cache else self._run(tokens, None)
        return tokens
