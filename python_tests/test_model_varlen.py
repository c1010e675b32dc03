"""Packed documents (``cu_seqlens``) in the model API: NeuralMemory, every block and TitansLM.

The definition is "each document runs alone from the start of a stream": every test compares
one packed call with one call per document, concatenated (values, and the gradients of a random
functional in the input and every parameter), over documents shorter than a chunk, a conv
kernel, a window and a MAC segment, of length 1 and 0, and longer than two segments.
"""

import pytest
import torch

from titans_ext.model import NeuralMemory, SlidingWindowAttention, TitansLM

from test_model import BLOCK_KINDS, MEMORY_KINDS, small_block
from utils import TOLERANCE, assert_close, random_cotangents

# With small_block's chunk 4, conv kernel 4, window 6 and MAC segment 8: empty documents (first,
# inside, last), documents of 1-3 tokens (shorter than a chunk and the kernel), 5 (shorter than
# a window and a segment) and 19 (over two segments, ending inside a chunk).
LENGTHS = (0, 5, 1, 19, 0, 3, 9, 2, 0)


def offsets(lengths, dtype=torch.int32):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=dtype)


def per_document(module, x, cu_seqlens):
    """The definition: ``module`` on each document alone (state None), outputs concatenated."""
    bounds = cu_seqlens.tolist()
    outputs = [module(x[:, begin:end])[0] for begin, end in zip(bounds, bounds[1:]) if end > begin]
    return torch.cat(outputs, dim=1)


def values_and_grads(run, module, x):
    """``run(x) -> y`` on a fresh leaf of ``x``: y, then the gradients of a random functional of y
    in x and in every parameter of ``module`` (zeros where a parameter gets none)."""
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    y = run(x)
    loss = (y.double() * random_cotangents([y])[0].double()).sum()
    params = list(module.parameters())
    leaves = ([x] if x.requires_grad else []) + params
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [y.detach()] + [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads)]


def assert_packed_equals_per_document(module, x, cu_seqlens, dtype):
    packed = values_and_grads(lambda x: module(x, cu_seqlens=cu_seqlens)[0], module, x)
    separate = values_and_grads(lambda x: per_document(module, x, cu_seqlens), module, x)
    names = ["y"] + (["d x"] if x.is_floating_point() else []) + [f"d {n}" for n, _ in module.named_parameters()]
    for name, ref, out in zip(names, separate, packed):
        assert_close(name, ref, out, TOLERANCE[dtype])
    with torch.no_grad():  # without autograd the memory runs its decode path
        assert_close("y (no autograd)", per_document(module, x, cu_seqlens), module(x, cu_seqlens=cu_seqlens)[0],
                     TOLERANCE[dtype])


@pytest.mark.parametrize("memory", MEMORY_KINDS)
@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_block_packed_equals_per_document(kind, memory):
    torch.manual_seed(0)
    block = small_block(kind, memory).double()
    cu_seqlens = offsets(LENGTHS)
    x = torch.randn(1, sum(LENGTHS), 16, dtype=torch.float64)
    y, state = block(x, cu_seqlens=cu_seqlens)
    assert y.shape == x.shape and state is None
    assert_packed_equals_per_document(block, x, cu_seqlens, torch.float64)


@pytest.mark.parametrize("options", [
    dict(memory="linear", chunk_size=3, conv_kernel=1),
    dict(memory="mlp", chunk_size=5, conv_kernel=6, read="chunk_start"),
    dict(preset="moneta", chunk_size=4),   # lq retention
    dict(preset="yaad", chunk_size=4),     # a learned per-token delta
    dict(preset="memora", chunk_size=4),   # kl retention
], ids=["linear-C3-K1", "mlp-C5-K6-chunk_start", "moneta", "yaad", "memora"])
def test_neural_memory_packed_equals_per_document(options):
    torch.manual_seed(1)
    layer = NeuralMemory(16, heads=2, head_dim=8, **options).double()
    cu_seqlens = offsets(LENGTHS, torch.int64)
    assert_packed_equals_per_document(layer, torch.randn(1, sum(LENGTHS), 16, dtype=torch.float64), cu_seqlens,
                                      torch.float64)


@pytest.mark.parametrize("window, persistent_tokens", [(1, 2), (3, 0), (6, 2)])
def test_attention_tiles_equal_per_document(monkeypatch, window, persistent_tokens):
    """Query tiles shorter than the packed batch (the tile is the window here): keys reach back
    into the previous tile and padding documents pad the last one. (Window 1 without persistent
    tokens is left out: each token attends itself alone, so the queries get no gradient.)"""
    monkeypatch.setattr(SlidingWindowAttention, "MIN_TILE", 1)
    torch.manual_seed(2)
    attention = SlidingWindowAttention(16, 2, window, persistent_tokens).double()
    cu_seqlens = offsets(LENGTHS)
    assert_packed_equals_per_document(attention, torch.randn(1, sum(LENGTHS), 16, dtype=torch.float64),
                                      cu_seqlens, torch.float64)


@pytest.mark.parametrize("kind, memory", [("mac", "mlp"), ("mag", "linear"), ("mal", "mlp"), ("lmm", "linear"),
                                          ("swa", "linear")])
def test_lm_packed_equals_per_document(kind, memory):
    """The blocks are tested with both memories above; here that the LM hands cu_seqlens to each."""
    torch.manual_seed(3)
    lm = TitansLM(40, dim=16, depth=2, block=kind, heads=2, window=8, persistent_tokens=3, memory=memory,
                  memory_heads=2, chunk_size=4).double()
    lengths = (7, 1, 0, 17, 4)
    tokens = torch.randint(0, 40, (1, sum(lengths)))
    logits, state = lm(tokens, cu_seqlens=offsets(lengths))
    assert logits.shape == (1, sum(lengths), 40) and state is None
    assert_packed_equals_per_document(lm, tokens, offsets(lengths), torch.float64)


@pytest.mark.parametrize("kind", ["mac", "mag"])
def test_packed_float32(kind):
    torch.manual_seed(4)
    block = small_block(kind, "mlp")
    assert_packed_equals_per_document(block, torch.randn(1, sum(LENGTHS), 16), offsets(LENGTHS), torch.float32)


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_only_empty_documents(kind):
    block = small_block(kind, "mlp")
    y, state = block(torch.randn(1, 0, 16), cu_seqlens=offsets((0, 0)))
    assert y.shape == (1, 0, 16) and state is None
    assert block(torch.randn(2, 0, 16))[0].shape == (2, 0, 16)  # and an empty call without cu_seqlens


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_block_packed_input_errors(kind):
    block = small_block(kind)
    x = torch.randn(1, 9, 16)
    with pytest.raises(TypeError, match="cu_seqlens: expected dtype int32 or int64"):
        block(x, cu_seqlens=torch.tensor([0.0, 9.0]))
    with pytest.raises(ValueError, match="cu_seqlens: packed sequences need B = 1"):
        block(torch.randn(2, 9, 16), cu_seqlens=offsets((9,)))
    with pytest.raises(ValueError, match="cu_seqlens: expected offsets ending at T = 9"):
        block(x, cu_seqlens=offsets((4, 4)))
    with pytest.raises(ValueError, match="cu_seqlens: expected non-decreasing offsets"):
        block(x, cu_seqlens=torch.tensor([0, 5, 3, 9]))
    with pytest.raises(ValueError, match="cu_seqlens: expected a 1-d tensor"):
        block(x, cu_seqlens=torch.tensor([0]))
    _, state = block(x)
    with pytest.raises(ValueError, match="state: a call with cu_seqlens .* takes no state"):
        block(x, state, cu_seqlens=offsets((4, 5)))


def test_packed_errors_name_the_argument():
    lm = TitansLM(40, dim=16, depth=1, block="mag", heads=2, window=8, memory_heads=2, chunk_size=4)
    tokens = torch.randint(0, 40, (1, 9))
    with pytest.raises(ValueError, match="cu_seqlens: packed sequences need B = 1"):
        lm(torch.randint(0, 40, (2, 9)), cu_seqlens=offsets((9,)))
    with pytest.raises(ValueError, match="state: a call with cu_seqlens"):
        lm(tokens, lm.initial_state(1), cu_seqlens=offsets((9,)))
    attention = SlidingWindowAttention(16, 2, 4)
    _, cache = attention(torch.randn(1, 9, 16))
    with pytest.raises(ValueError, match="cache: a call with cu_seqlens"):
        attention(torch.randn(1, 9, 16), cache, cu_seqlens=offsets((9,)))
