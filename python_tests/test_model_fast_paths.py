"""The model's fast paths against their plain-PyTorch references: the causal convolution's own
backward (values and gradients of every input, packed documents, dtypes), the rotary embedding,
and whole models with the fast convolution against the same models on the reference."""

import pytest
import torch

from titans_ext.model import TitansLM, memory
from titans_ext.model.attention import rotate
from titans_ext.model.memory import CausalConvFunction, causal_conv_reference

from utils import TOLERANCE, assert_close


def conv_case(dtype, K, T=11, B=2, C=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    padded = torch.randn(B, K - 1 + T, C, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    weight = torch.randn(C, K, generator=generator, dtype=torch.float64).to(torch.float64 if dtype == torch.float64
                                                                             else torch.float32).requires_grad_()
    bias = torch.randn(C, generator=generator, dtype=weight.dtype).requires_grad_()
    return padded, weight, bias


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("packed", [False, True], ids=["stream", "packed"])
def test_causal_conv_function_matches_reference(dtype, K, packed):
    T = 11
    document_position = torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 0]) if packed else None
    results = []
    for fn in (causal_conv_reference, CausalConvFunction.apply):
        padded, weight, bias = conv_case(dtype, K, T)
        y = fn(padded, weight, bias, T, document_position)
        cotangent = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
        (y * cotangent).sum().backward()
        results.append((y, padded.grad, weight.grad, bias.grad))
    for name, ref, out in zip(("y", "d_padded", "d_weight", "d_bias"), *results):
        assert out.dtype == ref.dtype, name
        assert_close(name, ref, out, TOLERANCE[dtype])


def test_causal_conv_function_gradcheck():
    padded, weight, bias = conv_case(torch.float64, 3, T=5, C=3)
    document_position = torch.tensor([0, 1, 0, 1, 2])
    for position in (None, document_position):
        assert torch.autograd.gradcheck(lambda p, w, b: CausalConvFunction.apply(p, w, b, 5, position),
                                        (padded, weight, bias))


@pytest.mark.parametrize("kind", ["mac", "mag", "mal", "lmm"])
def test_models_match_the_reference_paths(monkeypatch, kind):
    """A model with the fast paths gives the outputs and parameter gradients of the same model on
    the references (fp64: only the order of float operations differs)."""

    def run():
        torch.manual_seed(0)
        model = TitansLM(40, dim=16, depth=2, block=kind, heads=2, window=8, persistent_tokens=3, memory_heads=2,
                         chunk_size=4).double()
        tokens = torch.randint(0, 40, (2, 21), generator=torch.Generator().manual_seed(2))
        logits, _ = model(tokens)
        logits.square().sum().backward()
        return logits, {name: p.grad for name, p in model.named_parameters()}

    fast = run()
    monkeypatch.setattr(memory.CausalConvFunction, "apply", causal_conv_reference)
    reference = run()
    assert_close("logits", reference[0], fast[0], TOLERANCE[torch.float64])
    for name, grad in reference[1].items():
        assert_close(name, grad, fast[1][name], TOLERANCE[torch.float64])


def rotate_reference(x, positions, base=10000.0):
    """The rotary embedding as written: the halves ``[x1 cos - x2 sin, x1 sin + x2 cos]``."""
    half = x.shape[-1] // 2
    angles = positions.double()[:, None] * base ** (-torch.arange(half, dtype=torch.float64) / half)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rotate_matches_reference(dtype):
    generator = torch.Generator().manual_seed(3)
    positions = torch.tensor([0, 1, 2, 7, 40, 3, 3])
    x = torch.randn(2, 3, 7, 8, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    cotangent = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(dtype)
    results = []
    for fn in (rotate_reference, rotate):
        y = fn(x, positions)
        (y * cotangent).sum().backward()
        results.append((y, x.grad))
        x.grad = None
    # fp32 angles in rotate (fp64 here): the reference's cos and sin differ by an fp32 rounding.
    ratio = max(TOLERANCE[dtype], 1e-6)
    assert_close("y", results[0][0], results[1][0], ratio)
    assert_close("dx", results[0][1], results[1][1], ratio)
