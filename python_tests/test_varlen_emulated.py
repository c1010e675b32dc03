"""Packed variable-length sequences (``cu_seqlens``, docs/design.md §6) in the CUDA kernels, run by
the CPU SIMT emulation (``titans_emu::linear_memory_*`` / ``mlp_memory_*`` take ``cu_seqlens`` as
the ``titans_ext::`` ops do), and, where there is a GPU, the CUDA ops themselves.

The definition is "each sequence runs as its own call": every emulated test compares one packed
call (forward, then backward with random cotangents of o and the final state) with the same
emulated kernels called once per sequence, over sequences shorter than a chunk, of length 1 and of
length 0 (first, inside and last), in fp32 and bf16 (whose forward keeps every other chunk's
checkpoint, so the packed checkpoint addressing differs), through the backward's three launch
shapes (one group of chunks per sequence; one chunk per group with the reverse scan; groups in
between), which the tests steer through the SM count the emulated device reports, and with a
non-l2 objective (huber, per-token delta), whose backward walks each packed sequence whole with
the carried cotangent in shared memory or in dm0 / ds0. Shapes are small: every emulated thread
is a fiber.
"""

import pytest
import torch

import titans_ext
import titans_ext._emu  # noqa: F401  (registers titans_emu::)
from titans_ext.ops.checks import CHECK_VALUES_ENV
from titans_ext.ops.linear_memory import cuda_launch_plan

from miras_cases import op_miras_args
from utils import TOLERANCE, assert_close, memory_inputs, syncs_are_errors

emu = torch.ops.titans_emu
H100 = (132, 227 * 1024)  # SMs and shared memory per block the emulated ops report by default

# Sequences shorter than a chunk, of length 0 (first, inside and last) and 1, and longer ones.
LENGTHS = (0, 5, 1, 0, 11, 3, 8, 0)
CHUNK = 4


@pytest.fixture(autouse=True)
def h100_afterwards():
    yield
    emu.set_device_limits(*H100)


def offsets(lengths, dtype=torch.int32, device="cpu"):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype, device=device)


def _randn(shape, seed, dtype, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)


def _pieces(x, lengths, dim):
    """x split along `dim` into the sequences' parts."""
    return list(torch.split(x, list(lengths), dim=dim))


# ---- linear memory


def linear_case(lengths, dtype, H=2, Dk=5, Dv=3, seed=0):
    """Packed inputs [1, T, ...], an initial state [N, H, Dv, Dk] and the cotangents of o and of
    the final state."""
    T, N = sum(lengths), len(lengths)
    inputs, _ = memory_inputs(1, T, H, Dk, Dv, dtype, seed=seed, theta_max=0.2, state=False)
    state_dtype = torch.float32 if dtype != torch.float64 else dtype
    init = tuple(_randn((N, H, Dv, Dk), seed + 1 + i, state_dtype, 0.3) for i in range(2))
    cot = (_randn((1, T, H, Dv), seed + 3, dtype),
           *(_randn((N, H, Dv, Dk), seed + 4 + i, state_dtype) for i in range(2)))
    return inputs, init, cot


def linear_emulated(inputs, init, cot, chunk_size, read_token, cu_seqlens=None, miras=()):
    """Emulated forward and backward: [o, m_T, s_T] and the gradients (dq, dk, dv, dtheta, deta,
    dalpha, dm0, ds0, and d_delta when `miras`, the ops' MIRAS arguments, has a delta)."""
    o, m, s, states = emu.linear_memory_fwd(*inputs, *init, chunk_size, read_token, True, *miras,
                                            cu_seqlens=cu_seqlens)
    grads = list(emu.linear_memory_bwd(*inputs, states, cot[0], cot[1], cot[2], chunk_size, read_token, *miras,
                                       cu_seqlens=cu_seqlens))
    d_delta = grads.pop()
    return [o, m, s], grads + ([d_delta] if _delta_of(miras) is not None else [])


def _delta_of(miras):
    return miras[3] if miras else None


def linear_per_sequence(inputs, init, cot, chunk_size, read_token, lengths, miras=()):
    """The emulated kernels once per sequence, concatenated as the packed call returns them (an
    empty sequence: its initial state, and its final state's cotangent as the initial one's)."""
    delta = _delta_of(miras)
    n_grads = 8 if delta is None else 9
    outs, grads = [[] for _ in range(3)], [[] for _ in range(n_grads)]
    token_pieces = [_pieces(x, lengths, 1) for x in inputs]
    d_o_pieces = _pieces(cot[0], lengths, 1)
    delta_pieces = None if delta is None else _pieces(delta, lengths, 1)
    for i, L in enumerate(lengths):
        seq_init = [x[i:i + 1] for x in init]
        seq_cot = [d_o_pieces[i], cot[1][i:i + 1], cot[2][i:i + 1]]
        seq_delta = [] if delta is None else [delta_pieces[i]]
        if L == 0:
            o_i, g_i = [d_o_pieces[i], *seq_init], [p[i] for p in token_pieces] + seq_cot[1:] + seq_delta
        else:
            seq_miras = miras if delta is None else (*miras[:3], delta_pieces[i], *miras[4:])
            o_i, g_i = linear_emulated([p[i] for p in token_pieces], seq_init, seq_cot, chunk_size, read_token,
                                       miras=seq_miras)
        for acc, x in zip(outs + grads, o_i + g_i):
            acc.append(x)
    token_dims = [1] + [0, 0] + [1] * 6 + [0, 0] + [1] * (n_grads - 8)
    return [torch.cat(x, dim=d) for x, d in zip(outs + grads, token_dims)]


LINEAR_NAMES = ("o", "m_T", "s_T", "dq", "dk", "dv", "dtheta", "deta", "dalpha", "dm0", "ds0", "d_delta")


def steer(lengths, launch, dtype=torch.float32, read="token", H=2, Dk=5, Dv=3, objective="l2"):
    """Sets the emulated device's SM count so that the packed backward runs as `launch`: "sequence"
    (a group holds the longest sequence: no sequence needs the scan), "chunk" (one chunk per group,
    the scan stores every chunk's end cotangent) or "groups" (in between). Returns the plan."""
    longest = -(-max(lengths) // CHUNK)
    for sm_count in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 132, 1024):
        emu.set_device_limits(sm_count, H100[1])
        plan = backward_plan(lengths, dtype, read, H, Dk, Dv, objective)
        got = "sequence" if plan["group"] >= longest else "chunk" if plan["group"] == 1 else "groups"
        if got == launch:
            return plan
    raise AssertionError(f"no SM count gives the {launch} launch for lengths {lengths}")


def backward_plan(lengths, dtype, read, H, Dk, Dv, objective):
    return cuda_launch_plan(1, sum(lengths), H, Dk, Dv, CHUNK, dtype, read=read, has_final_cotangent=True,
                            objective=objective, emulated=True, n_seqs=len(lengths))["backward"]


def steer_global_carry(lengths, objective, H=2, Dk=5, Dv=3):
    """Lowers the emulated device's shared memory per block until the whole-sequence backward of a
    non-l2 objective keeps its carried cotangent in dm0 / ds0 instead. Returns the plan."""
    emu.set_device_limits(H100[0], H100[1])
    plan = backward_plan(lengths, torch.float32, "token", H, Dk, Dv, objective)
    while plan["fits"] and not plan["global_carry"]:
        [chunks] = plan["kernels"]
        emu.set_device_limits(H100[0], chunks["smem_bytes"] - 1)
        plan = backward_plan(lengths, torch.float32, "token", H, Dk, Dv, objective)
    assert plan["fits"], f"no shared memory size gives the global carry for lengths {lengths}"
    return plan


def test_packed_plan_sizes_grids_from_T_and_N():
    """The chunk kernel runs a block per entry of T // (C group) + N per head; the scan and the
    forward a block per (value tile, head, sequence); the buffers are the bounds of sequences.h."""
    T, N, H, Dk, Dv = sum(LENGTHS), len(LENGTHS), 2, 5, 3
    plan = steer(LENGTHS, "chunk")
    chunks = next(k for k in plan["kernels"] if k["name"] == "linear_memory_bwd_chunks")
    scan = next(k for k in plan["kernels"] if k["name"] == "linear_memory_bwd_scan")
    assert chunks["blocks"] == (T // CHUNK + N) * H and scan["blocks"] == N * H
    assert plan["buffers"] == [{"name": "group cotangents", "bytes": (T // CHUNK + N) * H * 2 * Dv * Dk * 4}]
    forward = cuda_launch_plan(1, T, H, Dk, Dv, CHUNK, torch.float32, emulated=True, n_seqs=N)["forward"]
    assert forward["kernels"][0]["blocks"] == N * H
    assert forward["buffers"] == [{"name": "checkpoints", "bytes": (T // CHUNK + N) * H * 2 * Dv * Dk * 4}]


@pytest.mark.parametrize("launch", ["sequence", "groups", "chunk"])
@pytest.mark.parametrize("read", ["token", "chunk_start"])
def test_linear_packed_is_each_sequence_alone(launch, read):
    steer(LENGTHS, launch, read=read)
    inputs, init, cot = linear_case(LENGTHS, torch.float32)
    cu = offsets(LENGTHS)
    packed_outs, packed_grads = linear_emulated(inputs, init, cot, CHUNK, read == "token", cu)
    expected = linear_per_sequence(inputs, init, cot, CHUNK, read == "token", LENGTHS)
    for name, got, want in zip(LINEAR_NAMES, packed_outs + packed_grads, expected):
        assert_close(name, got, want, TOLERANCE[torch.float32])


@pytest.mark.parametrize("carry", ["shared", "global"])
def test_linear_packed_non_l2_objective_is_each_sequence_alone(carry):
    """huber with a per-token delta: the backward runs one block per (packed sequence, head) that walks
    the sequence's chunks, carrying the cotangent in shared memory or in the sequence's rows of dm0 /
    ds0; values and gradients, d_delta's included, equal per-sequence calls."""
    if carry == "global":
        plan = steer_global_carry(LENGTHS, ("huber", 0.5))
    else:
        plan = backward_plan(LENGTHS, torch.float32, "token", 2, 5, 3, ("huber", 0.5))
        assert not plan["global_carry"]
    assert plan["n_groups"] == 1 and [k["name"] for k in plan["kernels"]] == ["linear_memory_bwd_chunks"]
    inputs, init, cot = linear_case(LENGTHS, torch.float32)
    delta = 0.05 + 0.4 * torch.rand(inputs[2].shape[:3], generator=torch.Generator().manual_seed(7))
    miras = op_miras_args(("huber", delta), "l2", inputs[2], torch.float32)
    packed_outs, packed_grads = linear_emulated(inputs, init, cot, CHUNK, True, offsets(LENGTHS), miras)
    expected = linear_per_sequence(inputs, init, cot, CHUNK, True, LENGTHS, miras)
    assert len(packed_outs + packed_grads) == len(expected) == len(LINEAR_NAMES)
    for name, got, want in zip(LINEAR_NAMES, packed_outs + packed_grads, expected):
        assert_close(name, got, want, TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("objective, retention", [("yaad", "l2"), ("huber", ("lq", 3)), ("huber", "kl")])
def test_linear_packed_whole_state_options_are_each_sequence_alone(objective, retention, dtype):
    """yaad (per-token delta) and lq: the forward runs one value tile over all of Dv per (sequence,
    head), and every chunk of a sequence keeps its checkpoint (bf16 included), so its rho0 and token
    norms come from the sequence's own entries; kl's lag token restarts with each sequence's chunks."""
    inputs, init, cot = linear_case(LENGTHS, dtype, Dk=8, Dv=8)
    if retention == "kl":
        init = (init[0].softmax(-1), init[1])
    delta = 0.5 + 2.0 * torch.rand(inputs[2].shape[:3], generator=torch.Generator().manual_seed(7))
    miras = op_miras_args((objective, delta), retention, inputs[2], torch.float32)
    packed_outs, packed_grads = linear_emulated(inputs, init, cot, CHUNK, True, offsets(LENGTHS), miras)
    expected = linear_per_sequence(inputs, init, cot, CHUNK, True, LENGTHS, miras)
    assert len(packed_outs + packed_grads) == len(expected) == len(LINEAR_NAMES)
    for name, got, want in zip(LINEAR_NAMES, packed_outs + packed_grads, expected):
        assert_close(name, got.float(), want.float(), TOLERANCE[dtype])


def test_linear_packed_bf16_with_int64_offsets():
    """bf16 keeps every other chunk's checkpoint of a sequence; the backward recomputes the others."""
    lengths = (9, 0, 1, 14)
    inputs, init, cot = linear_case(lengths, torch.bfloat16, Dk=8, Dv=8)
    packed_outs, packed_grads = linear_emulated(inputs, init, cot, CHUNK, True, offsets(lengths, torch.int64))
    expected = linear_per_sequence(inputs, init, cot, CHUNK, True, lengths)
    for name, got, want in zip(LINEAR_NAMES, packed_outs + packed_grads, expected):
        assert_close(name, got.float(), want.float(), TOLERANCE[torch.bfloat16])


@pytest.mark.parametrize("dtype, stride, retention", [(torch.float32, 1, "l2"), (torch.bfloat16, 2, "l2"),
                                                     (torch.bfloat16, 1, ("lq", 3))])
def test_linear_checkpoints_have_a_static_shape(dtype, stride, retention):
    """T // (C stride) + N checkpoint entries per head whatever the lengths (csrc/cuda/common/sequences.h),
    as the fake kernel says on CUDA; the entries no sequence uses are zeros. lq keeps every chunk's."""
    lengths = (8, 0, 4)
    inputs, init, _ = linear_case(lengths, dtype)
    miras = op_miras_args("l2", retention, inputs[2], torch.float32)
    _, _, _, states = emu.linear_memory_fwd(*inputs, *init, CHUNK, True, True, *miras, cu_seqlens=offsets(lengths))
    assert states.shape == (1, 2, 12 // (CHUNK * stride) + 3, 2, 3, 5)
    # Sequence i's entries start at cu_seqlens[i] // (C stride) + i.
    used = {1: [0, 1, 4], 2: [0, 3]}[stride]
    assert all(states[:, :, j].any() for j in used)
    assert not any(states[:, :, j].any() for j in range(states.shape[2]) if j not in used)


# ---- MLP memory


def mlp_case(lengths, dtype, H=2, D=4, E=2, seed=0):
    """Packed inputs [1, T, ...], weights and momenta [N, H, ...] and the cotangents of o and of
    the final state."""
    T, N = sum(lengths), len(lengths)
    inputs, _ = memory_inputs(1, T, H, D, D, dtype, seed=seed, theta_max=0.2, state=False)
    state_dtype = torch.float32 if dtype != torch.float64 else dtype
    shapes = [(N, H, E * D, D), (N, H, D, E * D)]
    weights = [_randn(s, seed + 1 + i, state_dtype, 0.5) for i, s in enumerate(shapes)]
    moments = [_randn(s, seed + 3 + i, state_dtype, 0.05) for i, s in enumerate(shapes)]
    cot = [_randn((1, T, H, D), seed + 5, dtype)] + [_randn(s, seed + 6 + i, state_dtype)
                                                      for i, s in enumerate(shapes + shapes)]
    return inputs, weights + moments, cot


def mlp_emulated(inputs, state, cot, chunk_size, cu_seqlens=None):
    """Emulated forward and backward: [o, w1_T, w2_T, s1_T, s2_T] and the gradients (dq, dk, dv,
    dtheta, deta, dalpha, dw1, dw2, ds1, ds2)."""
    hidden = state[0].shape[2]
    o, *final, states = emu.mlp_memory_fwd(*inputs, *state, chunk_size, True, "gelu", True, cu_seqlens=cu_seqlens)
    grads = emu.mlp_memory_bwd(*inputs, states, *cot, hidden, chunk_size, True, "gelu", cu_seqlens=cu_seqlens)
    return [o, *final], list(grads)[:10]


def mlp_per_sequence(inputs, state, cot, chunk_size, lengths):
    outs, grads = [[] for _ in range(5)], [[] for _ in range(10)]
    token_pieces = [_pieces(x, lengths, 1) for x in inputs]
    d_o_pieces = _pieces(cot[0], lengths, 1)
    for i, L in enumerate(lengths):
        seq_state = [x[i:i + 1] for x in state]
        seq_cot = [d_o_pieces[i]] + [x[i:i + 1] for x in cot[1:]]
        if L == 0:
            o_i, g_i = [d_o_pieces[i], *seq_state], [p[i] for p in token_pieces] + seq_cot[1:]
        else:
            o_i, g_i = mlp_emulated([p[i] for p in token_pieces], seq_state, seq_cot, chunk_size)
        for acc, x in zip(outs + grads, o_i + g_i):
            acc.append(x)
    token_dims = [1] + [0] * 4 + [1] * 6 + [0] * 4
    return [torch.cat(x, dim=d) for x, d in zip(outs + grads, token_dims)]


MLP_NAMES = ("o", "w1_T", "w2_T", "s1_T", "s2_T", "dq", "dk", "dv", "dtheta", "deta", "dalpha", "dw1", "dw2",
             "ds1", "ds2")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mlp_packed_is_each_sequence_alone(dtype):
    lengths = LENGTHS if dtype == torch.float32 else (6, 0, 1)
    inputs, state, cot = mlp_case(lengths, dtype)
    outs, grads = mlp_emulated(inputs, state, cot, CHUNK, offsets(lengths))
    expected = mlp_per_sequence(inputs, state, cot, CHUNK, lengths)
    for name, got, want in zip(MLP_NAMES, outs + grads, expected):
        assert_close(name, got.float(), want.float(), TOLERANCE[dtype])


def test_mlp_states_have_a_static_shape():
    lengths = (8, 0, 4)
    inputs, state, _ = mlp_case(lengths, torch.float32)
    _, *_, states = emu.mlp_memory_fwd(*inputs, *state, CHUNK, True, "gelu", True, cu_seqlens=offsets(lengths))
    assert states.shape == (1, 2, 12 // CHUNK + 3, 4, 8 * 4)
    used = [0, 1, 4]
    assert not any(states[:, :, j].any() for j in range(states.shape[2]) if j not in used)


# ---- bad offsets: the emulated ops read them on the CPU, so they refuse bad values always


def _emulated_linear_call(cu, B=1, lengths=(3, 3)):
    inputs, init, _ = linear_case(lengths, torch.float32)
    if B != 1:
        inputs = [torch.cat([x] * B) for x in inputs]
    return lambda: emu.linear_memory_fwd(*inputs, *init, CHUNK, True, True, cu_seqlens=cu)


def _emulated_mlp_call(cu):
    inputs, state, _ = mlp_case((3, 3), torch.float32)
    return lambda: emu.mlp_memory_fwd(*inputs, *state, CHUNK, True, "gelu", True, cu_seqlens=cu)


@pytest.mark.parametrize("cu, match", [
    (torch.tensor([0, 4, 3, 6]), "cu_seqlens must be non-decreasing, got 4 then 3"),
    (torch.tensor([1, 3, 6]), "cu_seqlens must run from 0 to T = 6"),
    (torch.tensor([0, 3, 7]), "cu_seqlens must run from 0 to T = 6"),
    (torch.tensor([0, 3, 6], dtype=torch.float32), "cu_seqlens must be int32 or int64"),
    (torch.tensor([[0, 3, 6]]), "cu_seqlens must be a 1-d tensor of N \\+ 1 offsets"),
    (torch.tensor([0]), "cu_seqlens must be a 1-d tensor of N \\+ 1 offsets"),
])
@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_emulated_ops_refuse_bad_offsets(memory, cu, match):
    call = _emulated_linear_call if memory == "linear" else _emulated_mlp_call
    with pytest.raises(RuntimeError, match=match):
        call(cu)()


def test_emulated_op_refuses_a_batch_or_state_rows_that_do_not_fit():
    with pytest.raises(RuntimeError, match="cu_seqlens needs B == 1"):
        _emulated_linear_call(offsets((3, 3)), B=2)()
    # Three sequences, but the initial state has two rows.
    with pytest.raises(RuntimeError, match="initial or final state must have shape"):
        _emulated_linear_call(offsets((3, 3, 0)))()


# ---- the CUDA ops (skipped without a GPU)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _leaves(tensors, device):
    return [x.detach().to(device).requires_grad_() for x in tensors]


def _values_and_grads(op, inputs, state, device, cu, state_kwargs, d_out, **options):
    leaves = _leaves(inputs + list(state), device)
    n_in = len(inputs)
    o, final = op(*leaves[:n_in], **state_kwargs(leaves[n_in:]), chunk_size=CHUNK, output_final_state=True,
                  cu_seqlens=cu.to(device), **options)
    outs = [o] + [x for part in final for x in (part if isinstance(part, tuple) else (part,))]
    grads = torch.autograd.grad(outs, leaves, [g.to(device).to(x.dtype) for g, x in zip(d_out, outs)])
    return [x.detach().cpu() for x in outs + list(grads)]


@needs_gpu
@pytest.mark.parametrize("objective", ["l2", ("huber", 0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_linear_matches_cpu(dtype, objective):
    inputs, init, cot = linear_case(LENGTHS, dtype, Dk=16, Dv=16)
    cu = offsets(LENGTHS)
    kwargs = lambda s: {"initial_state": tuple(s)}  # noqa: E731
    cpu = _values_and_grads(titans_ext.linear_memory, inputs, init, "cpu", cu, kwargs, cot, objective=objective)
    gpu = _values_and_grads(titans_ext.linear_memory, inputs, init, "cuda", cu, kwargs, cot, objective=objective)
    for name, got, want in zip(("o", "m_T", "s_T", "dq", "dk", "dv", "dtheta", "deta", "dalpha", "dm0", "ds0"),
                               gpu, cpu):
        assert_close(name, got.float(), want.float(), TOLERANCE[dtype])


@needs_gpu
def test_cuda_mlp_matches_cpu():
    if not torch._C._dispatch_has_kernel_for_dispatch_key("titans_ext::mlp_memory_fwd", "CUDA"):
        pytest.skip("mlp_memory has no CUDA kernels in this build")
    inputs, state, cot = mlp_case(LENGTHS, torch.float32, D=16)
    kwargs = lambda s: {"weights": tuple(s[:2]), "momentum": tuple(s[2:])}  # noqa: E731
    cpu = _values_and_grads(titans_ext.mlp_memory, inputs, state, "cpu", offsets(LENGTHS), kwargs, cot[:5])
    gpu = _values_and_grads(titans_ext.mlp_memory, inputs, state, "cuda", offsets(LENGTHS), kwargs, cot[:5])
    for name, got, want in zip(MLP_NAMES, gpu, cpu):
        assert_close(name, got, want, TOLERANCE[torch.float32])


@needs_gpu
@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_cuda_bad_offsets_under_the_value_check_switch(monkeypatch, memory):
    """On a GPU the offsets' values are checked only with TITANS_EXT_CHECK_VALUES=1 (a host sync)."""
    monkeypatch.setenv(CHECK_VALUES_ENV, "1")
    bad = torch.tensor([0, 4, 3, 6], dtype=torch.int32, device="cuda")
    if memory == "linear":
        inputs, init, _ = linear_case((4, 0, 2), torch.float32, Dk=16, Dv=16)
        call = lambda: titans_ext.linear_memory(*[x.cuda() for x in inputs],  # noqa: E731
                                                initial_state=tuple(x.cuda() for x in init), cu_seqlens=bad)
    else:
        inputs, state, _ = mlp_case((4, 0, 2), torch.float32, D=16)
        state = [x.cuda() for x in state]
        call = lambda: titans_ext.mlp_memory(*[x.cuda() for x in inputs], tuple(state[:2]),  # noqa: E731
                                             momentum=tuple(state[2:]), cu_seqlens=bad)
    with pytest.raises(ValueError, match="cu_seqlens: expected non-decreasing offsets"):
        call()


@needs_gpu
@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_cuda_packed_call_makes_no_host_sync(monkeypatch, memory):
    """The default path (value checks off on a GPU) reads no offset on the host, forward and backward."""
    monkeypatch.delenv(CHECK_VALUES_ENV, raising=False)
    cu = offsets(LENGTHS, device="cuda")
    if memory == "linear":
        inputs, init, _ = linear_case(LENGTHS, torch.bfloat16, Dk=16, Dv=16)
        leaves = _leaves(inputs + list(init), "cuda")

        def run():
            o, (m, s) = titans_ext.linear_memory(*leaves[:6], initial_state=tuple(leaves[6:]), chunk_size=CHUNK,
                                                 output_final_state=True, cu_seqlens=cu)
            torch.autograd.grad([o, m, s], leaves, [torch.ones_like(o), torch.ones_like(m), torch.ones_like(s)])
    else:
        if not torch._C._dispatch_has_kernel_for_dispatch_key("titans_ext::mlp_memory_fwd", "CUDA"):
            pytest.skip("mlp_memory has no CUDA kernels in this build")
        inputs, state, _ = mlp_case(LENGTHS, torch.float32, D=16)
        leaves = _leaves(inputs + list(state), "cuda")

        def run():
            o, _ = titans_ext.mlp_memory(*leaves[:6], tuple(leaves[6:8]), momentum=tuple(leaves[8:]),
                                         chunk_size=CHUNK, cu_seqlens=cu)
            torch.autograd.grad(o, leaves, torch.ones_like(o), allow_unused=True)

    with syncs_are_errors():
        run()
