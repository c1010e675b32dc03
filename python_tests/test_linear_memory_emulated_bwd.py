"""The CUDA linear_memory kernels, forward AND backward (csrc/cuda/linear_memory_{fwd,bwd}.cuh), run by
the CPU SIMT emulation (``titans_emu::linear_memory_fwd`` / ``linear_memory_bwd``, same schemas and
contracts as the ``titans_ext::`` ops) against autograd of the float64 token-loop reference.

The emulation runs the kernels' MMA wrappers with the GPU's operand rounding, so the per-dtype
closeness rule (relative RMS error, utils.TOLERANCE) is the one the CUDA tests use: fp64 1e-10,
fp32 1e-4 (3xTF32 products), bf16 / fp16 1e-2 (bf16 operands / tf32 operands, fp32 state).
Shapes are tiny: every emulated thread is a fiber.
"""

import pytest
import torch

import titans_ext  # noqa: F401  (registers titans_ext::, used for the contract comparison)
import titans_ext._emu  # noqa: F401  (registers titans_emu::)
from titans_ext.reference import linear_memory_recurrent

from utils import (GRAD_NAMES, TOLERANCE, all_emulation_modes, assert_close, memory_inputs,  # noqa: F401
                   set_emulation_modes, shape_id)

emu = torch.ops.titans_emu
pytestmark = pytest.mark.usefixtures("all_emulation_modes")


H100 = (132, 227 * 1024)  # SMs and shared memory per block the emulated ops report by default


@pytest.fixture
def device_limits():
    """Sets the (SM count, shared memory per block) the emulated ops report."""
    yield emu.set_device_limits
    emu.set_device_limits(*H100)


def cotangents(shapes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


def run_emulated(inputs, init, chunk_size, read, cot, final_cotangent=True, layout=lambda x: x):
    """Emulated forward, then backward with the cotangents (d_o, dM_T, dS_T); ``layout`` makes
    the tensor d_o is passed as (by default d_o itself)."""
    m0, s0 = (None, None) if init is None else init
    o, m, s, states = emu.linear_memory_fwd(*inputs, m0, s0, chunk_size, read == "token", True)
    d_o = layout(cot[0].to(o.dtype))
    d_m, d_s = (cot[1].to(m.dtype), cot[2].to(s.dtype)) if final_cotangent else (None, None)
    grads = emu.linear_memory_bwd(*inputs, states, d_o, d_m, d_s, chunk_size, read == "token")
    return [o, m, s], list(grads)


def reference(inputs, init, chunk_size, read, cot, final_cotangent=True):
    """float64 token loop and its autograd, with the cotangents as the emulated run sees them."""
    leaves = [x.detach().double().requires_grad_() for x in inputs]
    init_leaves = None if init is None else tuple(x.detach().double().requires_grad_() for x in init)
    o, (m, s) = linear_memory_recurrent(*leaves, chunk_size=chunk_size, initial_state=init_leaves,
                                        output_final_state=True, read=read)
    d_o = cot[0].to(inputs[0].dtype).double()  # bf16/fp16 runs see a rounded d_o
    loss = (o * d_o).sum()
    if final_cotangent:
        loss = loss + (m * cot[1]).sum() + (s * cot[2]).sum()
    wrt = leaves + (list(init_leaves) if init_leaves else [])
    grads = torch.autograd.grad(loss, wrt)
    return [o.detach(), m.detach(), s.detach()], list(grads)


def check(inputs, init, chunk_size, read, ratio, final_cotangent=True, layout=lambda x: x):
    B, T, H, Dk = inputs[0].shape
    Dv = inputs[2].shape[-1]
    cot = cotangents([(B, T, H, Dv), (B, H, Dv, Dk), (B, H, Dv, Dk)])
    values, grads = run_emulated(inputs, init, chunk_size, read, cot, final_cotangent, layout)
    ref_values, ref_grads = reference(inputs, init, chunk_size, read, cot, final_cotangent)
    for name, r, out in zip(["o", "M_T", "S_T"], ref_values, values):
        assert_close(name, r, out, ratio)
    # Without an initial state the reference has no dM0 / dS0; the kernel still returns them.
    for name, r, out in zip(GRAD_NAMES, ref_grads, grads):
        assert_close(name, r, out, ratio)


# (B, T, H, Dk, Dv, chunk_size): T not a multiple of the chunk (short last chunk, down to one
# token), Dk != Dv (both ways), Dv over several value tiles with a partial last tile (the
# parallel kernels take 32 rows per tile for Dk <= 64, 16 above; the sequential ones 16 here),
# an odd chunk size, a chunk longer than T, Dk > 64.
SHAPES = [
    (2, 37, 2, 8, 5, 16),
    (1, 65, 1, 12, 40, 32),
    (1, 45, 2, 32, 24, 64),
    (1, 30, 1, 6, 9, 7),
    (1, 1, 1, 4, 4, 16),
    (1, 20, 1, 80, 20, 16),
]


@pytest.mark.parametrize("with_state", [True, False], ids=["init", "zeros"])
@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_float64_values_and_grads_match_token_loop(shape, read, with_state):
    B, T, H, Dk, Dv, C = shape
    inputs, init = memory_inputs(B, T, H, Dk, Dv, torch.float64, state=with_state)
    check(inputs, init, C, read, TOLERANCE[torch.float64])


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_match_float64_reference(dtype, chunk_size, read):
    inputs, init = memory_inputs(1, 50, 1, 16, 40, dtype)
    check(inputs, init, chunk_size, read, TOLERANCE[dtype])


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_wide_state_tile_matches_float64_reference(device_limits, dtype, read):
    # A device that cannot hold every 16-row sequential block at once: 32 rows per sequential
    # block (fp64 keeps 16), two tiles, the second partial.
    device_limits(0, H100[1])
    inputs, init = memory_inputs(1, 50, 2, 16, 40, dtype)
    check(inputs, init, 16, read, TOLERANCE[dtype])


def test_shared_memory_of_the_device_decides_the_parallel_tile(device_limits):
    # An A100 block (163 KiB) does not hold the parallel backward kernel's 32-row tile for bf16,
    # Dk = 64 and chunk 64: the launchers take 16 rows there, with the same results.
    inputs, init = memory_inputs(1, 70, 1, 64, 40, torch.bfloat16)
    device_limits(H100[0], 163 * 1024)
    check(inputs, init, 64, "token", TOLERANCE[torch.bfloat16])
    device_limits(H100[0], 32 * 1024)
    with pytest.raises(RuntimeError, match="needs .* bytes of shared memory per block, more than the 32768 this device"):
        emu.linear_memory_fwd(*inputs, *init, 64, True, True)


def test_without_final_state_cotangent():
    inputs, init = memory_inputs(2, 40, 1, 8, 8, torch.float64)
    check(inputs, init, 16, "token", TOLERANCE[torch.float64], final_cotangent=False)


def test_zero_and_one_gates_are_exact():
    # eta = 0 resets the momentum and alpha = 1 forgets the memory: the forward and reverse row
    # recurrences never divide by a gate, so values and gradients stay finite and exact.
    inputs, init = memory_inputs(1, 33, 2, 8, 8, torch.float64)
    eta, alpha = inputs[4], inputs[5]
    eta[:, ::3] = 0.0
    alpha[:, 5::7] = 1.0
    check(inputs, init, 16, "token", TOLERANCE[torch.float64])


def test_strided_inputs():
    # Slices of larger buffers: both kernels read every token tensor through its strides.
    inputs, init = memory_inputs(2, 30, 3, 8, 10, torch.float64)
    wide = [torch.cat([x, torch.full_like(x, float("nan"))], dim=2)[:, :, :3] for x in inputs]
    assert not any(x.is_contiguous() for x in wide)
    check(wide, init, 16, "token", TOLERANCE[torch.float64])


def misaligned(x):
    """x as a view that starts one element into a wider buffer (NaN around it): rows keep unit
    stride but no row start is 16-byte aligned."""
    wide = torch.full((*x.shape[:-1], x.shape[-1] + 8), float("nan"), dtype=x.dtype)
    wide[..., 1:1 + x.shape[-1]] = x
    view = wide[..., 1:1 + x.shape[-1]]
    assert view.data_ptr() % 16 != 0
    return view


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_inputs_are_staged_element_by_element(dtype):
    # The kernels stage q, k, v and dO with 16-byte cp.async copies only where every row start
    # is 16-byte aligned; the emulation raises on a misaligned cp.async, so these inputs must
    # take the element copies. Five chunks: both sequential pipelines refill their buffers.
    inputs, init = memory_inputs(1, 80, 2, 16, 24, dtype)
    check([misaligned(x) for x in inputs], init, 16, "token", TOLERANCE[dtype], layout=misaligned)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 7])
def test_emulation_modes_give_identical_gradients(seed, dtype):
    # Every value is computed by one thread in a fixed order and the value tiles' partial sums
    # are added in tile order, so any run that respects the barriers, cp.async waits and fences
    # gives the same bits as the orderly default. bf16 with Dk = 16 runs the ldmatrix fragment paths.
    inputs, init = memory_inputs(1, 45, 2, 16 if dtype == torch.bfloat16 else 8, 40, dtype)
    Dk = inputs[0].shape[-1]
    cot = cotangents([(1, 45, 2, 40), (1, 2, 40, Dk), (1, 2, 40, Dk)])
    set_emulation_modes(-1)
    expected = run_emulated(inputs, init, 16, "token", cot)
    set_emulation_modes(seed)
    values, grads = run_emulated(inputs, init, 16, "token", cot)
    for name, e, out in zip(["o", "M_T", "S_T"] + GRAD_NAMES, expected[0] + expected[1], values + grads):
        assert torch.equal(e, out), name


def test_backward_contract_matches_the_cpu_op():
    inputs, init = memory_inputs(1, 20, 2, 8, 6, torch.bfloat16)
    o, m, s, states = emu.linear_memory_fwd(*inputs, *init, 16, True, True)
    d_o = torch.randn_like(o)
    emulated = emu.linear_memory_bwd(*inputs, states, d_o, torch.randn_like(m), None, 16, True)
    cpu = torch.ops.titans_ext.linear_memory_bwd(*inputs, states, d_o, torch.randn_like(m), None, 16, True)
    for name, e, c in zip(GRAD_NAMES, emulated, cpu):
        assert e.shape == c.shape and e.dtype == c.dtype, name


def test_empty_sequence_passes_the_final_cotangent_through():
    inputs, init = memory_inputs(1, 0, 2, 8, 6, torch.float32)
    _, m, _, states = emu.linear_memory_fwd(*inputs, *init, 16, True, True)
    d_m, d_s = torch.randn_like(m), torch.randn_like(m)
    grads = emu.linear_memory_bwd(*inputs, states, torch.zeros(1, 0, 2, 6), d_m, d_s, 16, True)
    assert torch.equal(grads[6], d_m) and torch.equal(grads[7], d_s)
    assert all(g.numel() == 0 for g in grads[:6])


def test_chunk_size_above_the_kernel_limit_is_rejected():
    inputs, init = memory_inputs(1, 10, 1, 8, 8, torch.float32)
    with pytest.raises(RuntimeError, match="chunk_size must be in 1..64"):
        emu.linear_memory_fwd(*inputs, *init, 128, True, True)
