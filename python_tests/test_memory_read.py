"""The read ops (a memory read without a write) against the memory ops' chunk-start read over one
chunk with zero gates: values and gradients, fp64/fp32/bf16, both MLP activations; NeuralMemory's
segment-start read for every retention; argument errors."""

import pytest
import torch

import titans_ext
from titans_ext.model import NeuralMemory
from titans_ext.ops import linear_memory_read, mlp_memory_read

from utils import TOLERANCE, assert_close


def op_read(q, memory, *, mlp=False, activation="gelu", retention="l2"):
    """The chunk-start read of a memory op call over one chunk whose gates are all zero."""
    B, T, H, _ = q.shape
    zero = torch.zeros(B, T, H, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    options = dict(chunk_size=max(T, 1), read="chunk_start", retention=retention)
    if mlp:
        return titans_ext.mlp_memory(q, q, q, zero, zero, zero, memory, activation=activation, **options)[0]
    v = q.new_zeros(B, T, H, memory.shape[2])
    return titans_ext.linear_memory(q, q, v, zero, zero, zero, initial_state=(memory, torch.zeros_like(memory)),
                                    **options)[0]


def linear_inputs(dtype, B=2, T=7, H=3, Dk=5, Dv=4):
    g = torch.Generator().manual_seed(0)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    q = torch.randn(B, T, H, Dk, generator=g).to(dtype)
    memory = torch.randn(B, H, Dv, Dk, generator=g, dtype=state_dtype)
    return q, memory


def mlp_inputs(dtype, B=2, T=7, H=3, D=4, expansion=2):
    g = torch.Generator().manual_seed(1)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    q = torch.randn(B, T, H, D, generator=g).to(dtype)
    weights = (torch.randn(B, H, expansion * D, D, generator=g, dtype=state_dtype) * D ** -0.5,
               torch.randn(B, H, D, expansion * D, generator=g, dtype=state_dtype) * (expansion * D) ** -0.5)
    return q, weights


def compare(fast, slow, inputs, dtype):
    """Values, and in fp64 the gradients of every input, of two reads."""
    inputs = [t.detach().requires_grad_(dtype == torch.float64) for t in inputs]
    o_fast, o_slow = fast(*inputs), slow(*inputs)
    assert o_fast.dtype == o_slow.dtype == inputs[0].dtype
    assert_close("o", o_slow, o_fast, TOLERANCE[dtype])
    if dtype == torch.float64:
        weight = torch.randn_like(o_fast)
        grads_fast = torch.autograd.grad((o_fast * weight).sum(), inputs)
        grads_slow = torch.autograd.grad((o_slow * weight).sum(), inputs)
        for i, (fast_grad, slow_grad) in enumerate(zip(grads_fast, grads_slow)):
            assert_close(f"gradient of input {i}", slow_grad, fast_grad, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_linear_memory_read_equals_the_op_chunk_start_read(dtype):
    q, memory = linear_inputs(dtype)
    compare(linear_memory_read, lambda q, m: op_read(q, m), [q, memory], dtype)


@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_mlp_memory_read_equals_the_op_chunk_start_read(dtype, activation):
    q, (w1, w2) = mlp_inputs(dtype)
    compare(lambda q, w1, w2: mlp_memory_read(q, (w1, w2), activation),
            lambda q, w1, w2: op_read(q, (w1, w2), mlp=True, activation=activation), [q, w1, w2], dtype)


@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("retention", ["l2", "kl", ("lq", 3), ("lq", 4), ("lq", 1.5)])
def test_neural_memory_lookup_reads_as_the_op_does_at_a_chunk_start(memory, retention):
    torch.manual_seed(2)
    layer = NeuralMemory(16, heads=2, head_dim=8, memory=memory, chunk_size=4, retention=retention).double()
    _, state = layer(torch.randn(2, 8, 16, dtype=torch.float64))  # a memory that has been written
    q = torch.nn.functional.normalize(torch.randn(2, 5, 2, 8, dtype=torch.float64), dim=-1)
    # The read ops with lq's scale rho0 applied to the weights (docs/miras.md §2.3), against the op
    # that applies it itself: values and gradients in q and in the state's weights.
    if memory == "linear":
        compare(lambda q, m: layer.lookup(q, (m, None)),
                lambda q, m: op_read(q, m, retention=layer.retention), [q, state.memory[0]], torch.float64)
    else:
        compare(lambda q, w1, w2: layer.lookup(q, ((w1, w2), None)),
                lambda q, w1, w2: op_read(q, (w1, w2), mlp=True, activation=layer.activation,
                                          retention=layer.retention), [q, *state.memory[0]], torch.float64)


def test_read_argument_errors():
    q, memory = linear_inputs(torch.float32)
    with pytest.raises(ValueError, match=r"memory: expected shape \[B, H, Dv, Dk\]"):
        linear_memory_read(q, memory[:1])
    with pytest.raises(TypeError, match="memory: expected dtype"):
        linear_memory_read(q, memory.half())
    with pytest.raises(ValueError, match="q: expected a 4-d tensor"):
        linear_memory_read(q[0], memory)
    q, (w1, w2) = mlp_inputs(torch.float32)
    with pytest.raises(ValueError, match=r"weights\[1\]: expected shape \[B, H, D, N\]"):
        mlp_memory_read(q, (w1, w2[..., :-1]))
    with pytest.raises(TypeError, match="weights: expected a pair"):
        mlp_memory_read(q, w1)
    with pytest.raises(ValueError, match="activation"):
        mlp_memory_read(q, (w1, w2), "relu")
