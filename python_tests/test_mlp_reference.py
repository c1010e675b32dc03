"""The chunked MLP-memory reference (dual form) against the token loop, float64.

Values and autograd gradients to every input (q, k, v, gates, initial weights and momenta),
through the output and the final state. Shapes are tiny: the token loop builds one autograd
graph per token.
"""

import pytest
import torch

from titans_ext.reference import mlp_memory_chunked, mlp_memory_recurrent

from mlp_inputs import GRAD_NAMES, OUT_NAMES, mlp_inputs, mlp_outputs_and_grads
from utils import TOLERANCE, assert_close


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("E, chunk_size, T", [(1, 1, 5), (2, 4, 11), (4, 8, 19)])
def test_chunked_matches_token_loop(read, activation, E, chunk_size, T):
    inputs, weights, momentum = mlp_inputs(2, T, 2, 4, E, torch.float64, seed=E * 100 + T)
    kwargs = dict(chunk_size=chunk_size, read=read, activation=activation)
    ref = mlp_outputs_and_grads(mlp_memory_recurrent, inputs, weights, momentum, **kwargs)
    out = mlp_outputs_and_grads(mlp_memory_chunked, inputs, weights, momentum, **kwargs)
    for name, r, o in zip(OUT_NAMES + GRAD_NAMES, ref, out):
        assert_close(name, r, o, TOLERANCE[torch.float64])


def test_chunked_without_momentum_matches_token_loop():
    inputs, weights, _ = mlp_inputs(1, 9, 1, 3, 2, torch.float64, seed=7, momentum=False)
    kwargs = dict(chunk_size=4, read="token", activation="gelu")
    ref = mlp_outputs_and_grads(mlp_memory_recurrent, inputs, weights, None, **kwargs)
    out = mlp_outputs_and_grads(mlp_memory_chunked, inputs, weights, None, **kwargs)
    for name, r, o in zip(OUT_NAMES + GRAD_NAMES[:-2], ref, out):
        assert_close(name, r, o, TOLERANCE[torch.float64])
