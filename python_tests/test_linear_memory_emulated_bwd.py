"""The CUDA linear_memory kernels, forward AND backward (csrc/cuda/linear_memory_{fwd,bwd}*.cuh), run
by the CPU SIMT emulation (``titans_emu::linear_memory_fwd`` / ``linear_memory_bwd``, same schemas
and contracts as the ``titans_ext::`` ops) against autograd of the float64 token-loop reference,
and the backward's launch plan.

The emulation runs the kernels' MMA wrappers with the GPU's operand rounding, so the per-dtype
closeness rule (relative RMS error, utils.TOLERANCE) is the one the CUDA tests use: fp64 1e-10,
fp32 1e-4 (3xTF32 products), bf16 / fp16 1e-2 (bf16 operands / tf32 operands, fp32 state).

The backward has three launch shapes, which the launch rule picks from the device (the tests steer
it through the SM count the emulated device reports, and check the plan they get): one group of
chunks per sequence (the chunk kernel carries the cotangent through the whole sequence, no scan),
one chunk per group (a reverse scan stores every chunk's end cotangent), and groups in between
(both). Shapes are small: every emulated thread is a fiber.
"""

import pytest
import torch

import titans_ext  # noqa: F401  (registers titans_ext::, used for the contract comparison)
import titans_ext._emu  # noqa: F401  (registers titans_emu::)
from titans_ext.ops.linear_memory import cuda_launch_plan
from titans_ext.reference import linear_memory_recurrent

from utils import (GRAD_NAMES, TOLERANCE, all_emulation_modes, assert_close, memory_inputs,  # noqa: F401
                   set_emulation_modes, shape_id)

emu = torch.ops.titans_emu
pytestmark = pytest.mark.usefixtures("all_emulation_modes")
H100 = (132, 227 * 1024)  # SMs and shared memory per block the emulated ops report by default


@pytest.fixture(autouse=True)
def h100_afterwards():
    yield
    emu.set_device_limits(*H100)


def backward_plan(shape, dtype, read="token"):
    B, T, H, Dk, Dv, C = shape
    return cuda_launch_plan(B, T, H, Dk, Dv, C, dtype, read=read, has_final_cotangent=True, emulated=True)["backward"]


def steer(shape, dtype, launch, read="token"):
    """Sets the emulated device's SM count so that the backward of `shape` runs as `launch`:
    "sequence" (one group per sequence), "chunk" (one chunk per group) or "groups" (several chunks
    per group, several groups). Returns the plan."""
    n_chunks = -(-shape[1] // shape[5])
    for sm_count in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 132, 1024):
        emu.set_device_limits(sm_count, H100[1])
        plan = backward_plan(shape, dtype, read)
        got = ("sequence" if plan["group"] >= n_chunks else "chunk" if plan["group"] == 1 else "groups")
        if got == launch:
            return plan
    raise AssertionError(f"no SM count gives the {launch} launch for {shape}")


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


def shape_cotangents(inputs):
    B, T, H, Dk = inputs[0].shape
    Dv = inputs[2].shape[-1]
    return cotangents([(B, T, H, Dv), (B, H, Dv, Dk), (B, H, Dv, Dk)])


def check(inputs, init, chunk_size, read, ratio, final_cotangent=True, layout=lambda x: x):
    cot = shape_cotangents(inputs)
    values, grads = run_emulated(inputs, init, chunk_size, read, cot, final_cotangent, layout)
    ref_values, ref_grads = reference(inputs, init, chunk_size, read, cot, final_cotangent)
    for name, r, out in zip(["o", "M_T", "S_T"], ref_values, values):
        assert_close(name, r, out, ratio)
    # Without an initial state the reference has no dM0 / dS0; the kernel still returns them.
    for name, r, out in zip(GRAD_NAMES, ref_grads, grads):
        assert_close(name, r, out, ratio)


# (B, T, H, Dk, Dv, chunk_size): T not a multiple of the chunk (short last chunk, down to one
# token), Dk != Dv (both ways), Dv over several value slices with a partial last one, an odd chunk
# size, a chunk longer than T, Dk > 64.
SHAPES = [
    (2, 37, 2, 8, 5, 16),
    (1, 65, 1, 12, 40, 32),
    (1, 25, 2, 32, 24, 32),
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


# Five chunks and more, the tuned key dimensions, a short last chunk, a partial value slice.
LONG_SHAPES = [(1, 75, 1, 64, 40, 16), (1, 70, 1, 128, 24, 16)]


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", LONG_SHAPES, ids=shape_id)
def test_long_sequences_match_float64_reference(shape, dtype, read):
    B, T, H, Dk, Dv, C = shape
    inputs, init = memory_inputs(B, T, H, Dk, Dv, dtype)
    check(inputs, init, C, read, TOLERANCE[dtype])


@pytest.mark.parametrize("launch", ["sequence", "chunk", "groups"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_every_launch_shape_matches_the_reference(launch, dtype):
    # Five chunks of 16 (the last short) over two heads: the cotangent carried on chip across the
    # whole sequence, stored by the scan for every chunk, or both, with a partial last group. 16-bit
    # inputs keep every other checkpoint, so chunks 1 and 3 recompute their start state.
    shape = (1, 75, 2, 16, 20, 16)
    plan = steer(shape, dtype, launch)
    assert (plan["n_groups"] > 1) == any(k["name"] == "linear_memory_bwd_scan" for k in plan["kernels"])
    B, T, H, Dk, Dv, C = shape
    inputs, init = memory_inputs(B, T, H, Dk, Dv, dtype)
    check(inputs, init, C, "token", TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_small_device_takes_smaller_slices(dtype):
    # An A100 block (163 KiB) takes 16-row value slices for Dk = 64 (chunk 64 with bf16, 32 with
    # fp32), with the same results; a device too small for any launch is refused by name.
    C = 64 if dtype == torch.bfloat16 else 32
    shape = (1, 3 * C - 10, 1, 64, 40, C)
    emu.set_device_limits(108, 163 * 1024)
    plan = backward_plan(shape, dtype)
    assert plan["fits"] and plan["slice"] == 16 and plan["kernels"][-1]["smem_bytes"] <= 163 * 1024
    B, T, H, Dk, Dv, C = shape
    inputs, init = memory_inputs(B, T, H, Dk, Dv, dtype)
    check(inputs, init, C, "token", TOLERANCE[dtype])
    emu.set_device_limits(108, 32 * 1024)
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
    # take the element copies. Five chunks: every pipeline refills its buffers.
    inputs, init = memory_inputs(1, 80, 2, 16, 24, dtype)
    check([misaligned(x) for x in inputs], init, 16, "token", TOLERANCE[dtype], layout=misaligned)


@pytest.mark.parametrize("launch", ["sequence", "chunk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_emulation_modes_give_identical_gradients(dtype, launch):
    # Every value is computed by one thread in a fixed order and every sum over Dv is taken in
    # slice order, so any run that respects the barriers, cp.async waits and fences gives the
    # same bits as the orderly default. Five chunks, Dk = 64, two value slices.
    shape = (1, 75, 2, 64, 40, 16)
    steer(shape, dtype, launch)
    B, T, H, Dk, Dv, C = shape
    inputs, init = memory_inputs(B, T, H, Dk, Dv, dtype)
    cot = shape_cotangents(inputs)
    set_emulation_modes(-1)
    expected = run_emulated(inputs, init, C, "token", cot)
    for seed in (0, 7):
        set_emulation_modes(seed)
        values, grads = run_emulated(inputs, init, C, "token", cot)
        for name, e, out in zip(["o", "M_T", "S_T"] + GRAD_NAMES, expected[0] + expected[1], values + grads):
            assert torch.equal(e, out), (name, seed)


def test_backward_contract_matches_the_cpu_op():
    inputs, init = memory_inputs(1, 20, 2, 8, 6, torch.bfloat16)
    o, m, s, states = emu.linear_memory_fwd(*inputs, *init, 16, True, True)
    cpu_states = torch.ops.titans_ext.linear_memory_fwd(*inputs, *init, 16, True, True)[3]
    assert states.dtype == cpu_states.dtype == torch.bfloat16
    d_o = torch.randn_like(o)
    emulated = emu.linear_memory_bwd(*inputs, states, d_o, torch.randn_like(m), None, 16, True)
    cpu = torch.ops.titans_ext.linear_memory_bwd(*inputs, cpu_states, d_o, torch.randn_like(m), None, 16, True)
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


def test_launch_plan_of_the_backward_at_the_headline_shape():
    # B=8, H=16, T=8192, Dk=Dv=64, chunk 64, bf16 on an H100: one group per sequence (128 blocks,
    # one wave), no scan and no scratch: the backward reads q, k, v, dO, the gates and the
    # checkpoints and writes the gradients, under 1.5 KB per token-head.
    B, T, H, D, C = 8, 8192, 16, 64, 64
    plan = cuda_launch_plan(B, T, H, D, D, C, torch.bfloat16, emulated=True)["backward"]
    assert plan["n_groups"] == 1 and [k["name"] for k in plan["kernels"]] == ["linear_memory_bwd_chunks"]
    assert plan["buffers"] == [] and plan["kernels"][0]["blocks"] == B * H
    moved = sum(k["bytes_read"] + k["bytes_written"] for k in plan["kernels"]) / (B * T * H)
    assert moved <= 1.5 * 1024
    # A small batch over many chunks takes smaller groups, with the scan's store as its scratch.
    small = cuda_launch_plan(1, 16384, 8, D, D, C, torch.bfloat16, emulated=True)["backward"]
    assert small["n_groups"] > 1 and small["buffers"][0]["name"] == "group cotangents"
    assert small["buffers"][0]["bytes"] == (small["n_groups"] - 1) * 8 * 2 * D * D * 2
