"""linear_memory (C++ CPU kernels) against the token-by-token reference and the chunked one."""

import pytest
import torch

import titans_ext
from titans_ext.reference import linear_memory_chunked, linear_memory_recurrent

from utils import (GRAD_NAMES, TOLERANCE, assert_close, assert_compile_matches_eager, memory_inputs,
                   opcheck_linear_memory, outputs_and_grads, shape_id)

NAMES = ["o", "M_T", "S_T"] + GRAD_NAMES

# (B, T, H, Dk, Dv, chunk_size): awkward lengths (not multiples of the chunk), Dk != Dv.
SHAPES = [
    (1, 1, 1, 4, 4, 16),
    (2, 63, 2, 8, 5, 16),
    (1, 100, 3, 6, 9, 64),
    (2, 37, 2, 7, 7, 1),
    (1, 130, 1, 16, 16, 64),
]


def _compare(ref, out, ratio, names=NAMES):
    for name, r, o in zip(names, ref, out):
        assert_close(name, r, o, ratio)


@pytest.mark.every_cpu_isa
@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_float64_values_and_grads_match_token_loop(shape, read):
    B, T, H, Dk, Dv, C = shape
    inputs, init = memory_inputs(B, T, H, Dk, Dv, torch.float64)
    ref = outputs_and_grads(linear_memory_recurrent, inputs, init, chunk_size=C, read=read)
    out = outputs_and_grads(titans_ext.linear_memory, inputs, init, chunk_size=C, read=read)
    _compare(ref, out, TOLERANCE[torch.float64])


@pytest.mark.every_cpu_isa
@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("chunk_size", [1, 16, 64])
def test_float32_matches_float64_reference(chunk_size, read):
    inputs, init = memory_inputs(2, 100, 2, 16, 12, torch.float32)
    ref = outputs_and_grads(linear_memory_recurrent, [x.double() for x in inputs], tuple(x.double() for x in init),
                            chunk_size=chunk_size, read=read)
    out = outputs_and_grads(titans_ext.linear_memory, inputs, init, chunk_size=chunk_size, read=read)
    _compare(ref, out, TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_computed_in_float32(dtype):
    inputs, init = memory_inputs(1, 70, 2, 16, 16, dtype)
    ref = outputs_and_grads(linear_memory_recurrent, [x.double() for x in inputs], tuple(x.double() for x in init),
                            chunk_size=16)
    out = outputs_and_grads(titans_ext.linear_memory, inputs, init, chunk_size=16)
    assert out[0].dtype == dtype and out[1].dtype == torch.float32
    assert out[3].dtype == dtype  # dq in the input's dtype
    _compare(ref, out, TOLERANCE[dtype])


def test_without_initial_state():
    inputs, _ = memory_inputs(2, 45, 2, 8, 8, torch.float64, state=False)
    ref = outputs_and_grads(linear_memory_recurrent, inputs, None, chunk_size=16)
    out = outputs_and_grads(titans_ext.linear_memory, inputs, None, chunk_size=16)
    _compare(ref, out, TOLERANCE[torch.float64], names=NAMES[:9])


def test_exact_zero_gates():
    """eta = 0 (momentum reset) and alpha = 1 (full forget) are exact, with correct gradients."""
    inputs, init = memory_inputs(1, 40, 2, 6, 5, torch.float64)
    eta, alpha = inputs[4], inputs[5]
    eta[0, 3, 0] = eta[0, 17, 1] = 0.0
    alpha[0, 5, 1] = alpha[0, 30, 0] = 1.0
    ref = outputs_and_grads(linear_memory_recurrent, inputs, init, chunk_size=8)
    out = outputs_and_grads(titans_ext.linear_memory, inputs, init, chunk_size=8)
    _compare(ref, out, TOLERANCE[torch.float64])


@pytest.mark.parametrize("read", ["token", "chunk_start"])
def test_chunked_reference_matches_token_loop(read):
    """The plain-PyTorch chunk algorithm (what the kernels implement) against the oracle."""
    inputs, init = memory_inputs(2, 50, 2, 5, 7, torch.float64)
    ref = outputs_and_grads(linear_memory_recurrent, inputs, init, chunk_size=16, read=read)
    out = outputs_and_grads(linear_memory_chunked, inputs, init, chunk_size=16, read=read)
    _compare(ref, out, 1e-9)


@pytest.mark.parametrize("read", ["token", "chunk_start"])
def test_stream_split_at_chunk_boundary_equals_one_call(read):
    inputs, init = memory_inputs(2, 80, 2, 8, 6, torch.float64)
    leaves = [x.clone().requires_grad_() for x in inputs]
    init_leaves = tuple(x.clone().requires_grad_() for x in init)
    o_full, (m_full, s_full) = titans_ext.linear_memory(*leaves, chunk_size=16, initial_state=init_leaves,
                                                        output_final_state=True, read=read)
    first = [x[:, :48] for x in leaves]
    second = [x[:, 48:] for x in leaves]
    o1, state = titans_ext.linear_memory(*first, chunk_size=16, initial_state=init_leaves, output_final_state=True,
                                         read=read)
    o2, (m2, s2) = titans_ext.linear_memory(*second, chunk_size=16, initial_state=state, output_final_state=True,
                                            read=read)
    o_split = torch.cat([o1, o2], dim=1)
    for name, a, b in (("o", o_full, o_split), ("M_T", m_full, m2), ("S_T", s_full, s2)):
        assert_close(name, a, b, 1e-12)
    wrt = leaves + list(init_leaves)
    g_full = torch.autograd.grad((o_full.sum() + m_full.sum() + s_full.sum()), wrt)
    g_split = torch.autograd.grad((o_split.sum() + m2.sum() + s2.sum()), wrt)
    for name, a, b in zip(GRAD_NAMES, g_full, g_split):
        assert_close(name, a, b, 1e-12)


def test_inputs_sliced_from_a_larger_buffer():
    inputs, init = memory_inputs(2, 33, 3, 8, 8, torch.float64)
    q, k, v, theta, eta, alpha = inputs
    big = torch.randn(2, 33, 3, 40, dtype=torch.float64)
    big[..., 5:13], big[..., 20:28], big[..., 30:38] = q, k, v
    gates = torch.randn(2, 3, 3, 33, dtype=torch.float64)  # [B, gate, H, T]: gates as transposed views
    gates[:, 0], gates[:, 1], gates[:, 2] = theta.transpose(1, 2), eta.transpose(1, 2), alpha.transpose(1, 2)
    strided = [big[..., 5:13], big[..., 20:28], big[..., 30:38]] + [gates[:, i].transpose(1, 2) for i in range(3)]
    assert not any(x.is_contiguous() for x in strided)
    ref = outputs_and_grads(titans_ext.linear_memory, [x.contiguous() for x in strided], init, chunk_size=8)
    out = outputs_and_grads(titans_ext.linear_memory, strided, init, chunk_size=8)
    _compare(ref, out, 1e-14)


def test_transposed_head_layout():
    """[B, H, T, D] storage viewed as [B, T, H, D] (the feature dim stays contiguous)."""
    inputs, init = memory_inputs(1, 20, 2, 4, 4, torch.float64)
    views = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in inputs]
    ref = outputs_and_grads(titans_ext.linear_memory, inputs, init, chunk_size=8)
    out = outputs_and_grads(titans_ext.linear_memory, views, init, chunk_size=8)
    _compare(ref, out, 1e-14)


def test_empty_sequence_returns_the_initial_state():
    inputs, init = memory_inputs(2, 0, 2, 4, 3, torch.float32)
    o, (m, s) = titans_ext.linear_memory(*inputs, initial_state=init, output_final_state=True)
    assert o.shape == (2, 0, 2, 3)
    torch.testing.assert_close(m, init[0])
    torch.testing.assert_close(s, init[1])
    init_leaves = tuple(x.clone().requires_grad_() for x in init)
    _, (m, s) = titans_ext.linear_memory(*inputs, initial_state=init_leaves, output_final_state=True)
    dm0, ds0 = torch.autograd.grad(m.sum() + 2 * s.sum(), init_leaves)
    torch.testing.assert_close(dm0, torch.ones_like(dm0))
    torch.testing.assert_close(ds0, 2 * torch.ones_like(ds0))


def test_no_grad_call_saves_no_states():
    inputs, init = memory_inputs(1, 64, 1, 8, 8)
    with torch.no_grad():
        o, _ = titans_ext.linear_memory(*inputs, initial_state=init)
    assert not o.requires_grad


def test_opcheck():
    opcheck_linear_memory((2, 19, 2, 4, 3), chunk_size=8)


def test_opcheck_strided_inputs():
    """q, k, v as views of one [B, H, T, 3D] projection (as a model makes them): the fake kernels must
    give the real outputs' strides, else torch.compile's inductor rejects the backward's results."""
    B, T, H, D = 2, 9, 2, 4
    inputs, init = memory_inputs(B, T, H, D, D)
    q, k, v = torch.cat(inputs[:3], dim=-1).transpose(1, 2).contiguous().transpose(1, 2).split(D, dim=-1)
    args = (q, k, v, *inputs[3:], *init, 4, True, True)
    torch.library.opcheck(torch.ops.titans_ext.linear_memory_fwd.default, args)
    o, m, s, states = torch.ops.titans_ext.linear_memory_fwd(*args)
    bwd_args = (q, k, v, *inputs[3:], states, torch.randn_like(o), torch.randn_like(m), None, 4, True)
    torch.library.opcheck(torch.ops.titans_ext.linear_memory_bwd.default, bwd_args)


def test_torch_compile_fullgraph():
    inputs, init = memory_inputs(1, 40, 2, 8, 8, torch.float32)

    def step(q, k, v, theta, eta, alpha, m0, s0):
        o, (m, s) = titans_ext.linear_memory(q, k, v, theta.sigmoid(), eta, alpha, chunk_size=16,
                                             initial_state=(m0, s0), output_final_state=True)
        return o.square().sum() + m.sum() + s.sum()

    assert_compile_matches_eager(step, inputs + list(init), GRAD_NAMES)
