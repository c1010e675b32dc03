"""The chunked MLP-memory reference (dual form) against the token loop, float64.

Values and autograd gradients to every input (q, k, v, gates, initial weights and momentum),
through the output and the final state. Shapes are tiny: the token loop is one autograd
graph per token.
"""

import pytest
import torch

from titans_ext.reference import mlp_memory_chunked, mlp_memory_recurrent

from .utils import assert_close


def make_mlp_inputs(B, T, H, D, E, *, dtype=torch.float64, with_momentum=True, seed=0):
    """Well-conditioned inputs: l2-normalized q, k and moderate gates (mlp_dual_form.md §3)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype)

    def uniform(lo, hi):
        return (lo + (hi - lo) * torch.rand(B, T, H, generator=gen, dtype=torch.float64)).to(dtype)

    q = torch.nn.functional.normalize(randn(B, T, H, D), dim=-1)
    k = torch.nn.functional.normalize(randn(B, T, H, D), dim=-1)
    v = randn(B, T, H, D, scale=0.5)
    gates = (uniform(0.0, 0.3), uniform(0.5, 1.0), uniform(0.0, 0.2))
    N = E * D
    weights = (randn(B, H, N, D, scale=D ** -0.5), randn(B, H, D, N, scale=N ** -0.5))
    momentum = (randn(B, H, N, D, scale=0.1 * D ** -0.5), randn(B, H, D, N, scale=0.1 * N ** -0.5)) \
        if with_momentum else None
    return (q, k, v, *gates), weights, momentum


def run_with_grads(fn, inputs, weights, momentum, **kwargs):
    """Output, final state and the gradients of a random linear loss on both to every input."""
    leaves = [x.detach().clone().requires_grad_() for x in (*inputs, *weights, *(momentum or ()))]
    n_in = len(inputs)
    ws = tuple(leaves[n_in:n_in + 2])
    ms = tuple(leaves[n_in + 2:]) if momentum is not None else None
    o, ((W1, W2), (S1, S2)) = fn(*leaves[:n_in], ws, momentum=ms, output_final_state=True, **kwargs)
    gen = torch.Generator().manual_seed(123)
    outs = (o, W1, W2, S1, S2)
    loss = sum((x * torch.randn(x.shape, generator=gen, dtype=x.dtype)).sum() for x in outs)
    grads = torch.autograd.grad(loss, leaves)
    return outs, grads


OUT_NAMES = ("o", "W1_T", "W2_T", "S1_T", "S2_T")
GRAD_NAMES = ("dq", "dk", "dv", "dtheta", "deta", "dalpha", "dW1", "dW2", "dS1", "dS2")


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("E,chunk_size,T", [(1, 1, 5), (2, 4, 11), (4, 8, 19)])
def test_chunked_matches_token_loop(read, activation, E, chunk_size, T):
    inputs, weights, momentum = make_mlp_inputs(2, T, 2, 4, E, seed=E * 100 + T)
    kwargs = dict(chunk_size=chunk_size, read=read, activation=activation)
    ref_outs, ref_grads = run_with_grads(mlp_memory_recurrent, inputs, weights, momentum, **kwargs)
    outs, grads = run_with_grads(mlp_memory_chunked, inputs, weights, momentum, **kwargs)
    for name, ref, out in zip(OUT_NAMES + GRAD_NAMES, ref_outs + ref_grads, outs + grads):
        assert_close(name, ref, out, 1e-12)


def test_chunked_without_momentum_matches_token_loop():
    inputs, weights, _ = make_mlp_inputs(1, 9, 1, 3, 2, seed=7)
    kwargs = dict(chunk_size=4, read="token", activation="gelu")
    ref_outs, ref_grads = run_with_grads(mlp_memory_recurrent, inputs, weights, None, **kwargs)
    outs, grads = run_with_grads(mlp_memory_chunked, inputs, weights, None, **kwargs)
    for name, ref, out in zip(OUT_NAMES + GRAD_NAMES, ref_outs + ref_grads, outs + grads):
        assert_close(name, ref, out, 1e-12)
