"""The CUDA mlp_memory kernels (csrc/cuda/mlp_memory_{fwd,bwd}.cuh) run by the CPU SIMT emulation
(``titans_emu::mlp_memory_fwd`` / ``_bwd``, the schemas and CUDA output contracts of the
``titans_ext::`` ops) against the float64 references. Shapes are small: every emulated thread is a
fiber."""

import pytest
import torch

import titans_ext  # noqa: F401  (registers titans_ext::, used for the contract comparison)
import titans_ext._emu  # noqa: F401  (registers titans_emu::)
from titans_ext.reference import mlp_memory_chunked

from mlp_inputs import OUT_NAMES, mlp_inputs
from utils import TOLERANCE, assert_close

emu = torch.ops.titans_emu


@pytest.fixture(autouse=True)
def deterministic_schedule():
    emu.set_schedule(-1)
    yield
    emu.set_schedule(-1)


def _forward(inputs, weights, momentum, chunk_size, read="token", activation="gelu", save_states=True):
    s1, s2 = (None, None) if momentum is None else momentum
    return emu.mlp_memory_fwd(*inputs, *weights, s1, s2, chunk_size, read == "token", activation, save_states)


def _reference(inputs, weights, momentum, chunk_size, read="token", activation="gelu"):
    as64 = lambda xs: None if xs is None else [x.double() for x in xs]  # noqa: E731
    o, ((W1, W2), (S1, S2)) = mlp_memory_chunked(*as64(inputs), as64(weights), momentum=as64(momentum),
                                                 chunk_size=chunk_size, read=read, activation=activation,
                                                 output_final_state=True)
    return [o, W1, W2, S1, S2]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("read", ["token", "chunk_start"])
def test_forward_matches_float64_reference(read, activation, dtype):
    inputs, weights, momentum = mlp_inputs(1, 37, 2, 16, 2, dtype)
    out = _forward(inputs, weights, momentum, 16, read, activation)
    for name, r, x in zip(OUT_NAMES, _reference(inputs, weights, momentum, 16, read, activation), out):
        assert_close(name, r, x, TOLERANCE[dtype])
    assert out[0].dtype == dtype and out[5].dtype == dtype  # o and the saved chunk-start states
