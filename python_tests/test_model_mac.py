"""MACBlock's structure (Titans Sec. 4.1): each segment reads the memory as it was at the
segment start, gradients reach every projection of the memory through that read, the output
adds the memory's read after the write to the attention output, streaming equals one call, and
at initialization the loss reaches facts beyond the segment, and the memory's projections, about
as strongly as in MAL (the learning itself is measured by bench/recall.py)."""

import random

import pytest
import torch
import torch.nn.functional as F

from titans_ext.demo.recall import IGNORE, RecallTask
from titans_ext.model import MACBlock, TitansLM

from test_model import random_pieces, run_in_pieces

SEGMENT = 8
MEMORY_KINDS = ("linear", "mlp")


def mac_block(memory="linear", segment_size=SEGMENT, chunk_size=4):
    options = {"heads": 2, "head_dim": 8, "chunk_size": chunk_size, "memory": memory}
    return MACBlock(16, heads=2, segment_size=segment_size, persistent_tokens=2, memory_options=options)


def record_lookups(block):
    """Records ``(memory, o)`` of every segment read of ``block``'s memory; returns the list."""
    calls, lookup = [], block.memory.lookup

    def recorded(q, memory):
        o = lookup(q, memory)
        calls.append((memory, o))
        return o

    block.memory.lookup = recorded
    return calls


def read_starts(lengths, segment_size):
    """Where each segment read of a stream fed in pieces of ``lengths`` starts: every piece reads
    once per segment it touches."""
    starts, position = [], 0
    for length in lengths:
        starts += [position] + [p for p in range(position + 1, position + length) if p % segment_size == 0]
        position += length
    return starts


@pytest.mark.parametrize("memory", MEMORY_KINDS)
def test_segment_read_uses_the_memory_at_the_segment_start(memory):
    torch.manual_seed(0)
    block = mac_block(memory).double()
    x = torch.randn(2, 3 * SEGMENT + 5, 16, dtype=torch.float64)
    # The memory at each segment start, from streams cut there.
    expected = [block(x[:, :SEGMENT * s])[1].memory.memory for s in range(4)]
    for lengths in ([x.shape[1]], random_pieces(x.shape[1], random.Random(1), longest=11)):
        calls = record_lookups(block)
        run_in_pieces(block, x, lengths)
        del block.memory.lookup
        starts = read_starts(lengths, SEGMENT)
        assert len(calls) == len(starts)
        for (read_memory, _), start in zip(calls, starts):
            torch.testing.assert_close(read_memory, expected[start // SEGMENT], rtol=1e-10, atol=1e-12)
    # The writes change the memory from segment to segment.
    flat = [torch.cat([t.flatten() for t in torch.utils._pytree.tree_leaves(m)]) for m in expected]
    assert all(not torch.allclose(a, b) for a, b in zip(flat, flat[1:]))


def test_memory_writes_the_block_input_and_the_output_adds_its_read():
    # The deliberate departures from eqs. 24 and 25 (MACBlock's docstring): the write is
    # u = norm(x) of each segment piece, not the attention output y, and the output is
    # x + y + M*(u), not y gated by M*(u).
    torch.manual_seed(3)
    block = mac_block().double()
    outputs, writes, transformed = [], [], []
    attend, update, output = block.attention.attend, block.memory.update, block.memory.output
    block.attention.attend = lambda *args: outputs.append(attend(*args)) or outputs[-1]
    block.memory.update = lambda x, state: writes.append(x) or update(x, state)
    block.memory.output = lambda o, x: transformed.append(output(o, x)) or transformed[-1]
    x = torch.randn(2, 2 * SEGMENT + 3, 16, dtype=torch.float64)
    y, _ = block(x)
    assert [w.shape[1] for w in writes] == [SEGMENT, SEGMENT, 3]
    y_attention = torch.cat(outputs, dim=1)
    torch.testing.assert_close(torch.cat(writes, dim=1), block.memory_norm(x), rtol=1e-12, atol=1e-12)
    assert len(transformed) == 3 + 1  # one segment read per segment piece, then the reads after the writes
    expected = block.feed_forward(x + y_attention + transformed[-1])
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("memory", MEMORY_KINDS)
def test_gradients_reach_every_projection_of_the_memory_through_the_segment_read(memory):
    torch.manual_seed(1)
    block = mac_block(memory).double()
    calls = record_lookups(block)
    x = torch.randn(2, 3 * SEGMENT, 16, dtype=torch.float64, requires_grad=True)
    y, _ = block(x)
    _, last_read = calls[-1]  # the last segment's read of the memory written by the first two
    last_read.pow(2).sum().backward(retain_graph=True)
    mem, inner = block.memory, 2 * 8
    output_transform = ("out_norm.", "out_gate.", "out_proj.")  # applied to the read, after the lookup
    parts = {
        **{f"qkv_proj {name}": mem.qkv_proj.weight.grad[i * inner:(i + 1) * inner] for i, name in enumerate("qkv")},
        **{f"qkv_conv {name}": mem.qkv_conv.weight.grad[i * inner:(i + 1) * inner] for i, name in enumerate("qkv")},
        **{f"gate_proj {name}": mem.gate_proj.weight.grad.view(3, 2, 16)[i]
           for i, name in enumerate(("theta", "eta", "alpha"))},
        **{name: p.grad for name, p in mem.named_parameters()
           if not name.startswith(("qkv_", "gate_proj.weight", *output_transform))},
        "memory_norm": block.memory_norm.weight.grad,
        "input of the first segment": x.grad[:, :SEGMENT],
    }
    missing = [name for name, grad in parts.items() if grad is None or not grad.abs().sum() > 0]
    assert not missing, f"the segment read does not reach {missing}"
    block.zero_grad()
    y.pow(2).sum().backward()
    unreached = [name for name, p in mem.named_parameters()
                 if name.startswith(output_transform) and not p.grad.abs().sum() > 0]
    assert not unreached, f"the block's output does not reach {unreached}"


@pytest.mark.parametrize("memory", MEMORY_KINDS)
@pytest.mark.parametrize("segment_size, chunk_size", [(8, 4), (4, 4), (6, 2)])
def test_streaming_equals_one_call(memory, segment_size, chunk_size):
    torch.manual_seed(2)
    block = mac_block(memory, segment_size, chunk_size).double()
    x = torch.randn(2, 27, 16, dtype=torch.float64)
    y, state = block(x)
    for lengths in ([1] * 27, random_pieces(27, random.Random(segment_size), longest=11)):
        streamed, streamed_state = run_in_pieces(block, x, lengths)
        torch.testing.assert_close(streamed, y, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(streamed_state.memory.memory, state.memory.memory, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(streamed_state.segment_memory, state.segment_memory, rtol=1e-10, atol=1e-10)


def fact_gradient_ratio(block, seed):
    """Gradient norm of the recall loss at the facts' embeddings over that at the questions', at
    initialization, on recall with every fact beyond the window (reached only through memory)."""
    torch.manual_seed(seed)
    task = RecallTask.mqar(n_pairs=2, filler=24, n_keys=16, n_values=16, n_noise=16)
    model = TitansLM(task.vocab_size, dim=32, depth=2, block=block, heads=2, window=8, chunk_size=4)
    tokens, targets, _ = task.sample(16, torch.Generator().manual_seed(seed))
    embedded = model.embedding(tokens).detach().requires_grad_()
    model.embedding.forward = lambda _: embedded
    logits, _ = model(tokens)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE).backward()
    norms = embedded.grad.norm(dim=-1).mean(0)
    return float(norms[:4].mean() / norms[-4:].mean())


def test_long_range_gradient_at_initialization_is_on_par_with_mal():
    # MAC used to write its memory with the raw attention output and to put the raw memory read
    # into the attention (both about 0.2 of the scale of the normalized input tokens): the loss
    # reached the facts ~200 times more weakly than in MAL, and MAC stayed at chance on MQAR.
    # (The scale was necessary, not sufficient: see MACBlock's docstring for what it writes.)
    for seed in range(2):
        mac, mal = fact_gradient_ratio("mac", seed), fact_gradient_ratio("mal", seed)
        assert mac > 0.25 * mal, (seed, mac, mal)


def memory_gradient(block, seed):
    """Gradient norm of the recall loss at initialization in the first block's memory
    projections (every parameter of its NeuralMemory but the initial memory)."""
    torch.manual_seed(seed)
    task = RecallTask.mqar(n_pairs=2, filler=24, n_keys=16, n_values=16, n_noise=16)
    model = TitansLM(task.vocab_size, dim=32, depth=2, block=block, heads=2, window=8, chunk_size=4)
    tokens, targets, _ = task.sample(16, torch.Generator().manual_seed(seed))
    logits, _ = model(tokens)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE).backward()
    grads = [p.grad for name, p in model.blocks[0].memory.named_parameters() if not name.startswith("initial_memory")]
    return float(torch.cat([g.flatten() for g in grads]).norm())


def test_memory_projections_learn_at_initialization_on_par_with_mal():
    # With the output y * sigmoid(M*(u)) the read reached the loss only as a factor of the
    # attention output: the projections of MAC's memory got 0.2-0.3 of MAL's gradient here (a
    # third on bench/recall.py's default setting), and MAC learned recall slowly (14.8 % where
    # MAL reached 72.3 %). Added to the output they get about as much as MAL's.
    for seed in range(2):
        mac, mal = memory_gradient("mac", seed), memory_gradient("mal", seed)
        assert mac > 0.6 * mal, (seed, mac, mal)
