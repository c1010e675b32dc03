"""Token-by-token references: the oracle the fast ops are tested against.

Each function is the literal per-token recurrence of the Titans memory (``docs/design.md``
§1), written for clarity, not speed: one Python step per token, float64-capable,
autograd provides every gradient. With ``chunk_size=1`` it is the exact Titans recurrence;
with a larger chunk, the per-token gradient is taken at the memory before the token's chunk.
"""

import torch
import torch.nn.functional as F

from ..ops.checks import check_linear_inputs, check_miras_args, check_mlp_inputs
from .miras import kl_initial_memory, kl_update, lq_scale, objective_loss


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def linear_memory_recurrent(q, k, v, theta, eta, alpha, *, chunk_size=64, initial_state=None,
                            output_final_state=False, read="token", objective="l2", retention="l2"):
    """Linear memory ``M(x) = M x``, ``M: [B, H, Dv, Dk]``, one token at a time.

    Same signature and semantics as :func:`titans_ext.linear_memory`.
    """
    B, T, H, Dk, Dv = check_linear_inputs(q, k, v, theta, eta, alpha, chunk_size, read, initial_state)
    dtype = _compute_dtype(q)
    objective, retention, delta = check_miras_args(
        objective, retention, [] if initial_state is None else initial_state[:1], (B, T, H, Dv), q.device, dtype)
    if initial_state is None:
        S = q.new_zeros(B, H, Dv, Dk, dtype=dtype)
        M = kl_initial_memory(S) if retention.kind == "kl" else torch.zeros_like(S)
    else:
        M, S = (x.to(dtype) for x in initial_state)
    o, (M,), (S,) = _token_loop(lambda W, x: torch.einsum("bhvk,bhk->bhv", W[0], x), [M], [S],
                                q, k, v, theta, eta, alpha, delta, chunk_size, read, objective, retention)
    return o, ((M, S) if output_final_state else None)


def _token_loop(apply, W, S, q, k, v, theta, eta, alpha, delta, chunk_size, read, objective, retention):
    """The per-token recurrence of a memory made of weight matrices W (a list, momenta S), read as
    ``apply(W, x)``. Each token's inner gradient is autograd's gradient of the objective's
    per-token loss at the chunk-start weights. The retention is applied literally
    (``docs/miras.md`` §2.3): ``lq`` carries each matrix as the accumulator A, whose weights are
    ``rho0 * A`` with ``rho0 = ||A||_q^(2-q)`` taken at the chunk start; ``kl``: the chunk's first
    token takes the softmax step from the previous weights, and the rest of the chunk learns at
    its result. Returns o, W_T (the accumulators for lq), S_T.
    """
    dtype = W[0].dtype
    q, k, v, theta, eta, alpha = (x.to(dtype) for x in (q, k, v, theta, eta, alpha))
    outputs = []
    for t in range(q.shape[1]):
        chunk_start = t % chunk_size == 0
        if chunk_start:
            rho = [lq_scale(w, retention.q) if retention.kind == "lq" else 1.0 for w in W]
            # W_chunk: the weights chunk_start reads; W_grad: where the inner gradients are taken.
            W_chunk = W_grad = [r * w for r, w in zip(rho, W)]
        k_t, v_t, q_t = k[:, t], v[:, t], q[:, t]                       # [B, H, D]
        delta_t = None if delta is None else delta[:, t]
        grads = _inner_gradients(W_grad, lambda W_at: objective_loss(objective, apply(W_at, k_t) - v_t, delta_t))
        th, et, al = (g[:, t, :, None, None] for g in (theta, eta, alpha))
        S = [et * s - th * u for s, u in zip(S, grads)]
        if chunk_start and retention.kind == "kl":
            W = W_grad = [kl_update(w, s, al) for w, s in zip(W, S)]
        else:
            W = [(1 - al) * w + s for w, s in zip(W, S)]
        outputs.append(apply([r * w for r, w in zip(rho, W)] if read == "token" else W_chunk, q_t))
    o = torch.stack(outputs, dim=1) if outputs else q.new_zeros(q.shape[0], 0, q.shape[2], v.shape[-1])
    return o, W, S


def _inner_gradients(weights, loss_fn):
    """Gradients of loss_fn at ``weights``. The inner gradient is part of the forward
    computation: it is built with create_graph so that outer gradients flow through it (second
    derivatives of the objective and the activation)."""
    with torch.enable_grad():
        at = [w if w.requires_grad else w.detach().requires_grad_() for w in weights]
        return torch.autograd.grad(loss_fn(at), at, create_graph=torch.is_grad_enabled())


def mlp_activation(name):
    """The memory MLP's activation: exact (erf) GELU or SiLU."""
    return {"gelu": lambda x: F.gelu(x, approximate="none"), "silu": F.silu}[name]


def mlp_apply(W1, W2, x, activation):
    """``M(x) = x + W2 act(W1 x)`` per (batch, head); W1 ``[B, H, N, D]``, W2 ``[B, H, D, N]``, x ``[B, H, D]``."""
    hidden = mlp_activation(activation)(torch.einsum("bhnd,bhd->bhn", W1, x))
    return x + torch.einsum("bhdn,bhn->bhd", W2, hidden)


def mlp_memory_recurrent(q, k, v, theta, eta, alpha, weights, *, chunk_size=64, momentum=None,
                         output_final_state=False, read="token", activation="gelu", objective="l2",
                         retention="l2"):
    """Deep memory ``M(x) = x + W2 act(W1 x)``, one token at a time.

    Same signature and semantics as :func:`titans_ext.mlp_memory`. Each token's gradient of the
    objective's loss at ``M(k_t) - v_t`` is taken with autograd at the chunk-start weights; the
    retention acts on each weight matrix (``kl``: a softmax over each row, the input axis).
    """
    B, T, H, D, N = check_mlp_inputs(q, k, v, theta, eta, alpha, weights, chunk_size, read,
                                     activation, momentum)
    dtype = _compute_dtype(q)
    objective, retention, delta = check_miras_args(objective, retention, weights, (B, T, H, D), q.device, dtype,
                                                   memory_name="weights")
    W = [w.to(dtype) for w in weights]
    S = [torch.zeros_like(w) for w in W] if momentum is None else [s.to(dtype) for s in momentum]
    o, W, S = _token_loop(lambda W, x: mlp_apply(*W, x, activation), W, S, q, k, v, theta, eta, alpha, delta,
                          chunk_size, read, objective, retention)
    return o, (((W[0], W[1]), (S[0], S[1])) if output_final_state else None)
