"""Decode steps: ``titans_ext.linear_memory_step`` and ``titans_ext.mlp_memory_step``, one token at
a time at O(state) cost, with their fake kernels.

The chunked ops take every token's inner gradient at the memory of its chunk's start
(``docs/design.md`` §2). So one token needs only two states: the running state (what the chunked
ops carry and return) and the chunk-start state (:class:`ChunkStartState`), which the step itself
refreshes whenever the token's position is a multiple of ``chunk_size``. A stream of steps gives,
token for token, the outputs and states of one chunked call on the whole stream (chunks counted from
position 0), for every ``read``, ``objective`` and ``retention``.

The compiled operators are ``titans_ext::linear_memory_step`` and ``titans_ext::mlp_memory_step``
(csrc/binding/ops_step.cpp, CPU; ops_step_cuda.cpp, one fused kernel launch on CUDA). They read the
position on the device and never synchronize the host, so a step can be captured in a CUDA graph
when the position is a tensor. The steps are for inference and have no backward (see
:func:`linear_memory_step`).

A decode step's own work is microseconds, so its Python is kept to the unavoidable: in the middle
of a stream without autograd (every generated token), the public functions call the operator
straight away (:func:`_decode_fast`); its C++ binding checks every argument, and on the CPU the
values (csrc/binding/memory_step.h). Only when it raises do the Python checks below run, to raise
the error as a ValueError or TypeError naming the argument. The start of a stream, autograd, CUDA
tensors with value checks on (each a host sync) and torch.compile take the checked path. Where the
host knows the token does not start a chunk, the operator runs with ``mid_chunk`` and the step
returns the chunk-start state it was given instead of the operator's copy (``docs/design.md``
§4.3).

A caller that owns its decode state (the model's streaming state, a serving loop) can update it in
place instead: :func:`linear_memory_step_` / :func:`mlp_memory_step_` (operators
``titans_ext::linear_memory_step_`` / ``mlp_memory_step_``, flash-attn's ``flash_attn_with_kvcache``
convention) overwrite the running state and the chunk-start buffers (:func:`empty_chunk_state`) and
return only the read: one allocation per token instead of six (MLP ten), one pass over the state
instead of a read and a fresh copy, and a third of the operator's outputs to box.
"""

import dataclasses
from typing import NamedTuple

import torch

from .checks import (READ_MODES, _check_state_pair, _dtype_name, check_device, check_kl_state, check_shape,
                     check_tensor, check_token_inputs, expand_delta, parse_objective, parse_retention,
                     state_dtype_for, value_checks_enabled)
from .cuda_arch import check_fake_device, check_op_device

_STATE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class ChunkStartState(NamedTuple):
    """What a decode step keeps from the start of the token's chunk (``docs/miras.md`` §2.3).

    Returned by :func:`linear_memory_step` / :func:`mlp_memory_step` and passed back to the next
    step; treat it as opaque. Fields (fp32, fp64 for fp64 inputs):

    - ``weights``: the weights the chunk's inner gradients are taken at: the memory before the
      chunk (``[B, H, Dv, Dk]``; for the MLP the pair ``(W1 [B, H, N, D], W2 [B, H, D, N])``), or
      ``rho0 A0`` for ``retention=("lq", q)``, or the memory after the chunk's first (lag) token for
      ``retention="kl"``.
    - ``scale``: lq's ``rho0``, by which token reads scale the accumulator (1 otherwise): ``[B, H]``
      (MLP: ``[B, H, 2]``, one per weight).
    - ``read_weights``: with ``read="chunk_start"`` and ``retention="kl"`` only, the memory before
      the lag token, which that read reads (shaped like ``weights``); None otherwise (the read
      weights are ``weights``).
    """

    weights: object
    scale: torch.Tensor
    read_weights: object = None


def _refuse_autograd(op_name, chunked_name, tensors):
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise RuntimeError(
            f"{op_name} has no backward: it is a decode step for inference. Call it under torch.no_grad() or "
            f"torch.inference_mode() (or detach its inputs); for gradients run titans_ext.{chunked_name} on the "
            "sequence")


def _no_backward(op_name):
    def backward(ctx, *grads):
        raise RuntimeError(f"titans_ext::{op_name} has no backward (a decode step for inference); call it under "
                           "torch.no_grad()")

    return backward


def _step_miras(objective, retention, memories, B, H, Dv, device, dtype, memory_name):
    """Parses ``objective=`` and ``retention=`` for one token; returns ``(Objective, Retention, delta)``
    with delta ``[B, H, Dv]`` (or None). A tensor delta broadcasts to ``[B, H]`` (up to 2-d) or,
    3-d, to ``[B, H, Dv]``: the chunked ops' per-token shapes without the time axis.
    ``memories``: the weight matrices a "kl" memory is checked in, those that start a stream (the
    chunked ops check their initial state alike; a state a step returned is taken back as it is)."""
    objective, retention = parse_objective(objective), parse_retention(retention)
    delta = objective.delta
    if isinstance(delta, torch.Tensor):
        target = (B, H) if delta.dim() <= 2 else (B, H, Dv)
        try:
            torch.broadcast_shapes(delta.shape, target)
        except RuntimeError:
            raise ValueError(f"delta: expected a tensor broadcastable to [B, H] = {[B, H]} or [B, H, Dv] = "
                             f"{[B, H, Dv]}, got shape {list(delta.shape)}") from None
        if delta.dim() >= 2:  # the chunked ops' [B, T, H(, Dv)] with T = 1
            objective = dataclasses.replace(objective, delta=delta.unsqueeze(1))
    delta = expand_delta(objective, (B, 1, H, Dv), device, dtype)
    check_kl_state(retention, memories, memory_name)
    return objective, retention, None if delta is None else delta[:, 0]


def _check_chunk_state(chunk_state, weight_shapes, dims, scale_shape, read_weights, device):
    """A chunk-start state as returned by a step with the same options, or None."""
    if chunk_state is None:
        return
    if not isinstance(chunk_state, tuple) or len(chunk_state) != 3:
        raise TypeError("chunk_state: expected the ChunkStartState a previous step returned, or None, got "
                        f"{type(chunk_state).__name__}")
    weights, scale, read = chunk_state
    pairs = [("chunk_state.weights", weights)]
    if read_weights:
        if read is None:
            raise ValueError('chunk_state.read_weights: expected the weights read="chunk_start" reads with '
                             'retention="kl", got None (pass the state a step with these options returned)')
        pairs.append(("chunk_state.read_weights", read))
    elif read is not None:
        raise ValueError('chunk_state.read_weights: expected None (it exists only with read="chunk_start" and '
                         'retention="kl"); pass the state a step with these options returned')
    for name, value in pairs:
        tensors = (value,) if len(weight_shapes) == 1 else value
        if not isinstance(tensors, (tuple, list)) or len(tensors) != len(weight_shapes):
            raise TypeError(f"{name}: expected {len(weight_shapes)} tensors, got {type(value).__name__}")
        for i, (t, shape, d) in enumerate(zip(tensors, weight_shapes, dims)):
            label = name if len(weight_shapes) == 1 else f"{name}[{i}]"
            check_tensor(label, t, len(shape), dtypes=_STATE_DTYPES)
            check_shape(label, t, shape, d)
            check_device(label, t, device)
    check_tensor("chunk_state.scale", scale, len(scale_shape), dtypes=_STATE_DTYPES)
    check_shape("chunk_state.scale", scale, scale_shape, ("B", "H", "2")[:len(scale_shape)])
    check_device("chunk_state.scale", scale, device)


def _position_tensor(position, B, device, chunk_size, starts_chunk):
    """``position`` as an int64 tensor on ``device`` (a Python int becomes a fill, not a copy from
    the host). starts_chunk: no chunk-start state is given, so the token must start a chunk."""
    if isinstance(position, torch.Tensor):
        if position.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"position: expected an int64 or int32 tensor, got {_dtype_name(position.dtype)}")
        if position.dim() > 1 or (position.dim() == 1 and position.shape[0] != B):
            raise ValueError(f"position: expected a scalar or [B] = [{B}] tensor, got shape {list(position.shape)}")
        check_device("position", position, device)
        if value_checks_enabled(position.device):
            if bool((position < 0).any()):
                raise ValueError("position: expected positions >= 0")
            if starts_chunk and bool((position % chunk_size != 0).any()):
                raise ValueError(f"chunk_state: None is only valid at a chunk start, but position is not a multiple "
                                 f"of chunk_size={chunk_size}: pass the chunk_state the previous step returned")
        return position
    if isinstance(position, bool) or not isinstance(position, int):
        raise TypeError(f"position: expected an int >= 0 or an integer tensor, got {position!r}")
    if position < 0:
        raise ValueError(f"position: expected an int >= 0, got {position}")
    if starts_chunk and position % chunk_size:
        raise ValueError(f"chunk_state: None is only valid at a chunk start, but position={position} is not a "
                         f"multiple of chunk_size={chunk_size}: pass the chunk_state the previous step returned")
    return torch.full((), position, dtype=torch.int64, device=device)


def _chunk_state_args(chunk_state, n_weights):
    """The op's chunk-start state arguments: the weights, the scale, the read weights (None each when
    absent)."""
    if chunk_state is None:
        return (None,) * n_weights, None, (None,) * n_weights
    weights, scale, read = chunk_state
    as_tuple = (lambda x: (x,)) if n_weights == 1 else tuple
    return as_tuple(weights), scale, (None,) * n_weights if read is None else as_tuple(read)


def _chunk_state_result(weights, scale, read, has_read):
    return ChunkStartState(weights, scale, read if has_read else None)


def _kept_chunk_state(chunk_state):
    """The chunk-start state a mid_chunk step passes on: the one it was given."""
    return chunk_state if type(chunk_state) is ChunkStartState else ChunkStartState(*chunk_state)


class _Checked(Exception):
    """Raised by :func:`_decode_fast` for a call it leaves to the checked path."""


# The operators read a position only modulo chunk_size (does the token start a chunk?), so the
# decode path passes an int position on the CPU as a kept scalar tensor of ``position %
# chunk_size``, a dictionary lookup instead of a new tensor per token (at most as many tensors as
# the largest chunk_size in use). Not on CUDA: a tensor first made while a CUDA graph is being captured
# would hold no value outside the graph.
_CPU_POSITION_OFFSETS = {}


def _cpu_position_offset(position, chunk_size):
    offset = position % chunk_size
    tensor = _CPU_POSITION_OFFSETS.get(offset)
    if tensor is None:
        tensor = _CPU_POSITION_OFFSETS[offset] = torch.full((), offset, dtype=torch.int64)
    return tensor


def _decode_fast(q, v, position, state, chunk_state, chunk_size, read, objective, retention):
    """The arguments of a decode step in the middle of a stream, as the operator takes them, for a
    call the operator's own checks cover: ``(position, read_token, objective, retention, delta,
    mid_chunk)``. Raises :class:`_Checked` for any other call (which then takes the checked path).

    ``mid_chunk`` (the operators' argument, csrc/binding/memory_step.h): the token is known on the
    host not to start a chunk (an int position, or a scalar position on the CPU) and the given
    chunk-start state is as a step returns it (the state dtype, contiguous), so the step passes
    that state on instead of the operator copying it."""
    if state is None or chunk_state is None:
        raise _Checked
    args = _fast_args(q, v, position, chunk_size, read, objective, retention)
    if type(position) is int:
        mid_chunk = position % chunk_size != 0
    else:  # a tensor (else the operator raises): read on the host where that is free
        mid_chunk = q.device.type == "cpu" and position.dim() == 0 and int(position) % chunk_size != 0
    if mid_chunk:
        state_dtype = state_dtype_for(q.dtype)
        mid_chunk = all(t is None or (t.dtype == state_dtype and t.is_contiguous()) for t in _flat(chunk_state))
    return (*args, mid_chunk)


def _fast_args(q, v, position, chunk_size, read, objective, retention):
    """The arguments every step operator takes, ``(position, read_token, objective, retention,
    delta)``, for a call of the fast path: no autograd, no torch.compile, values read on the host
    only for CPU tensors (the operator checks them). Raises :class:`_Checked` otherwise."""
    if (torch.is_grad_enabled() or type(chunk_size) is not int or read not in READ_MODES
            or torch.compiler.is_compiling()):
        raise _Checked
    device = q.device
    if device.type != "cpu" and value_checks_enabled(device):  # Python reads the values (a host sync)
        raise _Checked
    check_op_device(q)
    if type(position) is int:
        if position < 0:
            raise _Checked
        position = (_cpu_position_offset(position, chunk_size) if device.type == "cpu"
                    else torch.full((), position, dtype=torch.int64, device=device))
    objective, retention = parse_objective(objective), parse_retention(retention)
    delta = objective.delta
    if delta is not None:
        if isinstance(delta, torch.Tensor):
            raise _Checked
        delta = torch.full(v.shape, delta, device=device, dtype=state_dtype_for(q.dtype))
    return position, read == "token", objective, retention, delta


def _flat(tensors):
    """The tensors (or None) of a chunk-start state, whose fields are tensors, pairs or None."""
    for x in tensors:
        if isinstance(x, (tuple, list)):
            yield from x
        else:
            yield x


def _checked_in_place_args(q, k, v, theta, eta, alpha, position, state, chunk_state, chunk_size, read, objective,
                           retention, functional_step, **options):
    """The checked path of an in-place step: runs the functional step on the same arguments (which
    writes nothing) to raise its errors naming the argument, then returns the operator's arguments
    as :func:`_fast_args`. torch.compile traces the operator through here."""
    if not torch.compiler.is_compiling():
        functional_step(q, k, v, theta, eta, alpha, position=position, state=state, chunk_state=chunk_state,
                        chunk_size=chunk_size, read=read, objective=objective, retention=retention, **options)
    B, H, Dv = v.shape
    state_dtype = state_dtype_for(q.dtype)
    objective, retention, delta = _step_miras(objective, retention, [], B, H, Dv, q.device, state_dtype, "state")
    position = _position_tensor(position, B, q.device, chunk_size, False)
    return position, read == "token", objective, retention, delta


def _run_in_place(op, pack, fast, checked):
    """Runs an in-place operator on ``pack(*fast())`` below the autograd layer (grad mode is off),
    bumping the version counters of the buffers it writes as the ADInplaceOrView layer would; when
    ``fast`` leaves the call to the checked path or the operator raises (before it writes
    anything), on ``pack(*checked())`` through the dispatcher, where the checks name the argument.
    ``pack(position, read_token, objective, retention, delta) -> (operator arguments, buffers)``."""
    try:
        args, buffers = pack(*fast())
        with torch._C._AutoDispatchBelowADInplaceOrView():
            o = op(*args)
    except (_Checked, RuntimeError, TypeError, ValueError, AttributeError):
        pass
    else:
        torch._C._increment_version(buffers)
        return o
    return op(*pack(*checked())[0])


def empty_chunk_state(state, *, read="token", retention="l2"):
    """Buffers for the chunk-start state of an in-place decode (:func:`linear_memory_step_`,
    :func:`mlp_memory_step_`) from its running ``state`` (``(M, S)`` or ``((W1, W2), (S1, S2))``):
    a :class:`ChunkStartState` of uninitialized tensors, which the first step (at a chunk start)
    fills. ``read_weights`` exist with ``read="chunk_start"`` and ``retention="kl"`` only."""
    weights = state[0]
    pair = isinstance(weights, (tuple, list))
    first = weights[0] if pair else weights
    B, H = first.shape[:2]
    like = (lambda: tuple(torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights)) if pair \
        else (lambda: torch.empty_like(weights, memory_format=torch.contiguous_format))
    has_read = read == "chunk_start" and parse_retention(retention).kind == "kl"
    scale = first.new_empty((B, H, 2) if pair else (B, H))
    return ChunkStartState(like(), scale, like() if has_read else None)


# ---- linear memory ----------------------------------------------------------------------------------------


@torch.library.register_fake("titans_ext::linear_memory_step")
def _linear_memory_step_fake(q, k, v, theta, eta, alpha, m, s, chunk_weights, chunk_scale, chunk_read, position,
                             chunk_size, read_token, objective=0, p=2.0, eps=0.0, delta=None, retention=0,
                             retention_q=2.0, mid_chunk=False):
    check_fake_device(q)
    B, H, Dk = q.shape
    Dv = v.shape[-1]
    state_dtype = state_dtype_for(q.dtype)

    def chunk_output(*shape, present=True):  # empty with mid_chunk
        return q.new_empty(shape if present and not mid_chunk else (0,), dtype=state_dtype)

    has_read = not read_token and retention == 2
    return (q.new_empty(B, H, Dv), *(q.new_empty(B, H, Dv, Dk, dtype=state_dtype) for _ in range(2)),
            chunk_output(B, H, Dv, Dk), chunk_output(B, H), chunk_output(B, H, Dv, Dk, present=has_read))


torch.library.register_autograd("titans_ext::linear_memory_step", _no_backward("linear_memory_step"),
                                setup_context=lambda ctx, inputs, output: None)


def linear_memory_step(q, k, v, theta, eta, alpha, *, position, state=None, chunk_state=None, chunk_size=64,
                       read="token", objective="l2", retention="l2"):
    r"""One token of :func:`titans_ext.linear_memory`, from the running and the chunk-start state.

    For the token at stream position ``position`` (chunks of ``chunk_size`` counted from position
    0, as in one call of the chunked op on the whole stream), with ``t0`` its chunk's first token::

        u = f(W0 k - v) k^T              # W0: the chunk-start weights (chunk_state.weights)
        S' = eta S - theta u,   M' = (1 - alpha) M + S'
        o = rho0 M' q  (read="token")   or   R0 q  (read="chunk_start")

    When ``position % chunk_size == 0`` the step first refreshes the chunk-start state from the
    running state (``W0 = rho0 M``, ``rho0 = ||M||_q^(2-q)`` for ``retention=("lq", q)``, else
    ``W0 = M`` and ``rho0 = 1``; ``R0 = W0``), and with ``retention="kl"`` takes Memora's softmax
    step ``M' = softmax((1 - alpha) log max(M, 1e-6) + S')`` over each row instead, which then
    becomes W0 (R0 stays the memory before it). A sequence fed step by step gives the outputs and
    the states of :func:`titans_ext.linear_memory` with the same options, token for token.

    Cost: O(B H Dv Dk) per token, whatever the position. On CUDA one fused kernel launch on the
    current stream, and nothing reads a tensor value on the host (with value checks off, the GPU
    default): with ``position`` a device tensor that the caller advances (``position += 1``), a
    step can be captured in a CUDA graph and replayed.

    Autograd: not supported (the step is for inference; train with the chunked op). Inputs that
    require grad while grad mode is on raise a RuntimeError; so does a backward through the
    operator called directly.

    Args:
        q, k: the token's query and key ``[B, H, Dk]``; fp32, fp64, bf16 or fp16.
        v: value ``[B, H, Dv]`` (q's dtype).
        theta, eta, alpha: gates ``[B, H]`` (as in :func:`titans_ext.linear_memory`).
        position: the token's position in the stream: an int >= 0, or an int64/int32 tensor on q's
            device, a scalar or one per batch row ``[B]`` (rows may be at different positions). A
            tensor is read on the device only (pass one for CUDA graphs).
        state: the running state ``(M, S)``, each ``[B, H, Dv, Dk]``, as the chunked op's
            ``final_state`` or a previous step's; None: the chunked op's default initial state.
        chunk_state: the :class:`ChunkStartState` the previous step returned; None is valid only
            when the token starts a chunk (checked for an int position, and for a tensor where value
            checks run).
        chunk_size, read, objective, retention: as in :func:`titans_ext.linear_memory`; the same
            values at every step of a stream. A tensor ``delta`` of the objective broadcasts to
            ``[B, H]`` or, 3-d, to ``[B, H, Dv]``.

    Returns:
        ``(o, state, chunk_state)``: ``o`` ``[B, H, Dv]`` in q's dtype, the running state ``(M', S')``
        and the :class:`ChunkStartState` after the token (fp32, fp64 for fp64 inputs).
    """
    try:
        return _linear_memory_step_fast(q, k, v, theta, eta, alpha, position, state, chunk_state, chunk_size, read,
                                        objective, retention)
    except (_Checked, RuntimeError, TypeError, ValueError, AttributeError):
        pass  # the checked path raises the error naming the argument, or runs the call it leaves to it
    return run_linear_memory_step(torch.ops.titans_ext.linear_memory_step, q, k, v, theta, eta, alpha,
                                  position=position, state=state, chunk_state=chunk_state, chunk_size=chunk_size,
                                  read=read, objective=objective, retention=retention)


def _linear_memory_step_fast(q, k, v, theta, eta, alpha, position, state, chunk_state, chunk_size, read, objective,
                             retention):
    position, read_token, objective, retention, delta, mid_chunk = _decode_fast(
        q, v, position, state, chunk_state, chunk_size, read, objective, retention)
    m, s = state
    chunk_weights, chunk_scale, chunk_read = chunk_state
    with torch._C._AutoDispatchBelowADInplaceOrView():  # no autograd kernel to pass through: grad mode is off
        o, m, s, chunk_weights, chunk_scale, chunk_read = torch.ops.titans_ext.linear_memory_step.default(
            q, k, v, theta, eta, alpha, m, s, chunk_weights, chunk_scale, chunk_read, position, chunk_size,
            read_token, objective.code, objective.p, objective.eps, delta, retention.code, retention.q, mid_chunk)
    if mid_chunk:
        return o, (m, s), _kept_chunk_state(chunk_state)
    has_read = not read_token and retention.kind == "kl"
    return o, (m, s), _chunk_state_result(chunk_weights, chunk_scale, chunk_read, has_read)


def run_linear_memory_step(op, q, k, v, theta, eta, alpha, *, position, state, chunk_state, chunk_size, read,
                           objective, retention):
    """:func:`linear_memory_step` on the operator ``op`` (the emulation tests pass the emulated
    CUDA kernel's)."""
    check_op_device(q)
    B, H, Dk, Dv = check_token_inputs(q, k, v, theta, eta, alpha, chunk_size, read, token_axis=False)
    state_shape, dims = (B, H, Dv, Dk), ("B", "H", "Dv", "Dk")
    if state is not None:
        _check_state_pair("state", state, state_shape, dims, q.device)
    state_dtype = state_dtype_for(q.dtype)
    starts_stream = state is not None and chunk_state is None
    objective, retention, delta = _step_miras(objective, retention, list(state[:1]) if starts_stream else [], B, H,
                                              Dv, q.device, state_dtype, "state")
    has_read = read == "chunk_start" and retention.kind == "kl"
    _check_chunk_state(chunk_state, [state_shape], [dims], (B, H), has_read, q.device)
    position = _position_tensor(position, B, q.device, chunk_size, chunk_state is None)
    _refuse_autograd("linear_memory_step", "linear_memory",
                     (q, k, v, theta, eta, alpha, delta, *(state or ()), *(chunk_state or ())))
    m, s = (None, None) if state is None else state
    (chunk_weights,), chunk_scale, (chunk_read,) = _chunk_state_args(chunk_state, 1)
    o, m, s, chunk_weights, chunk_scale, chunk_read = op(
        q, k, v, theta, eta, alpha, m, s, chunk_weights, chunk_scale, chunk_read, position, chunk_size,
        read == "token", objective.code, objective.p, objective.eps, delta, retention.code, retention.q)
    return o, (m, s), _chunk_state_result(chunk_weights, chunk_scale, chunk_read, has_read)


@torch.library.register_fake("titans_ext::linear_memory_step_")
def _linear_memory_step_inplace_fake(q, k, v, theta, eta, alpha, m, s, chunk_weights, chunk_scale, chunk_read,
                                     position, chunk_size, read_token, objective=0, p=2.0, eps=0.0, delta=None,
                                     retention=0, retention_q=2.0):
    check_fake_device(q)
    return q.new_empty(v.shape)


def linear_memory_step_(q, k, v, theta, eta, alpha, *, position, state, chunk_state, chunk_size=64, read="token",
                        objective="l2", retention="l2"):
    r""":func:`linear_memory_step` on a decode state the caller owns, updated in place; returns ``o``.

    ``state = (M, S)`` holds the running state before the token and, after the call, the state
    after it; ``chunk_state`` (a :class:`ChunkStartState` of buffers, :func:`empty_chunk_state` at
    the start of a stream) likewise holds the chunk-start state, which the step overwrites from the
    running state when the token starts a chunk (``position`` a multiple of ``chunk_size``, read on
    the device: no host sync, CUDA-graph capturable). So a stream of in-place steps leaves in its
    buffers, token for token, what :func:`linear_memory_step` returns, and its reads are the same.

    Every buffer is a contiguous tensor of the state dtype (fp32, fp64 for fp64 inputs) and a
    tensor of its own. The step has no backward: call it under ``torch.no_grad()``. Per token it
    allocates only ``o`` and passes over the state once, where :func:`linear_memory_step` allocates
    the new state and returns six tensors.
    """
    return run_linear_memory_step_(torch.ops.titans_ext.linear_memory_step_.default, q, k, v, theta, eta, alpha,
                                   position=position, state=state, chunk_state=chunk_state, chunk_size=chunk_size,
                                   read=read, objective=objective, retention=retention)


def run_linear_memory_step_(op, q, k, v, theta, eta, alpha, *, position, state, chunk_state, chunk_size, read,
                            objective, retention):
    """:func:`linear_memory_step_` on the in-place operator ``op`` (the emulation tests pass the
    emulated CUDA kernel's)."""
    def pack(position_, read_token, objective_, retention_, delta):
        m, s = state
        chunk_weights, chunk_scale, chunk_read = chunk_state
        args = (q, k, v, theta, eta, alpha, m, s, chunk_weights, chunk_scale, chunk_read, position_, chunk_size,
                read_token, objective_.code, objective_.p, objective_.eps, delta, retention_.code, retention_.q)
        return args, (m, s, chunk_weights, chunk_scale) + (() if chunk_read is None else (chunk_read,))

    return _run_in_place(
        op, pack,
        lambda: _fast_args(q, v, position, chunk_size, read, objective, retention),
        lambda: _checked_in_place_args(q, k, v, theta, eta, alpha, position, state, chunk_state, chunk_size, read,
                                       objective, retention, linear_memory_step))


# ---- MLP memory -------------------------------------------------------------------------------------------


@torch.library.register_fake("titans_ext::mlp_memory_step")
def _mlp_memory_step_fake(q, k, v, theta, eta, alpha, w1, w2, s1, s2, chunk_w1, chunk_w2, chunk_scale, chunk_read_w1,
                          chunk_read_w2, position, chunk_size, read_token, activation, objective=0, p=2.0, eps=0.0,
                          delta=None, retention=0, retention_q=2.0, mid_chunk=False):
    check_fake_device(q)
    B, H, D = q.shape
    N = w1.shape[2]
    state_dtype = state_dtype_for(q.dtype)

    def pair(present=True):
        shapes = ((B, H, N, D), (B, H, D, N)) if present else ((0,), (0,))
        return [q.new_empty(shape, dtype=state_dtype) for shape in shapes]

    (w1_out, w2_out), (s1_out, s2_out), (cw1, cw2) = pair(), pair(), pair(not mid_chunk)
    has_read = not read_token and retention == 2
    return (q.new_empty(B, H, D), w1_out, w2_out, s1_out, s2_out, cw1, cw2,
            q.new_empty((0,) if mid_chunk else (B, H, 2), dtype=state_dtype), *pair(has_read and not mid_chunk))


torch.library.register_autograd("titans_ext::mlp_memory_step", _no_backward("mlp_memory_step"),
                                setup_context=lambda ctx, inputs, output: None)


def _check_mlp_state(state, B, H, D, device):
    """``((W1, W2), (S1, S2) or None)``; returns N."""
    if not isinstance(state, (tuple, list)) or len(state) != 2 or not isinstance(state[0], (tuple, list)):
        raise TypeError("state: expected ((W1, W2), (S1, S2)) or ((W1, W2), None), as the chunked op's final_state, "
                        f"got {type(state).__name__}")
    weights, momentum = state
    if len(weights) != 2:
        raise TypeError(f"state[0]: expected the pair (W1, W2), got {len(weights)} items")
    W1 = weights[0]
    check_tensor("state[0][0]", W1, 4, dtypes=_STATE_DTYPES)
    N = W1.shape[2]
    if N == 0 or N % D:
        raise ValueError(f"state[0][0]: expected shape [B, H, E*D, D] with E*D a positive multiple of D={D}, got "
                         f"{list(W1.shape)}")
    shapes, dims = ((B, H, N, D), (B, H, D, N)), (("B", "H", "E*D", "D"), ("B", "H", "D", "E*D"))
    for group, tensors in ((0, weights), (1, momentum)):
        if tensors is None and group == 1:
            continue
        if not isinstance(tensors, (tuple, list)) or len(tensors) != 2:
            raise TypeError(f"state[{group}]: expected a pair of tensors, got {type(tensors).__name__}")
        for i, (t, shape, d) in enumerate(zip(tensors, shapes, dims)):
            check_tensor(f"state[{group}][{i}]", t, 4, dtypes=_STATE_DTYPES)
            check_shape(f"state[{group}][{i}]", t, shape, d)
            check_device(f"state[{group}][{i}]", t, device)
    return N


def mlp_memory_step(q, k, v, theta, eta, alpha, *, position, state, chunk_state=None, chunk_size=64, read="token",
                    activation="gelu", objective="l2", retention="l2"):
    r"""One token of :func:`titans_ext.mlp_memory`, from the running and the chunk-start state.

    The deep memory ``M(x) = x + W2 act(W1 x)``: for the token at ``position``, the inner gradients
    of both weights are taken at the chunk-start weights ``(W1_0, W2_0) = chunk_state.weights``
    (``z = W1_0 k``, ``e = f(k + W2_0 act(z) - v)``, ``u2 = e act(z)^T``,
    ``u1 = ((W2_0^T e) * act'(z)) k^T``), each weight steps as in :func:`linear_memory_step`, and
    ``o = q + rho2 W2' act(rho1 W1' q)`` (``read="token"``) or the memory at the chunk_start read
    weights. The chunk boundary, ``retention`` (``"lq"``: each weight with its own rho0; ``"kl"``:
    a softmax over each row of each weight at the lag token), the position, CUDA graphs and
    autograd (not supported) are as in :func:`linear_memory_step`. A sequence fed step by step gives
    the outputs and states of :func:`titans_ext.mlp_memory` token for token.

    Cost: O(B H N D) per token (N = E D the hidden width); on CUDA one fused kernel launch.

    Args:
        q, k, v: the token's ``[B, H, D]``; fp32, fp64, bf16 or fp16.
        theta, eta, alpha: gates ``[B, H]``.
        position: as in :func:`linear_memory_step`.
        state: the running state ``((W1 [B, H, N, D], W2 [B, H, D, N]), (S1, S2))`` as the chunked
            op's ``final_state`` (momenta None: zeros).
        chunk_state: the :class:`ChunkStartState` the previous step returned (None only at a chunk
            start); ``weights`` and ``read_weights`` are ``(W1, W2)`` pairs, ``scale`` is ``[B, H, 2]``.
        chunk_size, read, activation, objective, retention: as in :func:`titans_ext.mlp_memory`.

    Returns:
        ``(o, state, chunk_state)``: ``o`` ``[B, H, D]`` in q's dtype, ``((W1', W2'), (S1', S2'))`` and
        the :class:`ChunkStartState` after the token.
    """
    try:
        return _mlp_memory_step_fast(q, k, v, theta, eta, alpha, position, state, chunk_state, chunk_size, read,
                                     activation, objective, retention)
    except (_Checked, RuntimeError, TypeError, ValueError, AttributeError):
        pass  # as in linear_memory_step
    return run_mlp_memory_step(torch.ops.titans_ext.mlp_memory_step, q, k, v, theta, eta, alpha, position=position,
                               state=state, chunk_state=chunk_state, chunk_size=chunk_size, read=read,
                               activation=activation, objective=objective, retention=retention)


def _mlp_memory_step_fast(q, k, v, theta, eta, alpha, position, state, chunk_state, chunk_size, read, activation,
                          objective, retention):
    position, read_token, objective, retention, delta, mid_chunk = _decode_fast(
        q, v, position, state, chunk_state, chunk_size, read, objective, retention)
    (w1, w2), momentum = state
    s1, s2 = (None, None) if momentum is None else momentum
    (chunk_w1, chunk_w2), chunk_scale, chunk_read = chunk_state
    chunk_read_w1, chunk_read_w2 = (None, None) if chunk_read is None else chunk_read
    with torch._C._AutoDispatchBelowADInplaceOrView():  # as in _linear_memory_step_fast
        out = torch.ops.titans_ext.mlp_memory_step.default(
            q, k, v, theta, eta, alpha, w1, w2, s1, s2, chunk_w1, chunk_w2, chunk_scale, chunk_read_w1,
            chunk_read_w2, position, chunk_size, read_token, activation, objective.code, objective.p, objective.eps,
            delta, retention.code, retention.q, mid_chunk)
    o, w1, w2, s1, s2, chunk_w1, chunk_w2, chunk_scale, chunk_read_w1, chunk_read_w2 = out
    if mid_chunk:
        return o, ((w1, w2), (s1, s2)), _kept_chunk_state(chunk_state)
    has_read = not read_token and retention.kind == "kl"
    return (o, ((w1, w2), (s1, s2)),
            _chunk_state_result((chunk_w1, chunk_w2), chunk_scale, (chunk_read_w1, chunk_read_w2), has_read))


def run_mlp_memory_step(op, q, k, v, theta, eta, alpha, *, position, state, chunk_state, chunk_size, read, activation,
                        objective, retention):
    """:func:`mlp_memory_step` on the operator ``op`` (as :func:`run_linear_memory_step`)."""
    check_op_device(q)
    B, H, D, Dv = check_token_inputs(q, k, v, theta, eta, alpha, chunk_size, read, token_axis=False)
    if Dv != D:
        raise ValueError(f"v: the MLP memory needs Dk == Dv (M(x) = x + W2 act(W1 x)), got Dk={D}, Dv={Dv}")
    if activation not in ("gelu", "silu"):
        raise ValueError(f"activation: expected one of ('gelu', 'silu'), got {activation!r}")
    N = _check_mlp_state(state, B, H, D, q.device)
    state_dtype = state_dtype_for(q.dtype)
    weights, momentum = state
    objective, retention, delta = _step_miras(objective, retention, list(weights) if chunk_state is None else [], B,
                                              H, D, q.device, state_dtype, "state")
    has_read = read == "chunk_start" and retention.kind == "kl"
    _check_chunk_state(chunk_state, [(B, H, N, D), (B, H, D, N)],
                       [("B", "H", "E*D", "D"), ("B", "H", "D", "E*D")], (B, H, 2), has_read, q.device)
    position = _position_tensor(position, B, q.device, chunk_size, chunk_state is None)
    flat_chunk = () if chunk_state is None else (*chunk_state[0], chunk_state[1], *(chunk_state[2] or ()))
    _refuse_autograd("mlp_memory_step", "mlp_memory",
                     (q, k, v, theta, eta, alpha, delta, *weights, *(momentum or ()), *flat_chunk))
    s1, s2 = (None, None) if momentum is None else momentum
    (chunk_w1, chunk_w2), chunk_scale, (chunk_read_w1, chunk_read_w2) = _chunk_state_args(chunk_state, 2)
    out = op(
        q, k, v, theta, eta, alpha, weights[0], weights[1], s1, s2, chunk_w1, chunk_w2, chunk_scale, chunk_read_w1,
        chunk_read_w2, position, chunk_size, read == "token", activation, objective.code, objective.p, objective.eps,
        delta, retention.code, retention.q)
    o, w1, w2, s1, s2, chunk_w1, chunk_w2, chunk_scale, chunk_read_w1, chunk_read_w2 = out
    return (o, ((w1, w2), (s1, s2)),
            _chunk_state_result((chunk_w1, chunk_w2), chunk_scale, (chunk_read_w1, chunk_read_w2), has_read))


@torch.library.register_fake("titans_ext::mlp_memory_step_")
def _mlp_memory_step_inplace_fake(q, k, v, theta, eta, alpha, w1, w2, s1, s2, chunk_w1, chunk_w2, chunk_scale,
                                  chunk_read_w1, chunk_read_w2, position, chunk_size, read_token, activation,
                                  objective=0, p=2.0, eps=0.0, delta=None, retention=0, retention_q=2.0):
    check_fake_device(q)
    return q.new_empty(v.shape)


def mlp_memory_step_(q, k, v, theta, eta, alpha, *, position, state, chunk_state, chunk_size=64, read="token",
                     activation="gelu", objective="l2", retention="l2"):
    r""":func:`mlp_memory_step` on a decode state the caller owns, updated in place; returns ``o``.

    ``state = ((W1, W2), (S1, S2))`` (momenta given) and ``chunk_state`` are buffers as in
    :func:`linear_memory_step_`, overwritten with what :func:`mlp_memory_step` would return.
    """
    return run_mlp_memory_step_(torch.ops.titans_ext.mlp_memory_step_.default, q, k, v, theta, eta, alpha,
                                position=position, state=state, chunk_state=chunk_state, chunk_size=chunk_size,
                                read=read, activation=activation, objective=objective, retention=retention)


def run_mlp_memory_step_(op, q, k, v, theta, eta, alpha, *, position, state, chunk_state, chunk_size, read, activation,
                         objective, retention):
    """:func:`mlp_memory_step_` on the in-place operator ``op`` (as :func:`run_linear_memory_step_`)."""
    def pack(position_, read_token, objective_, retention_, delta):
        (w1, w2), (s1, s2) = state
        (chunk_w1, chunk_w2), chunk_scale, chunk_read = chunk_state
        chunk_read = () if chunk_read is None else tuple(chunk_read)
        chunk_read_w1, chunk_read_w2 = chunk_read or (None, None)
        args = (q, k, v, theta, eta, alpha, w1, w2, s1, s2, chunk_w1, chunk_w2, chunk_scale, chunk_read_w1,
                chunk_read_w2, position_, chunk_size, read_token, activation, objective_.code, objective_.p,
                objective_.eps, delta, retention_.code, retention_.q)
        return args, (w1, w2, s1, s2, chunk_w1, chunk_w2, chunk_scale) + chunk_read

    return _run_in_place(
        op, pack,
        lambda: _fast_args(q, v, position, chunk_size, read, objective, retention),
        lambda: _checked_in_place_args(q, k, v, theta, eta, alpha, position, state, chunk_state, chunk_size, read,
                                       objective, retention, mlp_memory_step, activation=activation))
