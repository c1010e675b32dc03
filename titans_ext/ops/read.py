"""Reads of a memory without a write: ``o_t = M(q_t)`` for every token, one memory per (batch, head).

This is what a memory-as-context block does at a segment start (Titans Sec. 4.1, eq. 21). It
equals the ``read="chunk_start"`` output of :func:`titans_ext.linear_memory` /
:func:`titans_ext.mlp_memory` over one chunk with zero gates, without the inner-gradient work
those do: plain PyTorch ops (so autograd, torch.compile and every device come with them), a
few times cheaper than the op call. The memory is read as given: a retention that transforms
the state at a chunk start (``("lq", q)``) is the op's to apply.
"""

import torch
import torch.nn.functional as F

from .checks import ACTIVATIONS, check_device, check_shape, check_tensor, state_dtype_for

_STATE_DTYPES = (torch.float32, torch.float64)


def linear_memory_read(q, memory):
    """``o[b, t, h] = M[b, h] q[b, t, h]``: ``q [B, T, H, Dk]``, ``memory`` M ``[B, H, Dv, Dk]``
    (fp32, or fp64 for fp64 q) -> ``o [B, T, H, Dv]`` in q's dtype, computed in M's dtype."""
    check_tensor("q", q, 4)
    B, _, H, Dk = q.shape
    check_tensor("memory", memory, 4, dtypes=_STATE_DTYPES)
    check_shape("memory", memory, (B, H, memory.shape[2], Dk), ("B", "H", "Dv", "Dk"))
    check_device("memory", memory, q.device)
    o = torch.einsum("bthk,bhvk->bthv", q.to(state_dtype_for(q.dtype)), memory.to(state_dtype_for(q.dtype)))
    return o.to(q.dtype)


def mlp_memory_read(q, weights, activation="gelu"):
    """``M(q) = q + W2 act(W1 q)``: ``q [B, T, H, D]``, ``weights`` ``(W1 [B, H, N, D], W2 [B, H, D, N])``
    (fp32, or fp64 for fp64 q), ``activation`` ``"gelu"`` (exact) or ``"silu"`` -> ``[B, T, H, D]``
    in q's dtype, computed in the weights' dtype."""
    check_tensor("q", q, 4)
    B, _, H, D = q.shape
    if not isinstance(weights, (tuple, list)) or len(weights) != 2:
        raise TypeError(f"weights: expected a pair (W1, W2), got {type(weights).__name__}")
    w1, w2 = weights
    check_tensor("weights[0]", w1, 4, dtypes=_STATE_DTYPES)
    N = w1.shape[2]
    check_shape("weights[0]", w1, (B, H, N, D), ("B", "H", "N", "D"))
    check_tensor("weights[1]", w2, 4, dtypes=_STATE_DTYPES)
    check_shape("weights[1]", w2, (B, H, D, N), ("B", "H", "D", "N"))
    for i, w in enumerate(weights):
        check_device(f"weights[{i}]", w, q.device)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    dtype = state_dtype_for(q.dtype)
    x = q.to(dtype)
    hidden = torch.einsum("bthd,bhnd->bthn", x, w1.to(dtype))
    hidden = F.gelu(hidden) if activation == "gelu" else F.silu(hidden)
    return (x + torch.einsum("bthn,bhdn->bthd", hidden, w2.to(dtype))).to(q.dtype)
