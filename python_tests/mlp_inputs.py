"""Input factory and gradient harness for the MLP-memory tests (the linear ones are in utils)."""

import torch

from utils import random_cotangents

OUT_NAMES = ["o", "W1_T", "W2_T", "S1_T", "S2_T"]
GRAD_NAMES = ["dq", "dk", "dv", "dtheta", "deta", "dalpha", "dW1", "dW2", "dS1", "dS2"]


def mlp_inputs(B, T, H, D, E, dtype=torch.float32, seed=0, momentum=True):
    """Random q, k, v, gates, initial weights and momenta.

    q and k are l2-normalized and theta is moderate, as in the layers: with raw keys the inner
    steps of the token loop itself can diverge (docs/mlp_dual_form.md §3). Weights are scaled so the
    MLP's output has the size of its input.
    """
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=g, dtype=torch.float64)

    def gate(lo, hi):
        return lo + (hi - lo) * torch.rand(B, T, H, generator=g, dtype=torch.float64)

    q = torch.nn.functional.normalize(rand(B, T, H, D), dim=-1)
    k = torch.nn.functional.normalize(rand(B, T, H, D), dim=-1)
    v = rand(B, T, H, D, scale=0.5)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    inputs = [x.to(dtype) for x in (q, k, v)] + [x.to(state_dtype) for x in (gate(0, 0.3), gate(0.5, 1), gate(0, 0.2))]
    N = E * D
    weights = (rand(B, H, N, D, scale=D ** -0.5).to(state_dtype), rand(B, H, D, N, scale=N ** -0.5).to(state_dtype))
    moments = None
    if momentum:
        moments = (rand(B, H, N, D, scale=0.1 * D ** -0.5).to(state_dtype),
                   rand(B, H, D, N, scale=0.1 * N ** -0.5).to(state_dtype))
    return inputs, weights, moments


def opcheck_mlp_memory_bwd(fwd_args):
    """torch.library.opcheck of mlp_memory_bwd at the outputs of mlp_memory_fwd(*fwd_args), with
    cotangents for o, W1_T and S2_T only (the others None)."""
    q, k, v, theta, eta, alpha, w1, w2, s1, s2, C, read_token, act, _, *miras = fwd_args
    o, w1_T, w2_T, s1_T, s2_T, states = torch.ops.titans_ext.mlp_memory_fwd(
        q, k, v, theta, eta, alpha, w1, w2, s1, s2, C, read_token, act, True, *miras)
    args = (q, k, v, theta, eta, alpha, states, torch.randn_like(o), torch.randn_like(w1_T), None, None,
            torch.randn_like(s2_T), w1.shape[2], C, read_token, act, *miras)
    torch.library.opcheck(torch.ops.titans_ext.mlp_memory_bwd.default, args)


def mlp_outputs_and_grads(fn, inputs, weights, momentum, **kwargs):
    """Runs fn(*inputs, weights, momentum=..., output_final_state=True), backpropagates a
    random functional of o AND the final state; returns [o, W1_T, W2_T, S1_T, S2_T, grads of
    inputs, weights and momenta]."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    w_leaves = tuple(x.detach().clone().requires_grad_() for x in weights)
    m_leaves = None if momentum is None else tuple(x.detach().clone().requires_grad_() for x in momentum)
    o, ((W1, W2), (S1, S2)) = fn(*leaves, w_leaves, momentum=m_leaves, output_final_state=True, **kwargs)
    outs = [o, W1, W2, S1, S2]
    loss = sum((a.double() * b.double()).sum() for a, b in zip(outs, random_cotangents(outs)))
    wrt = leaves + list(w_leaves) + (list(m_leaves) if m_leaves else [])
    grads = torch.autograd.grad(loss, wrt)
    return [x.detach() for x in outs] + list(grads)
