"""The CUDA linear_memory forward (csrc/cuda/linear_memory_fwd.cuh) run by the CPU SIMT emulation
(``titans_emu::linear_memory_fwd``, same schema and contract as ``titans_ext::linear_memory_fwd``)
against the float64 references, and its launch plan (``cuda_launch_plan``). Shapes are small: every
emulated thread is a fiber."""

import pytest
import torch

import titans_ext  # noqa: F401  (registers titans_ext::, used for the contract comparison)
import titans_ext._emu  # noqa: F401  (registers titans_emu::)
from titans_ext.ops.linear_memory import cuda_launch_plan
from titans_ext.reference import linear_memory_chunked, linear_memory_recurrent

from utils import TOLERANCE, all_emulation_modes, assert_close, memory_inputs, set_emulation_modes, shape_id  # noqa: F401

emu = torch.ops.titans_emu
pytestmark = pytest.mark.usefixtures("all_emulation_modes")
H100 = (132, 227 * 1024)  # SMs and shared memory per block the emulated ops report by default


@pytest.fixture(autouse=True)
def h100_afterwards():
    yield
    emu.set_device_limits(*H100)


def run_emulated(inputs, init, chunk_size, read, save_states=True):
    m0, s0 = (None, None) if init is None else init
    return emu.linear_memory_fwd(*inputs, m0, s0, chunk_size, read == "token", save_states)


def reference(inputs, init, chunk_size, read):
    inputs = [x.double() for x in inputs]
    init = None if init is None else tuple(x.double() for x in init)
    o, (m, s) = linear_memory_recurrent(*inputs, chunk_size=chunk_size, initial_state=init,
                                        output_final_state=True, read=read)
    return o, m, s


def reference_chunk_states(inputs, init, chunk_size):
    """[B, H, N, 2, Dv, Dk]: (M, S) at the start of each chunk, from the chunked reference."""
    inputs = [x.double() for x in inputs]
    B, T, H, Dk = inputs[0].shape
    Dv = inputs[2].shape[-1]
    state = tuple(x.double() for x in init) if init is not None else (torch.zeros(B, H, Dv, Dk, dtype=torch.float64),) * 2
    states = []
    for start in range(0, T, chunk_size):
        states.append(torch.stack(state, dim=2))
        piece = [x[:, start:start + chunk_size] for x in inputs]
        _, state = linear_memory_chunked(*piece, chunk_size=chunk_size, initial_state=state, output_final_state=True)
    return torch.stack(states, dim=2)


def check(inputs, init, chunk_size, read, ratio):
    o, m, s, chunk_states = run_emulated(inputs, init, chunk_size, read)
    ref_o, ref_m, ref_s = reference(inputs, init, chunk_size, read)
    assert_close("o", ref_o, o, ratio)
    assert_close("M_T", ref_m, m, ratio)
    assert_close("S_T", ref_s, s, ratio)
    assert_close("chunk_states", reference_chunk_states(inputs, init, chunk_size), chunk_states, ratio)


# (B, T, H, Dk, Dv, chunk_size): T not a multiple of the chunk, Dk != Dv, Dv over one value tile
# and a partial last tile, an odd chunk size, a chunk longer than T, a single token.
SHAPES = [
    (2, 37, 2, 8, 5, 16),
    (1, 70, 2, 12, 20, 32),
    (2, 25, 1, 32, 24, 32),
    (1, 30, 2, 6, 9, 7),
    (1, 1, 1, 4, 4, 16),
]


@pytest.mark.parametrize("with_state", [True, False], ids=["init", "zeros"])
@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_float64_matches_token_loop(shape, read, with_state):
    B, T, H, Dk, Dv, C = shape
    inputs, init = memory_inputs(B, T, H, Dk, Dv, torch.float64, state=with_state)
    check(inputs, init, C, read, TOLERANCE[torch.float64])


# At least five chunks, the key dimensions the kernels are tuned for, a short last chunk and a
# partial value tile.
LONG_SHAPES = [(1, 75, 1, 64, 40, 16), (1, 70, 1, 128, 24, 16)]


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", LONG_SHAPES, ids=shape_id)
def test_long_sequences_match_float64_reference(shape, dtype, read):
    B, T, H, Dk, Dv, C = shape
    inputs, init = memory_inputs(B, T, H, Dk, Dv, dtype)
    o, m, s, chunk_states = run_emulated(inputs, init, C, read)
    ref_o, ref_m, ref_s = reference(inputs, init, C, read)
    # bf16 products read the state as bf16 operands, so the state carries the inputs' tolerance.
    for name, r, out in (("o", ref_o, o), ("M_T", ref_m, m), ("S_T", ref_s, s)):
        assert_close(name, r, out, TOLERANCE[dtype])
    # Checkpoints in the input dtype; bf16 keeps every other chunk's.
    assert chunk_states.dtype == dtype and chunk_states.shape[2] == -(-T // C // (2 if dtype == torch.bfloat16 else 1))


@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_float32_chunk_sizes(chunk_size):
    inputs, init = memory_inputs(2, 70, 2, 16, 12, torch.float32)
    check(inputs, init, chunk_size, "token", TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_keep_their_dtype_and_fp32_state(dtype):
    # o and the checkpoints in the inputs' dtype, the final state in fp32.
    inputs, init = memory_inputs(1, 40, 2, 16, 16, dtype)
    o, m, s, chunk_states = run_emulated(inputs, init, 16, "token")
    assert o.dtype == chunk_states.dtype == dtype and m.dtype == s.dtype == torch.float32
    ref_o, ref_m, ref_s = reference(inputs, init, 16, "token")
    assert_close("o", ref_o, o, TOLERANCE[dtype])
    assert_close("M_T", ref_m, m, TOLERANCE[dtype])


def test_outputs_do_not_depend_on_the_checkpoints_or_the_value_tile():
    # The outputs never read the checkpoints back, and every element of every product sums its
    # terms in the same order whatever the tile: without a gradient, and with 64, 32 or 16 rows
    # per block (each a device whose shared memory stops the wider one), the outputs are the same.
    inputs, init = memory_inputs(1, 70, 2, 16, 40, torch.bfloat16)
    expected = run_emulated(inputs, init, 16, "token", save_states=False)
    tiles, smem = [], H100[1]
    for _ in range(3):
        emu.set_device_limits(H100[0], smem)
        plan = cuda_launch_plan(1, 70, 2, 16, 40, 16, torch.bfloat16, emulated=True)["forward"]
        tiles.append(plan["tile_v"])
        smem = plan["kernels"][0]["smem_bytes"] - 1
        out = run_emulated(inputs, init, 16, "token")
        for name, e, x in zip(("o", "M_T", "S_T"), expected, out):
            assert torch.equal(e, x), (name, tiles[-1])
    assert tiles == [64, 32, 16]


def test_zero_and_one_gates_are_exact():
    # eta = 0 resets the momentum and alpha = 1 forgets the memory: the row recurrence never
    # divides by a gate, so these stay finite and exact.
    inputs, init = memory_inputs(1, 33, 2, 8, 8, torch.float64)
    q, k, v, theta, eta, alpha = inputs
    eta[:, ::3] = 0.0
    alpha[:, 5::7] = 1.0
    check([q, k, v, theta, eta, alpha], init, 16, "token", TOLERANCE[torch.float64])


def test_strided_inputs():
    # Slices of larger buffers: the kernel reads every token tensor through its strides.
    inputs, init = memory_inputs(2, 50, 3, 8, 10, torch.float64)
    wide = [torch.cat([x, torch.full_like(x, float("nan"))], dim=2)[:, :, :3] for x in inputs]
    assert not any(x.is_contiguous() for x in wide)
    check(wide, init, 16, "token", TOLERANCE[torch.float64])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 7])
def test_emulation_modes_give_identical_results(seed, dtype):
    # Every value is computed by one thread in a fixed order, so any run that respects the
    # barriers, cp.async waits and fences gives the same bits as the orderly default; a missing
    # one would not. Five chunks, Dk = 64.
    inputs, init = memory_inputs(1, 75, 2, 64, 20, dtype)
    set_emulation_modes(-1)
    expected = run_emulated(inputs, init, 16, "token")
    set_emulation_modes(seed)
    for name, e, out in zip(["o", "M_T", "S_T", "chunk_states"], expected, run_emulated(inputs, init, 16, "token")):
        assert torch.equal(e, out), name


def test_output_contract_matches_the_cpu_op():
    inputs, init = memory_inputs(1, 20, 2, 8, 6, torch.float32)
    for save_states in (True, False):
        emulated = emu.linear_memory_fwd(*inputs, *init, 16, True, save_states)
        cpu = torch.ops.titans_ext.linear_memory_fwd(*inputs, *init, 16, True, save_states)
        for e, c in zip(emulated, cpu):
            assert e.shape == c.shape and e.dtype == c.dtype
    assert emulated[3].shape == (0,)
    assert_close("o", cpu[0], emulated[0], TOLERANCE[torch.float32])


def test_launch_plan_of_the_forward():
    # B=8, H=16, T=8192, Dk=Dv=64, chunk 64, bf16 on an H100: one kernel, whole-Dv tiles (one
    # wave of 128 blocks); without a gradient it requests no checkpoint buffer and moves q, k, v,
    # the gates and o only; with one it adds the checkpoints in bf16, every other chunk's
    # (128 MiB).
    B, T, H, D, C = 8, 8192, 16, 64, 64
    no_grad = cuda_launch_plan(B, T, H, D, D, C, torch.bfloat16, save_states=False, emulated=True)["forward"]
    grad = cuda_launch_plan(B, T, H, D, D, C, torch.bfloat16, save_states=True, emulated=True)["forward"]
    assert no_grad["buffers"] == [] and no_grad["tile_v"] == 64 and no_grad["kernels"][0]["blocks"] == 128
    per_token_head = lambda plan: sum(k["bytes_read"] + k["bytes_written"] for k in plan["kernels"]) / (B * T * H)
    # q, k, v, o in bf16 and three fp32 gates, plus the final state.
    assert per_token_head(no_grad) == pytest.approx(4 * D * 2 + 3 * 4, abs=5)
    checkpoints = sum(b["bytes"] for b in grad["buffers"] if b["name"] == "checkpoints")
    assert checkpoints == B * H * (T // C // 2) * 2 * D * D * 2 == 128 << 20
    assert per_token_head(grad) <= 0.8 * 1024
