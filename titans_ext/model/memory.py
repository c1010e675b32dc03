"""``NeuralMemory``: the Titans long-term memory as a layer, with a streaming state.

The layer projects its input to per-head queries, keys and values, gates from the same input,
and hands them to the public ops (:func:`titans_ext.linear_memory`,
:func:`titans_ext.mlp_memory`); it has no memory math of its own.

Streaming. The ops split a call into chunks starting at the call's first token, and a token's
inner gradient is taken at the memory before its chunk. So that pieces of any length give the
one-shot result, chunks are counted from the start of the stream. A call runs its whole chunks
with the chunked op and the tokens of a chunk it shares with other calls in one of two ways:

- without autograd (inference, ``TitansLM.generate``): one decode step per token
  (:func:`titans_ext.linear_memory_step`, :func:`titans_ext.mlp_memory_step`), which carries the
  running memory and the chunk-start state, so a token costs O(state) whatever the chunk size
  (under :func:`owned_decode_states`, as in ``TitansLM.generate``, the steps update the state in
  place: :func:`titans_ext.linear_memory_step_`, :func:`titans_ext.mlp_memory_step_`);
- with autograd (the steps have no backward): the state keeps the memory at the last chunk
  boundary and the op inputs of the tokens since then, and the call replays them with its own
  through the chunked op (at most ``chunk_size - 1`` tokens recomputed).

A stream may switch from the second way to the first mid-chunk (the chunk-start state is rebuilt
from the replayed tokens), not back: gradients cannot flow through tokens a step consumed.
"""

import contextlib
import contextvars
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import linear_memory, linear_memory_read, mlp_memory_read
from ..ops.checks import parse_objective, parse_retention, state_dtype_for
from ..ops.step import empty_chunk_state, linear_memory_step, linear_memory_step_, mlp_memory_step, mlp_memory_step_
from ..reference.miras import lq_scale
from .checks import (check_choice, check_input, check_positive_int, check_positive_number,
                     check_unit_interval)
from .packed import check_packed, document_positions

MEMORY_KINDS = ("linear", "mlp")
# Objectives that take a threshold delta; NeuralMemory can learn it per token and channel.
DELTA_OBJECTIVES = ("huber", "pseudo_huber", "yaad")
LEARNED = "learned"

# The MIRAS models (docs/miras.md §3) as NeuralMemory defaults: memory, objective,
# retention and the momentum bound (the MIRAS models learn by plain gradient descent: eta = 0).
PRESETS = {
    "titans": dict(memory="mlp", objective="l2", retention="l2", max_momentum=0.9),
    "moneta": dict(memory="mlp", objective=("lp", 3), retention=("lq", 4), max_momentum=0.0),
    "yaad": dict(memory="mlp", objective=("huber", LEARNED), retention="l2", max_momentum=0.0),
    "memora": dict(memory="mlp", objective="l2", retention="kl", max_momentum=0.0),
}


def map_tensors(fn, obj):
    """Applies ``fn`` to every tensor in a nest of dataclasses, tuples and lists (the rest passes through)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: map_tensors(fn, getattr(obj, f.name))
                                           for f in dataclasses.fields(obj)})
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a NamedTuple (ChunkStartState)
        return type(obj)(*(map_tensors(fn, item) for item in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(fn, item) for item in obj)
    return obj


# Set by owned_decode_states: the decode steps of NeuralMemory may update the streaming states they
# are given in place (linear_memory_step_ / mlp_memory_step_).
_DECODE_IN_PLACE = contextvars.ContextVar("titans_ext_decode_in_place", default=False)


@contextlib.contextmanager
def owned_decode_states():
    """Within: the decode steps of every :class:`NeuralMemory` update the running and chunk-start
    states of the :class:`MemoryState` they are given in place instead of returning new ones (one
    allocation per token instead of the step's outputs). For a decode loop that owns its states:
    ``TitansLM.generate`` runs its one-token calls in it, on a copy of the prompt's states
    (:func:`owned_copy`), which nothing outside holds."""
    token = _DECODE_IN_PLACE.set(True)
    try:
        yield
    finally:
        _DECODE_IN_PLACE.reset(token)


def decoding_in_place():
    """Whether the calls run inside :func:`owned_decode_states`: a caller that keeps a reference to
    a running state's tensors (MAC's segment-start memory) must copy them, since the next decode
    steps overwrite them."""
    return _DECODE_IN_PLACE.get()


def owned_copy(state):
    """A copy of a streaming state (any nest of state dataclasses) whose tensors are its own,
    contiguous: what :func:`owned_decode_states` may update in place."""
    return map_tensors(lambda t: t.clone(memory_format=torch.contiguous_format), state)


def detach_state(state):
    """A copy of a streaming state (any nest of state dataclasses) cut from the autograd graph.

    Use it between segments of truncated backpropagation through time.
    """
    return map_tensors(torch.Tensor.detach, state)


def time_range(t, start, stop=None):
    """``t[:, start:stop]``, or ``t`` itself when that is all of it: autograd turns even a whole slice
    into a zero-filled copy of ``t`` in the backward (the segmented blocks call the memory often,
    on short pieces)."""
    stop = t.shape[1] if stop is None else stop
    return t if start == 0 and stop == t.shape[1] else t[:, start:stop]


@dataclass
class MemoryState:
    """Streaming state of a :class:`NeuralMemory`.

    Attributes:
        memory: the op state after the last token seen (the running state): ``(M, S)``, each
            ``[B, H, D, D]``, for the linear memory; ``((W1, W2), (S1, S2))`` for the MLP memory.
            fp32 (fp64 for fp64 inputs).
        conv_cache: the last ``conv_kernel - 1`` projected inputs ``[B, conv_kernel - 1, 3 * H * D]``
            (q, k, v side by side), the history of the causal convolutions.
        position: tokens seen so far.
        step_position: ``position`` as an int64 scalar tensor on the state's device, which the decode
            steps read: a one-token call captured in a CUDA graph takes its position from the state
            instead of baking it in (its control flow does not depend on ``position``).
        chunk_start: the :class:`~titans_ext.ChunkStartState` of the current chunk, which the decode
            steps carry (None when the last call ran with autograd or no step has run yet).
        replay: with autograd, ``(boundary, pending)``: the op state at the stream's last chunk
            boundary and ``(k, v, theta, eta, alpha)`` of the tokens after it, which the next call
            replays (k, v ``[B, n, H, D]``, gates ``[B, n, H]``, ``n < chunk_size``; with a learned
            delta also its ``[B, n, H, D]`` values). None when the last call ran the decode steps.
    """

    memory: tuple
    conv_cache: torch.Tensor
    position: int = 0
    step_position: torch.Tensor = None
    chunk_start: object = None
    replay: tuple = None

    def detach(self):
        """This state cut from the autograd graph (for truncated backpropagation through time)."""
        return detach_state(self)


def causal_conv_taps(padded, T, document_position=None):
    """The K inputs of a causal convolution of width K over ``padded [B, K - 1 + T, C]`` (history,
    then the T tokens): tap ``lag`` is the tokens ``K - 1 - lag`` back ``[B, T, C]``, zero where
    that reaches before the token's document (``document_position [T]``, see
    :class:`CausalDepthwiseConv`)."""
    K = padded.shape[1] - T + 1
    taps = []
    for lag in range(K):
        shifted = padded[:, lag:lag + T]
        if document_position is not None and lag < K - 1:
            shifted = shifted * (document_position >= K - 1 - lag).to(padded.dtype)[:, None]
        taps.append(shifted)
    return taps


def causal_conv_reference(padded, weight, bias, T, document_position=None):
    """``y [B, T, C] = bias + sum_lag tap_lag * weight[:, lag]`` in plain PyTorch (autograd
    differentiates it); :class:`CausalConvFunction` computes the same with its own backward."""
    taps = causal_conv_taps(padded, T, document_position)
    y = torch.addcmul(bias, taps[0], weight[:, 0])
    for lag in range(1, len(taps)):
        y = torch.addcmul(y, taps[lag], weight[:, lag])
    return y


class CausalConvFunction(torch.autograd.Function):
    """:func:`causal_conv_reference` with a backward that accumulates the input's gradient in one
    buffer, tap by tap in place. Autograd's own backward of the K shifted products makes a
    zero-filled copy of the whole input per tap and adds them up (three more passes over it per
    tap). Forward and backward on the CPU (1 thread, B 32, K 4): 1.5x faster than autograd's at
    T 80 with 384 channels (MAL's and MAG's call), 0.9x at T 16 (MAC's segments, where the calls'
    fixed costs dominate)."""

    @staticmethod
    def forward(padded, weight, bias, T, document_position):
        return causal_conv_reference(padded, weight, bias, T, document_position)

    @staticmethod
    def setup_context(ctx, inputs, output):
        padded, weight, bias, T, document_position = inputs
        ctx.save_for_backward(padded, weight, document_position)
        ctx.T = T

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        padded, weight, document_position = ctx.saved_tensors
        T = ctx.T
        K = weight.shape[1]
        d_padded = d_weight = d_bias = None
        if ctx.needs_input_grad[0]:
            d_padded = torch.zeros_like(padded)
            for lag in range(K):
                d_tap = grad
                if document_position is not None and lag < K - 1:
                    d_tap = grad * (document_position >= K - 1 - lag).to(grad.dtype)[:, None]
                # In place through the view (`d_padded[...] += ...` would also copy the view onto itself).
                d_padded[:, lag:lag + T].addcmul_(d_tap, weight[:, lag])
        if ctx.needs_input_grad[1]:
            taps = causal_conv_taps(padded, T, document_position)
            d_weight = torch.stack([(grad * tap).sum(dim=(0, 1)) for tap in taps], dim=1).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            d_bias = grad.sum(dim=(0, 1)).to(weight.dtype)
        return d_padded, d_weight, d_bias, None, None


class CausalDepthwiseConv(nn.Module):
    """Depthwise causal 1-d convolution over time with an explicit history.

    ``forward(x [B, T, C], history [B, K-1, C]) -> (y [B, T, C], new history)``; a zero history is
    the start of a stream, so a stream cut anywhere convolves the same as in one piece.
    ``channels`` (a slice) convolves only those channels (x and history hold just them).
    ``document_position [T]`` (packed documents, see :mod:`titans_ext.model.packed`): each token's
    position in its document; taps that reach before the document's first token read zeros, as
    at the start of a stream.

    Computed as K shifted multiply-adds (:class:`CausalConvFunction`): on the CPU a grouped
    ``conv1d`` costs several times more, most of all on the short pieces a segmented block feeds it.

    Initialized as ``nn.Conv1d``, the bias included, deliberately: the random bias is one offset
    added to every token, which behind :class:`NeuralMemory`'s SiLU and l2 normalization gives
    the keys of a sequence a shared direction (mean cosine 0.45 at initialization in
    ``bench/recall.py``'s model, 0.04 with a zero bias), yet with a zero bias the recall
    benchmark's MAC and MAL learned less at every seed measured (``docs/design.md`` §4.1).
    """

    def __init__(self, channels, kernel_size):
        super().__init__()
        self.kernel_size = kernel_size
        bound = kernel_size ** -0.5  # nn.Conv1d's default initialization (fan-in = kernel_size)
        self.weight = nn.Parameter(torch.empty(channels, kernel_size).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(channels).uniform_(-bound, bound))

    def forward(self, x, history, channels=slice(None), document_position=None):
        padded = torch.cat([history.to(x.dtype), x], dim=1)
        weight, bias = self.weight[channels], self.bias[channels]
        y = CausalConvFunction.apply(padded, weight, bias, x.shape[1], document_position)
        return y, padded[:, padded.shape[1] - (self.kernel_size - 1):]


def chunk_stability_edge(chunk_size, eta):
    """The inner learning rate theta at which the linear memory's chunk-to-chunk map stops being
    stable in the worst case: every key of a chunk the same unit vector, constant gates theta and
    ``eta`` < 1, no forgetting (``docs/design.md`` §4.1).

    Along the key the state is the error ``e = M k - v`` and the momentum ``s = S k``; a chunk,
    whose C tokens all take their gradient ``2 e_0`` at the chunk start, maps ``(e, s)`` by
    ``[[1 - 2 theta b, a], [-2 theta c, eta^C]]`` with ``c = sum_{j<C} eta^j``, ``a = eta c`` and
    ``b = sum_{t=1..C} sum_{j<t} eta^j``. Its eigenvalues stay inside the unit circle (Jury's
    conditions for a 2 x 2 map) while theta is below the returned value: beyond it an
    eigenvalue passes -1 (the chunk overshoots) or the eigenvalues' product passes 1.
    """
    p = eta ** chunk_size
    c = (1 - p) / (1 - eta)
    a = eta * c
    b = (chunk_size - a) / (1 - eta)
    edge = (1 + p) / (b * (1 + p) - a * c)
    if a * c > b * p:
        edge = min(edge, (1 - p) / (2 * (a * c - b * p)))
    return edge


def stable_max_lr(chunk_size, max_momentum):
    """``NeuralMemory``'s default bound of the inner learning rate theta: half the
    :func:`chunk_stability_edge` for the worst momentum in ``[0, max_momentum]`` (the edge is not
    monotone in it; a grid of 257 values), and at most 0.25 (``docs/design.md`` §4.1).

    A model that calls the ops directly can bound its gates with it (``max_momentum < 1``).
    """
    check_positive_int("chunk_size", chunk_size)
    check_unit_interval("max_momentum", max_momentum)
    if max_momentum == 1:
        raise ValueError("max_momentum: no stable bound of the inner learning rate exists at 1; expected < 1")
    steps = 256
    edge = min(chunk_stability_edge(chunk_size, max_momentum * i / steps) for i in range(steps + 1))
    return min(0.25, edge / 2)


class NeuralMemory(nn.Module):
    r"""Titans neural long-term memory layer (multi-head), over the public memory ops.

    ``x [B, T, dim] -> y [B, T, dim]``. Per token and head::

        q, k, v = SiLU(causal_depthwise_conv(W_{q,k,v} x))      # then q, k l2-normalized
        theta = max_lr * sigmoid(w_theta x),  eta = max_momentum * sigmoid(w_eta x),  alpha = sigmoid(w_alpha x)
        o = memory op(q, k, v, theta, eta, alpha; learned initial memory; objective, retention)
        y = W_out(RMSNorm(o) * SiLU(W_gate x))

    The memory learns ``k -> v`` at test time (see :func:`titans_ext.linear_memory`).

    Stability: keys are unit vectors and the gates are bounded. The worst case for the linear
    memory is a chunk whose keys all coincide: along that key the chunk-to-chunk map is stable
    while theta stays below an edge set by the chunk size and the momentum
    (:func:`chunk_stability_edge`). The default ``max_lr`` is half the edge at the worst
    momentum up to ``max_momentum``, at most 0.25 (:func:`stable_max_lr`: 0.110 at chunk 4 and
    ``max_momentum`` 0.5, 0.0179 at chunk 16), so long sequences stay finite for any gate values
    (``docs/design.md`` §4.1).

    Presets (``docs/miras.md`` §3; MIRAS, arXiv 2504.13173). ``preset`` picks the memory,
    the objective, the retention and the momentum bound of a published model; arguments passed
    explicitly override its choices:

    - ``"titans"``: MLP memory, ``"l2"`` objective and retention, momentum (``max_momentum=0.9``).
    - ``"moneta"``: MLP memory, ``objective=("lp", 3)``, ``retention=("lq", 4)`` on top of the
      forget gate alpha, no momentum (``max_momentum=0``).
    - ``"yaad"``: MLP memory, ``objective=("huber", "learned")`` (a per-token, per-channel delta
      learned from x), ``"l2"`` retention, no momentum. ``("yaad", "learned")`` is the paper's
      literal switch.
    - ``"memora"``: MLP memory, ``"l2"`` objective, ``retention="kl"`` (alpha acts on log W),
      no momentum.

    The paper's memory also has a LayerNorm inside the MLP, which this memory does not.

    Args:
        dim: model width.
        heads: memory heads H.
        head_dim: width D of each head's keys and values (default ``dim // heads``).
        memory: ``"linear"`` (``M(x) = W x``) or ``"mlp"`` (``M(x) = x + W2 act(W1 x)``); default
            ``"linear"``, or the preset's.
        expansion: hidden width ``expansion * D`` of the MLP memory.
        chunk_size: tokens per chunk of the op (inner gradients at chunk-start memory). The
            default, 16, is smaller than the ops' 64 on purpose (``docs/design.md`` §4.2): the
            stable ``max_lr`` above scales as ``1 / chunk_size``, a smaller chunk re-linearizes
            the inner loss more often, streaming replays up to ``chunk_size - 1`` tokens per call,
            and a MAC segment must be a multiple of it.
        conv_kernel: width of the causal depthwise convolutions (>= 1; 1 is no mixing in time).
        max_lr: upper bound of the inner learning rate theta (default: the stable bound above).
        max_momentum: upper bound of the momentum gate eta, in [0, 1] (default 0.5, or the
            preset's); 0 is plain gradient descent. The stable ``max_lr`` shrinks with the
            momentum (as ``1 - max_momentum`` at long chunks), so the bound trades momentum for
            inner step: at 0.9 a token's step at the starting gates is under 2 % of its value
            (chunk 4), the memory stays a slowly growing sum of everything written rather than a
            delta rule, and models learned long-range recall late or not at all
            (``docs/design.md`` §4.1).
        activation: ``"gelu"`` or ``"silu"``, the MLP memory's activation.
        read: ``"token"`` (read after each token's update) or ``"chunk_start"``.
        objective: the op's ``objective`` (default ``"l2"``, or the preset's); for ``"huber"``,
            ``"pseudo_huber"`` and ``"yaad"``, delta may be ``"learned"``:
            ``delta = softplus(W_delta x)`` per token and channel ``[B, T, H, D]``.
        retention: the op's ``retention`` (default ``"l2"``, or the preset's). With ``"kl"`` the
            learned initial memory is held as logits and enters as their row softmax, so it
            stays a valid (positive, row-stochastic) memory while it is trained. With
            ``("lq", q)`` each initial weight (an accumulator A) starts at unit q-norm, where its
            scale ``rho0 = ||A||_q^(2-q)`` is 1.
        preset: ``"titans"``, ``"moneta"``, ``"yaad"``, ``"memora"`` or None (the arguments alone).

    ``forward(x, state=None, cu_seqlens=None) -> (y, state)``: ``state`` is a :class:`MemoryState`
    (None: the learned initial memory); feeding a sequence in pieces with the state carried gives
    the outputs of one call. ``cu_seqlens``: packed documents, see :meth:`forward`.
    """

    def __init__(self, dim, heads=4, head_dim=None, memory=None, expansion=2, chunk_size=16, conv_kernel=4,
                 max_lr=None, max_momentum=None, activation="gelu", read="token", objective=None, retention=None,
                 preset=None):
        super().__init__()
        if preset is not None:
            check_choice("preset", preset, tuple(PRESETS))
        chosen = PRESETS.get(preset, dict(memory="linear", objective="l2", retention="l2", max_momentum=0.5))
        memory = chosen["memory"] if memory is None else memory
        objective = chosen["objective"] if objective is None else objective
        retention = chosen["retention"] if retention is None else retention
        max_momentum = chosen["max_momentum"] if max_momentum is None else max_momentum
        check_positive_int("dim", dim)
        check_positive_int("heads", heads)
        head_dim = dim // heads if head_dim is None else head_dim
        check_positive_int("head_dim", head_dim)
        check_choice("memory", memory, MEMORY_KINDS)
        check_positive_int("expansion", expansion)
        check_positive_int("chunk_size", chunk_size)
        check_positive_int("conv_kernel", conv_kernel)
        check_unit_interval("max_momentum", max_momentum)
        if max_lr is None:
            if max_momentum == 1:
                raise ValueError("max_lr: no stable default exists for max_momentum=1; pass max_lr explicitly")
            max_lr = stable_max_lr(chunk_size, max_momentum)
        check_positive_number("max_lr", max_lr)
        check_choice("activation", activation, ("gelu", "silu"))
        check_choice("read", read, ("token", "chunk_start"))
        learned_delta = isinstance(objective, (tuple, list)) and len(objective) == 2 and objective[1] == LEARNED
        if learned_delta:
            check_choice("objective", objective[0], DELTA_OBJECTIVES)
        else:
            parse_objective(objective)
        self.dim, self.heads, self.head_dim = dim, heads, head_dim
        self.memory_kind, self.chunk_size = memory, chunk_size
        self.max_lr, self.max_momentum = max_lr, max_momentum
        self.activation, self.read = activation, read
        self.objective, self.retention = objective, parse_retention(retention)
        inner = heads * head_dim
        self.qkv_proj = nn.Linear(dim, 3 * inner, bias=False)
        self.qkv_conv = CausalDepthwiseConv(3 * inner, conv_kernel)
        self.gate_proj = nn.Linear(dim, 3 * heads)
        self.delta_proj = nn.Linear(dim, inner) if learned_delta else None
        self.out_norm = nn.RMSNorm(head_dim)
        self.out_gate = nn.Linear(dim, inner, bias=False)
        self.out_proj = nn.Linear(inner, dim, bias=False)
        self.initial_memory = nn.ParameterList(nn.Parameter(w) for w in self._initial_weights(expansion))
        with torch.no_grad():
            # theta starts at max_lr / 2, momentum at 0.5, and forgetting slow (alpha ~ 0.002) so
            # that what is written survives hundreds of tokens before training tunes it.
            self.gate_proj.weight.mul_(0.1)
            self.gate_proj.bias.view(3, heads).copy_(torch.tensor([[0.0], [0.0], [-6.0]]).expand(3, heads))
            if learned_delta:
                # delta starts near 0.5, about the size of a residual entry (v is a SiLU output).
                self.delta_proj.weight.mul_(0.1)
                self.delta_proj.bias.fill_(math.log(math.expm1(0.5)))

    def _initial_weights(self, expansion):
        """Values of the learned initial memory's parameters (logits with retention "kl")."""
        H, D = self.heads, self.head_dim
        if self.memory_kind == "linear":
            shapes = [(H, D, D)]
        else:
            hidden = expansion * D
            shapes = [(H, hidden, D), (H, D, hidden)]
        retention = self.retention.kind
        if retention == "kl":
            # Uniform rows, except W1's, which differ so that the hidden units do.
            return [torch.randn(shape) if i == 0 and len(shapes) == 2 else torch.zeros(shape)
                    for i, shape in enumerate(shapes)]
        if retention == "lq":
            # Unit q-norm per head, where the weights rho0 A (docs/miras.md §2.3) equal the
            # accumulator A. Their q-norm is ||A||_q^(3-q) (1/||A|| at q = 4), so a small
            # accumulator (a zero one after its first update) would give huge weights.
            q = self.retention.q
            return [w / w.abs().pow(q).sum(dim=(1, 2), keepdim=True).pow(1 / q)
                    for w in (torch.randn(shape) for shape in shapes)]
        if self.memory_kind == "linear":
            return [torch.zeros(shapes[0])]
        # Hidden activations of norm ~1 for unit keys, so the inner gradient of W2 is about as
        # large as the linear memory's and the same max_lr bound applies.
        return [torch.randn(shapes[0]) / shapes[0][1] ** 0.5, torch.zeros(shapes[1])]

    def initial_state(self, batch_size, dtype=torch.float32, device=None):
        """The state before the first token: the learned initial memory, zero momentum, zero history.

        ``dtype`` is the dtype of the inputs the layer will see (its state is fp32, fp64 for fp64).
        """
        device = self.qkv_proj.weight.device if device is None else device
        state_dtype = state_dtype_for(dtype)
        weights = tuple(w.to(device=device, dtype=state_dtype).unsqueeze(0).expand(batch_size, *w.shape)
                        for w in self.initial_memory)
        if self.retention.kind == "kl":
            weights = tuple(torch.softmax(w, dim=-1) for w in weights)
        momentum = tuple(torch.zeros_like(w) for w in weights)
        memory = (weights[0], momentum[0]) if self.memory_kind == "linear" else (weights, momentum)
        H, D = self.heads, self.head_dim
        conv_cache = torch.zeros(batch_size, self.qkv_conv.kernel_size - 1, 3 * H * D, dtype=dtype, device=device)
        return MemoryState(memory=memory, conv_cache=conv_cache,
                           step_position=torch.zeros((), dtype=torch.int64, device=device))

    def _convolved(self, x, conv_cache, parts, document_position=None):
        """The first ``parts`` of q, k, v of ``x [B, T, dim]`` -> ``([B, T, parts, H, D], conv_cache)``."""
        B, T, _ = x.shape
        width = parts * self.heads * self.head_dim
        projected = F.linear(x, self.qkv_proj.weight[:width])
        convolved, conv_cache = self.qkv_conv(projected, conv_cache, slice(0, width), document_position)
        return F.silu(convolved).view(B, T, parts, self.heads, self.head_dim), conv_cache

    def project(self, x, conv_cache, document_position=None):
        """Op inputs of ``x [B, T, dim]``: ``q [B, T, H, D]`` (unit), the per-token inputs the memory
        learns from, ``(k, v, theta, eta, alpha)`` (k unit, gates ``[B, T, H]`` in fp32, fp64 for
        fp64 x) plus a learned delta ``[B, T, H, D]`` when there is one, and the new conv cache.
        ``document_position``: see :class:`CausalDepthwiseConv`."""
        B, T, _ = x.shape
        qkv, conv_cache = self._convolved(x, conv_cache, 3, document_position)
        q, k, v = qkv.unbind(dim=2)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        state_dtype = state_dtype_for(x.dtype)
        gates = torch.sigmoid(self.gate_proj(x).to(state_dtype)).view(B, T, 3, self.heads)
        inputs = (k, v, self.max_lr * gates[:, :, 0], self.max_momentum * gates[:, :, 1], gates[:, :, 2])
        if self.delta_proj is not None:
            inputs += (F.softplus(self.delta_proj(x).to(state_dtype)).view(B, T, self.heads, self.head_dim),)
        return q, inputs, conv_cache

    def queries(self, x, conv_cache):
        """The unit queries ``[B, T, H, D]`` of ``x [B, T, dim]`` alone (no keys, values or gates).

        ``conv_cache [B, conv_kernel - 1, H * D]`` is the history of the query convolution of
        ``x``'s own stream; returns ``(q, conv_cache)``.
        """
        q, conv_cache = self._convolved(x, conv_cache, 1)
        return F.normalize(q[:, :, 0], dim=-1), conv_cache

    def output(self, o, x):
        """``y = W_out(RMSNorm(o) * SiLU(W_gate x))`` for op outputs ``o [B, T, H, D]``, inputs ``x [B, T, dim]``."""
        B, T = o.shape[:2]
        gated = self.out_norm(o.to(x.dtype)).reshape(B, T, self.heads * self.head_dim) * F.silu(self.out_gate(x))
        return self.out_proj(gated)

    def run_op(self, q, inputs, memory, *, output_final_state, chunk_size=None, read=None, cu_seqlens=None):
        """Calls the memory op from ``memory`` (op state format, see :class:`MemoryState`) on the
        queries q and the per-token ``inputs`` of :meth:`project`."""
        chunk_size = self.chunk_size if chunk_size is None else chunk_size
        read = self.read if read is None else read
        k, v, theta, eta, alpha, *learned_delta = inputs
        objective = (self.objective[0], learned_delta[0]) if learned_delta else self.objective
        options = dict(chunk_size=chunk_size, output_final_state=output_final_state, read=read, objective=objective,
                       retention=self.retention, cu_seqlens=cu_seqlens)
        if self.memory_kind == "linear":
            return linear_memory(q, k, v, theta, eta, alpha, initial_state=memory, **options)
        import titans_ext  # the MLP op is looked up when used: it may be missing from older builds

        if not hasattr(titans_ext, "mlp_memory"):
            raise RuntimeError("memory='mlp' needs titans_ext.mlp_memory, which this build of titans_ext lacks")
        weights, momentum = memory
        return titans_ext.mlp_memory(q, k, v, theta, eta, alpha, weights, momentum=momentum,
                                     activation=self.activation, **options)

    def step(self, q, inputs, position, memory, chunk_start, read=None, in_place=False):
        """One decode step (:func:`titans_ext.linear_memory_step` / :func:`titans_ext.mlp_memory_step`)
        on the token ``q [B, H, D]``, ``inputs`` as :meth:`project`'s without the time axis, at stream
        ``position``; returns ``(o [B, H, D], memory, chunk_start)``. With ``in_place`` (a state this
        layer's caller owns, :func:`owned_decode_states`) the in-place steps
        (:func:`titans_ext.linear_memory_step_`, ...) overwrite ``memory`` and the chunk-start
        buffers ``chunk_start`` with the states after the token and return them."""
        k, v, theta, eta, alpha, *learned_delta = inputs
        objective = (self.objective[0], learned_delta[0]) if learned_delta else self.objective
        options = dict(position=position, state=memory, chunk_state=chunk_start, chunk_size=self.chunk_size,
                       read=self.read if read is None else read, objective=objective, retention=self.retention)
        if self.memory_kind == "linear":
            out = (linear_memory_step_ if in_place else linear_memory_step)(q, k, v, theta, eta, alpha, **options)
        else:
            out = (mlp_memory_step_ if in_place else mlp_memory_step)(q, k, v, theta, eta, alpha,
                                                                      activation=self.activation, **options)
        return (out, memory, chunk_start) if in_place else out

    def forward(self, x, state=None, cu_seqlens=None):
        """``x [B, T, dim]``, ``state`` a :class:`MemoryState` or None -> ``(y [B, T, dim], state)``.

        ``cu_seqlens``: packed documents (:mod:`titans_ext.model.packed`), ``x [1, T, dim]``; each
        document is written and read as if alone, from the learned initial memory (its chunks
        and convolutions start at its first token); ``state`` must be None and None is returned.
        """
        o, state = self.update(x, state, cu_seqlens)
        return self.output(o, x), state

    def update(self, x, state=None, cu_seqlens=None):
        """Writes ``x [B, T, dim]`` into the memory, each token reading after its own update.

        Returns the reads before the output transform, ``o [B, T, H, D]`` (``forward`` is
        ``output(o, x)``), and the new :class:`MemoryState` (None with ``cu_seqlens``). A block
        that transforms the reads of several calls at once uses this.
        """
        check_input("x", x, self.dim)
        B, T, _ = x.shape
        if cu_seqlens is not None:
            return self._update_packed(x, state, cu_seqlens), None
        if state is None:
            state = self.initial_state(B, x.dtype, x.device)
        elif state.step_position is None:  # a state put together by hand
            state = dataclasses.replace(
                state, step_position=torch.full((), state.position, dtype=torch.int64, device=x.device))
        q, inputs, conv_cache = self.project(x, state.conv_cache)
        if torch.is_grad_enabled() and self._needs_grad(q, inputs, state):
            o, new_state = self._replay(q, inputs, state)
        else:
            o, new_state = self._decode(q, inputs, state)
        new_state.conv_cache, new_state.position = conv_cache, state.position + T
        new_state.step_position = state.step_position + T
        return o, new_state

    @staticmethod
    def _needs_grad(q, inputs, state):
        tensors = [q, *inputs]
        map_tensors(tensors.append, (state.memory, state.replay))
        return any(t.requires_grad for t in tensors)

    def _update_packed(self, x, state, cu_seqlens):
        """The reads of the packed documents of ``x [1, T, dim]``: one op call over all of them."""
        n_documents = check_packed(x, state, cu_seqlens)
        _, document_position = document_positions(cu_seqlens, x.shape[1])
        start = self.initial_state(n_documents, x.dtype, x.device)
        q, inputs, _ = self.project(x, start.conv_cache[:1], document_position)
        o, _ = self.run_op(q, inputs, start.memory, output_final_state=False, cu_seqlens=cu_seqlens)
        return o

    def _decode(self, q, inputs, state):
        """Without autograd: decode steps for the tokens of chunks shared with other calls, the
        chunked op for the call's whole chunks."""
        C, T = self.chunk_size, q.shape[1]
        position, memory, chunk_start = state.position, state.memory, state.chunk_start
        if position % C and chunk_start is None:
            memory, chunk_start = self._chunk_start_from_replay(state)
        outputs = []

        def run_steps(start, end, memory, chunk_start):
            in_place = start < end and decoding_in_place() and self._owns(memory)
            if in_place and chunk_start is None:
                chunk_start = empty_chunk_state(memory, read=self.read, retention=self.retention)
            for t in range(start, end):
                token, position = tuple(x[:, t] for x in inputs), state.step_position + t if t else state.step_position
                o, memory, chunk_start = self.step(q[:, t], token, position, memory, chunk_start, in_place=in_place)
                outputs.append(o.unsqueeze(1))
            return memory, chunk_start

        head = min(T, -position % C)
        # One token is a step even when it fills a chunk (chunk_size 1): a decoded token costs one launch.
        whole = (T - head) // C * C if T > 1 else 0
        memory, chunk_start = run_steps(0, head, memory, chunk_start)
        if whole:
            o, memory = self.run_op(q[:, head:head + whole], tuple(x[:, head:head + whole] for x in inputs), memory,
                                    output_final_state=True)
            outputs.append(o)
        memory, chunk_start = run_steps(head + whole, T, memory, chunk_start)
        o = torch.cat(outputs, dim=1) if outputs else q
        return o, MemoryState(memory=memory, conv_cache=state.conv_cache, chunk_start=chunk_start)

    def _owns(self, memory):
        """Whether the in-place steps take ``memory`` as it is: every tensor given (MLP momenta too),
        contiguous, in the state dtype."""
        tensors = [memory[0], memory[1]] if self.memory_kind == "linear" else [*memory[0], *(memory[1] or (None,))]
        dtype = tensors[0].dtype
        return all(t is not None and t.dtype == dtype and t.is_contiguous() for t in tensors) and \
            dtype in (torch.float32, torch.float64)

    def _chunk_start_from_replay(self, state):
        """The running and the chunk-start state of a stream last advanced with autograd: the
        pending tokens stepped from the chunk boundary (their outputs are not needed)."""
        if state.replay is None:
            raise ValueError("state: expected a MemoryState from this layer, got one in the middle of a chunk "
                             "with neither a chunk_start nor a replay")
        memory, pending = state.replay
        n = pending[0].shape[1]
        chunk_start = None
        for t in range(n):
            token = tuple(x[:, t] for x in pending)
            memory, chunk_start = self.step(torch.zeros_like(token[0]), token, state.position - n + t, memory,
                                            chunk_start)[1:]
        return memory, chunk_start

    def _replay(self, q, inputs, state):
        """With autograd: the chunked op from the last chunk boundary on the pending tokens and the
        call's own (the decode steps have no backward)."""
        B, C = q.shape[0], self.chunk_size
        if state.replay is None:
            if state.position % C:
                raise ValueError(
                    f"state: the stream is at position {state.position}, inside a chunk of {C} tokens, and was "
                    "advanced by decode steps (without autograd), whose tokens gradients cannot flow through; "
                    "continue it under torch.no_grad(), or run the calls that need gradients from a chunk boundary")
            pending = tuple(x[:, :0] for x in inputs)
            boundary = state.memory
        else:
            boundary, pending = state.replay
        n_pending = pending[0].shape[1]
        if n_pending:
            # Replay the tokens since the last boundary so that chunks are counted from the stream's start;
            # their queries are placeholders (their outputs were returned by an earlier call).
            q = torch.cat([q.new_zeros(B, n_pending, *q.shape[2:]), q], dim=1)
            inputs = tuple(torch.cat([old.to(new.dtype), new], dim=1) for old, new in zip(pending, inputs))
        n_complete = (q.shape[1] // C) * C
        outputs, memory = [], boundary
        if n_complete > 0:
            o, boundary = self.run_op(time_range(q, 0, n_complete), tuple(time_range(t, 0, n_complete) for t in inputs),
                                      boundary, output_final_state=True)
            outputs.append(o)
            memory = boundary
        if q.shape[1] > n_complete:
            o, memory = self.run_op(time_range(q, n_complete), tuple(time_range(t, n_complete) for t in inputs),
                                    boundary, output_final_state=True)
            outputs.append(o)
        o = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1) if outputs else q
        o = time_range(o, n_pending)
        pending = tuple(t[:, n_complete:] for t in inputs)
        replay = (boundary, pending) if pending[0].shape[1] else None
        return o, MemoryState(memory=memory, conv_cache=state.conv_cache, replay=replay)

    def lookup(self, q, memory):
        """Reads ``memory`` (op state format) with unit queries ``q [B, T, H, D]``, writing nothing.

        Returns ``o [B, T, H, D]``: every token reads ``memory`` as the op reads it at a chunk
        start. The read ops (:func:`titans_ext.ops.linear_memory_read`, ``mlp_memory_read``) do
        it without the inner-gradient work of an op call, for any T on every device (an op call
        over T tokens in one chunk would need ``chunk_size = T``, which the CUDA kernels cap).
        With the ``lq`` retention the state is the accumulator A and the op reads the weights
        ``rho0 A`` (``docs/miras.md`` §2.3), each weight matrix with its own scale.
        """
        weights = memory[0]
        if self.retention.kind == "lq":
            q_norm = self.retention.q
            weights = (lq_scale(weights, q_norm) * weights if self.memory_kind == "linear"
                       else tuple(lq_scale(w, q_norm) * w for w in weights))
        if self.memory_kind == "linear":
            return linear_memory_read(q, weights)
        return mlp_memory_read(q, weights, self.activation)

    def retrieve(self, x, memory, conv_cache):
        """Reads ``memory`` (op state format) with the queries of ``x [B, T, dim]``, writing nothing.

        Returns ``(y [B, T, dim], conv_cache)``; ``conv_cache [B, conv_kernel - 1, H * D]`` is the
        history of the query convolution of ``x``'s own stream (zeros at its start). This is the
        read of a memory-as-context block at a segment start.
        """
        check_input("x", x, self.dim)
        q, conv_cache = self.queries(x, conv_cache)
        return self.output(self.lookup(q, memory), x), conv_cache
