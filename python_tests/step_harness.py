"""Harness of the decode-step tests: a stream fed through a step op one token at a time, against the
chunked op run on every prefix of the stream (outputs, running states and chunk-start states after
every token). Shared by the CPU tests (test_memory_step.py) and the emulated CUDA kernel's
(test_memory_step_emulated.py), which pass their own operator."""

import torch

import titans_ext
from titans_ext.ops.step import (ChunkStartState, run_linear_memory_step, run_linear_memory_step_, run_mlp_memory_step,
                                 run_mlp_memory_step_)
from titans_ext.reference.miras import lq_scale

from mlp_inputs import mlp_inputs
from utils import assert_close, memory_inputs

MEMORIES = ("linear", "mlp")
STEP_OPS = {"linear": "linear_memory_step", "mlp": "mlp_memory_step"}
IN_PLACE_STEP_OPS = {"linear": "linear_memory_step_", "mlp": "mlp_memory_step_"}


def flat(x):
    """The tensors of a nest of tuples (states), in order; None is skipped."""
    if isinstance(x, torch.Tensor):
        return [x]
    return [t for item in (x or ()) for t in flat(item)]


def make_stream(memory, B, T, H, D, dtype=torch.float64, retention="l2", seed=0):
    """The per-token inputs ``[q, k, v, theta, eta, alpha]`` (each ``[B, T, ...]``) and an initial state
    in the op's ``final_state`` format (positive rows for retention "kl"). The linear memory gets
    Dk = D + 1 != Dv = D."""
    kl = retention == "kl"
    if memory == "linear":
        tokens, (m0, s0) = memory_inputs(B, T, H, D + 1, D, dtype, seed=seed)
        return tokens, (torch.softmax(4 * m0, dim=-1) if kl else m0, s0)
    tokens, weights, momentum = mlp_inputs(B, T, H, D, 2, dtype, seed=seed)
    if kl:
        weights = tuple(torch.softmax(4 * w, dim=-1) for w in weights)
    return tokens, (weights, momentum)


def _token_objective(objective, t):
    """The objective of token t: a per-token delta tensor ``[B, T, ...]`` sliced to ``[B, ...]``."""
    if isinstance(objective, tuple) and isinstance(objective[-1], torch.Tensor) and objective[-1].dim() >= 3:
        return (*objective[:-1], objective[-1][:, t])
    return objective


def default_state(tokens, retention):
    """The linear op's initial state for ``initial_state=None``: M zeros (uniform rows 1/Dk for kl),
    S zeros."""
    q, _, v = tokens[:3]
    (B, _, H, Dk), Dv = q.shape, v.shape[-1]
    s = torch.zeros(B, H, Dv, Dk, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return (torch.full_like(s, 1 / Dk) if retention == "kl" else s), s


def chunked(memory, tokens, state, n, **options):
    """The chunked op on tokens [0, n): ``(o, final_state)``; ``(None, state)`` for n = 0."""
    if n == 0:
        return None, default_state(tokens, options.get("retention", "l2")) if state is None else state
    prefix = [x[:, :n] for x in tokens]
    objective = options.pop("objective", "l2")
    if isinstance(objective, tuple) and isinstance(objective[-1], torch.Tensor) and objective[-1].dim() >= 3:
        objective = (*objective[:-1], objective[-1][:, :n])
    if memory == "linear":
        return titans_ext.linear_memory(*prefix, initial_state=state, output_final_state=True, objective=objective,
                                        **options)
    weights, momentum = state
    return titans_ext.mlp_memory(*prefix, weights, momentum=momentum, output_final_state=True, objective=objective,
                                 **options)


def step(memory, op, tokens, t, state, chunk_state, position=None, **options):
    """Token t of the stream through the step operator ``op``: ``(o, state, chunk_state)``. The
    titans_ext:: operator runs through the public function under no_grad, so that the tokens after
    the first take its decode path (the operator called without the Python checks); another
    operator (the emulated kernel's) through the checked path."""
    token = [x[:, t] for x in tokens]
    options = dict(options, objective=_token_objective(options.get("objective", "l2"), t))
    position = t if position is None else position
    if memory == "mlp":
        options.setdefault("activation", "gelu")
    options = dict(dict(read="token", objective="l2", retention="l2"), **options)
    if op is getattr(torch.ops.titans_ext, STEP_OPS[memory]):
        with torch.no_grad():
            return getattr(titans_ext, STEP_OPS[memory])(*token, position=position, state=state,
                                                         chunk_state=chunk_state, **options)
    run = run_linear_memory_step if memory == "linear" else run_mlp_memory_step
    return run(op, *token, position=position, state=state, chunk_state=chunk_state, **options)


def expected_chunk_state(memory, tokens, state, t, chunk_size, retention="l2", read="token", **options):
    """The chunk-start state after token t, from the chunked op (docs/miras.md §2.3): the weights
    where token t's chunk takes its gradients (the memory before the chunk, rho0 A0 for lq, the
    memory after the lag token for kl), lq's scale and, for kl with read "chunk_start", the memory
    before the lag token."""
    t0 = t - t % chunk_size
    options = dict(options, chunk_size=chunk_size, retention=retention, read=read)
    _, before = chunked(memory, tokens, state, t0, **options)
    weights = (before[0],) if memory == "linear" else tuple(before[0])
    kind = retention if isinstance(retention, str) else retention[0]
    read_weights = None
    if kind == "lq":
        scales = [lq_scale(w, retention[1])[..., 0, 0] for w in weights]
        weights = tuple(s[..., None, None] * w for s, w in zip(scales, weights))
    else:
        scales = [torch.ones_like(weights[0][..., 0, 0]) for _ in weights]
        if kind == "kl":
            read_weights = weights if read == "chunk_start" else None
            _, after_lag = chunked(memory, tokens, state, t0 + 1, **options)
            weights = (after_lag[0],) if memory == "linear" else tuple(after_lag[0])
    if memory == "linear":
        return ChunkStartState(weights[0], scales[0], None if read_weights is None else read_weights[0])
    return ChunkStartState(weights, torch.stack(scales, dim=-1), read_weights)


def check_stream(memory, op, tokens, state, chunk_size, ratio, **options):
    """Feeds every token of ``tokens`` through the step operator ``op`` from ``state`` (the first with
    chunk_state None) and compares, after every token, o, the running state and the chunk-start
    state with the chunked op's."""
    T = tokens[0].shape[1]
    o_all, _ = chunked(memory, tokens, state, T, chunk_size=chunk_size, **options)
    running, chunk_state = state, None
    for t in range(T):
        o, running, chunk_state = step(memory, op, tokens, t, running, chunk_state, chunk_size=chunk_size, **options)
        _, expected = chunked(memory, tokens, state, t + 1, chunk_size=chunk_size, **options)
        where = f"token {t} (position {t % chunk_size} of its chunk)"
        assert_close(f"o, {where}", o_all[:, t], o, ratio)
        for i, (e, s) in enumerate(zip(flat(expected), flat(running))):
            assert_close(f"state[{i}], {where}", e, s, ratio)
        want = expected_chunk_state(memory, tokens, state, t, chunk_size, **options)
        assert (chunk_state.read_weights is None) == (want.read_weights is None), where
        for i, (e, s) in enumerate(zip(flat(want), flat(chunk_state))):
            assert_close(f"chunk_state[{i}], {where}", e, s, ratio)
    return running, chunk_state


def owned_state(state):
    """Buffers of an in-place decode holding ``state`` (contiguous copies)."""
    if isinstance(state, torch.Tensor):
        return state.clone(memory_format=torch.contiguous_format)
    return tuple(owned_state(x) for x in state)


def check_in_place_stream(memory, op, functional_op, tokens, state, chunk_size, positions=None, **options):
    """Feeds every token of ``tokens`` through the in-place step operator ``op`` on buffers that
    start as ``state`` (chunk-start buffers from titans_ext.empty_chunk_state) and through the
    functional ``functional_op`` (the harness's ``step``), and checks after every token that the reads
    and the buffers equal the functional step's reads and returned states, bit for bit (the same
    arithmetic). ``positions``: per token, a position for ``op`` (default: t), e.g. a [B] tensor."""
    T = tokens[0].shape[1]
    read, retention = options.get("read", "token"), options.get("retention", "l2")
    buffers = owned_state(state)
    chunk_buffers = titans_ext.empty_chunk_state(buffers, read=read, retention=retention)
    running, chunk_state = state, None
    options = dict(dict(read="token", objective="l2", retention="l2"), **options)
    if memory == "mlp":
        options.setdefault("activation", "gelu")
    for t in range(T):
        position = t if positions is None else positions[t]
        o, running, chunk_state = step(memory, functional_op, tokens, t, running, chunk_state, position=position,
                                       chunk_size=chunk_size, **options)
        token = [x[:, t] for x in tokens]
        token_options = dict(options, objective=_token_objective(options["objective"], t))
        with torch.no_grad():
            if op is getattr(torch.ops.titans_ext, IN_PLACE_STEP_OPS[memory]):
                o_in_place = getattr(titans_ext, IN_PLACE_STEP_OPS[memory])(
                    *token, position=position, state=buffers, chunk_state=chunk_buffers, chunk_size=chunk_size,
                    **token_options)
            else:
                run = run_linear_memory_step_ if memory == "linear" else run_mlp_memory_step_
                o_in_place = run(op, *token, position=position, state=buffers, chunk_state=chunk_buffers,
                                 chunk_size=chunk_size, **token_options)
        where = f"token {t} (position {t % chunk_size} of its chunk)"
        assert torch.equal(o, o_in_place), f"o, {where}"
        for i, (a, b) in enumerate(zip(flat(running), flat(buffers))):
            assert torch.equal(a, b), f"state[{i}], {where}"
        assert (chunk_state.read_weights is None) == (chunk_buffers.read_weights is None), where
        for i, (a, b) in enumerate(zip(flat(chunk_state), flat(chunk_buffers))):
            assert torch.equal(a, b), f"chunk_state[{i}], {where}"


def mid_chunk_op_args(memory, read_token, retention, position, dtype=torch.float64):
    """The step operator's positional arguments up to ``retention_q`` (chunk_size 4; ``retention``
    the kernels' code, 2 = kl) for a token of 2 batch rows at ``position`` with a running and a
    chunk-start state (positive rows, which kl needs; read weights with read "chunk_start" and kl)."""
    tokens, state = make_stream(memory, 2, 1, 3, 4, dtype=dtype, retention="kl")
    weights = flat(state)
    n = 1 if memory == "linear" else 2
    chunk_weights = [(w + 0.1 * w.flip(-1)).softmax(-1) for w in weights[:n]]
    scale = 0.5 + torch.rand(2, 3, *(() if memory == "linear" else (2,)), dtype=chunk_weights[0].dtype,
                             generator=torch.Generator().manual_seed(1))
    read = [w.flip(-2) for w in chunk_weights] if not read_token and retention == 2 else [None] * n
    head = (*(x[:, 0] for x in tokens), *weights, *chunk_weights, scale, *read, torch.tensor(position), 4, read_token)
    return (*head, *(() if memory == "linear" else ("gelu",)), 0, 2.0, 0.0, None, retention, 4.0)


def check_mid_chunk(memory, op, read_token, retention):
    """``op`` with mid_chunk gives the outputs and running state of the copying call, and empty
    chunk-start outputs."""
    args = mid_chunk_op_args(memory, read_token, retention, [5, 7])
    copied, kept = op(*args, False), op(*args, True)
    n_chunk = 3 if memory == "linear" else 5
    for i, (a, b) in enumerate(zip(copied[:-n_chunk], kept[:-n_chunk])):
        assert torch.equal(a, b), f"output {i}"
    assert [x.shape for x in kept[-n_chunk:]] == [torch.Size([0])] * n_chunk


def state_tensors(state):
    """The tensors of a model's streaming state (lists of block states, dataclasses), in order."""
    found = []
    titans_ext.model.memory.map_tensors(found.append, state)
    return found


def decode_model_stream(model, prompt, fed):
    """Under no_grad: the state after ``prompt`` and the logits of each token of ``fed [B, n]`` fed
    one at a time after it (the eager run a replayed one-token call is compared with)."""
    with torch.no_grad():
        _, state = model(prompt)
        logits, running = [], state
        for t in range(fed.shape[1]):
            step_logits, running = model(fed[:, t:t + 1], running)
            logits.append(step_logits)
    return state, logits


def replay_one_token_calls(run_token, static_state, fed, after_each):
    """Feeds ``fed`` through ``run_token(token) -> (logits, new_state)`` of a fixed state object: after
    each call the new state's tensors are copied into ``static_state``'s (its Python fields stay as
    they were, as in a CUDA graph), then ``after_each(t, logits)``."""
    for t in range(fed.shape[1]):
        logits, new_state = run_token(fed[:, t:t + 1])
        for dst, src in zip(state_tensors(static_state), state_tensors(new_state)):
            dst.copy_(src)
        after_each(t, logits)
