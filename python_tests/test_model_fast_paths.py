"""The model's fast paths against their plain-PyTorch references: the causal convolution's own
backward (values and gradients of every input, packed documents, dtypes), and whole models
with every fast path against the same models on the references."""

import pytest
import torch

from titans_ext.model import TitansLM, memory
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
