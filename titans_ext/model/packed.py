"""Packed variable-length documents (``cu_seqlens``) in the model API.

A packed batch is ``x [1, T, dim]`` (tokens ``[1, T]``) with FlashAttention's offsets
``cu_seqlens [N + 1]`` (int32 or int64, ``docs/design.md`` §6): document i is the tokens
``cu_seqlens[i] .. cu_seqlens[i + 1] - 1``. Its meaning is a definition: every layer gives what
it gives each document run alone from the start of a stream, and the outputs are concatenated.

Streaming state and packing do not mix: the documents of a packed batch stand at different
positions of their streams, while a streaming state carries one position for all its rows (the
memory's chunks, the attention's window and MAC's segments count from it). A packed call
therefore starts every document from the layer's initial state and returns None as its state.
"""

import torch

from ..ops.checks import check_cu_seqlens


def check_packed(x, state, cu_seqlens, state_name="state"):
    """Checks a packed call: ``cu_seqlens`` against ``x [1, T, ...]`` (the ops' check) and no
    state (the argument ``state_name``). Returns the number of documents N."""
    n_documents = check_cu_seqlens(cu_seqlens, x)
    if state is not None:
        raise ValueError(f"{state_name}: a call with cu_seqlens starts every document at the beginning of its stream "
                         "and takes no state (the packed documents stand at different positions, a state has "
                         f"one position); pass {state_name}=None, or continue a document unpacked (B = 1)")
    return n_documents


def document_positions(cu_seqlens, T):
    """``(document [T], position [T])``, int64: the document of each packed token and its position
    in that document (0 at the document's first token)."""
    offsets = cu_seqlens.to(torch.int64)
    token = torch.arange(T, device=cu_seqlens.device)
    document = torch.searchsorted(offsets[1:], token, right=True)
    return document, token - offsets[document]


def select_rows(state, rows):
    """The rows ``rows`` (int64 indices) of a streaming state: every tensor of two or more
    dimensions in a state has the batch first; scalars and 1-d tensors (positions) belong to all
    rows and are kept."""
    from .memory import map_tensors  # memory.py imports this module

    return map_tensors(lambda t: t[rows] if t.dim() >= 2 else t, state)


def run_in_rounds(module, x, cu_seqlens, round_length):
    """``module(x, state) -> (y, state)`` on the packed documents of ``x [1, T, dim]``, in rounds
    of ``round_length`` tokens counted from each document's start.

    Round j runs the j-th ``round_length`` tokens of every document that has them, as one batch
    padded to the longest (a row per document, the padding after its tokens), from the state of
    its rows after round j - 1. A document whose round is short ends there, so the padding after
    its tokens reaches no output of its tokens (every layer is causal) and no later round; a
    module whose state is consistent only at round boundaries (a MAC segment) gets only full
    rounds before the last. Returns ``y [1, T, dim]``.
    """
    T = x.shape[1]
    offsets = cu_seqlens.tolist()
    starts, lengths = offsets[:-1], [end - begin for begin, end in zip(offsets, offsets[1:])]
    # Padding slots gather the zero row appended after the tokens.
    tokens = torch.cat([x[0], x.new_zeros(1, x.shape[2])])
    values, where, state, active = [], [], None, None
    for round_start in range(0, max(lengths, default=0), round_length):
        documents = [i for i, length in enumerate(lengths) if length > round_start]
        if state is not None:
            kept = torch.tensor([active.index(i) for i in documents], device=x.device)
            state = select_rows(state, kept)
        width = min(round_length, max(lengths[i] for i in documents) - round_start)
        slot = torch.arange(width, device=x.device)
        start = torch.tensor([starts[i] + round_start for i in documents], device=x.device)
        count = torch.tensor([min(round_length, lengths[i] - round_start) for i in documents], device=x.device)
        valid = slot[None, :] < count[:, None]
        index = torch.where(valid, start[:, None] + slot[None, :], T)
        y, state = module(tokens[index], state)
        values.append(y[valid])
        where.append(index[valid])
        active = documents
    if not values:  # T = 0
        return x.new_zeros(x.shape)
    return x.new_zeros(x.shape[1:]).index_put((torch.cat(where),), torch.cat(values)).unsqueeze(0)
