"""mlp_memory (C++ CPU kernels) against the token-by-token reference and the chunked one."""

import pytest
import torch

import titans_ext
from titans_ext.reference import mlp_memory_chunked, mlp_memory_recurrent

from mlp_inputs import GRAD_NAMES, OUT_NAMES, mlp_inputs, mlp_outputs_and_grads
from utils import TOLERANCE, assert_close, assert_compile_matches_eager

NAMES = OUT_NAMES + GRAD_NAMES

# (B, T, H, D, E, chunk_size): chunk sizes 1, 8, 64; lengths that are not multiples of the
# chunk (a short last chunk, down to a single short chunk); every expansion.
SHAPES = [
    (2, 13, 2, 4, 1, 1),
    (1, 21, 2, 6, 2, 8),
    (2, 19, 1, 4, 4, 8),
    (1, 70, 2, 4, 4, 64),
    (1, 5, 1, 8, 2, 64),
]


def _ids(shape):
    return "B{}-T{}-H{}-D{}-E{}-C{}".format(*shape)


def _compare(ref, out, ratio, names=NAMES):
    for name, r, o in zip(names, ref, out):
        assert_close(name, r, o, ratio)


@pytest.mark.every_cpu_isa
@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_float64_values_and_grads_match_token_loop(shape, read, activation):
    B, T, H, D, E, C = shape
    inputs, weights, momentum = mlp_inputs(B, T, H, D, E, torch.float64, seed=T)
    kwargs = dict(chunk_size=C, read=read, activation=activation)
    ref = mlp_outputs_and_grads(mlp_memory_recurrent, inputs, weights, momentum, **kwargs)
    out = mlp_outputs_and_grads(titans_ext.mlp_memory, inputs, weights, momentum, **kwargs)
    _compare(ref, out, TOLERANCE[torch.float64])


def test_float64_without_momentum_matches_token_loop():
    inputs, weights, _ = mlp_inputs(2, 11, 1, 4, 2, torch.float64, momentum=False)
    kwargs = dict(chunk_size=4, read="token", activation="gelu")
    ref = mlp_outputs_and_grads(mlp_memory_recurrent, inputs, weights, None, **kwargs)
    out = mlp_outputs_and_grads(titans_ext.mlp_memory, inputs, weights, None, **kwargs)
    _compare(ref, out, TOLERANCE[torch.float64], NAMES[:-2])


@pytest.mark.every_cpu_isa
@pytest.mark.parametrize("activation", ["gelu", "silu"])
@pytest.mark.parametrize("read", ["token", "chunk_start"])
def test_float32_matches_float64_reference(read, activation):
    # The chunked reference (itself checked against the token loop) keeps this fast at D = 16.
    inputs, weights, momentum = mlp_inputs(2, 50, 2, 16, 4, torch.float32, seed=3)
    kwargs = dict(chunk_size=16, read=read, activation=activation)
    as64 = [x.double() for x in inputs]
    ref = mlp_outputs_and_grads(mlp_memory_chunked, as64, [w.double() for w in weights],
                                [s.double() for s in momentum], **kwargs)
    out = mlp_outputs_and_grads(titans_ext.mlp_memory, inputs, weights, momentum, **kwargs)
    _compare(ref, out, TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_computed_in_float32(dtype):
    inputs, weights, momentum = mlp_inputs(1, 20, 2, 8, 2, dtype, seed=5)
    o, ((W1, W2), (S1, S2)) = titans_ext.mlp_memory(*inputs, weights, momentum=momentum, chunk_size=8,
                                                     output_final_state=True)
    assert o.dtype == dtype and W1.dtype == torch.float32
    ref_o, ref_state = mlp_memory_chunked(*[x.double() for x in inputs], [w.double() for w in weights],
                                          momentum=[s.double() for s in momentum], chunk_size=8,
                                          output_final_state=True)
    assert_close("o", ref_o, o, TOLERANCE[dtype])
    for name, r, x in zip(OUT_NAMES[1:], (*ref_state[0], *ref_state[1]), (W1, W2, S1, S2)):
        assert_close(name, r, x, 1e-5)


def test_strided_inputs():
    """Slices of larger buffers (feature dim contiguous, other strides arbitrary) are read in place."""
    inputs, weights, momentum = mlp_inputs(2, 12, 2, 4, 2, torch.float64, seed=9)
    q, k, v, theta, eta, alpha = inputs
    wide = torch.zeros(2, 12, 2, 10, dtype=torch.float64)
    wide[..., 3:7] = k
    k_view = wide[..., 3:7]
    gates_t = torch.stack([theta, eta, alpha], dim=-1)
    strided = [q, k_view, v.transpose(1, 2).contiguous().transpose(1, 2), *gates_t.unbind(-1)]
    kwargs = dict(chunk_size=4, read="token", activation="silu")
    ref = mlp_outputs_and_grads(titans_ext.mlp_memory, inputs, weights, momentum, **kwargs)
    out = mlp_outputs_and_grads(titans_ext.mlp_memory, strided, weights, momentum, **kwargs)
    _compare(ref, out, TOLERANCE[torch.float64])


@pytest.mark.parametrize("read", ["token", "chunk_start"])
def test_stream_split_at_chunk_boundary_equals_one_call(read):
    """Two calls chained through the final state equal one call, values and gradients."""
    inputs, weights, momentum = mlp_inputs(2, 24, 2, 4, 2, torch.float64, seed=11)
    kwargs = dict(chunk_size=8, read=read, activation="gelu")

    def split_call(*args, momentum, output_final_state, **kw):
        *tensors, w = args
        first, second = ([x[:, :16] for x in tensors], [x[:, 16:] for x in tensors])
        o1, (w_mid, s_mid) = titans_ext.mlp_memory(*first, w, momentum=momentum, output_final_state=True, **kw)
        o2, final = titans_ext.mlp_memory(*second, w_mid, momentum=s_mid, output_final_state=True, **kw)
        return torch.cat([o1, o2], dim=1), final

    ref = mlp_outputs_and_grads(titans_ext.mlp_memory, inputs, weights, momentum, **kwargs)
    out = mlp_outputs_and_grads(split_call, inputs, weights, momentum, **kwargs)
    _compare(ref, out, TOLERANCE[torch.float64])


def test_empty_sequence_returns_the_initial_state():
    inputs, weights, momentum = mlp_inputs(1, 0, 2, 4, 2, torch.float64)
    o, ((W1, W2), (S1, S2)) = titans_ext.mlp_memory(*inputs, weights, momentum=momentum, output_final_state=True)
    assert o.shape == (1, 0, 2, 4)
    for ref, x in zip((*weights, *momentum), (W1, W2, S1, S2)):
        assert torch.equal(ref, x)


def test_no_final_state_unless_asked():
    inputs, weights, _ = mlp_inputs(1, 9, 1, 4, 1)
    o, final = titans_ext.mlp_memory(*inputs, weights, chunk_size=4)
    assert final is None and o.shape == inputs[0].shape


def _opcheck_args(requires_grad, momentum=True):
    inputs, weights, moments = mlp_inputs(2, 19, 2, 4, 2, torch.float32, momentum=momentum)
    tensors = [x.requires_grad_(requires_grad) for x in inputs + list(weights)]
    s1, s2 = (None, None) if moments is None else (x.requires_grad_(requires_grad) for x in moments)
    return (*tensors, s1, s2, 8, True, "gelu", True)


@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_forward(requires_grad, momentum):
    torch.library.opcheck(torch.ops.titans_ext.mlp_memory_fwd.default, _opcheck_args(requires_grad, momentum))


def test_opcheck_backward():
    q, k, v, theta, eta, alpha, w1, w2, s1, s2, C, read_token, act, _ = _opcheck_args(False)
    o, w1_T, w2_T, s1_T, s2_T, states = torch.ops.titans_ext.mlp_memory_fwd(
        q, k, v, theta, eta, alpha, w1, w2, s1, s2, C, read_token, act, True)
    args = (q, k, v, theta, eta, alpha, states, torch.randn_like(o), torch.randn_like(w1_T), None, None,
            torch.randn_like(s2_T), w1.shape[2], C, read_token, act)
    torch.library.opcheck(torch.ops.titans_ext.mlp_memory_bwd.default, args)


def test_opcheck_backward_strided_inputs():
    """q, k, v as views of one projection: the fake gradients must be contiguous, as the kernel's are."""
    q, k, v, theta, eta, alpha, w1, w2, s1, s2, C, read_token, act, _ = _opcheck_args(False)
    D = q.shape[-1]
    q, k, v = torch.cat([q, k, v], dim=-1).transpose(1, 2).contiguous().transpose(1, 2).split(D, dim=-1)
    o, w1_T, w2_T, s1_T, s2_T, states = torch.ops.titans_ext.mlp_memory_fwd(
        q, k, v, theta, eta, alpha, w1, w2, s1, s2, C, read_token, act, True)
    args = (q, k, v, theta, eta, alpha, states, torch.randn_like(o), torch.randn_like(w1_T), None, None,
            torch.randn_like(s2_T), w1.shape[2], C, read_token, act)
    torch.library.opcheck(torch.ops.titans_ext.mlp_memory_bwd.default, args)


def test_torch_compile_fullgraph():
    inputs, weights, momentum = mlp_inputs(1, 40, 2, 8, 2, torch.float32)

    def step(q, k, v, theta, eta, alpha, w1, w2, s1, s2):
        o, ((W1, W2), (S1, S2)) = titans_ext.mlp_memory(q, k, v, theta.sigmoid(), eta, alpha, (w1, w2),
                                                         momentum=(s1, s2), chunk_size=16, output_final_state=True,
                                                         activation="silu")
        return o.square().sum() + W1.sum() + W2.sum() + S1.sum() + S2.sum()

    assert_compile_matches_eager(step, inputs + list(weights) + list(momentum), GRAD_NAMES)
