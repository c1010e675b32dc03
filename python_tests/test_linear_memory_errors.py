"""Bad input to linear_memory gets a ValueError/TypeError naming the argument."""

import pytest
import torch

import titans_ext

from utils import memory_inputs


def _args():
    inputs, init = memory_inputs(2, 10, 3, 4, 5)
    return dict(zip(["q", "k", "v", "theta", "eta", "alpha"], inputs)), init


def _call(args, **kwargs):
    return titans_ext.linear_memory(*args.values(), **kwargs)


@pytest.mark.parametrize("name, bad, error, match", [
    ("q", lambda a: a["q"][0], ValueError, r"q: expected a 4-d tensor"),
    ("k", lambda a: a["k"][:, :9], ValueError, r"k: expected shape \[B, T, H, Dk\] = \[2, 10, 3, 4\]"),
    ("k", lambda a: a["k"][..., :3], ValueError, r"k: expected shape"),
    ("v", lambda a: a["v"][:, :, :2], ValueError, r"v: expected shape \[B, T, H, Dv\]"),
    ("theta", lambda a: a["theta"][..., None], ValueError, r"theta: expected a 3-d tensor"),
    ("eta", lambda a: a["eta"][1:], ValueError, r"eta: expected shape \[B, T, H\] = \[2, 10, 3\]"),
    ("alpha", lambda a: a["alpha"].to(torch.int64), TypeError, r"alpha: expected dtype in"),
    ("q", lambda a: a["q"].to(torch.int32), TypeError, r"q: expected dtype in"),
    ("k", lambda a: a["k"].double(), TypeError, r"k: expected dtype float32 \(the dtype of q\)"),
    ("v", lambda a: a["v"].tolist(), TypeError, r"v: expected a torch.Tensor, got list"),
    ("k", lambda a: a["k"].to("meta"), ValueError, r"k: expected a tensor on cpu"),
])
def test_bad_tensor(name, bad, error, match):
    args, _ = _args()
    args[name] = bad(args)
    with pytest.raises(error, match=match):
        _call(args)


@pytest.mark.parametrize("gate", ["theta", "eta", "alpha"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_gates(gate, value):
    args, _ = _args()
    args[gate][1, 4, 2] = value
    with pytest.raises(ValueError, match=f"{gate}: gates must be finite"):
        _call(args)


@pytest.mark.parametrize("chunk_size, error", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_chunk_size(chunk_size, error):
    args, _ = _args()
    with pytest.raises(error, match="chunk_size: expected an int >= 1"):
        _call(args, chunk_size=chunk_size)


def test_unknown_read_mode():
    args, _ = _args()
    with pytest.raises(ValueError, match=r"read: expected one of \('token', 'chunk_start'\), got 'last'"):
        _call(args, read="last")


def test_bad_initial_state():
    args, (m0, s0) = _args()
    with pytest.raises(ValueError, match=r"initial_state\[1\]: expected shape \[B, H, Dv, Dk\] = \[2, 3, 5, 4\]"):
        _call(args, initial_state=(m0, s0.transpose(-1, -2)))
    with pytest.raises(TypeError, match=r"initial_state: expected a pair of tensors or None"):
        _call(args, initial_state=m0)
