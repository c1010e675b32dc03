"""Token-by-token references: the oracle the fast ops are tested against.

Each function is the literal per-token recurrence of the Titans memory (``shared/design``
README §1), written for clarity, not speed: one Python step per token, float64-capable,
autograd provides every gradient. With ``chunk_size=1`` it is the exact Titans recurrence;
with a larger chunk, the per-token gradient is taken at the memory before the token's chunk.
"""

import torch
import torch.nn.functional as F

from ..ops.checks import check_linear_inputs, check_miras_args, check_mlp_inputs
from .miras import kl_initial_memory, kl_update, lq_rescale, objective_loss


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def linear_memory_recurrent(q, k, v, theta, eta, alpha, *, chunk_size=64, initial_state=None,
                            output_final_state=False, read="token", objective="l2", retention="l2"):
    """Linear memory ``M(x) = M x``, ``M: [B, H, Dv, Dk]``, one token at a time.

    Same signature and semantics as :func:`titans_ext.linear_memory`. Each token's inner
    gradient is autograd's gradient of the objective's per-token loss at the chunk-start memory;
    the retention is applied literally (``lq``: rescale at every chunk start; ``kl``: the chunk's
    first token takes the softmax step from the previous memory).
    """
    B, T, H, Dk, Dv = check_linear_inputs(q, k, v, theta, eta, alpha, chunk_size, read, initial_state)
    dtype = _compute_dtype(q)
    objective, retention, delta = check_miras_args(
        objective, retention, None if initial_state is None else initial_state[0], (B, T, H, Dv), q.device, dtype)
    q, k, v, theta, eta, alpha = (x.to(dtype) for x in (q, k, v, theta, eta, alpha))
    if initial_state is None:
        M = kl_initial_memory(B, H, Dv, Dk, q) if retention.kind == "kl" else q.new_zeros(B, H, Dv, Dk)
        S = q.new_zeros(B, H, Dv, Dk)
    else:
        M, S = (x.to(dtype) for x in initial_state)
    outputs = []
    for t in range(T):
        chunk_start = t % chunk_size == 0
        if chunk_start:
            if retention.kind == "lq":
                M = lq_rescale(M, retention.q)
            M_chunk = M_grad = M  # M_chunk: what chunk_start reads; M_grad: where gradients are taken
        k_t, v_t, q_t = k[:, t], v[:, t], q[:, t]                       # [B, H, D]
        delta_t = None if delta is None else delta[:, t]
        u = _inner_gradient(M_grad, lambda M_at: objective_loss(
            objective, torch.einsum("bhvk,bhk->bhv", M_at, k_t) - v_t, delta_t))
        th, et, al = (g[:, t, :, None, None] for g in (theta, eta, alpha))
        S = et * S - th * u
        if chunk_start and retention.kind == "kl":  # the lag token; the rest of the chunk learns at M_{t0}
            M = M_grad = kl_update(M, S, al)
        else:
            M = (1 - al) * M + S
        M_read = M if read == "token" else M_chunk
        outputs.append(torch.einsum("bhvk,bhk->bhv", M_read, q_t))
    o = torch.stack(outputs, dim=1) if T > 0 else q.new_zeros(B, 0, H, Dv)
    return o, ((M, S) if output_final_state else None)


def _inner_gradient(weight, loss_fn):
    """Gradient of loss_fn at ``weight``, kept in the graph (create_graph) so that outer
    gradients flow through it."""
    with torch.enable_grad():
        at = weight if weight.requires_grad else weight.detach().requires_grad_()
        return torch.autograd.grad(loss_fn(at), at, create_graph=torch.is_grad_enabled())[0]


def mlp_activation(name):
    """The memory MLP's activation: exact (erf) GELU or SiLU."""
    return {"gelu": lambda x: F.gelu(x, approximate="none"), "silu": F.silu}[name]


def mlp_apply(W1, W2, x, activation):
    """``M(x) = x + W2 act(W1 x)`` per (batch, head); W1 ``[B, H, N, D]``, W2 ``[B, H, D, N]``, x ``[B, H, D]``."""
    hidden = mlp_activation(activation)(torch.einsum("bhnd,bhd->bhn", W1, x))
    return x + torch.einsum("bhdn,bhn->bhd", W2, hidden)


def mlp_memory_recurrent(q, k, v, theta, eta, alpha, weights, *, chunk_size=64, momentum=None,
                         output_final_state=False, read="token", activation="gelu"):
    """Deep memory ``M(x) = x + W2 act(W1 x)``, one token at a time.

    Same signature and semantics as :func:`titans_ext.mlp_memory`. Each token's gradient of
    ``||M(k_t) - v_t||^2`` is taken with autograd at the chunk-start weights.
    """
    B, T, H, D, N = check_mlp_inputs(q, k, v, theta, eta, alpha, weights, chunk_size, read,
                                     activation, momentum)
    dtype = _compute_dtype(q)
    q, k, v, theta, eta, alpha = (x.to(dtype) for x in (q, k, v, theta, eta, alpha))
    W = [w.to(dtype) for w in weights]
    S = [torch.zeros_like(w) for w in W] if momentum is None else [s.to(dtype) for s in momentum]
    W_chunk = W
    outputs = []
    for t in range(T):
        if t % chunk_size == 0:
            W_chunk = W
        # The inner gradient is part of the forward computation: build it with create_graph so
        # outer gradients flow through it (second derivatives of the activation).
        with torch.enable_grad():
            W_at = [w if w.requires_grad else w.detach().requires_grad_() for w in W_chunk]
            loss = (mlp_apply(*W_at, k[:, t], activation) - v[:, t]).pow(2).sum()
            grads = torch.autograd.grad(loss, W_at, create_graph=torch.is_grad_enabled())
        th, et, al = (g[:, t, :, None, None] for g in (theta, eta, alpha))
        S = [et * s - th * u for s, u in zip(S, grads)]
        W = [(1 - al) * w + s for w, s in zip(W, S)]
        W_read = W if read == "token" else W_chunk
        outputs.append(mlp_apply(*W_read, q[:, t], activation))
    o = torch.stack(outputs, dim=1) if T > 0 else q.new_zeros(B, 0, H, D)
    return o, (((W[0], W[1]), (S[0], S[1])) if output_final_state else None)
