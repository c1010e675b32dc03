"""Model API: shapes and dtypes, streaming == parallel (with autograd: the replay; without: the decode
steps), cached == uncached generation and its one-token calls, gradients
to every parameter, stability of the defaults at T = 4096, and argument errors."""

import random

import pytest
import torch

import titans_ext
from titans_ext.model import (LMMBlock, MACBlock, MAGBlock, MALBlock, MemoryState, NeuralMemory, SWABlock, TitansLM,
                              chunk_stability_edge, detach_state, stable_max_lr)

from step_harness import decode_model_stream, replay_one_token_calls, state_tensors

BLOCK_KINDS = ("mac", "mag", "mal", "lmm", "swa")
MEMORY_KINDS = ("linear", "mlp")


def small_block(kind, memory="linear"):
    options = {"heads": 2, "head_dim": 8, "chunk_size": 4, "memory": memory}
    if kind == "lmm":
        return LMMBlock(16, options)
    if kind == "swa":
        return SWABlock(16, heads=2, window=6)
    block = {"mac": MACBlock, "mag": MAGBlock, "mal": MALBlock}[kind]
    return block(16, 2, 8, 3, options)


def small_lm(kind, memory="linear"):
    return TitansLM(40, dim=16, depth=2, block=kind, heads=2, window=8, persistent_tokens=3, memory=memory,
                    memory_heads=2, chunk_size=4)


def run_in_pieces(module, x, piece_lengths, state=None):
    """Outputs of ``module`` fed ``x`` in consecutive pieces, with the state carried (from ``state``)."""
    outputs, start = [], 0
    for length in piece_lengths:
        y, state = module(x[:, start:start + length], state)
        outputs.append(y)
        start += length
    return torch.cat(outputs, dim=1), state


def random_pieces(total, rng, longest=9):
    lengths = []
    while sum(lengths) < total:
        lengths.append(min(rng.randint(1, longest), total - sum(lengths)))
    return lengths


# --- shapes and dtypes ---------------------------------------------------------------------------

@pytest.mark.parametrize("memory", MEMORY_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_neural_memory_shapes_and_dtypes(memory, dtype):
    layer = NeuralMemory(16, heads=2, head_dim=8, memory=memory, chunk_size=4).to(dtype)
    x = torch.randn(3, 10, 16, dtype=dtype)
    y, state = layer(x)
    assert y.shape == (3, 10, 16) and y.dtype == dtype
    assert isinstance(state, MemoryState) and state.position == 10 and state.replay[1][0].shape[1] == 2
    weights = state.memory[0] if memory == "linear" else state.memory[0][0]
    assert weights.dtype == torch.float32 and weights.shape[:2] == (3, 2)
    assert state.conv_cache.shape == (3, 3, 3 * 2 * 8)


@pytest.mark.parametrize("kind", BLOCK_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_shapes_and_dtypes(kind, dtype):
    block = small_block(kind).to(dtype)
    y, _ = block(torch.randn(2, 13, 16, dtype=dtype))
    assert y.shape == (2, 13, 16) and y.dtype == dtype and torch.isfinite(y.float()).all()


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_lm_shapes(kind):
    model = small_lm(kind)
    logits, state = model(torch.randint(0, 40, (2, 11)))
    assert logits.shape == (2, 11, 40) and logits.dtype == torch.float32
    assert isinstance(state, list) and len(state) == 2


# --- streaming equals one parallel call ----------------------------------------------------------

@pytest.mark.parametrize("memory", MEMORY_KINDS)
@pytest.mark.parametrize("chunk_size", [1, 4, 5])
def test_neural_memory_streaming_equals_parallel(memory, chunk_size):
    torch.manual_seed(0)
    layer = NeuralMemory(16, heads=2, head_dim=8, memory=memory, chunk_size=chunk_size).double()
    x = torch.randn(2, 23, 16, dtype=torch.float64)  # 23: not a multiple of any chunk size above
    y, state = layer(x)
    y_tokens, state_tokens = run_in_pieces(layer, x, [1] * 23)
    y_pieces, state_pieces = run_in_pieces(layer, x, random_pieces(23, random.Random(chunk_size)))
    torch.testing.assert_close(y_tokens, y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y_pieces, y, rtol=1e-10, atol=1e-10)
    for other in (state_tokens, state_pieces):
        torch.testing.assert_close(other.memory, state.memory, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_lm_streaming_equals_parallel(kind):
    torch.manual_seed(1)
    model = small_lm(kind).double()
    tokens = torch.randint(0, 40, (2, 21))
    logits, _ = model(tokens)
    for lengths in ([1] * 21, random_pieces(21, random.Random(2))):
        streamed, _ = run_in_pieces(model, tokens, lengths)
        torch.testing.assert_close(streamed, logits, rtol=1e-9, atol=1e-9)


MODEL_CASES = [(kind, "linear") for kind in BLOCK_KINDS] + [(kind, "mlp") for kind in BLOCK_KINDS if kind != "swa"]


@pytest.mark.parametrize("memory", MEMORY_KINDS)
@pytest.mark.parametrize("chunk_size", [1, 4, 5])
def test_neural_memory_decode_streaming_equals_parallel(memory, chunk_size):
    """Without autograd the pieces run the decode steps (and the chunked op on whole chunks)."""
    torch.manual_seed(0)
    layer = NeuralMemory(16, heads=2, head_dim=8, memory=memory, chunk_size=chunk_size).double()
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    with torch.no_grad():
        y, state = layer(x)
        y_tokens, state_tokens = run_in_pieces(layer, x, [1] * 23)
        y_pieces, state_pieces = run_in_pieces(layer, x, random_pieces(23, random.Random(chunk_size)))
    assert state_tokens.replay is None and state_tokens.chunk_start is not None
    for y_other, other in ((y_tokens, state_tokens), (y_pieces, state_pieces)):
        torch.testing.assert_close(y_other, y, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(other.memory, state.memory, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("memory", MEMORY_KINDS)
def test_owned_decode_states_update_in_place(memory):
    """Within owned_decode_states the decode steps write the states they are given (a copy owned by
    the caller) and return them: the same reads and states as the functional steps, bit for bit,
    across chunk boundaries and calls of several tokens (steps, the chunked op on whole chunks, steps)."""
    from titans_ext.model.memory import owned_copy, owned_decode_states

    torch.manual_seed(0)
    layer = NeuralMemory(16, heads=2, head_dim=8, memory=memory, chunk_size=4, read="chunk_start",
                         retention="kl").double()
    x = torch.randn(2, 19, 16, dtype=torch.float64)
    with torch.no_grad():
        _, state = layer(x[:, :3])
        functional, owned = state, owned_copy(state)
        for start, stop in ((3, 4), (4, 5), (5, 16), (16, 17), (17, 19)):
            y, functional = layer(x[:, start:stop], functional)
            given = owned
            with owned_decode_states():
                y_owned, owned = layer(x[:, start:stop], owned)
            assert torch.equal(y, y_owned)
            for a, b in zip(state_tensors(functional.memory), state_tensors(owned.memory)):
                assert torch.equal(a, b)
            if stop - start == 1:  # a step only: the given buffers hold the new state
                assert all(a is b for a, b in zip(state_tensors(given.memory), state_tensors(owned.memory)))
        _, again = layer(x[:, :3])
    for a, b in zip(state_tensors(again), state_tensors(state)):  # the prompt's state is untouched
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["mac", "mag", "mal", "lmm"])
def test_owned_decode_states_stream_equals_one_call(kind):
    """A model's one-token calls inside owned_decode_states (TitansLM.generate's decode loop) give
    the logits of one call on the whole sequence, across chunk and MAC segment boundaries: no
    state a block keeps (MAC's segment-start memory) is overwritten by the in-place steps."""
    from titans_ext.model.memory import owned_copy, owned_decode_states

    torch.manual_seed(2)
    model = small_lm(kind).double()
    tokens = torch.randint(0, 40, (2, 21))
    with torch.no_grad():
        logits, _ = model(tokens)
        streamed, state = model(tokens[:, :6])
        streamed, state = [streamed], owned_copy(state)
        with owned_decode_states():
            for t in range(6, 21):
                out, state = model(tokens[:, t:t + 1], state)
                streamed.append(out)
    torch.testing.assert_close(torch.cat(streamed, dim=1), logits, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("memory", MEMORY_KINDS)
def test_stream_switches_from_autograd_to_decode_mid_chunk(memory):
    """The chunk-start state is rebuilt from the replayed tokens; the way back is refused."""
    torch.manual_seed(1)
    layer = NeuralMemory(16, heads=2, head_dim=8, memory=memory, chunk_size=4).double()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    with torch.no_grad():
        y, state = layer(x)
    y_first, mid = layer(x[:, :6])
    assert mid.replay is not None
    with torch.no_grad():
        y_rest, end = run_in_pieces(layer, x[:, 6:], [1, 3, 1], mid)
    torch.testing.assert_close(torch.cat([y_first.detach(), y_rest], dim=1), y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(end.memory, state.memory, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        _, stepped = layer(x[:, :6])
    with pytest.raises(ValueError, match="state: the stream is at position 6, inside a chunk"):
        layer(x[:, 6:8], stepped)


@pytest.mark.parametrize("kind, memory", MODEL_CASES)
def test_lm_decode_streaming_equals_parallel(kind, memory):
    torch.manual_seed(1)
    model = small_lm(kind, memory).double()
    tokens = torch.randint(0, 40, (2, 21))
    with torch.no_grad():
        logits, _ = model(tokens)
        for lengths in ([1] * 21, random_pieces(21, random.Random(2))):
            streamed, _ = run_in_pieces(model, tokens, lengths)
            torch.testing.assert_close(streamed, logits, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind, memory", MODEL_CASES)
def test_cached_generation_runs_the_decode_steps(monkeypatch, kind, memory):
    """After the prompt, each generated token runs decode steps only (O(state)), never the chunked op:
    in-place steps on generate's own copy of the prompt's state."""
    model = small_lm(kind, memory)
    prompt = torch.randint(0, 40, (1, 6))
    calls = {"chunked": 0, "step": 0, "step_": 0}
    for name in ("run_op", "step"):
        original = getattr(NeuralMemory, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls["chunked" if _name == "run_op" else "step_" if kwargs.get("in_place") else "step"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(NeuralMemory, name, counted)
    model.generate(prompt, 0)  # the prompt alone (its tokens count below only through it)
    prompt_calls = dict(calls)
    calls.update(chunked=0, step=0, step_=0)
    model.generate(prompt, 9)
    steps_per_token = (0 if kind == "swa" else 1) * len(model.blocks)
    assert calls["chunked"] == prompt_calls["chunked"]
    assert calls["step"] == prompt_calls["step"] and prompt_calls["step_"] == 0
    assert calls["step_"] == 9 * steps_per_token


@pytest.mark.parametrize("memory", MEMORY_KINDS)
def test_one_token_call_reads_its_position_from_the_state_tensors(memory):
    """What a CUDA graph of one generate step needs (python_tests/test_memory_step_cuda.py captures
    one): a state object whose tensors are overwritten with the next state's, its Python fields left
    as they were, continues the stream, across chunk boundaries."""
    torch.manual_seed(0)
    model = TitansLM(40, dim=16, depth=2, block="lmm", memory=memory, memory_heads=2, chunk_size=4)
    prompt, fed = torch.randint(0, 40, (2, 3)), torch.randint(0, 40, (2, 9))
    state, eager = decode_model_stream(model, prompt, fed)
    static_state = titans_ext.model.memory.map_tensors(torch.clone, state)

    def check(t, logits):
        torch.testing.assert_close(logits, eager[t], rtol=0, atol=0)

    with torch.no_grad():
        replay_one_token_calls(lambda token: model(token, static_state), static_state, fed, check)


@pytest.mark.parametrize("kind, memory", MODEL_CASES)
def test_cached_generation_equals_uncached(kind, memory):
    torch.manual_seed(2)
    model = small_lm(kind, memory).double()
    prompt = torch.randint(0, 40, (2, 6))
    cached = model.generate(prompt, 12)
    assert cached.shape == (2, 18) and torch.equal(cached[:, :6], prompt)
    assert torch.equal(cached, model.generate(prompt, 12, use_cache=False))
    sampled = [model.generate(prompt, 8, temperature=1.0, use_cache=use_cache,
                              generator=torch.Generator().manual_seed(3)) for use_cache in (True, False)]
    assert torch.equal(*sampled)


def test_detached_state_continues_the_stream():
    torch.manual_seed(3)
    model = small_lm("mag")
    tokens = torch.randint(0, 40, (1, 14))
    _, state = model(tokens[:, :9])
    detached = detach_state(state)
    assert all(not t.requires_grad for t in state_tensors(detached))
    continued, _ = model(tokens[:, 9:], detached)
    logits, _ = model(tokens)
    torch.testing.assert_close(continued, logits[:, 9:], rtol=1e-5, atol=1e-5)


# --- gradients -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, memory", [(kind, "linear") for kind in BLOCK_KINDS] + [
    (kind, "mlp") for kind in BLOCK_KINDS if kind != "swa"])
def test_gradients_reach_every_parameter(kind, memory):
    torch.manual_seed(4)
    model = small_lm(kind, memory)
    logits, _ = model(torch.randint(0, 40, (2, 19)))
    logits.pow(2).mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


# --- stability of the defaults -------------------------------------------------------------------

@pytest.mark.parametrize("memory", MEMORY_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_defaults_are_finite_at_long_sequences(memory, dtype):
    torch.manual_seed(5)
    layer = NeuralMemory(32, heads=2, memory=memory).to(dtype)
    x = torch.randn(1, 4096, 32, dtype=dtype, requires_grad=True)
    y, _ = layer(x)
    y.float().pow(2).mean().backward()
    assert torch.isfinite(y.float()).all() and torch.isfinite(x.grad.float()).all()
    for name, p in layer.named_parameters():
        assert torch.isfinite(p.grad.float()).all(), name


def _error_after_repeated_writes(chunk_size, eta, theta, chunks=200, D=8):
    """|M k - v| / |v| after the linear op wrote one pair (k, v) at every token from a zero
    memory, with constant gates and no forgetting: the worst case of chunk_stability_edge."""
    torch.manual_seed(8)
    T = chunk_size * chunks
    k = torch.nn.functional.normalize(torch.randn(1, 1, 1, D, dtype=torch.float64), dim=-1).expand(1, T, 1, D)
    v = torch.randn(1, 1, 1, D, dtype=torch.float64).expand(1, T, 1, D)
    gate = lambda value: torch.full((1, T, 1), value, dtype=torch.float64)  # noqa: E731
    _, (M, _) = titans_ext.linear_memory(k, k, v, gate(theta), gate(eta), gate(0.0), chunk_size=chunk_size,
                                         output_final_state=True)
    return ((M[0, 0] @ k[0, -1, 0] - v[0, -1, 0]).norm() / v[0, -1, 0].norm()).item()


@pytest.mark.parametrize("chunk_size, eta", [(1, 0.5), (4, 0.0), (4, 0.5), (16, 0.3), (16, 0.9)])
def test_chunk_stability_edge_is_where_the_op_diverges(chunk_size, eta):
    """The analysis of docs/design.md §4.1 against the op itself: a pair written at every token
    is learned below the edge and blows up above it."""
    edge = chunk_stability_edge(chunk_size, eta)
    assert _error_after_repeated_writes(chunk_size, eta, 0.9 * edge) < 0.1
    assert _error_after_repeated_writes(chunk_size, eta, 1.1 * edge) > 10


def test_stable_max_lr_is_half_the_edge_at_the_worst_momentum():
    for chunk_size, max_momentum in [(4, 0.5), (16, 0.5), (64, 0.9)]:
        bound = stable_max_lr(chunk_size, max_momentum)
        edges = [chunk_stability_edge(chunk_size, max_momentum * i / 50) for i in range(51)]
        assert min(edges) / 2 - 1e-3 * bound <= bound <= min(edges) / 2
    assert stable_max_lr(4, 0.5) == pytest.approx(0.10975, abs=1e-5)
    assert stable_max_lr(1, 0.5) == 0.25  # capped: half the edge would be 0.5 at chunk 1
    assert NeuralMemory(32, chunk_size=4).max_lr == stable_max_lr(4, 0.5)
    with pytest.raises(ValueError, match="max_momentum"):
        stable_max_lr(4, 1.0)


def test_saturated_gates_stay_finite():
    """The default max_lr bounds the inner steps for any gate values (here all at their bounds)."""
    torch.manual_seed(6)
    layer = NeuralMemory(32, heads=2, chunk_size=64)
    with torch.no_grad():
        layer.gate_proj.weight.zero_()
        layer.gate_proj.bias.view(3, 2).copy_(torch.tensor([[20.0], [20.0], [-20.0]]))
    y, state = layer(torch.randn(1, 4096, 32))
    assert torch.isfinite(y).all() and state.memory[0].abs().max() < 10



@pytest.mark.parametrize("chunk_size", [4, 16])
def test_starting_gates_learn_a_repeated_pair_within_four_chunks(chunk_size):
    """The default gates at initialization make the memory a delta rule on the scale of a few
    chunks, not a slowly growing sum: one key-value pair written at every token is learned at
    least halfway (M k . v / |v|^2 >= 0.5) within four chunks. With the former default
    max_momentum 0.9 the stable max_lr leaves a sixth (chunk 4) to a quarter (chunk 16) of the
    default's step, and the models of the recall benchmark stayed at chance for the first third
    of their training (docs/design.md §4.1, issue 16)."""
    torch.manual_seed(7)
    heads, D, T = 2, 16, 4 * chunk_size
    layer = NeuralMemory(heads * D, heads=heads, chunk_size=chunk_size)
    # The gates of an input the gate projection maps to zero: their biases, the starting gates.
    gates = torch.sigmoid(layer.gate_proj.bias.detach()).view(3, heads).expand(1, T, 3, heads)
    theta, eta, alpha = layer.max_lr * gates[:, :, 0], layer.max_momentum * gates[:, :, 1], gates[:, :, 2]
    k = torch.nn.functional.normalize(torch.randn(1, 1, heads, D), dim=-1).expand(1, T, heads, D)
    v = torch.randn(1, 1, heads, D).expand(1, T, heads, D)
    _, (M, _) = titans_ext.linear_memory(k, k, v, theta, eta, alpha, chunk_size=chunk_size,
                                         initial_state=layer.initial_state(1).memory, output_final_state=True)
    learned = torch.einsum("bhij,bhj,bhi->bh", M, k[:, -1], v[:, -1]) / v[:, -1].pow(2).sum(-1)
    assert (learned >= 0.5).all(), learned

# --- argument errors -----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    ({"heads": 0}, ValueError, "heads"),
    ({"memory": "deep"}, ValueError, "memory"),
    ({"chunk_size": 2.5}, TypeError, "chunk_size"),
    ({"max_lr": -1.0}, ValueError, "max_lr"),
    ({"max_momentum": 1.5}, ValueError, "max_momentum"),
    ({"max_momentum": 1.0}, ValueError, "max_lr"),
    ({"activation": "relu"}, ValueError, "activation"),
])
def test_neural_memory_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        NeuralMemory(16, **kwargs)


def test_model_argument_errors():
    with pytest.raises(ValueError, match="block"):
        TitansLM(10, block="transformer")
    with pytest.raises(ValueError, match="segment_size"):
        MACBlock(16, 2, 6, 2, {"chunk_size": 4})
    with pytest.raises(ValueError, match="heads"):
        SWABlock(16, heads=3)
    layer = NeuralMemory(16, heads=2)
    with pytest.raises(ValueError, match="x: expected shape"):
        layer(torch.randn(2, 5, 8))
    model = small_lm("lmm")
    with pytest.raises(ValueError, match="tokens: token ids must lie in"):
        model(torch.tensor([[0, 40]]))
    with pytest.raises(TypeError, match="tokens: expected integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="state"):
        model(torch.zeros(1, 3, dtype=torch.long), state=[None])
    with pytest.raises(ValueError, match="prompt"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 3)
