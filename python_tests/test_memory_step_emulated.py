"""The CUDA decode-step kernels (csrc/cuda/memory_step.cuh) under the CPU SIMT emulation
(titans_emu::linear_memory_step / mlp_memory_step, the titans_ext:: schemas on CPU tensors): streams
fed one token at a time equal the chunked op token for token, through the same Python path as the
public ops, with every emulation hazard mode on. Shapes are small (every thread is a fiber) but cross
a warp's 32 lanes in the rows the kernels split over lanes."""

import pytest
import torch

import titans_ext  # noqa: F401  (registers titans_ext::, the chunked op the streams are compared with)
import titans_ext._emu  # noqa: F401  (registers titans_emu::)

from miras_cases import OBJECTIVES, RETENTIONS
from step_harness import (IN_PLACE_STEP_OPS, MEMORIES, STEP_OPS, check_in_place_stream, check_mid_chunk, check_stream,
                          flat, make_stream, step)
from utils import TOLERANCE, all_emulation_modes, assert_close, set_emulation_modes  # noqa: F401

pytestmark = pytest.mark.usefixtures("all_emulation_modes")

EMULATED = {memory: getattr(torch.ops.titans_emu, name) for memory, name in STEP_OPS.items()}
EMULATED_IN_PLACE = {memory: getattr(torch.ops.titans_emu, name) for memory, name in IN_PLACE_STEP_OPS.items()}
RATIO = 1e-12


def token_delta(B, T, H):
    return 0.2 + torch.rand(B, T, H, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


@pytest.mark.parametrize("retention", RETENTIONS)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("memory", MEMORIES)
def test_stream_equals_chunked_op(memory, objective, retention):
    # Read "token" with every objective and retention; "chunk_start" below.
    tokens, state = make_stream(memory, 1, 6, 2, 4, retention=RETENTIONS[retention])
    check_stream(memory, EMULATED[memory], tokens, state, 4, RATIO,
                 objective=OBJECTIVES[objective](token_delta(1, 6, 2)), retention=RETENTIONS[retention])


@pytest.mark.parametrize("retention", ["l2", "lq4", "kl"])
@pytest.mark.parametrize("memory", MEMORIES)
def test_chunk_start_read(memory, retention):
    tokens, state = make_stream(memory, 2, 6, 1, 4, retention=RETENTIONS[retention])
    check_stream(memory, EMULATED[memory], tokens, state, 3, RATIO, read="chunk_start",
                 retention=RETENTIONS[retention])


@pytest.mark.parametrize("retention", ["l2", "lq4", "kl"])
@pytest.mark.parametrize("memory", MEMORIES)
def test_rows_wider_than_a_warp(memory, retention):
    # D = 40: every warp's lanes loop twice over a row (and the MLP's N = 80 hidden rows, three times
    # over the block's warps); yaad takes its residual norm by a block sum.
    tokens, state = make_stream(memory, 1, 5, 2, 40, retention=RETENTIONS[retention], seed=2)
    check_stream(memory, EMULATED[memory], tokens, state, 4, RATIO, retention=RETENTIONS[retention],
                 objective=("yaad", 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("memory", MEMORIES)
def test_input_dtypes_match_the_cpu_op(memory, dtype):
    # The kernel reads bf16/fp16 inputs as they are and computes in fp32, like the CPU op, which
    # converts them first: the same values up to fp32 rounding.
    tokens, state = make_stream(memory, 2, 5, 2, 8, dtype=torch.float32)
    tokens = [x.to(dtype) if i < 3 else x for i, x in enumerate(tokens)]
    cpu = getattr(torch.ops.titans_ext, STEP_OPS[memory])
    runs = []
    for op in (cpu, EMULATED[memory]):
        running, chunk_state, outs = state, None, []
        for t in range(5):
            o, running, chunk_state = step(memory, op, tokens, t, running, chunk_state, chunk_size=2,
                                           retention=("lq", 4))
            outs.append(o)
        assert outs[-1].dtype == dtype
        runs.append(outs + flat(running) + flat(chunk_state))
    for i, (c, e) in enumerate(zip(*runs)):
        assert_close(f"output {i}", c.float(), e.float(), 1e-6 if dtype == torch.float32 else TOLERANCE[dtype])


@pytest.mark.parametrize("memory", MEMORIES)
def test_emulation_modes_give_identical_results(memory):
    # Each value is computed by one thread (or one warp sum) in a fixed order: any schedule that
    # respects the barriers gives the same bits.
    tokens, state = make_stream(memory, 2, 3, 2, 36, dtype=torch.float32, retention="kl")
    runs = []
    for seed in (-1, 5):
        set_emulation_modes(seed)
        running, chunk_state, outs = state, None, []
        for t in range(3):
            o, running, chunk_state = step(memory, EMULATED[memory], tokens, t, running, chunk_state, chunk_size=2,
                                           retention="kl", objective=("yaad", 0.5))
            outs.append(o)
        runs.append(outs + flat(running) + flat(chunk_state))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("read_token, retention", [(True, 0), (False, 2), (True, 1)])
@pytest.mark.parametrize("memory", MEMORIES)
def test_mid_chunk(memory, read_token, retention):
    check_mid_chunk(memory, EMULATED[memory], read_token, retention)


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("retention", ["l2", "lq4", "kl"])
@pytest.mark.parametrize("memory", MEMORIES)
def test_in_place_stream_equals_steps(memory, retention, read):
    # The kernel run in place (every state pointer its output's): each element is read before it is
    # written, by the thread that writes it, so the buffers hold the functional kernel's outputs.
    # Row 1 at position 2t: the rows start chunks at different tokens.
    tokens, state = make_stream(memory, 2, 6, 2, 4, retention=RETENTIONS[retention])
    positions = [torch.tensor([t, 2 * t]) for t in range(6)]
    check_in_place_stream(memory, EMULATED_IN_PLACE[memory], EMULATED[memory], tokens, state, 3, positions, read=read,
                          retention=RETENTIONS[retention], objective=("yaad", 0.5))
