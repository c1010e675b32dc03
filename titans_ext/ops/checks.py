"""Argument checks shared by the ops and the references.

Every error names the argument and says what was expected, so a user sees
``ValueError: k: expected shape [B, T, H, Dk] = [2, 100, 4, 64], got [2, 99, 4, 64]`` instead of
a crash inside a kernel.
"""

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


def _check_finite_gates(gates):
    # Data-dependent: a host sync on GPUs and not traceable, so it is skipped under torch.compile.
    if torch.compiler.is_compiling():
        return
    for name, g in gates.items():
        if not bool(torch.isfinite(g).all()):
            raise ValueError(f"{name}: gates must be finite (found NaN or inf)")


def _check_common(q, k, v, theta, eta, alpha, chunk_size, read):
    check_tensor("q", q, 4)
    B, T, H, Dk = q.shape
    check_tensor("k", k, 4)
    check_shape("k", k, (B, T, H, Dk), ("B", "T", "H", "Dk"))
    check_tensor("v", v, 4)
    check_shape("v", v, (B, T, H, v.shape[-1]), ("B", "T", "H", "Dv"))
    gates = {"theta": theta, "eta": eta, "alpha": alpha}
    for name, g in gates.items():
        check_tensor(name, g, 3)
        check_shape(name, g, (B, T, H), ("B", "T", "H"))
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
    _check_finite_gates(gates)
    return B, T, H, Dk, v.shape[-1]


def _check_state_pair(name, pair, shape, dims, device):
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(f"{name}: expected a pair of tensors or None, got {type(pair).__name__}")
    for i, t in enumerate(pair):
        label = f"{name}[{i}]"
        check_tensor(label, t, len(shape), dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16))
        check_shape(label, t, shape, dims)
        check_device(label, t, device)


def check_linear_inputs(q, k, v, theta, eta, alpha, chunk_size, read, initial_state):
    """Validates the arguments of ``linear_memory``; returns ``(B, T, H, Dk, Dv)``."""
    B, T, H, Dk, Dv = _check_common(q, k, v, theta, eta, alpha, chunk_size, read)
    if initial_state is not None:
        _check_state_pair("initial_state", initial_state, (B, H, Dv, Dk), ("B", "H", "Dv", "Dk"), q.device)
    return B, T, H, Dk, Dv


def check_mlp_inputs(q, k, v, theta, eta, alpha, weights, chunk_size, read, activation, momentum):
    """Validates the arguments of ``mlp_memory``; returns ``(B, T, H, D, N)`` with N = E * D."""
    B, T, H, Dk, Dv = _check_common(q, k, v, theta, eta, alpha, chunk_size, read)
    if Dk != Dv:
        raise ValueError(f"v: the MLP memory needs Dk == Dv (M(x) = x + W2 act(W1 x)), got Dk={Dk}, Dv={Dv}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    if not isinstance(weights, (tuple, list)) or len(weights) != 2:
        raise TypeError(f"weights: expected a pair (W1 [B, H, E*D, D], W2 [B, H, D, E*D]), got {type(weights).__name__}")
    W1, W2 = weights
    check_tensor("weights[0]", W1, 4)
    N = W1.shape[2]
    if N % Dk != 0 or N == 0:
        raise ValueError(f"weights[0]: expected shape [B, H, E*D, D] with E*D a positive multiple of D={Dk}, got {_shape(W1)}")
    check_shape("weights[0]", W1, (B, H, N, Dk), ("B", "H", "E*D", "D"))
    check_device("weights[0]", W1, q.device)
    check_tensor("weights[1]", W2, 4)
    check_shape("weights[1]", W2, (B, H, Dk, N), ("B", "H", "D", "E*D"))
    check_device("weights[1]", W2, q.device)
    if momentum is not None:
        if not isinstance(momentum, (tuple, list)) or len(momentum) != 2:
            raise TypeError(f"momentum: expected a pair (S1, S2) or None, got {type(momentum).__name__}")
        dims = (("B", "H", "E*D", "D"), ("B", "H", "D", "E*D"))
        for i, (s, w) in enumerate(zip(momentum, weights)):
            check_tensor(f"momentum[{i}]", s, 4)
            check_shape(f"momentum[{i}]", s, tuple(w.shape), dims[i])
            check_device(f"momentum[{i}]", s, q.device)
    return B, T, H, Dk, N


def state_dtype_for(dtype):
    """Memory state and gates are fp32, or fp64 when the inputs are fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32
