"""No host syncs on CUDA: the memory ops (forward and backward) and the model's forward run under
torch.cuda.set_sync_debug_mode("error"), which turns every synchronizing CUDA call torch makes
(a device-to-host copy, .item(), nonzero, ...) into an error. With the default settings the value
checks are off on CUDA (titans_ext/ops/checks.py); each test also shows that turning them on
(TITANS_EXT_CHECK_VALUES=1) is caught, so the harness can fail. Skipped without a GPU; the
CPU-side counterpart is test_value_checks.py::test_checks_off_read_no_tensor_value.
"""

import contextlib

import pytest
import torch

import titans_ext
from titans_ext.model import TitansLM
from titans_ext.ops.checks import CHECK_VALUES_ENV

from mlp_inputs import mlp_inputs
from utils import memory_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SYNC_ERROR = r"called a synchronizing CUDA operation"


@contextlib.contextmanager
def syncs_are_errors():
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize()


def _check_no_sync_unless_values_checked(monkeypatch, run):
    monkeypatch.delenv(CHECK_VALUES_ENV, raising=False)
    with syncs_are_errors():
        run()
    monkeypatch.setenv(CHECK_VALUES_ENV, "1")
    with pytest.raises(RuntimeError, match=SYNC_ERROR):
        with syncs_are_errors():
            run()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_memory_forward_and_backward(monkeypatch, dtype):
    inputs, init = memory_inputs(2, 100, 2, 64, 64, dtype, device="cuda")
    leaves = [x.requires_grad_() for x in inputs + list(init)]
    d_o = torch.randn(2, 100, 2, 64, device="cuda").to(dtype)

    def run():
        o, (m, s) = titans_ext.linear_memory(*leaves[:6], initial_state=tuple(leaves[6:]), chunk_size=64,
                                             output_final_state=True)
        torch.autograd.grad([o, m, s], leaves, [d_o, torch.ones_like(m), torch.ones_like(s)])

    _check_no_sync_unless_values_checked(monkeypatch, run)


def test_linear_memory_without_grad(monkeypatch):
    inputs, init = memory_inputs(1, 70, 2, 32, 32, torch.bfloat16, device="cuda")

    def run():
        with torch.no_grad():
            titans_ext.linear_memory(*inputs, initial_state=init, chunk_size=16)

    _check_no_sync_unless_values_checked(monkeypatch, run)


def test_mlp_memory_forward_and_backward(monkeypatch):
    if not torch._C._dispatch_has_kernel_for_dispatch_key("titans_ext::mlp_memory_fwd", "CUDA"):
        pytest.skip("mlp_memory has no CUDA kernels in this build")
    inputs, weights, momentum = mlp_inputs(1, 40, 2, 32, 2)
    inputs = [x.cuda().requires_grad_() for x in inputs]
    weights, momentum = (tuple(w.cuda() for w in pair) for pair in (weights, momentum))

    def run():
        o, _ = titans_ext.mlp_memory(*inputs, weights, momentum=momentum, chunk_size=16)
        torch.autograd.grad(o, inputs, torch.ones_like(o))

    _check_no_sync_unless_values_checked(monkeypatch, run)


@pytest.mark.parametrize("block", ["mac", "mag", "mal", "lmm"])
def test_model_forward(monkeypatch, block):
    torch.manual_seed(0)
    model = TitansLM(100, dim=64, depth=2, block=block, heads=4, window=32, memory_heads=4, chunk_size=16).cuda()
    tokens = torch.randint(0, 100, (2, 70), device="cuda")

    def run():
        _, state = model(tokens)
        model(tokens[:, :5], state)  # streaming: the state carries pending tokens and caches

    _check_no_sync_unless_values_checked(monkeypatch, run)
