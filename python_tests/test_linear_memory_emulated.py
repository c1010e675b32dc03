"""The CUDA linear_memory forward (csrc/cuda/linear_memory_fwd.cuh) run by the CPU SIMT emulation
(``titans_emu::linear_memory_fwd``, same schema and contract as ``titans_ext::linear_memory_fwd``)
against the float64 references. Shapes are tiny: every emulated thread is a fiber."""

import pytest
import torch

import titans_ext  # noqa: F401  (registers titans_ext::, used for the contract comparison)
import titans_ext._emu  # noqa: F401  (registers titans_emu::)
from titans_ext.reference import linear_memory_chunked, linear_memory_recurrent

from utils import TOLERANCE, all_emulation_modes, assert_close, memory_inputs, set_emulation_modes, shape_id  # noqa: F401

emu = torch.ops.titans_emu
pytestmark = pytest.mark.usefixtures("all_emulation_modes")


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
# (16 rows per block) and a partial last tile, an odd chunk size, a chunk longer than T.
SHAPES = [
    (2, 37, 2, 8, 5, 16),
    (1, 70, 2, 12, 20, 32),
    (2, 45, 1, 32, 24, 64),
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


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_float32_matches_float64_reference(chunk_size, read):
    inputs, init = memory_inputs(2, 70, 2, 16, 12, torch.float32)
    check(inputs, init, chunk_size, read, TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_keep_their_dtype_and_fp32_state(dtype):
    inputs, init = memory_inputs(1, 40, 2, 16, 16, dtype)
    o, m, s, chunk_states = run_emulated(inputs, init, 16, "token")
    assert o.dtype == dtype and m.dtype == s.dtype == chunk_states.dtype == torch.float32
    ref_o, ref_m, ref_s = reference(inputs, init, 16, "token")
    # The state is stored in fp32, but the products read it as bf16 (bf16 inputs) or tf32 (fp16
    # inputs) MMA operands, so it carries the inputs' tolerance.
    assert_close("o", ref_o, o, TOLERANCE[dtype])
    assert_close("M_T", ref_m, m, TOLERANCE[dtype])


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
    # one would not. bf16 with Dk = 16 runs the ldmatrix fragment paths.
    inputs, init = memory_inputs(2, 45, 2, 16 if dtype == torch.bfloat16 else 8, 20, dtype)
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
