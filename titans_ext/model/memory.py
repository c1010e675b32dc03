"""``NeuralMemory``: the Titans long-term memory as a layer, with a streaming state.

The layer projects its input to per-head queries, keys and values, gates from the same input,
and hands them to the public ops (:func:`titans_ext.linear_memory`,
:func:`titans_ext.mlp_memory`); it has no memory math of its own.

Streaming. The ops split a call into chunks starting at the call's first token, and a token's
inner gradient is taken at the memory before its chunk. So that pieces of any length give the
one-shot result, chunks are counted from the start of the stream: the state keeps the memory
at the last chunk boundary of the stream and the op inputs (k, v, gates) of the tokens since
then, fewer than a chunk. A call replays those tokens from the boundary together with its own,
so at most ``chunk_size - 1`` tokens are recomputed per call.
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import linear_memory
from ..ops.checks import parse_objective, parse_retention, state_dtype_for
from .checks import (check_choice, check_input, check_positive_int, check_positive_number,
                     check_unit_interval)

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
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(fn, item) for item in obj)
    return obj


def detach_state(state):
    """A copy of a streaming state (any nest of state dataclasses) cut from the autograd graph.

    Use it between segments of truncated backpropagation through time.
    """
    return map_tensors(torch.Tensor.detach, state)


@dataclass
class MemoryState:
    """Streaming state of a :class:`NeuralMemory`.

    Attributes:
        memory: the op state at the stream's last chunk boundary: ``(M, S)``, each
            ``[B, H, D, D]``, for the linear memory; ``((W1, W2), (S1, S2))`` for the MLP memory.
            fp32 (fp64 for fp64 inputs).
        pending: ``(k, v, theta, eta, alpha)`` of the tokens after that boundary, which the next
            call replays: k, v ``[B, n, H, D]``, gates ``[B, n, H]``, ``n < chunk_size``; with a
            learned delta also its ``[B, n, H, D]`` values.
        conv_cache: the last ``conv_kernel - 1`` projected inputs ``[B, conv_kernel - 1, 3 * H * D]``
            (q, k, v side by side), the history of the causal convolutions.
        position: tokens seen so far.
    """

    memory: tuple
    pending: tuple
    conv_cache: torch.Tensor
    position: int = 0

    def detach(self):
        """This state cut from the autograd graph (for truncated backpropagation through time)."""
        return detach_state(self)

    @property
    def n_pending(self):
        return self.pending[0].shape[1]


class CausalDepthwiseConv(nn.Module):
    """Depthwise causal 1-d convolution over time with an explicit history.

    ``forward(x [B, T, C], history [B, K-1, C]) -> (y [B, T, C], new history)``; a zero history is
    the start of a stream, so a stream cut anywhere convolves the same as in one piece.
    """

    def __init__(self, channels, kernel_size):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels)

    def forward(self, x, history):
        padded = torch.cat([history.to(x.dtype), x], dim=1)
        y = self.conv(padded.transpose(1, 2)).transpose(1, 2)
        return y, padded[:, padded.shape[1] - (self.kernel_size - 1):]


class NeuralMemory(nn.Module):
    r"""Titans neural long-term memory layer (multi-head), over the public memory ops.

    ``x [B, T, dim] -> y [B, T, dim]``. Per token and head::

        q, k, v = SiLU(causal_depthwise_conv(W_{q,k,v} x))      # then q, k l2-normalized
        theta = max_lr * sigmoid(w_theta x),  eta = max_momentum * sigmoid(w_eta x),  alpha = sigmoid(w_alpha x)
        o = memory op(q, k, v, theta, eta, alpha; learned initial memory; objective, retention)
        y = W_out(RMSNorm(o) * SiLU(W_gate x))

    The memory learns ``k -> v`` at test time (see :func:`titans_ext.linear_memory`).

    Stability: keys are unit vectors and the gates are bounded, so a chunk's inner steps add up
    to at most ``2 * max_lr * chunk_size`` along one key direction, amplified by the momentum up
    to about ``1 / (1 - max_momentum)``. The default ``max_lr = min(0.25, (1 - max_momentum) /
    (2 * chunk_size))`` keeps the linear memory's chunk-to-chunk map non-expanding for any gate
    values even when all keys of a chunk coincide (the worst case), so long sequences stay finite
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
        max_momentum: upper bound of the momentum gate eta, in [0, 1] (default 0.9, or the
            preset's); 0 is plain gradient descent.
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

    ``forward(x, state=None) -> (y, state)``: ``state`` is a :class:`MemoryState` (None: the
    learned initial memory); feeding a sequence in pieces with the state carried gives the
    outputs of one call.
    """

    def __init__(self, dim, heads=4, head_dim=None, memory=None, expansion=2, chunk_size=16, conv_kernel=4,
                 max_lr=None, max_momentum=None, activation="gelu", read="token", objective=None, retention=None,
                 preset=None):
        super().__init__()
        if preset is not None:
            check_choice("preset", preset, tuple(PRESETS))
        chosen = PRESETS.get(preset, dict(memory="linear", objective="l2", retention="l2", max_momentum=0.9))
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
            max_lr = min(0.25, (1 - max_momentum) / (2 * chunk_size))
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
        pending = (torch.zeros(batch_size, 0, H, D, dtype=dtype, device=device),
                   torch.zeros(batch_size, 0, H, D, dtype=dtype, device=device),
                   *(torch.zeros(batch_size, 0, H, dtype=state_dtype, device=device) for _ in range(3)))
        if self.delta_proj is not None:
            pending += (torch.zeros(batch_size, 0, H, D, dtype=state_dtype, device=device),)
        conv_cache = torch.zeros(batch_size, self.qkv_conv.kernel_size - 1, 3 * H * D, dtype=dtype, device=device)
        return MemoryState(memory=memory, pending=pending, conv_cache=conv_cache)

    def project(self, x, conv_cache):
        """Op inputs of ``x [B, T, dim]``: ``q [B, T, H, D]`` (unit), the per-token inputs the memory
        learns from, ``(k, v, theta, eta, alpha)`` (k unit, gates ``[B, T, H]`` in fp32, fp64 for
        fp64 x) plus a learned delta ``[B, T, H, D]`` when there is one, and the new conv cache."""
        B, T, _ = x.shape
        qkv, conv_cache = self.qkv_conv(self.qkv_proj(x), conv_cache)
        q, k, v = F.silu(qkv).view(B, T, 3, self.heads, self.head_dim).unbind(dim=2)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        state_dtype = state_dtype_for(x.dtype)
        gates = torch.sigmoid(self.gate_proj(x).to(state_dtype)).view(B, T, 3, self.heads)
        inputs = (k, v, self.max_lr * gates[:, :, 0], self.max_momentum * gates[:, :, 1], gates[:, :, 2])
        if self.delta_proj is not None:
            inputs += (F.softplus(self.delta_proj(x).to(state_dtype)).view(B, T, self.heads, self.head_dim),)
        return q, inputs, conv_cache

    def output(self, o, x):
        """``y = W_out(RMSNorm(o) * SiLU(W_gate x))`` for op outputs ``o [B, T, H, D]``, inputs ``x [B, T, dim]``."""
        B, T = o.shape[:2]
        gated = self.out_norm(o.to(x.dtype)).reshape(B, T, -1) * F.silu(self.out_gate(x))
        return self.out_proj(gated)

    def run_op(self, q, inputs, memory, *, output_final_state, chunk_size=None, read=None):
        """Calls the memory op from ``memory`` (op state format, see :class:`MemoryState`) on the
        queries q and the per-token ``inputs`` of :meth:`project`."""
        chunk_size = self.chunk_size if chunk_size is None else chunk_size
        read = self.read if read is None else read
        k, v, theta, eta, alpha, *learned_delta = inputs
        objective = (self.objective[0], learned_delta[0]) if learned_delta else self.objective
        options = dict(chunk_size=chunk_size, output_final_state=output_final_state, read=read, objective=objective,
                       retention=self.retention)
        if self.memory_kind == "linear":
            return linear_memory(q, k, v, theta, eta, alpha, initial_state=memory, **options)
        import titans_ext  # the MLP op is looked up when used: it may be missing from older builds

        if not hasattr(titans_ext, "mlp_memory"):
            raise RuntimeError("memory='mlp' needs titans_ext.mlp_memory, which this build of titans_ext lacks")
        weights, momentum = memory
        return titans_ext.mlp_memory(q, k, v, theta, eta, alpha, weights, momentum=momentum,
                                     activation=self.activation, **options)

    def forward(self, x, state=None):
        """``x [B, T, dim]``, ``state`` a :class:`MemoryState` or None -> ``(y [B, T, dim], state)``."""
        check_input("x", x, self.dim)
        B, T, _ = x.shape
        if state is None:
            state = self.initial_state(B, x.dtype, x.device)
        q, inputs, conv_cache = self.project(x, state.conv_cache)
        n_pending = state.n_pending
        # Replay the tokens since the last boundary so that chunks are counted from the stream's start;
        # their queries are placeholders (their outputs were returned by an earlier call).
        q = torch.cat([q.new_zeros(B, n_pending, *q.shape[2:]), q], dim=1)
        inputs = tuple(torch.cat([old.to(new.dtype), new], dim=1) for old, new in zip(state.pending, inputs))
        n_complete = (q.shape[1] // self.chunk_size) * self.chunk_size
        memory, outputs = state.memory, []
        if n_complete > 0:
            o, memory = self.run_op(q[:, :n_complete], tuple(t[:, :n_complete] for t in inputs), memory,
                                    output_final_state=True)
            outputs.append(o)
        if q.shape[1] > n_complete:
            o, _ = self.run_op(q[:, n_complete:], tuple(t[:, n_complete:] for t in inputs), memory,
                               output_final_state=False)
            outputs.append(o)
        o = torch.cat(outputs, dim=1)[:, n_pending:] if outputs else q[:, n_pending:]
        pending = tuple(t[:, n_complete:] for t in inputs)
        new_state = MemoryState(memory=memory, pending=pending, conv_cache=conv_cache, position=state.position + T)
        return self.output(o, x), new_state

    def retrieve(self, x, memory, conv_cache):
        """Reads ``memory`` (op state format) with the queries of ``x [B, T, dim]``, writing nothing.

        Returns ``(y [B, T, dim], conv_cache)``; ``conv_cache`` is the history of ``x``'s own stream
        (``[B, conv_kernel - 1, 3 * H * D]``). This is the read of a memory-as-context block at a
        segment start.
        """
        check_input("x", x, self.dim)
        q, (k, v, theta, _, _, *learned_delta), conv_cache = self.project(x, conv_cache)
        zero = torch.zeros_like(theta)
        # One chunk spanning the call, read before it: every token reads `memory` itself.
        o, _ = self.run_op(q, (k, v, zero, zero, zero, *learned_delta), memory, output_final_state=False,
                           chunk_size=max(x.shape[1], 1), read="chunk_start")
        return self.output(o, x), conv_cache
