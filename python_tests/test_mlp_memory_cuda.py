"""titans_ext.mlp_memory on CUDA tensors (csrc/cuda/mlp_memory_{fwd,bwd}.cuh) against the CPU op in float64
(itself checked against the token loop), with every MIRAS option. Skipped without a GPU; the same
kernels run under the CPU emulation in test_mlp_memory_emulated.py.

Closeness rule (utils.TOLERANCE): fp64 1e-10, fp32 1e-4 (3xTF32 products), bf16 and fp16 relative
RMS 1e-2 and a largest error of at most 3 % of the reference's largest entry.
"""

import pytest
import torch

import titans_ext

from miras_cases import OBJECTIVES, RETENTIONS, needs_delta
from mlp_inputs import GRAD_NAMES, OUT_NAMES, mlp_inputs, opcheck_mlp_memory_bwd
from utils import TOLERANCE, assert_close, assert_compile_matches_eager, random_cotangents

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

NAMES = OUT_NAMES + GRAD_NAMES + ["d_delta"]


def _inputs(B, T, H, D, E, dtype, retention="l2", objective="l2", theta_scale=1.0, seed=0):
    inputs, weights, momentum = mlp_inputs(B, T, H, D, E, dtype, seed=seed)
    inputs[3] = inputs[3] * theta_scale
    if retention == "kl":
        weights = tuple(torch.softmax(3 * w, dim=-1) for w in weights)
    delta = None
    if needs_delta(objective):
        g = torch.Generator().manual_seed(seed + 3)
        low, width = (0.3 * D ** 0.5, 0.4 * D ** 0.5) if objective == "yaad" else (0.2, 0.6)
        delta = low + width * torch.rand(B, T, H, D, generator=g, dtype=torch.float64)
    return inputs, weights, momentum, delta


def _run(device, dtype, inputs, weights, momentum, delta, objective, **kwargs):
    """Outputs and the gradients of a fixed random functional of them (delta's included), computed
    with the tensors moved to `device` and `dtype` (gates and states in the matching state dtype)."""
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def leaf(x, to):
        return x.detach().to(device=device, dtype=to).requires_grad_()

    leaves = [leaf(x, dtype if i < 3 else state_dtype) for i, x in enumerate(inputs)]
    w = tuple(leaf(x, state_dtype) for x in weights)
    m = tuple(leaf(x, state_dtype) for x in momentum)
    d = None if delta is None else leaf(delta, state_dtype)
    o, ((W1, W2), (S1, S2)) = titans_ext.mlp_memory(*leaves, w, momentum=m, output_final_state=True,
                                                     objective=OBJECTIVES[objective](d), **kwargs)
    outs = [o, W1, W2, S1, S2]
    cot = [c.to(device) for c in random_cotangents([x.detach().cpu() for x in outs])]
    loss = sum((x.double() * c.double()).sum() for x, c in zip(outs, cot))
    wrt = leaves + list(w) + list(m) + ([d] if d is not None else [])
    return [x.detach().cpu() for x in outs + list(torch.autograd.grad(loss, wrt))]


def _check(B, T, H, D, E, C, dtype, objective="l2", retention="l2", read="token", activation="gelu", **kw):
    inputs, weights, momentum, delta = _inputs(B, T, H, D, E, dtype, retention, objective, **kw)
    kwargs = dict(chunk_size=C, read=read, activation=activation, retention=RETENTIONS[retention])
    # The CPU op in float64 sees the inputs the GPU sees (rounded to dtype).
    as_dtype = [x.to(dtype) if i < 3 else x for i, x in enumerate(inputs)]
    ref = _run("cpu", torch.float64, as_dtype, weights, momentum, delta, objective, **kwargs)
    out = _run("cuda", dtype, inputs, weights, momentum, delta, objective, **kwargs)
    for name, r, x in zip(NAMES, ref, out):
        assert_close(name, r, x, TOLERANCE[dtype])
        if dtype in (torch.bfloat16, torch.float16):
            assert (r - x.double()).abs().max() <= 0.03 * r.abs().max(), name


# (B, T, H, D, E, chunk_size): short last chunks, the primary D and E, chunk sizes 1, 16, 64.
SHAPES = [
    (2, 100, 3, 64, 4, 64),
    (1, 77, 2, 64, 2, 16),
    (1, 45, 2, 128, 2, 16),
    (2, 40, 1, 128, 4, 32),
    (1, 9, 2, 32, 2, 1),
    (1, 50, 2, 24, 3, 16),
]


def _ids(shape):
    return "B{}-T{}-H{}-D{}-E{}-C{}".format(*shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_values_and_grads_match_the_cpu_op(shape, read, dtype):
    _check(*shape, dtype, read=read, activation="silu" if shape[3] == 128 else "gelu")


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("retention", ["l2", "kl"])
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_miras_option_matches_the_cpu_op(objective, retention, read):
    for dtype in (torch.float32, torch.bfloat16):
        _check(1, 70, 2, 64, 2, 16, dtype, objective, retention, read, theta_scale=0.2)


def test_float64():
    _check(2, 50, 2, 16, 2, 16, torch.float64, "huber", "kl")


def test_state_carried_across_calls_equals_one_call():
    inputs, weights, momentum, _ = _inputs(2, 192, 2, 64, 4, torch.float32)
    inputs = [x.cuda() for x in inputs]
    weights, momentum = tuple(w.cuda() for w in weights), tuple(s.cuda() for s in momentum)
    o, state = titans_ext.mlp_memory(*inputs, weights, momentum=momentum, chunk_size=64, output_final_state=True)
    o1, (w1, m1) = titans_ext.mlp_memory(*[x[:, :128] for x in inputs], weights, momentum=momentum, chunk_size=64,
                                         output_final_state=True)
    o2, (w2, m2) = titans_ext.mlp_memory(*[x[:, 128:] for x in inputs], w1, momentum=m1, chunk_size=64,
                                         output_final_state=True)
    # Same kernels, same chunk boundaries: the split run repeats the one-shot run's arithmetic.
    assert torch.equal(o, torch.cat([o1, o2], dim=1))
    for a, b in zip([*state[0], *state[1]], [*w2, *m2]):
        assert torch.equal(a, b)


def test_no_grad_saves_no_chunk_states_and_gives_the_same_outputs():
    inputs, weights, momentum, _ = _inputs(1, 200, 2, 64, 4, torch.bfloat16)
    inputs = [x.cuda() for x in inputs]
    weights, momentum = tuple(w.cuda() for w in weights), tuple(s.cuda() for s in momentum)
    args = (*inputs, *weights, *momentum, 64, True, "gelu")
    with torch.no_grad():
        o, *_, states = torch.ops.titans_ext.mlp_memory_fwd(*args, False)
    assert states.numel() == 0
    o_saved, *_, states = torch.ops.titans_ext.mlp_memory_fwd(*args, True)
    assert torch.equal(o, o_saved)
    assert states.dtype == torch.bfloat16 and states.shape == (1, 2, 4, 4, 256 * 64)


def test_backward_is_deterministic():
    inputs, weights, momentum, _ = _inputs(2, 300, 4, 64, 4, torch.bfloat16)
    first = _run("cuda", torch.bfloat16, inputs, weights, momentum, None, "l2", chunk_size=64)
    second = _run("cuda", torch.bfloat16, inputs, weights, momentum, None, "l2", chunk_size=64)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_runs_on_the_current_stream():
    inputs, weights, momentum, _ = _inputs(1, 64, 2, 64, 4, torch.bfloat16)
    inputs = [x.cuda() for x in inputs]
    weights, momentum = tuple(w.cuda() for w in weights), tuple(s.cuda() for s in momentum)
    expected, _ = titans_ext.mlp_memory(*inputs, weights, momentum=momentum)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        o, _ = titans_ext.mlp_memory(*inputs, weights, momentum=momentum)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(o, expected)


def test_limits_raise_value_errors():
    inputs, weights, momentum, _ = _inputs(1, 10, 1, 16, 2, torch.float32)
    inputs = [x.cuda() for x in inputs]
    weights = tuple(w.cuda() for w in weights)
    with pytest.raises(ValueError, match=r"chunk_size: the CUDA kernels of mlp_memory support chunk sizes 1..64"):
        titans_ext.mlp_memory(*inputs, weights, chunk_size=128)
    with pytest.raises(ValueError, match=r"retention: \('lq', q\) is not supported by the CUDA kernels"):
        titans_ext.mlp_memory(*inputs, weights, chunk_size=16, retention=("lq", 4))
    wide, wide_weights, _, _ = _inputs(1, 10, 1, 256, 1, torch.float32)
    with pytest.raises(ValueError, match=r"q: the CUDA kernels of mlp_memory support head dimensions D <= 128"):
        titans_ext.mlp_memory(*[x.cuda() for x in wide], tuple(w.cuda() for w in wide_weights), chunk_size=16)
    # fp32 at D = 128 with chunk 64: the backward's tiles do not fit a block's shared memory.
    big, big_weights, _, _ = _inputs(1, 70, 1, 128, 2, torch.float32)
    big = [x.cuda().requires_grad_() for x in big]
    with pytest.raises(ValueError, match=r"needs \d+ bytes of shared memory per block, more than the \d+ this device"):
        o, _ = titans_ext.mlp_memory(*big, tuple(w.cuda() for w in big_weights), chunk_size=64)
        o.sum().backward()


def _opcheck_args(requires_grad):
    inputs, weights, momentum, delta = _inputs(2, 19, 2, 16, 2, torch.float32, objective="yaad")
    tensors = [x.cuda().requires_grad_(requires_grad) for x in [*inputs, *weights, *momentum]]
    delta = delta.float().cuda().requires_grad_(requires_grad)
    return (*tensors, 8, True, "gelu", True, 4, 2.0, 0.0, delta, 0, 2.0)  # yaad


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_forward(requires_grad):
    torch.library.opcheck(torch.ops.titans_ext.mlp_memory_fwd.default, _opcheck_args(requires_grad))


def test_opcheck_backward():
    opcheck_mlp_memory_bwd(_opcheck_args(False))


def test_torch_compile_fullgraph():
    inputs, weights, momentum, _ = _inputs(1, 100, 2, 64, 4, torch.float32)

    def step(q, k, v, theta, eta, alpha, w1, w2, s1, s2):
        o, ((W1, W2), (S1, S2)) = titans_ext.mlp_memory(q, k, v, theta.sigmoid(), eta, alpha, (w1, w2),
                                                         momentum=(s1, s2), chunk_size=64, output_final_state=True)
        return o.square().sum() + W1.sum() + W2.sum() + S1.sum() + S2.sum()

    tensors = [x.cuda() for x in [*inputs, *weights, *momentum]]
    assert_compile_matches_eager(step, tensors, GRAD_NAMES)
