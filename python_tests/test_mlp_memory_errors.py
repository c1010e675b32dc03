"""Bad input to mlp_memory gets a ValueError/TypeError naming the argument.

The MLP-specific checks, and the checks mlp_memory shares with linear_memory (the same
function validates both, so one case per kind of error suffices here).
"""

import pytest
import torch

import titans_ext

from mlp_inputs import mlp_inputs

NAMES = ["q", "k", "v", "theta", "eta", "alpha"]


def _args():
    # B=2, T=10, H=3, D=4, E=2.
    inputs, weights, momentum = mlp_inputs(2, 10, 3, 4, 2)
    return dict(zip(NAMES, inputs)), list(weights), list(momentum)


def _call(args, weights, momentum=None, **kwargs):
    return titans_ext.mlp_memory(*args.values(), weights, momentum=momentum, **kwargs)


def test_dk_must_equal_dv():
    args, weights, _ = _args()
    args["v"] = torch.zeros(2, 10, 3, 5)
    with pytest.raises(ValueError, match=r"v: the MLP memory needs Dk == Dv .* got Dk=4, Dv=5"):
        _call(args, weights)


@pytest.mark.parametrize("index, bad, error, match", [
    (0, lambda w: w[..., :6, :], ValueError, r"weights\[0\]: expected shape \[B, H, E\*D, D\] with E\*D a positive "
                                             r"multiple of D=4, got \[2, 3, 6, 4\]"),
    (0, lambda w: w[..., :3], ValueError, r"weights\[0\]: expected shape \[B, H, E\*D, D\] = \[2, 3, 8, 4\]"),
    (0, lambda w: w[:1], ValueError, r"weights\[0\]: expected shape \[B, H, E\*D, D\] = \[2, 3, 8, 4\]"),
    (0, lambda w: w[0], ValueError, r"weights\[0\]: expected a 4-d tensor"),
    (1, lambda w: w.transpose(-1, -2), ValueError, r"weights\[1\]: expected shape \[B, H, D, E\*D\] = \[2, 3, 4, 8\]"),
    (1, lambda w: w.to(torch.int64), TypeError, r"weights\[1\]: expected dtype in"),
    (1, lambda w: w.to("meta"), ValueError, r"weights\[1\]: expected a tensor on cpu"),
])
def test_bad_weights(index, bad, error, match):
    args, weights, _ = _args()
    weights[index] = bad(weights[index])
    with pytest.raises(error, match=match):
        _call(args, weights)


def test_weights_must_be_a_pair():
    args, weights, _ = _args()
    with pytest.raises(TypeError, match=r"weights: expected a pair \(W1 \[B, H, E\*D, D\], W2 \[B, H, D, E\*D\]\)"):
        _call(args, weights[0])


def test_bad_momentum():
    args, weights, momentum = _args()
    with pytest.raises(ValueError, match=r"momentum\[0\]: expected shape \[B, H, E\*D, D\] = \[2, 3, 8, 4\]"):
        _call(args, weights, momentum=(momentum[0][..., :3], momentum[1]))
    with pytest.raises(ValueError, match=r"momentum\[1\]: expected shape \[B, H, D, E\*D\] = \[2, 3, 4, 8\]"):
        _call(args, weights, momentum=(momentum[0], momentum[0]))
    with pytest.raises(TypeError, match=r"momentum: expected a pair \(S1, S2\) or None"):
        _call(args, weights, momentum=momentum[0])


def test_unknown_activation():
    args, weights, _ = _args()
    with pytest.raises(ValueError, match=r"activation: expected one of \('gelu', 'silu'\), got 'relu'"):
        _call(args, weights, activation="relu")


@pytest.mark.parametrize("name, bad, error, match", [
    ("q", lambda a: a["q"][0], ValueError, r"q: expected a 4-d tensor"),
    ("k", lambda a: a["k"][:, :9], ValueError, r"k: expected shape \[B, T, H, Dk\] = \[2, 10, 3, 4\]"),
    ("eta", lambda a: a["eta"][1:], ValueError, r"eta: expected shape \[B, T, H\] = \[2, 10, 3\]"),
    ("alpha", lambda a: a["alpha"].to(torch.int64), TypeError, r"alpha: expected dtype in"),
    ("k", lambda a: a["k"].double(), TypeError, r"k: expected dtype (torch\.)?float32 \(the dtype of q\)"),
    ("v", lambda a: a["v"].tolist(), TypeError, r"v: expected a torch.Tensor, got list"),
    ("k", lambda a: a["k"].to("meta"), ValueError, r"k: expected a tensor on cpu"),
])
def test_bad_tensor(name, bad, error, match):
    args, weights, _ = _args()
    args[name] = bad(args)
    with pytest.raises(error, match=match):
        _call(args, weights)


@pytest.mark.parametrize("gate", ["theta", "eta", "alpha"])
def test_non_finite_gates(gate):
    args, weights, _ = _args()
    args[gate][1, 4, 2] = float("nan")
    with pytest.raises(ValueError, match=f"{gate}: gates must be finite"):
        _call(args, weights)


@pytest.mark.parametrize("chunk_size, error", [(0, ValueError), (2.5, TypeError), (True, TypeError)])
def test_bad_chunk_size(chunk_size, error):
    args, weights, _ = _args()
    with pytest.raises(error, match="chunk_size: expected an int >= 1"):
        _call(args, weights, chunk_size=chunk_size)


def test_unknown_read_mode():
    args, weights, _ = _args()
    with pytest.raises(ValueError, match=r"read: expected one of \('token', 'chunk_start'\), got 'last'"):
        _call(args, weights, read="last")


def test_binding_rejects_unknown_activation():
    """Direct torch.ops calls skip the Python checks; the binding still refuses."""
    args, weights, _ = _args()
    with pytest.raises(RuntimeError, match=r"activation must be \"gelu\" or \"silu\""):
        torch.ops.titans_ext.mlp_memory_fwd(*args.values(), *weights, None, None, 4, True, "tanh", False)


# ---- The CUDA path's checks, asked directly on fake CUDA tensors (no GPU needed).

def _fake_cuda(*shape):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        return torch.empty(*shape, device="cuda")


@pytest.mark.parametrize("D, chunk_size, match", [
    (16, 65, r"chunk_size: the CUDA kernels of mlp_memory support chunk sizes 1..64, got 65 \(q is on cuda"),
    (136, 16, r"q: the CUDA kernels of mlp_memory support head dimensions D <= 128, got D=136 \(q is on cuda"),
])
def test_cuda_limits_name_the_argument_and_the_device(D, chunk_size, match):
    from titans_ext.ops.mlp_memory import check_cuda_limits

    with pytest.raises(ValueError, match=match):
        check_cuda_limits(_fake_cuda(2, 10, 3, D), chunk_size)
    check_cuda_limits(_fake_cuda(2, 10, 3, 128), 64)  # the largest head dimension and chunk


@pytest.mark.parametrize("D, chunk_size, dtype, backward, match", [
    (128, 64, torch.bfloat16, True, r"chunk_size: mlp_memory's CUDA backward with chunk_size 64, D=128, E\*D=256 and "
                                    r"bfloat16 inputs needs \d+ bytes of shared memory per block, more than the "
                                    r"232448 that cuda:0 allows"),
    (64, 64, torch.float32, False, r"chunk_size: mlp_memory's CUDA forward with chunk_size 64, D=64, E\*D=128 and "
                                   r"float32 inputs needs \d+ bytes .* more than the 65536 that cuda:0 allows"),
])
def test_cuda_shared_memory_names_the_bytes(D, chunk_size, dtype, backward, match):
    # The launchers' plan comes from the emulation's build of the same kernels (a CPU build has no
    # titans_ext::mlp_memory_plan); the shared memory is an H100's (227 KiB) or a small device's.
    import titans_ext._emu  # noqa: F401
    from titans_ext.ops.mlp_memory import check_cuda_shared_memory

    q = _fake_cuda(1, 10, 1, D).to(dtype)
    max_shared = 227 * 1024 if backward else 64 * 1024
    kwargs = dict(plan=torch.ops.titans_emu.mlp_memory_plan, max_shared_bytes=max_shared)
    with pytest.raises(ValueError, match=match):
        check_cuda_shared_memory(q, 2 * D, chunk_size, True, 0, backward, **kwargs)
    check_cuda_shared_memory(q, 2 * D, 16, True, 0, True, **kwargs)  # chunk 16 fits both


@pytest.fixture
def fake_cuda_op(monkeypatch):
    """Calls titans_ext.mlp_memory on fake CUDA tensors of D = 128, E = 2 (bf16, weights requiring
    grad) as on a device with ``max_shared`` bytes of shared memory per block; the build check of
    the device (cuda_arch.py) is skipped: there is no GPU to ask."""
    import importlib
    from types import SimpleNamespace

    from torch._subclasses.fake_tensor import FakeTensorMode

    op_module = importlib.import_module("titans_ext.ops.mlp_memory")  # titans_ext.ops.mlp_memory is the op
    monkeypatch.setattr(op_module, "check_op_device", lambda q: None)

    def call(chunk_size, max_shared=227 * 1024, D=128):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device: SimpleNamespace(shared_memory_per_block_optin=max_shared))
        with FakeTensorMode():
            inputs = [torch.empty(1, 10, 1, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
            gates = [torch.empty(1, 10, 1, device="cuda") for _ in range(3)]
            weights = (torch.empty(1, 1, 2 * D, D, device="cuda", requires_grad=True),
                       torch.empty(1, 1, D, 2 * D, device="cuda", requires_grad=True))
            return titans_ext.mlp_memory(*inputs, *gates, weights, chunk_size=chunk_size)

    return call


def test_mlp_memory_checks_the_cuda_limits_before_dispatch(fake_cuda_op):
    with pytest.raises(ValueError, match=r"chunk_size: the CUDA kernels of mlp_memory support chunk sizes 1..64"):
        fake_cuda_op(65)
    with pytest.raises(ValueError, match=r"q: the CUDA kernels of mlp_memory support head dimensions D <= 128"):
        fake_cuda_op(16, D=136)


@pytest.mark.skipif(not hasattr(torch.ops.titans_ext, "mlp_memory_plan"),
                    reason="a CPU build of titans_ext has no CUDA launchers to ask")
def test_mlp_memory_checks_the_shared_memory_before_dispatch(fake_cuda_op):
    # An H100's 227 KiB: the bf16 backward at D = 128, chunk 64 fits no hidden block, chunk 32 does.
    with pytest.raises(ValueError, match=r"chunk_size: mlp_memory's CUDA backward with chunk_size 64, D=128, "
                                         r"E\*D=256 and bfloat16 inputs needs \d+ bytes of shared memory per "
                                         r"block, more than the 232448 that cuda:0 allows"):
        fake_cuda_op(64)
    o, _ = fake_cuda_op(32)
    assert o.shape == (1, 10, 1, 128)
    with pytest.raises(ValueError, match=r"mlp_memory's CUDA forward with chunk_size 32, .* more than the 16384"):
        fake_cuda_op(32, max_shared=16 * 1024)


def test_cuda_build_plans_like_the_emulation():
    """titans_ext::mlp_memory_plan (CUDA build) and titans_emu::mlp_memory_plan share one source."""
    if not hasattr(torch.ops.titans_ext, "mlp_memory_plan"):
        pytest.skip("a CPU build of titans_ext has no CUDA launchers to ask")
    import titans_ext._emu  # noqa: F401

    for args in [(64, 256, 64, torch.bfloat16, True, 0, 227 * 1024),
                 (128, 512, 32, torch.float32, False, 2, 163 * 1024),
                 (16, 64, 1, torch.float64, True, 1, 48 * 1024)]:
        assert torch.ops.titans_ext.mlp_memory_plan(*args) == torch.ops.titans_emu.mlp_memory_plan(*args)


def test_cuda_fake_kernel_saves_chunk_states_in_the_inputs_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        inputs = [torch.empty(2, 10, 3, 4, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        gates = [torch.empty(2, 10, 3, device="cuda") for _ in range(3)]
        w1, w2 = torch.empty(2, 3, 8, 4, device="cuda"), torch.empty(2, 3, 4, 8, device="cuda")
        out = torch.ops.titans_ext.mlp_memory_fwd(*inputs, *gates, w1, w2, None, None, 4, True, "gelu", True)
        assert out[0].dtype == torch.bfloat16 and out[1].dtype == torch.float32
        assert out[5].shape == (2, 3, 3, 4, 32) and out[5].dtype == torch.bfloat16
