"""Value checks (titans_ext/ops/checks.py): the checks that read tensor data (gates finite and in
range, delta > 0, a usable "kl" state, token ids) and the switch TITANS_EXT_CHECK_VALUES that
decides where they run. On a GPU a read is a host sync, so with value checks off the Python path
of the ops and of the model must read no tensor value at all: tested here on CPU tensors by
making every read raise (the CUDA tests run the same paths under torch.cuda.set_sync_debug_mode).
"""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import titans_ext
from titans_ext.model import NeuralMemory, TitansLM
from titans_ext.ops.checks import CHECK_VALUES_ENV, value_checks_enabled
from titans_ext.reference import linear_memory_chunked

from mlp_inputs import mlp_inputs
from utils import memory_inputs

LINEAR_GATES = dict(zip(["theta", "eta", "alpha"], range(3, 6)))


@pytest.fixture
def check_values(monkeypatch):
    """Sets TITANS_EXT_CHECK_VALUES for one test (None: unset)."""

    def set_to(setting):
        if setting is None:
            monkeypatch.delenv(CHECK_VALUES_ENV, raising=False)
        else:
            monkeypatch.setenv(CHECK_VALUES_ENV, setting)

    return set_to


# --- the switch ---------------------------------------------------------------------------------

@pytest.mark.parametrize("setting, on_cpu, on_meta", [(None, True, False), ("", True, False), ("0", False, False),
                                                      ("1", True, True)])
def test_switch(check_values, setting, on_cpu, on_meta):
    check_values(setting)
    assert value_checks_enabled(torch.device("cpu")) == on_cpu
    assert value_checks_enabled(torch.device("meta")) == on_meta


def test_switch_rejects_other_settings(check_values):
    check_values("yes")
    inputs, init = memory_inputs(1, 4, 1, 4, 4)
    with pytest.raises(ValueError, match=r"TITANS_EXT_CHECK_VALUES: expected 0 or 1 \(or unset\), got 'yes'"):
        titans_ext.linear_memory(*inputs, initial_state=init)


def test_checks_off_let_bad_gates_through(check_values):
    inputs, init = memory_inputs(1, 8, 1, 4, 4)
    inputs[LINEAR_GATES["eta"]][0, 3, 0] = 2.0
    check_values("0")
    o, _ = titans_ext.linear_memory(*inputs, initial_state=init, chunk_size=4)  # the caller's responsibility
    assert o.shape == (1, 8, 1, 4)
    check_values(None)
    with pytest.raises(ValueError, match="eta: expected values in"):
        titans_ext.linear_memory(*inputs, initial_state=init, chunk_size=4)


# --- gate ranges --------------------------------------------------------------------------------

@pytest.mark.parametrize("gate, value, match", [
    ("theta", -0.25, r"theta: expected values >= 0, got values in \[-0.25, "),
    ("eta", 1.5, r"eta: expected values in \[0, 1\], got values in \[.*, 1.5\]"),
    ("eta", -1e-3, r"eta: expected values in \[0, 1\], got values in \[-0.001, "),
    ("alpha", 1.0625, r"alpha: expected values in \[0, 1\], got values in \[.*, 1.0625\]"),
    ("alpha", -2.0, r"alpha: expected values in \[0, 1\], got values in \[-2, "),
    ("theta", float("inf"), r"theta: gates must be finite"),
])
@pytest.mark.parametrize("op", ["linear_memory", "mlp_memory", "reference"])
def test_gate_out_of_range(op, gate, value, match):
    if op == "mlp_memory":
        inputs, weights, momentum = mlp_inputs(1, 6, 2, 4, 2)
        inputs[LINEAR_GATES[gate]][0, 2, 1] = value
        call = lambda: titans_ext.mlp_memory(*inputs, weights, momentum=momentum, chunk_size=4)  # noqa: E731
    else:
        inputs, init = memory_inputs(1, 6, 2, 4, 4)
        inputs[LINEAR_GATES[gate]][0, 2, 1] = value
        fn = titans_ext.linear_memory if op == "linear_memory" else linear_memory_chunked
        call = lambda: fn(*inputs, initial_state=init, chunk_size=4)  # noqa: E731
    with pytest.raises(ValueError, match=match):
        call()


def test_gates_at_the_ends_of_their_ranges_are_accepted():
    inputs, init = memory_inputs(1, 6, 1, 4, 4)
    q, k, v, theta, eta, alpha = inputs
    theta[:, :2], eta[:, ::2], eta[:, 1::2], alpha[:, 3], alpha[:, 4] = 0.0, 0.0, 1.0, 0.0, 1.0
    titans_ext.linear_memory(*inputs, initial_state=init, chunk_size=4)


# --- no value read with the checks off ------------------------------------------------------------

# Operators that read tensor data on the host (item, bool, int and comparisons of scalars all end
# in _local_scalar_dense) or whose output shape depends on values (a GPU must sync to size them).
_VALUE_READING_OPS = {
    torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default,
    torch.ops.aten.nonzero.default, torch.ops.aten.masked_select.default, torch.ops.aten.unique_dim.default,
    torch.ops.aten._unique2.default, torch.ops.aten.repeat_interleave.Tensor,
}


class ValueRead(AssertionError):
    pass


class _RaiseOnValueRead(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _VALUE_READING_OPS:
            raise ValueRead(f"{func} reads tensor values")
        return func(*args, **(kwargs or {}))


def _refuse(method):
    def refuse(self, *args, **kwargs):
        raise ValueRead(f"Tensor.{method} reads tensor values")
    return refuse


@contextlib.contextmanager
def no_value_reads():
    """Raises ValueRead on any read of tensor data from Python or through the dispatcher."""
    saved = {method: getattr(torch.Tensor, method) for method in ("tolist", "numpy", "__array__")}
    try:
        for method in saved:
            setattr(torch.Tensor, method, _refuse(method))
        with _RaiseOnValueRead():
            yield
    finally:
        for method, original in saved.items():
            setattr(torch.Tensor, method, original)


def _linear_call():
    inputs, init = memory_inputs(2, 9, 2, 4, 4)
    leaves = [x.requires_grad_() for x in inputs]
    return lambda: titans_ext.linear_memory(*leaves, initial_state=init, chunk_size=4, output_final_state=True)[0]


def _linear_delta_call():
    inputs, init = memory_inputs(2, 9, 2, 4, 4)
    delta = torch.full((2, 9, 2), 0.5, requires_grad=True)
    return lambda: titans_ext.linear_memory(*inputs, initial_state=init, chunk_size=4, objective=("huber", delta))[0]


def _linear_kl_call():
    inputs, _ = memory_inputs(1, 9, 2, 4, 4)
    inputs[0].requires_grad_()
    init = (torch.full((1, 2, 4, 4), 0.25), torch.zeros(1, 2, 4, 4))
    return lambda: titans_ext.linear_memory(*inputs, initial_state=init, chunk_size=4, retention="kl")[0]


def _mlp_call():
    inputs, weights, momentum = mlp_inputs(1, 9, 2, 4, 2)
    leaves = [x.requires_grad_() for x in inputs]
    return lambda: titans_ext.mlp_memory(*leaves, weights, momentum=momentum, chunk_size=4)[0]


def _model_call(block):
    torch.manual_seed(0)
    model = TitansLM(40, dim=16, depth=2, block=block, heads=2, window=8, persistent_tokens=2, memory_heads=2,
                     chunk_size=4)
    tokens = torch.randint(0, 40, (2, 13))
    return lambda: model(tokens)[0]


def _preset_call(preset):
    torch.manual_seed(0)
    layer = NeuralMemory(16, heads=2, head_dim=8, chunk_size=4, preset=preset)
    x = torch.randn(2, 7, 16)
    return lambda: layer(x)[0]


CALLS = {
    "linear_memory": _linear_call,
    "linear_memory-delta": _linear_delta_call,
    "linear_memory-kl": _linear_kl_call,
    "mlp_memory": _mlp_call,
    **{f"TitansLM-{block}": (lambda block=block: _model_call(block)) for block in ("mac", "mag", "mal", "lmm")},
    **{f"NeuralMemory-{preset}": (lambda preset=preset: _preset_call(preset)) for preset in ("yaad", "memora")},
}


@pytest.mark.parametrize("name", CALLS)
def test_checks_off_read_no_tensor_value(check_values, name):
    call = CALLS[name]()
    check_values("1")
    with pytest.raises(ValueRead):  # the guard sees the value checks' reads
        with no_value_reads():
            call()
    check_values("0")
    with no_value_reads():
        out = call()
        out.float().square().sum().backward()
