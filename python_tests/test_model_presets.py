"""NeuralMemory presets (titans, moneta, yaad, memora; docs/miras.md §3): what each picks,
streaming with their options, a short training run on the recall task, argument errors."""

import random

import pytest
import torch

from titans_ext.demo.recall import RecallTask
from titans_ext.demo.train import recall_loss, train
from titans_ext.model import NeuralMemory, TitansLM

from test_model import random_pieces, run_in_pieces

PRESETS = ("titans", "moneta", "yaad", "memora")


def small_memory(**kwargs):
    return NeuralMemory(16, heads=2, head_dim=8, chunk_size=4, **kwargs)


@pytest.mark.parametrize("preset, objective, retention, max_momentum", [
    ("titans", "l2", "l2", 0.9),
    ("moneta", ("lp", 3), "lq", 0.0),
    ("yaad", ("huber", "learned"), "l2", 0.0),
    ("memora", "l2", "kl", 0.0),
])
def test_preset_choices(preset, objective, retention, max_momentum):
    layer = small_memory(preset=preset)
    assert layer.memory_kind == "mlp" and layer.objective == objective
    assert layer.retention.kind == retention and layer.max_momentum == max_momentum
    assert (layer.delta_proj is not None) == (preset == "yaad")
    x = torch.randn(2, 6, 16)
    _, (_, _, _, eta, _, *delta), _ = layer.project(x, layer.initial_state(2).conv_cache)
    assert (eta.abs().max() == 0) == (max_momentum == 0)  # no momentum: eta = 0
    assert [d.shape for d in delta] == ([(2, 6, 2, 8)] if preset == "yaad" else [])
    y, _ = layer(x)
    assert torch.isfinite(y).all()


def test_explicit_arguments_override_the_preset():
    layer = small_memory(preset="moneta", memory="linear", retention="l2")
    assert layer.memory_kind == "linear" and layer.objective == ("lp", 3) and layer.retention.kind == "l2"
    assert layer.max_momentum == 0.0


def test_initial_memory_of_the_retentions():
    """kl: the learned logits enter as row-stochastic weights; lq: unit q-norm per head."""
    (W1, W2), _ = small_memory(preset="memora").initial_state(3).memory
    for w in (W1, W2):
        assert (w > 0).all()
        torch.testing.assert_close(w.sum(dim=-1), torch.ones_like(w[..., 0]))
    (W1, W2), _ = small_memory(preset="moneta").initial_state(3).memory
    for w in (W1, W2):
        torch.testing.assert_close(w.pow(4).sum(dim=(-2, -1)), torch.ones(3, 2))


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_streaming_equals_parallel(preset):
    """Learned delta, lq and kl carried across calls of any length (pending tokens included)."""
    torch.manual_seed(0)
    layer = small_memory(preset=preset).double()
    x = torch.randn(2, 15, 16, dtype=torch.float64)
    y, state = layer(x)
    y_pieces, state_pieces = run_in_pieces(layer, x, random_pieces(15, random.Random(1), longest=6))
    torch.testing.assert_close(y_pieces, y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state_pieces.memory, state.memory, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_training_reduces_the_loss(preset):
    torch.manual_seed(0)
    task = RecallTask(seq_len=32, n_pairs=2, n_keys=8, n_values=8, n_noise=8)
    model = TitansLM(task.vocab_size, dim=32, depth=1, block="lmm", heads=2, chunk_size=4, preset=preset)
    batch = task.sample(64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = recall_loss(model, batch[0], batch[1]).item()
    losses = train(model, task, steps=30, batch_size=16, lr=1e-2, seed=2)
    with torch.no_grad():
        after = recall_loss(model, batch[0], batch[1]).item()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert after < before - 1.0, (before, after)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"preset": "mamba"}, ValueError, "preset: expected one of"),
    ({"objective": ("lp", "learned")}, ValueError, "objective: expected one of"),
    ({"objective": ("huber", -1.0)}, ValueError, "delta: expected delta > 0"),
    ({"retention": ("lq", 1)}, ValueError, "retention: lq needs q > 1"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        small_memory(**kwargs)
