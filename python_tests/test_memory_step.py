"""The decode steps titans_ext.linear_memory_step and titans_ext.mlp_memory_step on CPU: a stream fed
one token at a time equals the chunked op token for token (outputs, running states and chunk-start
states after every token, so every position in a chunk), in float64, for every objective, retention
and read; per-row positions, tensor positions, the default state; opcheck and torch.compile; bad
arguments and the refusal of autograd. The CUDA kernels' source runs the same streams under the
emulation (test_memory_step_emulated.py) and on a GPU (test_memory_step_cuda.py)."""

import re

import pytest
import torch

import titans_ext
from titans_ext.ops.checks import CHECK_VALUES_ENV

from miras_cases import OBJECTIVES, RETENTIONS
from step_harness import (IN_PLACE_STEP_OPS, MEMORIES, STEP_OPS, check_in_place_stream, check_mid_chunk,
                          check_stream, flat, make_stream, mid_chunk_op_args, owned_state, step)
from utils import TOLERANCE, assert_close

OPS = {memory: getattr(torch.ops.titans_ext, name) for memory, name in STEP_OPS.items()}
IN_PLACE_OPS = {memory: getattr(torch.ops.titans_ext, name) for memory, name in IN_PLACE_STEP_OPS.items()}
# The step and the chunked op differ only in summation order.
RATIO = 1e-12


def token_delta(B, T, H, D=None, seed=3):
    shape = (B, T, H) if D is None else (B, T, H, D)
    return 0.2 + torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("retention", RETENTIONS)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("memory", MEMORIES)
def test_stream_equals_chunked_op(memory, objective, retention):
    # 9 tokens in chunks of 4: every position of a chunk, and a short last chunk.
    tokens, state = make_stream(memory, 2, 9, 2, 4, retention=RETENTIONS[retention])
    check_stream(memory, OPS[memory], tokens, state, 4, RATIO, objective=OBJECTIVES[objective](token_delta(2, 9, 2)),
                 retention=RETENTIONS[retention])


@pytest.mark.parametrize("retention", RETENTIONS)
@pytest.mark.parametrize("objective", ["l2", "huber", "yaad"])
@pytest.mark.parametrize("memory", MEMORIES)
def test_chunk_start_read(memory, objective, retention):
    # The read weights are the learning weights but for kl, whose chunk state keeps its own.
    tokens, state = make_stream(memory, 2, 9, 2, 4, retention=RETENTIONS[retention])
    check_stream(memory, OPS[memory], tokens, state, 4, RATIO, read="chunk_start",
                 objective=OBJECTIVES[objective](token_delta(2, 9, 2)), retention=RETENTIONS[retention])


@pytest.mark.every_cpu_isa
@pytest.mark.parametrize("chunk_size", [1, 3, 16])
@pytest.mark.parametrize("retention", ["l2", "lq4", "kl"])
@pytest.mark.parametrize("memory", MEMORIES)
def test_chunk_sizes(memory, retention, chunk_size):
    # 1: every token starts a chunk (the exact recurrence); 16: one chunk longer than the stream.
    tokens, state = make_stream(memory, 1, 7, 3, 5, retention=RETENTIONS[retention], seed=1)
    check_stream(memory, OPS[memory], tokens, state, chunk_size, RATIO, retention=RETENTIONS[retention])


@pytest.mark.parametrize("objective", ["huber", "yaad"])
@pytest.mark.parametrize("memory", MEMORIES)
def test_per_channel_delta(memory, objective):
    tokens, state = make_stream(memory, 2, 6, 2, 4)
    delta = token_delta(2, 6, 2, 4)
    check_stream(memory, OPS[memory], tokens, state, 4, RATIO, objective=OBJECTIVES[objective](delta))


@pytest.mark.parametrize("memory", MEMORIES)
def test_number_delta(memory):
    # A number delta: the steps after the first build its tensor on the path without Python checks.
    tokens, state = make_stream(memory, 2, 6, 2, 4)
    check_stream(memory, OPS[memory], tokens, state, 4, RATIO, objective=("pseudo_huber", 0.3))


@pytest.mark.parametrize("retention", ["l2", "kl"])
def test_default_initial_state(retention):
    # state=None is the chunked op's initial_state=None: zeros, or uniform rows 1/Dk for kl.
    tokens, _ = make_stream("linear", 2, 6, 2, 4)
    check_stream("linear", OPS["linear"], tokens, None, 4, RATIO, retention=retention)


@pytest.mark.every_cpu_isa
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory", MEMORIES)
def test_low_precision_inputs(memory, dtype):
    # fp32 state in both; bf16 inputs are read as they are. Against the float64 stream.
    tokens64, state64 = make_stream(memory, 2, 9, 2, 8)
    tokens = [x.to(dtype if i < 3 else torch.float32) for i, x in enumerate(tokens64)]
    state = [t.float() for t in flat(state64)]
    state = (state[0], state[1]) if memory == "linear" else ((state[0], state[1]), (state[2], state[3]))
    running, chunk_state, running64, chunk_state64 = state, None, state64, None
    for t in range(9):
        o, running, chunk_state = step(memory, OPS[memory], tokens, t, running, chunk_state, chunk_size=4)
        o64, running64, chunk_state64 = step(memory, OPS[memory], tokens64, t, running64, chunk_state64, chunk_size=4)
        assert o.dtype == dtype and all(x.dtype == torch.float32 for x in flat(running) + flat(chunk_state))
    ratio = 1e-5 if dtype == torch.float32 else TOLERANCE[dtype]
    assert_close("o", o64, o, ratio)
    for i, (e, s) in enumerate(zip(flat(running64) + flat(chunk_state64), flat(running) + flat(chunk_state))):
        assert_close(f"state {i}", e, s, ratio)


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("memory, B, H", [("linear", 4, 256), ("linear", 1, 3), ("mlp", 2, 160), ("mlp", 1, 3)])
def test_threads_split_heads_alike(memory, B, H, read):
    # B * H above the per-task work (csrc/binding/ops_step.cpp) splits the heads over the threads,
    # a small step runs on the calling thread: the same values either way, at every chunk position.
    tokens, state = make_stream(memory, B, 5, H, 16, dtype=torch.float32)
    streams = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            running, chunk_state, outputs = state, None, []
            for t in range(5):
                o, running, chunk_state = step(memory, OPS[memory], tokens, t, running, chunk_state, chunk_size=4,
                                               read=read)
                outputs += [o, *flat(running), *flat(chunk_state)]
            streams.append(outputs)
    finally:
        torch.set_num_threads(previous)
    for i, (one, two) in enumerate(zip(*streams)):
        assert torch.equal(one, two), f"output {i}: 1 thread != 2 threads"


def _rows(tokens, t_per_row):
    """Token t_per_row[b] of batch row b, as one [B, ...] token."""
    return [torch.stack([x[b, t] for b, t in enumerate(t_per_row)]) for x in tokens]


@pytest.mark.parametrize("memory", MEMORIES)
def test_rows_at_different_positions(memory):
    # A [B] position: row 0 continues at position 3 (mid-chunk), row 1 at 8 (a chunk start).
    B, C = 2, 4
    tokens, state = make_stream(memory, B, 9, 2, 4, retention=("lq", 4))
    lengths = [3, 8]
    row_states = []
    for b, n in enumerate(lengths):
        row_tokens = [x[b:b + 1] for x in tokens]
        row_state = tuple(x[b:b + 1] for x in flat(state))
        running = (row_state[0], row_state[1]) if memory == "linear" else (row_state[:2], row_state[2:])
        chunk_state = None
        for t in range(n + 1):
            o, running, chunk_state = step(memory, OPS[memory], row_tokens, t, running, chunk_state, chunk_size=C,
                                           retention=("lq", 4))
            if t == n - 1:
                before = (running, chunk_state)
        row_states.append((before, o, running, chunk_state))

    def cat(i):
        return [torch.cat(parts) for parts in zip(*(flat(r[0][i]) for r in row_states))]

    running, chunk_parts = cat(0), cat(1)
    running = (running[0], running[1]) if memory == "linear" else ((running[0], running[1]), (running[2], running[3]))
    if memory == "linear":
        chunk_state = titans_ext.ChunkStartState(chunk_parts[0], chunk_parts[1])
    else:
        chunk_state = titans_ext.ChunkStartState((chunk_parts[0], chunk_parts[1]), chunk_parts[2])
    token = [x[:, None] for x in _rows(tokens, lengths)]
    o, running, chunk_state = step(memory, OPS[memory], token, 0, running, chunk_state, chunk_size=C,
                                   position=torch.tensor(lengths), retention=("lq", 4))
    for b, (_, o_b, running_b, chunk_b) in enumerate(row_states):
        assert_close(f"o row {b}", o_b[0], o[b], RATIO)
        for i, (e, s) in enumerate(zip(flat(running_b) + flat(chunk_b), flat(running) + flat(chunk_state))):
            assert_close(f"state {i} row {b}", e[0], s[b], RATIO)


@pytest.mark.parametrize("memory", MEMORIES)
def test_position_tensor_equals_int(memory):
    tokens, state = make_stream(memory, 2, 6, 2, 4)
    runs = []
    for as_tensor in (False, True):
        running, chunk_state, outs = state, None, []
        for t in range(6):
            position = torch.tensor(t) if as_tensor else t
            o, running, chunk_state = step(memory, OPS[memory], tokens, t, running, chunk_state, position=position,
                                           chunk_size=4)
            outs.append(o)
        runs.append(outs + flat(running) + flat(chunk_state))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---- operator checks --------------------------------------------------------------------------------------


def _linear_op_args(read_token=True, retention=0, with_chunk=True, delta=False):
    g = torch.Generator().manual_seed(0)
    B, H, Dk, Dv = 2, 3, 5, 4

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    q, k, v = rand(B, H, Dk), rand(B, H, Dk), rand(B, H, Dv)
    gates = [torch.rand(B, H, generator=g) * 0.3 for _ in range(3)]
    state = [rand(B, H, Dv, Dk).softmax(-1) for _ in range(2)]
    chunk = [rand(B, H, Dv, Dk).softmax(-1), torch.rand(B, H, generator=g) + 0.5] if with_chunk else [None, None]
    read = rand(B, H, Dv, Dk).softmax(-1) if with_chunk and not read_token and retention == 2 else None
    position = torch.tensor([4, 6])
    miras = (2, 3.0, 0.0, 0.2 + torch.rand(B, H, Dv, generator=g), 0, 2.0) if delta else (0, 2.0, 0.0, None, retention, 4.0)
    return (q, k, v, *gates, *state, *chunk, read, position, 4, read_token, *miras)


@pytest.mark.parametrize("case", ["plain", "no_chunk", "kl_chunk_start", "lq", "huber"])
def test_opcheck_linear(case):
    args = {"plain": dict(), "no_chunk": dict(with_chunk=False), "kl_chunk_start": dict(read_token=False, retention=2),
            "lq": dict(retention=1), "huber": dict(delta=True)}[case]
    torch.library.opcheck(torch.ops.titans_ext.linear_memory_step.default, _linear_op_args(**args))


@pytest.mark.parametrize("read_token, retention", [(True, 0), (False, 2), (True, 1)])
def test_opcheck_mlp(read_token, retention):
    tokens, ((w1, w2), (s1, s2)) = make_stream("mlp", 2, 1, 2, 4, dtype=torch.float32)
    q, k, v, theta, eta, alpha = (x[:, 0] for x in tokens)
    chunk = [w1.softmax(-1), w2.softmax(-1), torch.rand(2, 2, 2) + 0.5]
    read = [w1.abs(), w2.abs()] if not read_token and retention == 2 else [None, None]
    args = (q, k, v, theta, eta, alpha, w1.softmax(-1), w2.softmax(-1), s1, s2, *chunk, *read, torch.tensor(5), 4,
            read_token, "silu", 0, 2.0, 0.0, None, retention, 3.0)
    torch.library.opcheck(torch.ops.titans_ext.mlp_memory_step.default, args)


# (read_token, retention code): the chunk-start weights read as they are, kl's own read weights, lq.
MID_CHUNK_CASES = [(True, 0), (False, 0), (False, 2), (True, 1)]


@pytest.mark.parametrize("read_token, retention", MID_CHUNK_CASES)
@pytest.mark.parametrize("memory", MEMORIES)
def test_mid_chunk_operator(memory, read_token, retention):
    check_mid_chunk(memory, OPS[memory], read_token, retention)
    args = mid_chunk_op_args(memory, read_token, retention, [5, 7], dtype=torch.float32)
    torch.library.opcheck(OPS[memory].default, args, {"mid_chunk": True})


@pytest.mark.parametrize("memory", MEMORIES)
def test_mid_chunk_operator_checks(memory):
    args = list(mid_chunk_op_args(memory, True, 0, [5, 8]))
    with pytest.raises(RuntimeError, match=r"mid_chunk: position 8 starts a chunk \(a multiple of chunk_size = 4\)"):
        OPS[memory](*args, mid_chunk=True)
    first_chunk = 8 if memory == "linear" else 10  # the chunk-start state: None
    n = 3 if memory == "linear" else 5
    args[first_chunk:first_chunk + n] = [None] * n
    args[first_chunk + n] = torch.tensor([5, 7])
    with pytest.raises(RuntimeError, match=r"mid_chunk: needs the chunk-start state"):
        OPS[memory](*args, mid_chunk=True)


@pytest.mark.parametrize("memory", MEMORIES)
def test_mid_chunk_steps_pass_the_chunk_state_on(memory):
    """Mid-chunk, the decode path keeps the chunk-start state it was given (the operator with
    mid_chunk) when it is as a step returns it; otherwise (here: a non-contiguous copy) it returns
    the operator's copy. The streams above check the values."""
    tokens, state = make_stream(memory, 2, 6, 2, 4, dtype=torch.float32)
    function = getattr(titans_ext, STEP_OPS[memory])
    with torch.no_grad():
        running, chunk_state = state, None
        for t in range(6):
            given = chunk_state
            _, running, chunk_state = function(*(x[:, t] for x in tokens), position=t, state=running,
                                               chunk_state=chunk_state, chunk_size=4)
            assert isinstance(chunk_state, titans_ext.ChunkStartState)
            assert (chunk_state is given) == (t % 4 != 0), f"token {t}"
        position = torch.tensor(6)
        _, _, kept = function(*(x[:, 4] for x in tokens), position=position, state=running, chunk_state=chunk_state,
                              chunk_size=4)
        assert kept is chunk_state
        strided = chunk_state._replace(weights=tuple(w.transpose(-1, -2).contiguous().transpose(-1, -2)
                                                     for w in flat(chunk_state.weights)))
        if memory == "linear":
            strided = strided._replace(weights=strided.weights[0])
        _, _, copied = function(*(x[:, 4] for x in tokens), position=6, state=running, chunk_state=strided,
                                chunk_size=4)
    assert copied is not strided
    for a, b in zip(flat(copied), flat(chunk_state)):
        assert a.is_contiguous() and torch.equal(a, b)


def test_torch_compile_fullgraph():
    lin_tokens, lin_state = make_stream("linear", 2, 5, 2, 4, dtype=torch.float32)
    mlp_tokens, mlp_state = make_stream("mlp", 2, 5, 2, 4, dtype=torch.float32)

    def steps(position):
        outs, lin, mlp, lin_chunk, mlp_chunk = [], lin_state, mlp_state, None, None
        for t in range(5):
            o, lin, lin_chunk = titans_ext.linear_memory_step(*(x[:, t] for x in lin_tokens), position=position + t,
                                                              state=lin, chunk_state=lin_chunk, chunk_size=2)
            p, mlp, mlp_chunk = titans_ext.mlp_memory_step(*(x[:, t] for x in mlp_tokens), position=position + t,
                                                           state=mlp, chunk_state=mlp_chunk, chunk_size=2,
                                                           retention=("lq", 4))
            outs += [o, p]
        return outs + flat(lin) + flat(mlp) + flat(lin_chunk) + flat(mlp_chunk)

    position = torch.tensor(0)
    eager = steps(position)
    compiled = torch.compile(steps, fullgraph=True)(position)
    for e, c in zip(eager, compiled):
        assert_close("output", e, c, 1e-6)


# ---- in-place steps ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("objective", ["l2", "huber", "yaad"])
@pytest.mark.parametrize("retention", RETENTIONS)
@pytest.mark.parametrize("memory", MEMORIES)
def test_in_place_stream_equals_steps(memory, retention, objective, read):
    # The functional steps equal the chunked op (above); the in-place ones leave in their buffers
    # what those return, bit for bit, at every position of a chunk.
    tokens, state = make_stream(memory, 2, 9, 2, 4, retention=RETENTIONS[retention])
    check_in_place_stream(memory, IN_PLACE_OPS[memory], OPS[memory], tokens, state, 4, read=read,
                          objective=OBJECTIVES[objective](token_delta(2, 9, 2)), retention=RETENTIONS[retention])


@pytest.mark.parametrize("memory", MEMORIES)
def test_in_place_rows_at_different_positions(memory):
    # Row 1 at position 2t (the operator reads a position only modulo chunk_size): the rows start
    # chunks at different tokens; chunk size 1: every token starts one.
    tokens, state = make_stream(memory, 2, 7, 2, 4, dtype=torch.float32, retention="kl")
    positions = [torch.tensor([t, 2 * t]) for t in range(7)]
    check_in_place_stream(memory, IN_PLACE_OPS[memory], OPS[memory], tokens, state, 4, positions, retention="kl")
    check_in_place_stream(memory, IN_PLACE_OPS[memory], OPS[memory], tokens, state, 1, retention=("lq", 3.0))


def _in_place_op_args(memory, read_token, retention, position):
    """The in-place operator's positional arguments (as mid_chunk_op_args, float32; buffers its own)."""
    args = [x.clone() if isinstance(x, torch.Tensor) else x
            for x in mid_chunk_op_args(memory, read_token, retention, position, dtype=torch.float32)]
    return tuple(args)


@pytest.mark.parametrize("position", [[4, 6], [5, 7]])
@pytest.mark.parametrize("read_token, retention", MID_CHUNK_CASES)
@pytest.mark.parametrize("memory", MEMORIES)
def test_opcheck_in_place(memory, read_token, retention, position):
    torch.library.opcheck(IN_PLACE_OPS[memory].default, _in_place_op_args(memory, read_token, retention, position))


@pytest.mark.parametrize("memory", MEMORIES)
def test_in_place_operator_equals_functional(memory):
    # Row 0 starts a chunk, row 1 does not: the buffers hold what the functional operator returns.
    args = _in_place_op_args(memory, False, 2, [4, 7])
    expected = OPS[memory](*args)
    o = IN_PLACE_OPS[memory](*args)
    n_state = 2 if memory == "linear" else 4
    n_chunk = 3 if memory == "linear" else 5
    assert torch.equal(o, expected[0])
    written = args[6:6 + n_state + n_chunk]
    for i, (a, b) in enumerate(zip(expected[1:], written)):
        assert torch.equal(a, b), f"buffer {i}"


def test_torch_compile_in_place():
    lin_tokens, lin_state = make_stream("linear", 2, 5, 2, 4, dtype=torch.float32)
    mlp_tokens, mlp_state = make_stream("mlp", 2, 5, 2, 4, dtype=torch.float32)

    def steps(position, lin, lin_chunk, mlp, mlp_chunk):
        outs = []
        for t in range(5):
            outs.append(titans_ext.linear_memory_step_(*(x[:, t] for x in lin_tokens), position=position + t,
                                                       state=lin, chunk_state=lin_chunk, chunk_size=2))
            outs.append(titans_ext.mlp_memory_step_(*(x[:, t] for x in mlp_tokens), position=position + t,
                                                    state=mlp, chunk_state=mlp_chunk, chunk_size=2,
                                                    retention=("lq", 4)))
        return outs

    def buffers():
        lin, mlp = owned_state(lin_state), owned_state(mlp_state)
        return (lin, titans_ext.empty_chunk_state(lin), mlp,
                titans_ext.empty_chunk_state(mlp, retention=("lq", 4)))

    position = torch.tensor(0)
    eager_buffers, compiled_buffers = buffers(), buffers()
    with torch.no_grad():
        eager = steps(position, *eager_buffers)
        compiled = torch.compile(steps, fullgraph=True)(position, *compiled_buffers)
    for e, c in zip(eager + flat(eager_buffers), compiled + flat(compiled_buffers)):
        assert_close("output", e, c, 1e-6)


@pytest.mark.parametrize("memory", MEMORIES)
def test_in_place_bad_buffers(memory):
    tokens, state = make_stream(memory, 2, 1, 3, 4, dtype=torch.float32)
    token = [x[:, 0] for x in tokens]
    function = getattr(titans_ext, IN_PLACE_STEP_OPS[memory])
    first = (lambda s: s[0]) if memory == "linear" else (lambda s: s[0][0])
    name = re.escape("state[0]" if memory == "linear" else "state[0][0]")

    def call(buffers, chunk_buffers=None, **kwargs):
        chunk_buffers = titans_ext.empty_chunk_state(buffers) if chunk_buffers is None else chunk_buffers
        with torch.no_grad():
            return function(*token, position=0, state=buffers, chunk_state=chunk_buffers, chunk_size=4, **kwargs)

    def replaced(buffers, new_first):
        if memory == "linear":
            return (new_first, buffers[1])
        return ((new_first, buffers[0][1]), buffers[1])

    buffers = owned_state(state)
    with pytest.raises(RuntimeError, match=rf"{name}: expected a contiguous"):
        call(replaced(buffers, first(buffers).transpose(-1, -2).contiguous().transpose(-1, -2)))
    with pytest.raises(RuntimeError, match=rf"{name}: expected dtype Float"):
        call(replaced(buffers, first(buffers).double()))
    aliased = replaced(buffers, flat(buffers)[2]) if memory == "mlp" else (buffers[0], buffers[0])
    with pytest.raises(RuntimeError, match=r"expected a tensor of its own"):
        call(aliased)
    with pytest.raises(ValueError, match=r"chunk_state.read_weights: expected None"):
        call(buffers, titans_ext.empty_chunk_state(buffers, read="chunk_start", retention="kl"))
    with pytest.raises(ValueError, match=r"k: expected shape \[B, H, Dk\]"):
        token[1] = token[1][:, :2]
        call(buffers)
    token[1] = tokens[1][:, 0]
    requires_grad = [x.clone().requires_grad_() if i == 0 else x for i, x in enumerate(token)]
    with pytest.raises(RuntimeError, match=r"has no backward"):
        function(*requires_grad, position=0, state=buffers, chunk_state=titans_ext.empty_chunk_state(buffers),
                 chunk_size=4)


@pytest.mark.parametrize("memory", MEMORIES)
def test_in_place_steps_skip_the_checked_path(memory, monkeypatch):
    # Under no_grad every in-place step calls the operator straight away, and bumps the versions
    # of the buffers it writes.
    import titans_ext.ops.step as step_module

    def refuse(*args, **kwargs):
        raise AssertionError("the checked path ran")

    monkeypatch.setattr(step_module, "_checked_in_place_args", refuse)
    tokens, state = make_stream(memory, 1, 5, 2, 4, dtype=torch.float32)
    buffers = owned_state(state)
    chunk_buffers = titans_ext.empty_chunk_state(buffers)
    versions = [t._version for t in flat(buffers)]
    function = getattr(titans_ext, IN_PLACE_STEP_OPS[memory])
    with torch.no_grad():
        for t in range(5):
            function(*(x[:, t] for x in tokens), position=t, state=buffers, chunk_state=chunk_buffers, chunk_size=4)
    assert all(t._version > v for t, v in zip(flat(buffers), versions))


# ---- arguments and autograd -------------------------------------------------------------------------------


def _linear_token():
    """One token of a linear stream with B = 2, H = 3, Dk = 5, Dv = 4, and a state."""
    tokens, state = make_stream("linear", 2, 1, 3, 4, dtype=torch.float32)
    return [x[:, 0] for x in tokens], state


def _call_linear(token, **kwargs):
    kwargs = dict(dict(position=0, chunk_size=4), **kwargs)
    return titans_ext.linear_memory_step(*token, **kwargs)


@pytest.mark.parametrize("change, kwargs, error, match", [pytest.param(*case, id=case[-1][:24]) for case in [
    (lambda x: x.__setitem__(0, x[0][:, None]), {}, ValueError, r"q: expected a 3-d tensor"),
    (lambda x: x.__setitem__(1, x[1][:, :2]), {}, ValueError, r"k: expected shape \[B, H, Dk\] = \[2, 3, 5\]"),
    (lambda x: x.__setitem__(2, x[2][:1]), {}, ValueError, r"v: expected shape \[B, H, Dv\]"),
    (lambda x: x.__setitem__(3, x[3][:, :, None]), {}, ValueError, r"theta: expected a 2-d tensor"),
    (lambda x: x.__setitem__(4, x[4].half()), {}, TypeError, r"eta: expected dtype float32"),
    (None, dict(position=2), ValueError, r"chunk_state: None is only valid at a chunk start"),
    (None, dict(position=-4), ValueError, r"position: expected an int >= 0, got -4"),
    (None, dict(position=1.0), TypeError, r"position: expected an int >= 0 or an integer tensor"),
    (None, dict(position=torch.tensor(0.0)), TypeError, r"position: expected an int64 or int32 tensor"),
    (None, dict(position=torch.tensor([0, 0, 0])), ValueError, r"position: expected a scalar or \[B\] = \[2\]"),
    (None, dict(chunk_size=0), ValueError, r"chunk_size: expected an int >= 1"),
    (None, dict(read="last"), ValueError, r"read: expected one of"),
    (None, dict(state=(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4))), ValueError,
     r"state\[0\]: expected shape \[B, H, Dv, Dk\] = \[2, 3, 4, 5\]"),
    (None, dict(chunk_state=(torch.zeros(2, 3, 4, 5),)), TypeError, r"chunk_state: expected the ChunkStartState"),
    (None, dict(chunk_state=titans_ext.ChunkStartState(torch.zeros(2, 3, 4, 5), torch.ones(2))), ValueError,
     r"chunk_state.scale: expected a 2-d tensor, got shape \[2\]"),
    (None, dict(chunk_state=titans_ext.ChunkStartState(torch.zeros(2, 3, 4, 5), torch.ones(2, 3)), read="chunk_start",
                retention="kl"), ValueError, r"chunk_state.read_weights: expected the weights"),
    (None, dict(objective=("huber", torch.ones(3, 2))), ValueError,
     r"delta: expected a tensor broadcastable to \[B, H\] = \[2, 3\]"),
    (None, dict(objective=("lp", 0.5)), ValueError, r"objective: lp needs p >= 1"),
]])
def test_bad_arguments(change, kwargs, error, match):
    token, state = _linear_token()
    if change is not None:
        change(token)
    with pytest.raises(error, match=match):
        _call_linear(token, **kwargs)


def test_bad_mlp_state():
    tokens, ((w1, w2), momentum) = make_stream("mlp", 2, 1, 2, 4, dtype=torch.float32)
    token = [x[:, 0] for x in tokens]
    with pytest.raises(ValueError, match=r"state\[0\]\[1\]: expected shape \[B, H, D, E\*D\] = \[2, 2, 4, 8\]"):
        titans_ext.mlp_memory_step(*token, position=0, state=((w1, w2[..., :4]), momentum), chunk_size=4)
    with pytest.raises(TypeError, match=r"state: expected \(\(W1, W2\), \(S1, S2\)\)"):
        titans_ext.mlp_memory_step(*token, position=0, state=w1, chunk_size=4)


def test_value_checks(monkeypatch):
    token, state = _linear_token()
    token[4] = token[4] + 2  # eta out of [0, 1]
    with pytest.raises(ValueError, match=r"eta: expected values in \[0, 1\]"):
        _call_linear(token)
    token, state = _linear_token()
    mid_chunk = torch.tensor([4, 5])
    with pytest.raises(ValueError, match=r"chunk_state: None is only valid at a chunk start"):
        _call_linear(token, position=mid_chunk)
    with pytest.raises(ValueError, match=r"position: expected positions >= 0"):
        _call_linear(token, position=torch.tensor(-4))
    monkeypatch.setenv(CHECK_VALUES_ENV, "0")  # the caller's responsibility: the row at 5 starts a chunk
    _call_linear(token, position=mid_chunk)


def test_autograd_is_refused():
    token, state = _linear_token()
    token[0].requires_grad_()
    with pytest.raises(RuntimeError, match=r"linear_memory_step has no backward: it is a decode step"):
        _call_linear(token, state=state)
    with torch.no_grad():
        o, _, _ = _call_linear(token, state=state)
    assert not o.requires_grad
    # Called directly, the operator gives outputs whose backward raises instead of a wrong gradient.
    args = list(_linear_op_args())
    args[0].requires_grad_()
    o = torch.ops.titans_ext.linear_memory_step(*args)[0]
    with pytest.raises(RuntimeError, match=r"titans_ext::linear_memory_step has no backward"):
        o.sum().backward()
    tokens, ((w1, w2), momentum) = make_stream("mlp", 2, 1, 2, 4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"mlp_memory_step has no backward"):
        titans_ext.mlp_memory_step(*(x[:, 0] for x in tokens), position=0, chunk_size=4,
                                   state=((w1.requires_grad_(), w2), momentum))


# ---- the checks of a step in the middle of a stream -------------------------------------------------------
# There the public functions call the operator straight away and run their Python checks only when
# it raises (titans_ext/ops/step.py): the same errors as at a stream's start, raised by the
# operator's C++ checks first.


def _mid_stream_linear():
    """A linear token at position 1 of a stream (chunk_size 4), with the state and chunk-start state
    the step at position 0 returned."""
    token, state = _linear_token()
    with torch.no_grad():
        _, state, chunk_state = _call_linear(token, state=state)
    return token, dict(position=1, state=state, chunk_state=chunk_state)


@pytest.mark.parametrize("change, kwargs, error, match", [pytest.param(*case, id=case[-1][:24]) for case in [
    (lambda x: x.__setitem__(1, x[1][:, :2]), {}, ValueError, r"k: expected shape \[B, H, Dk\] = \[2, 3, 5\]"),
    (lambda x: x.__setitem__(2, x[2].double()), {}, TypeError, r"v: expected dtype float32 \(the dtype of q\)"),
    (lambda x: x.__setitem__(3, x[3][:, :, None]), {}, ValueError, r"theta: expected a 2-d tensor"),
    (lambda x: x.__setitem__(4, x[4].half()), {}, TypeError, r"eta: expected dtype float32"),
    (lambda x: x.__setitem__(4, x[4] + 2), {}, ValueError, r"eta: expected values in \[0, 1\]"),
    (lambda x: x.__setitem__(3, x[3] - 1), {}, ValueError, r"theta: expected values >= 0"),
    (lambda x: x.__setitem__(5, x[5] * float("nan")), {}, ValueError, r"alpha: gates must be finite"),
    (None, dict(position=-1), ValueError, r"position: expected an int >= 0, got -1"),
    (None, dict(position=torch.tensor(-3)), ValueError, r"position: expected positions >= 0"),
    (None, dict(position=torch.tensor([1, 1, 1])), ValueError, r"position: expected a scalar or \[B\] = \[2\]"),
    (None, dict(position=torch.tensor(1.0)), TypeError, r"position: expected an int64 or int32 tensor"),
    (None, dict(chunk_size=True), TypeError, r"chunk_size: expected an int >= 1"),
    (None, dict(read="last"), ValueError, r"read: expected one of"),
    (None, dict(state=(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4))), ValueError,
     r"state\[0\]: expected shape \[B, H, Dv, Dk\] = \[2, 3, 4, 5\]"),
    (None, dict(state=(torch.zeros(2, 3, 4, 5, dtype=torch.int32), torch.zeros(2, 3, 4, 5))), TypeError,
     r"state\[0\]: expected dtype in"),
    (None, dict(chunk_state=titans_ext.ChunkStartState(torch.zeros(2, 3, 4, 5), torch.ones(2))), ValueError,
     r"chunk_state.scale: expected a 2-d tensor, got shape \[2\]"),
    (None, dict(chunk_state=(torch.zeros(2, 3, 4, 5),)), TypeError, r"chunk_state: expected the ChunkStartState"),
]])
def test_bad_arguments_mid_stream(change, kwargs, error, match):
    token, options = _mid_stream_linear()
    if change is not None:
        change(token)
    with torch.no_grad(), pytest.raises(error, match=match):
        _call_linear(token, **dict(options, **kwargs))


def test_bad_mlp_arguments_mid_stream():
    tokens, state = make_stream("mlp", 2, 1, 2, 4, dtype=torch.float32)
    token = [x[:, 0] for x in tokens]
    with torch.no_grad():
        _, state, chunk_state = titans_ext.mlp_memory_step(*token, position=0, state=state, chunk_size=4)
        options = dict(position=1, state=state, chunk_state=chunk_state, chunk_size=4)
        (w1, w2), momentum = state
        with pytest.raises(ValueError, match=r"state\[0\]\[1\]: expected shape \[B, H, D, E\*D\] = \[2, 2, 4, 8\]"):
            titans_ext.mlp_memory_step(*token, **dict(options, state=((w1, w2[..., :4]), momentum)))
        with pytest.raises(ValueError, match=r"activation: expected one of"):
            titans_ext.mlp_memory_step(*token, activation="relu", **options)
        bad_alpha = token[:5] + [token[5] + 1.5]
        with pytest.raises(ValueError, match=r"alpha: expected values in \[0, 1\]"):
            titans_ext.mlp_memory_step(*bad_alpha, **options)


def test_mid_stream_value_checks_switch(monkeypatch):
    """With value checks off, the operator reads no values either (the caller's responsibility)."""
    token, options = _mid_stream_linear()
    token[4] = token[4] + 2
    monkeypatch.setenv(CHECK_VALUES_ENV, "0")
    with torch.no_grad():
        o, _, _ = _call_linear(token, **options)
    assert o.shape == (2, 3, 4)
    monkeypatch.setenv(CHECK_VALUES_ENV, "yes")
    with torch.no_grad(), pytest.raises(ValueError, match=rf"{CHECK_VALUES_ENV}: expected 0 or 1"):
        _call_linear(token, **options)


@pytest.mark.parametrize("index, value, match", [
    (1, lambda a: a[1][:, :2], r"k: expected shape \[B, H, Dk\] = \[2, 3, 5\] \(that of q\), got \[2, 2, 5\]"),
    (0, lambda a: a[0].long(), r"q: expected dtype float32, float64, bfloat16 or float16, got Long"),
    (4, lambda a: a[4].half(), r"eta: expected dtype Float \(the dtype of q\), float32 or float64, got Half"),
    (4, lambda a: a[4] + 2, r"eta: expected finite values in \[0, 1\], got 2\.\d+ \(batch 0, head 0\)"),
    (3, lambda a: a[3] * float("inf"), r"theta: expected finite values >= 0, got inf"),
    (6, lambda a: a[6][..., :3], r"state\[0\]: expected shape \[B, H, Dv, Dk\], got \[2, 3, 4, 3\]"),
    (7, lambda a: a[7].int(), r"state\[1\]: expected dtype float32, float64, bfloat16 or float16, got Int"),
    (9, lambda a: a[9][:1], r"chunk_state.scale: expected shape \[B, H\], got \[1, 3\]"),
    (11, lambda a: torch.tensor([-1, 4]), r"position: expected positions >= 0, got -1"),
    (11, lambda a: torch.tensor([4, 4, 4]), r"position: expected a scalar or \[B\] = \[2\] tensor"),
    (10, lambda a: a[8], r"chunk_state: the read weights must be given exactly with read \"chunk_start\""),
])
def test_operator_checks(index, value, match):
    """The operator's own checks (csrc/binding/memory_step.h), which name the argument as the public
    function does; on CPU tensors they include the value checks."""
    args = list(_linear_op_args())
    args[index] = value(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.titans_ext.linear_memory_step(*args)


def test_operator_value_checks_switch(monkeypatch):
    args = list(_linear_op_args())
    args[4] = args[4] + 2
    monkeypatch.setenv(CHECK_VALUES_ENV, "0")
    torch.ops.titans_ext.linear_memory_step(*args)


@pytest.mark.parametrize("memory", MEMORIES)
def test_mid_stream_calls_skip_the_checked_path(memory, monkeypatch):
    """In the middle of a stream without autograd the public functions call the operator directly
    (their per-token cost); the streams above compare that path with the chunked op."""
    import titans_ext.ops.step as step_module

    tokens, state = make_stream(memory, 2, 3, 2, 4, dtype=torch.float32)
    function = getattr(titans_ext, STEP_OPS[memory])
    token = [x[:, 0] for x in tokens]
    with torch.no_grad():
        _, state, chunk_state = function(*token, position=0, state=state, chunk_size=4)

        def checked_path(*args, **kwargs):
            raise AssertionError("the checked path ran")

        monkeypatch.setattr(step_module, f"run_{STEP_OPS[memory]}", checked_path)
        for t in (1, 2):
            _, state, chunk_state = function(*(x[:, t] for x in tokens), position=t, state=state,
                                             chunk_state=chunk_state, chunk_size=4)
        with pytest.raises(AssertionError, match="the checked path ran"):  # a stream's start takes it
            function(*token, position=0, state=state, chunk_size=4)
