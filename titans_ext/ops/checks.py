"""Argument checks shared by the ops and the references.

Every error names the argument and says what was expected, so a user sees
``ValueError: k: expected shape [B, T, H, Dk] = [2, 100, 4, 64], got [2, 99, 4, 64]`` instead of
a crash inside a kernel.

Two kinds of checks. Shape, dtype and device checks read only metadata and always run. Value
checks (finite gates in their ranges, delta > 0, a usable "kl" state, token ids in range) read
tensor data, which on a GPU is a device-to-host copy that waits for the stream (a host sync: it
stalls every decode step and rules out CUDA-graph capture). They run where
:func:`value_checks_enabled` says so: by default on CPU tensors (no sync there) and not on
others; the environment variable ``TITANS_EXT_CHECK_VALUES=1`` turns them on everywhere and
``TITANS_EXT_CHECK_VALUES=0`` off everywhere.
"""

import math
import os
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
READ_MODES = ("token", "chunk_start")
ACTIVATIONS = ("gelu", "silu")


def _shape(t):
    return list(t.shape)


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def check_tensor(name, t, ndim=None, dtypes=FLOAT_DTYPES):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {_shape(t)}")
    if t.dtype not in dtypes:
        names = ", ".join(_dtype_name(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype in ({names}), got {_dtype_name(t.dtype)}")


def check_shape(name, t, expected, dims):
    if _shape(t) != list(expected):
        raise ValueError(f"{name}: expected shape [{', '.join(dims)}] = {list(expected)}, got {_shape(t)}")


def check_device(name, t, device):
    if t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of q), got {t.device}")


CHECK_VALUES_ENV = "TITANS_EXT_CHECK_VALUES"


def value_checks_enabled(device):
    """Whether the checks that read tensor values run for tensors on ``device``.

    ``TITANS_EXT_CHECK_VALUES`` is read at every call (a dictionary lookup, nothing next to an op
    call), so it can be switched on for a debugging session or a single test without restarting
    or re-importing anything. Unset or empty: on for CPU tensors only. Under ``torch.compile``
    never: a traced graph cannot branch on values.
    """
    if torch.compiler.is_compiling():
        return False
    setting = os.environ.get(CHECK_VALUES_ENV, "")
    if setting == "":
        return device.type == "cpu"
    if setting not in ("0", "1"):
        raise ValueError(f"{CHECK_VALUES_ENV}: expected 0 or 1 (or unset), got {setting!r}")
    return setting == "1"


# Gate ranges (docs/design.md §1): the inner learning rate is non-negative; momentum decay and
# forget gate are fractions of the previous state.
GATE_RANGES = {"theta": (0.0, math.inf), "eta": (0.0, 1.0), "alpha": (0.0, 1.0)}


def _range_text(low, high):
    return f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"


def check_gate_values(gates):
    """Finite gates in their ranges (:data:`GATE_RANGES`); a value check, so it reads the gates'
    data only where :func:`value_checks_enabled` allows (one host sync for all gates on a GPU)."""
    first = next(iter(gates.values()))
    if first.numel() == 0 or not value_checks_enabled(first.device):
        return
    # Comparisons with NaN are false and the upper bound is strict when it is inf, so two comparisons
    # per gate reject NaN and inf too (this runs at every decode step on the CPU).
    valid = [((g >= low) & (g < high if high == math.inf else g <= high)).all()
             for (low, high), g in ((GATE_RANGES[name], g) for name, g in gates.items())]
    for (name, g), ok in zip(gates.items(), torch.stack(valid).tolist()):
        if ok:
            continue
        if not bool(torch.isfinite(g).all()):
            raise ValueError(f"{name}: gates must be finite (found NaN or inf)")
        raise ValueError(f"{name}: expected values {_range_text(*GATE_RANGES[name])}, "
                         f"got values in [{g.min().item():g}, {g.max().item():g}]")


def check_token_inputs(q, k, v, theta, eta, alpha, chunk_size, read, check_values=True, token_axis=True):
    """q, k, v, the gates, chunk_size and read of an op call (``token_axis``: q ``[B, T, H, Dk]``,
    gates ``[B, T, H]``) or of a decode step (q ``[B, H, Dk]``, gates ``[B, H]``); returns q's
    leading sizes, Dk and Dv: ``(B, T, H, Dk, Dv)`` or ``(B, H, Dk, Dv)``."""
    lead_names = ("B", "T", "H") if token_axis else ("B", "H")
    check_tensor("q", q, len(lead_names) + 1)
    lead, Dk = tuple(q.shape[:-1]), q.shape[-1]
    check_tensor("k", k, len(lead) + 1)
    check_shape("k", k, (*lead, Dk), (*lead_names, "Dk"))
    check_tensor("v", v, len(lead) + 1)
    check_shape("v", v, (*lead, v.shape[-1]), (*lead_names, "Dv"))
    gates = {"theta": theta, "eta": eta, "alpha": alpha}
    for name, g in gates.items():
        check_tensor(name, g, len(lead))
        check_shape(name, g, lead, lead_names)
    for name, t in (("k", k), ("v", v), *gates.items()):
        check_device(name, t, q.device)
        if t.dtype != q.dtype and not (name in gates and t.dtype in (torch.float32, torch.float64)):
            raise TypeError(f"{name}: expected dtype {_dtype_name(q.dtype)} (the dtype of q), got {_dtype_name(t.dtype)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size: expected an int >= 1, got {chunk_size!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected an int >= 1, got {chunk_size}")
    if read not in READ_MODES:
        raise ValueError(f"read: expected one of {READ_MODES}, got {read!r}")
    if check_values:
        check_gate_values(gates)
    return (*lead, Dk, v.shape[-1])


# Packed variable-length sequences (FlashAttention's cu_seqlens, docs/design.md §6).
OFFSET_DTYPES = (torch.int32, torch.int64)


def check_cu_seqlens(cu_seqlens, q):
    """Validates ``cu_seqlens``, the ``[N + 1]`` token offsets of N sequences packed along T of
    ``q [1, T, H, D]``; returns N. Sequence i is tokens ``cu_seqlens[i] .. cu_seqlens[i + 1] - 1``
    (empty when the two are equal). The offsets' values (0 first, T last, non-decreasing) are a
    value check (:func:`value_checks_enabled`): on a GPU reading them is a host sync."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens: expected a torch.Tensor of N + 1 offsets or None, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in OFFSET_DTYPES:
        raise TypeError(f"cu_seqlens: expected dtype int32 or int64, got {_dtype_name(cu_seqlens.dtype)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected a 1-d tensor of N + 1 offsets, N >= 1, got shape {_shape(cu_seqlens)}")
    check_device("cu_seqlens", cu_seqlens, q.device)
    B, T = q.shape[:2]
    if B != 1:
        raise ValueError(f"cu_seqlens: packed sequences need B = 1 (the sequences concatenated along T), "
                         f"got q of shape {_shape(q)}")
    if value_checks_enabled(cu_seqlens.device):
        offsets = cu_seqlens.tolist()
        if offsets[0] != 0:
            raise ValueError(f"cu_seqlens: expected offsets starting at 0, got {offsets[0]}")
        if offsets[-1] != T:
            raise ValueError(f"cu_seqlens: expected offsets ending at T = {T} (the tokens of q), got {offsets[-1]}")
        for i, (begin, end) in enumerate(zip(offsets, offsets[1:])):
            if end < begin:
                raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got {begin} then {end} "
                                 f"(entries {i} and {i + 1})")
    return cu_seqlens.shape[0] - 1


def chunk_slots(T, chunk_size, cu_seqlens, device_type="cpu", unit=1):
    """Saved chunk-start states per (batch, head), one per ``unit`` consecutive chunks of a sequence,
    so that no shape depends on the offsets' values (torch.compile): without ``cu_seqlens``
    ``ceil(ceil(T / chunk_size) / unit)``; with N sequences on the CPU (unit 1)
    ``(T + N (chunk_size - 1)) // chunk_size``, the most chunks any split of T tokens into N
    sequences has; on CUDA ``T // (chunk_size unit) + N``, the bound under which the kernels place
    each sequence's entries from its offset alone, without a prefix sum (csrc/cuda/common/sequences.h)."""
    if cu_seqlens is None:
        return ((T + chunk_size - 1) // chunk_size + unit - 1) // unit
    n_seqs = cu_seqlens.shape[0] - 1
    if device_type == "cuda":
        return T // (chunk_size * unit) + n_seqs
    return (T + n_seqs * (chunk_size - 1)) // chunk_size


def state_rows(B, cu_seqlens):
    """Rows of the initial and final states: B, or N with cu_seqlens."""
    return B if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _check_state_pair(name, pair, shape, dims, device):
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{name}: expected a pair of tensors or None, got {type(pair).__name__}")
    for i, t in enumerate(pair):
        label = f"{name}[{i}]"
        check_tensor(label, t, len(shape), dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16))
        check_shape(label, t, shape, dims)
        check_device(label, t, device)


def _check_common_and_offsets(q, k, v, theta, eta, alpha, chunk_size, read, check_values, cu_seqlens):
    """:func:`check_token_inputs` and ``cu_seqlens``; returns its sizes and the states' leading dim and
    its name (B, or N with cu_seqlens)."""
    sizes = check_token_inputs(q, k, v, theta, eta, alpha, chunk_size, read, check_values)
    if cu_seqlens is None:
        return sizes, sizes[0], "B"
    return sizes, check_cu_seqlens(cu_seqlens, q), "N"


def check_linear_inputs(q, k, v, theta, eta, alpha, chunk_size, read, initial_state, check_values=True,
                        cu_seqlens=None):
    """Validates the arguments of ``linear_memory``; returns ``(B, T, H, Dk, Dv)``.

    ``check_values=False`` leaves out the gates' value checks (:func:`check_gate_values`), for a
    caller that hands the same gates to the op, which checks them. With ``cu_seqlens``
    (:func:`check_cu_seqlens`) the states are ``[N, H, Dv, Dk]``.
    """
    (B, T, H, Dk, Dv), rows, rows_name = _check_common_and_offsets(q, k, v, theta, eta, alpha, chunk_size, read,
                                                                   check_values, cu_seqlens)
    if initial_state is not None:
        _check_state_pair("initial_state", initial_state, (rows, H, Dv, Dk), (rows_name, "H", "Dv", "Dk"), q.device)
    return B, T, H, Dk, Dv


def check_mlp_inputs(q, k, v, theta, eta, alpha, weights, chunk_size, read, activation, momentum, cu_seqlens=None):
    """Validates the arguments of ``mlp_memory``; returns ``(B, T, H, D, N)`` with N = E * D. With
    ``cu_seqlens`` (:func:`check_cu_seqlens`) the weights and momenta have one row per sequence."""
    (B, T, H, Dk, Dv), rows, rows_name = _check_common_and_offsets(q, k, v, theta, eta, alpha, chunk_size, read,
                                                                   True, cu_seqlens)
    if Dk != Dv:
        raise ValueError(f"v: the MLP memory needs Dk == Dv (M(x) = x + W2 act(W1 x)), got Dk={Dk}, Dv={Dv}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(weights, (tuple, list)) or len(weights) != 2:
        raise TypeError(f"weights: expected a pair (W1 [{rows_name}, H, E*D, D], W2 [{rows_name}, H, D, E*D]), "
                        f"got {type(weights).__name__}")
    W1, W2 = weights
    check_tensor("weights[0]", W1, 4)
    N = W1.shape[2]
    if N % Dk != 0 or N == 0:
        raise ValueError(f"weights[0]: expected shape [{rows_name}, H, E*D, D] with E*D a positive multiple of "
                         f"D={Dk}, got {_shape(W1)}")
    check_shape("weights[0]", W1, (rows, H, N, Dk), (rows_name, "H", "E*D", "D"))
    check_device("weights[0]", W1, q.device)
    check_tensor("weights[1]", W2, 4)
    check_shape("weights[1]", W2, (rows, H, Dk, N), (rows_name, "H", "D", "E*D"))
    check_device("weights[1]", W2, q.device)
    if momentum is not None:
        if not isinstance(momentum, (tuple, list)) or len(momentum) != 2:
            raise TypeError(f"momentum: expected a pair (S1, S2) or None, got {type(momentum).__name__}")
        dims = ((rows_name, "H", "E*D", "D"), (rows_name, "H", "D", "E*D"))
        for i, (s, w) in enumerate(zip(momentum, weights)):
            check_tensor(f"momentum[{i}]", s, 4)
            check_shape(f"momentum[{i}]", s, tuple(w.shape), dims[i])
            check_device(f"momentum[{i}]", s, q.device)
    return B, T, H, Dk, N


def state_dtype_for(dtype):
    """Memory state and gates are fp32, or fp64 when the inputs are fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# MIRAS options (docs/miras.md §2). The integer codes are the kernels' (enum
# ObjectiveKind / RetentionKind in csrc/titans_params.h); keep the two lists in the same order.
OBJECTIVES = ("l2", "lp", "huber", "pseudo_huber", "yaad")
RETENTIONS = ("l2", "lq", "kl")
# Entries of a "kl" memory are clamped to this before the log (docs/miras.md §2.3).
KL_LOG_FLOOR = 1e-6
_DELTA_OBJECTIVES = ("huber", "pseudo_huber", "yaad")
_OBJECTIVE_FORMS = ('"l2", ("lp", p), ("lp", p, eps), ("huber", delta), ("pseudo_huber", delta) '
                    'or ("yaad", delta)')


@dataclass(frozen=True)
class Objective:
    """A parsed ``objective=`` argument: the error map f(r) applied to the residual r = M(k) - v.

    ``delta`` is a float or a tensor broadcastable to ``[B, T, H]`` or ``[B, T, H, Dv]`` (huber,
    pseudo_huber, yaad), else None; ``p`` and ``eps`` are lp's exponent and smoothing.
    """

    kind: str = "l2"
    p: float = 2.0
    eps: float = 0.0
    delta: object = None

    @property
    def code(self):
        return OBJECTIVES.index(self.kind)


@dataclass(frozen=True)
class Retention:
    """A parsed ``retention=`` argument; ``q`` is the exponent of ``("lq", q)``."""

    kind: str = "l2"
    q: float = 2.0

    @property
    def code(self):
        return RETENTIONS.index(self.kind)


# The parsed forms of the plain options (frozen, so shared): a decode step parses its options at
# every token.
_L2_OBJECTIVE = Objective()
_PLAIN_RETENTIONS = {"l2": Retention("l2"), "kl": Retention("kl")}


def _real(name, x):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name}: expected a real number, got {x!r}")
    return float(x)


def parse_objective(objective):
    """``objective=`` as an :class:`Objective`; raises a ValueError/TypeError naming the argument."""
    if isinstance(objective, Objective):
        return objective
    if objective == "l2":
        return _L2_OBJECTIVE
    if not isinstance(objective, (tuple, list)) or not objective or objective[0] not in OBJECTIVES[1:]:
        raise ValueError(f"objective: expected {_OBJECTIVE_FORMS}, got {objective!r}")
    kind, *args = objective
    if kind == "lp":
        if len(args) not in (1, 2):
            raise ValueError(f'objective: expected ("lp", p) or ("lp", p, eps), got {objective!r}')
        p = _real("objective (p)", args[0])
        eps = _real("objective (eps)", args[1]) if len(args) == 2 else 0.0
        if not p >= 1:
            raise ValueError(f"objective: lp needs p >= 1, got p={p}")
        if not eps >= 0:
            raise ValueError(f"objective: lp needs eps >= 0, got eps={eps}")
        if eps == 0 and p < 2:
            raise ValueError(f"objective: lp with p={p} < 2 needs eps > 0 (its derivative is unbounded at r = 0)")
        return Objective("lp", p=p, eps=eps)
    if len(args) != 1:
        raise ValueError(f'objective: expected ("{kind}", delta), got {objective!r}')
    delta = args[0]
    if isinstance(delta, torch.Tensor):
        check_tensor("delta", delta)
    elif not _real("delta", delta) > 0:
        raise ValueError(f"delta: expected delta > 0, got {delta}")
    return Objective(kind, delta=delta)


def parse_retention(retention):
    """``retention=`` as a :class:`Retention`; raises a ValueError/TypeError naming the argument."""
    if isinstance(retention, Retention):
        return retention
    if isinstance(retention, str) and retention in _PLAIN_RETENTIONS:
        return _PLAIN_RETENTIONS[retention]
    if isinstance(retention, (tuple, list)) and len(retention) == 2 and retention[0] == "lq":
        q = _real("retention (q)", retention[1])
        if not q > 1:
            raise ValueError(f"retention: lq needs q > 1, got q={q}")
        return Retention("lq", q=q)
    raise ValueError(f'retention: expected "l2", ("lq", q) or "kl", got {retention!r}')


def expand_delta(objective, shape, device, dtype):
    """The objective's delta as a ``[B, T, H, Dv]`` tensor (an autograd-tracked broadcast, so its
    gradient sums back to delta's own shape), or None when the objective has no delta.

    A tensor of at most 3 dims broadcasts against ``[B, T, H]`` (scalar, per head, per token); a
    4-d one against ``[B, T, H, Dv]`` (per channel).
    """
    if objective.kind not in _DELTA_OBJECTIVES:
        return None
    delta = objective.delta
    if not isinstance(delta, torch.Tensor):
        return torch.full(shape, delta, device=device, dtype=dtype)
    check_device("delta", delta, device)
    B, T, H, Dv = shape
    try:
        per_token = delta.dim() <= 3
        target = (B, T, H) if per_token else shape
        delta = torch.broadcast_to(delta, target)
    except RuntimeError:
        raise ValueError(f"delta: expected a tensor broadcastable to [B, T, H] = {[B, T, H]} or "
                         f"[B, T, H, Dv] = {list(shape)}, got shape {_shape(objective.delta)}") from None
    if value_checks_enabled(device) and not bool((delta > 0).all()):
        raise ValueError("delta: expected delta > 0 everywhere")
    delta = delta.to(dtype)
    return delta[..., None].expand(shape) if per_token else delta


def check_kl_state(retention, memories, name):
    """A "kl" memory is read through log max(M, KL_LOG_FLOOR): a row without a positive entry
    (a zero memory, say) carries nothing. Single entries <= 0 are legal: the linear steps inside
    a chunk produce them, and a returned state must be accepted back (streaming)."""
    if retention.kind != "kl" or not memories or not value_checks_enabled(memories[0].device):
        return
    if not all(bool((m > 0).any(dim=-1).all()) for m in memories):
        raise ValueError(f'{name}: retention="kl" needs a memory with a positive entry in every row '
                         '(it enters through log M; the default is uniform rows 1/Dk)')


def check_miras_args(objective, retention, initial_memories, shape, device, dtype, memory_name="initial_state"):
    """Parses ``objective=`` and ``retention=``; returns ``(Objective, Retention, delta)`` with
    delta broadcast to ``shape = [B, T, H, Dv]`` in ``dtype`` (None without one).
    ``initial_memories``: the given initial weight matrices (checked for ``kl``)."""
    objective, retention = parse_objective(objective), parse_retention(retention)
    delta = expand_delta(objective, shape, device, dtype)
    check_kl_state(retention, initial_memories, memory_name)
    return objective, retention, delta
