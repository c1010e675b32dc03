"""MIRAS options of linear_memory (objectives, lq / kl retention) against the float64 token loop.

The token loop differentiates each objective's per-token loss with autograd and applies the
retention literally; the C++ kernels apply the error map f and its handwritten backward.
"""

import pytest
import torch

import titans_ext
from titans_ext.reference import linear_memory_chunked, linear_memory_recurrent

from miras_cases import OBJECTIVES, RETENTIONS, compare, needs_delta, values_and_grads
from utils import GRAD_NAMES, TOLERANCE, assert_close, memory_inputs, random_cotangents

F64 = TOLERANCE[torch.float64]
NAMES = ["o", "M_T", "S_T"] + GRAD_NAMES + ["d_delta"]


def _inputs(T=19, B=2, H=2, Dk=5, Dv=4, seed=0, retention="l2"):
    inputs, init = memory_inputs(B, T, H, Dk, Dv, torch.float64, seed=seed, theta_max=0.2)
    if retention == "kl":  # a positive memory on the simplex rows
        init = (torch.softmax(3 * init[0], dim=-1), init[1])
    return inputs, init


def _delta(kind, inputs, seed=3):
    """Thresholds around the residuals' scale: scalar, per token [B, T, H] or per channel."""
    B, T, H, Dv = inputs[2].shape
    g = torch.Generator().manual_seed(seed)
    if kind == "scalar":
        return torch.tensor(0.6, dtype=torch.float64)
    shape = (B, T, H) if kind == "token" else (B, T, H, Dv)
    return 0.3 + torch.rand(shape, generator=g, dtype=torch.float64)


def _run(fn, inputs, init, objective, delta=None, **kwargs):
    """o, final state and the gradients of a random functional of them, delta's included."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    init_leaves = None if init is None else tuple(x.detach().clone().requires_grad_() for x in init)
    delta_leaf = None if delta is None else delta.detach().clone().requires_grad_()
    o, (m, s) = fn(*leaves, initial_state=init_leaves, output_final_state=True,
                   objective=OBJECTIVES[objective](delta_leaf), **kwargs)
    outs = [o, m, s]
    wrt = leaves + list(init_leaves or []) + ([delta_leaf] if delta is not None else [])
    return values_and_grads(outs, wrt)


def _compare(ref, out, ratio=F64):
    compare(NAMES, ref, out, ratio)


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_objective_matches_token_loop(objective, read):
    inputs, init = _inputs()
    delta = _delta("token", inputs) if needs_delta(objective) else None
    ref = _run(linear_memory_recurrent, inputs, init, objective, delta, chunk_size=4, read=read)
    out = _run(titans_ext.linear_memory, inputs, init, objective, delta, chunk_size=4, read=read)
    _compare(ref, out)


@pytest.mark.parametrize("delta_kind", ["scalar", "channel"])
@pytest.mark.parametrize("objective", ["huber", "pseudo_huber", "yaad"])
def test_delta_shapes(objective, delta_kind):
    inputs, init = _inputs(T=13, seed=1)
    delta = _delta(delta_kind, inputs)
    ref = _run(linear_memory_recurrent, inputs, init, objective, delta, chunk_size=4)
    out = _run(titans_ext.linear_memory, inputs, init, objective, delta, chunk_size=4)
    _compare(ref, out)
    assert out[-1].shape == delta.shape


def test_delta_as_float_and_per_head():
    inputs, init = _inputs(T=9)
    per_head = torch.tensor([0.5, 0.8], dtype=torch.float64)
    ref = _run(linear_memory_recurrent, inputs, init, "huber", per_head, chunk_size=4)
    out = _run(titans_ext.linear_memory, inputs, init, "huber", per_head, chunk_size=4)
    _compare(ref, out)
    o_float, _ = titans_ext.linear_memory(*inputs, chunk_size=4, initial_state=init, objective=("huber", 0.5))
    o_tensor, _ = titans_ext.linear_memory(*inputs, chunk_size=4, initial_state=init,
                                           objective=("huber", torch.tensor(0.5, dtype=torch.float64)))
    assert_close("o", o_tensor, o_float, 1e-15)


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("objective, retention", [("l2", "lq4"), ("lp3", "lq4"), ("huber", "lq3"), ("l2", "kl"),
                                                  ("lp3", "kl"), ("pseudo_huber", "kl"), ("yaad", "kl")])
def test_retention_matches_token_loop(objective, retention, read):
    inputs, init = _inputs(retention=retention)
    delta = _delta("channel", inputs) if needs_delta(objective) else None
    kwargs = dict(chunk_size=4, read=read, retention=RETENTIONS[retention])
    ref = _run(linear_memory_recurrent, inputs, init, objective, delta, **kwargs)
    out = _run(titans_ext.linear_memory, inputs, init, objective, delta, **kwargs)
    _compare(ref, out)


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("chunk_size", [1, 3, 8])
@pytest.mark.parametrize("retention", ["lq4", "kl"])
def test_retention_chunk_sizes(retention, chunk_size, read):
    """C = 1 makes every token its own chunk: kl's lag token (the exact Memora recurrence), lq's
    o_t = rho(A_{t-1}) A_t q_t. C = 8 leaves a last chunk of 3 tokens, C = 3 one of a single token."""
    inputs, init = _inputs(T=19, retention=retention)
    kwargs = dict(chunk_size=chunk_size, read=read, retention=RETENTIONS[retention])
    _compare(_run(linear_memory_recurrent, inputs, init, "lp3", **kwargs),
             _run(titans_ext.linear_memory, inputs, init, "lp3", **kwargs))


@pytest.mark.parametrize("retention", ["lq4", "kl"])
def test_retention_without_initial_state(retention):
    """No initial state: lq leaves the zero memory unscaled, kl starts from uniform rows 1/Dk."""
    inputs, _ = _inputs(T=11)
    kwargs = dict(chunk_size=4, retention=RETENTIONS[retention])
    ref = _run(linear_memory_recurrent, inputs, None, "lp3", **kwargs)
    out = _run(titans_ext.linear_memory, inputs, None, "lp3", **kwargs)
    _compare(ref[:9], out)


@pytest.mark.parametrize("objective, retention", [("huber", "lq4"), ("yaad", "kl"), ("lp1.5", "l2")])
def test_chunked_reference_matches_token_loop(objective, retention):
    inputs, init = _inputs(T=14, retention=retention)
    delta = _delta("channel", inputs) if needs_delta(objective) else None
    kwargs = dict(chunk_size=4, retention=RETENTIONS[retention])
    _compare(_run(linear_memory_recurrent, inputs, init, objective, delta, **kwargs),
             _run(linear_memory_chunked, inputs, init, objective, delta, **kwargs), 1e-9)


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("chunk_size", [1, 4, 8])
@pytest.mark.parametrize("objective, retention", [("lp3", "lq4"), ("l2", "lq3")])
def test_lq_chunked_reference_matches_token_loop(objective, retention, chunk_size, read):
    """The accumulator form of docs/miras.md §2.3 in both references, through o and the final
    state: C = 1, and C = 4, 8 with a short last chunk (T = 19)."""
    inputs, init = _inputs(T=19)
    kwargs = dict(chunk_size=chunk_size, read=read, retention=RETENTIONS[retention])
    _compare(_run(linear_memory_recurrent, inputs, init, objective, **kwargs),
             _run(linear_memory_chunked, inputs, init, objective, **kwargs), 1e-9)


@pytest.mark.parametrize("fn", [titans_ext.linear_memory, linear_memory_chunked, linear_memory_recurrent])
def test_lq_reads_the_scaled_accumulator(fn):
    """With nothing written (theta = 0, alpha = 0, S0 = 0) the accumulator stays A0 across chunks
    and every token reads rho0 A0 q_t, rho0 = ||A0||_4^(-2): the carried state is never rescaled.
    Gradients against autograd of that closed form (the rho0 term of the backward included)."""
    inputs, (A0, _) = _inputs(T=10)
    q, k, v, theta, eta, alpha = inputs
    zero = torch.zeros_like(theta)
    q_leaf, A0_leaf = q.clone().requires_grad_(), A0.clone().requires_grad_()
    o, (A_T, S_T) = fn(q_leaf, k, v, zero, eta, zero, chunk_size=4, initial_state=(A0_leaf, torch.zeros_like(A0)),
                       output_final_state=True, retention=("lq", 4))
    rho0 = A0_leaf.pow(4).sum(dim=(-2, -1), keepdim=True).pow(-0.5)
    expected = torch.einsum("bhvk,bthk->bthv", rho0 * A0_leaf, q_leaf)
    assert_close("A_T", A0, A_T.detach(), 1e-15)
    assert S_T.abs().max() == 0
    assert_close("o", expected.detach(), o.detach(), 1e-14)
    cot_o, cot_A = random_cotangents([o, A_T])
    grads = torch.autograd.grad((o * cot_o).sum() + (A_T * cot_A).sum(), [q_leaf, A0_leaf])
    expected_grads = torch.autograd.grad((expected * cot_o).sum() + (A0_leaf * cot_A).sum(), [q_leaf, A0_leaf])
    for name, a, b in zip(["dq", "dA0"], expected_grads, grads):
        assert_close(name, a, b, 1e-13)


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("fn", [titans_ext.linear_memory, linear_memory_chunked])
def test_lq_with_q2_equals_l2(fn, read):
    """rho0 = ||A0||_2^0 = 1 and its derivative vanishes: ("lq", 2) is the l2 retention."""
    inputs, init = _inputs(T=13)
    kwargs = dict(chunk_size=4, read=read)
    _compare(_run(fn, inputs, init, "lp3", retention="l2", **kwargs),
             _run(fn, inputs, init, "lp3", retention=("lq", 2), **kwargs), 1e-14)


def test_lq_zero_initial_accumulator():
    """A0 = 0: the first chunk runs with rho0 = 1, and rho0's gradient term vanishes there."""
    inputs, (A0, S0) = _inputs(T=11)
    init = (torch.zeros_like(A0), S0)
    kwargs = dict(chunk_size=4, retention=("lq", 4))
    _compare(_run(linear_memory_recurrent, inputs, init, "lp3", **kwargs),
             _run(titans_ext.linear_memory, inputs, init, "lp3", **kwargs))


@pytest.mark.parametrize("objective", ["huber", "yaad"])
def test_residuals_exactly_at_delta(objective):
    """With a zero memory the first chunk's residuals are -v: delta = |v| (huber, per channel) or
    ||v|| (yaad, per token) puts every residual of that chunk on the threshold, where the inside
    branch applies (f = 2r, f' = 2, no delta gradient)."""
    inputs, _ = _inputs(T=8)
    v = inputs[2]
    delta = v.abs() if objective == "huber" else torch.linalg.vector_norm(v, dim=-1)
    ref = _run(linear_memory_recurrent, inputs, None, objective, delta, chunk_size=8)
    out = _run(titans_ext.linear_memory, inputs, None, objective, delta, chunk_size=8)
    _compare(ref[:9] + ref[-1:], out[:9] + out[-1:])
    # One chunk from zero: the result equals the l2 objective's, and delta gets no gradient.
    l2 = _run(titans_ext.linear_memory, inputs, None, "l2", chunk_size=8)
    _compare(l2[:9], out[:9], 1e-14)
    assert out[-1].abs().max() == 0


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("objective, retention", [("lp3", "lq4"), ("huber", "kl"), ("yaad", "l2")])
def test_stream_split_at_chunk_boundary_equals_one_call(objective, retention, read):
    inputs, init = _inputs(T=20, retention=retention)
    delta = _delta("channel", inputs).requires_grad_() if needs_delta(objective) else None
    leaves = [x.clone().requires_grad_() for x in inputs]
    init_leaves = tuple(x.clone().requires_grad_() for x in init)
    kwargs = dict(chunk_size=4, read=read, retention=RETENTIONS[retention], output_final_state=True)

    def call(x, state, d):
        return titans_ext.linear_memory(*x, initial_state=state, objective=OBJECTIVES[objective](d), **kwargs)

    o_full, (m_full, s_full) = call(leaves, init_leaves, delta)
    split = lambda x, sl: None if x is None else x[:, sl]  # noqa: E731
    o1, state = call([x[:, :12] for x in leaves], init_leaves, split(delta, slice(0, 12)))
    o2, (m2, s2) = call([x[:, 12:] for x in leaves], state, split(delta, slice(12, None)))
    o_split = torch.cat([o1, o2], dim=1)
    for name, a, b in (("o", o_full, o_split), ("M_T", m_full, m2), ("S_T", s_full, s2)):
        assert_close(name, a, b, 1e-12)
    wrt = leaves + list(init_leaves) + ([delta] if delta is not None else [])
    g_full = torch.autograd.grad(o_full.sum() + m_full.sum() + s_full.sum(), wrt)
    g_split = torch.autograd.grad(o_split.sum() + m2.sum() + s2.sum(), wrt)
    for name, a, b in zip(NAMES[3:], g_full, g_split):
        assert_close(name, a, b, 1e-12)


@pytest.mark.parametrize("retention, read", [("kl", "token"), ("lq4", "token"), ("lq4", "chunk_start")])
def test_float32_matches_float64_reference(retention, read):
    inputs, init = _inputs(T=21, retention=retention)
    delta = _delta("token", inputs)
    kwargs = dict(chunk_size=8, read=read, retention=RETENTIONS[retention])
    ref = _run(linear_memory_recurrent, inputs, init, "pseudo_huber", delta, **kwargs)
    out = _run(titans_ext.linear_memory, [x.float() for x in inputs], tuple(x.float() for x in init),
               "pseudo_huber", delta.float(), **kwargs)
    _compare(ref, out, TOLERANCE[torch.float32])


def _opcheck_args(requires_grad):
    inputs, init = memory_inputs(2, 11, 2, 4, 3, torch.float32)
    tensors = [x.requires_grad_(requires_grad) for x in inputs + [torch.softmax(init[0], -1), init[1]]]
    delta = (0.5 + torch.rand(2, 11, 2, 3)).requires_grad_(requires_grad)
    return (*tensors, 4, True, True, 4, 2.0, 0.0, delta, 2, 2.0)  # yaad, kl


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_forward(requires_grad):
    torch.library.opcheck(torch.ops.titans_ext.linear_memory_fwd.default, _opcheck_args(requires_grad))


def test_opcheck_backward():
    q, k, v, theta, eta, alpha, m0, s0, C, read_token, _, *miras = _opcheck_args(False)
    o, m, s, states = torch.ops.titans_ext.linear_memory_fwd(q, k, v, theta, eta, alpha, m0, s0, C, read_token, True,
                                                             *miras)
    args = (q, k, v, theta, eta, alpha, states, torch.randn_like(o), torch.randn_like(m), None, C, read_token, *miras)
    torch.library.opcheck(torch.ops.titans_ext.linear_memory_bwd.default, args)


def test_torch_compile_fullgraph():
    inputs, init = _inputs(T=12)
    inputs = [x.float() for x in inputs]

    def step(q, k, v, theta, eta, alpha, delta):
        o, _ = titans_ext.linear_memory(q, k, v, theta, eta, alpha, chunk_size=4, objective=("huber", delta),
                                        retention=("lq", 3))
        return o.square().sum()

    leaves = [x.clone().requires_grad_() for x in inputs] + [torch.tensor(0.4, requires_grad=True)]
    eager = torch.autograd.grad(step(*leaves), leaves)
    compiled = torch.autograd.grad(torch.compile(step, fullgraph=True)(*leaves), leaves)
    for a, b in zip(eager, compiled):
        assert_close("grad", a, b, 1e-5)


def _call(**kwargs):
    inputs, init = _inputs(T=6)
    kwargs.setdefault("initial_state", init)
    return titans_ext.linear_memory(*inputs, chunk_size=4, **kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(objective="l1"), ValueError, r"objective: expected"),
    (dict(objective=("lp", 0.5, 0.1)), ValueError, r"objective: lp needs p >= 1"),
    (dict(objective=("lp", 1.5)), ValueError, r"objective: lp with p=1.5 < 2 needs eps > 0"),
    (dict(objective=("lp", 3, -1.0)), ValueError, r"objective: lp needs eps >= 0"),
    (dict(objective=("lp", "3")), TypeError, r"objective \(p\): expected a real number"),
    (dict(objective=("lp",)), ValueError, r'objective: expected \("lp", p\)'),
    (dict(objective=("huber",)), ValueError, r'objective: expected \("huber", delta\)'),
    (dict(objective=("huber", 0.0)), ValueError, r"delta: expected delta > 0, got 0.0"),
    (dict(objective=("pseudo_huber", -1)), ValueError, r"delta: expected delta > 0"),
    (dict(objective=("yaad", torch.tensor([0.5, 0.0]))), ValueError, r"delta: expected delta > 0 everywhere"),
    (dict(objective=("huber", torch.ones(3))), ValueError, r"delta: expected a tensor broadcastable to \[B, T, H\]"),
    (dict(objective=("huber", torch.ones(2, 6, 2, 3))), ValueError, r"delta: expected a tensor broadcastable"),
    (dict(objective=("huber", torch.ones(1, dtype=torch.int64))), TypeError, r"delta: expected dtype in"),
    (dict(retention="l1"), ValueError, r'retention: expected "l2", \("lq", q\) or "kl"'),
    (dict(retention=("lq", 1)), ValueError, r"retention: lq needs q > 1, got q=1.0"),
    (dict(retention=("lq", None)), TypeError, r"retention \(q\): expected a real number"),
    (dict(retention="kl", initial_state=(torch.zeros(2, 2, 4, 5), torch.zeros(2, 2, 4, 5))), ValueError,
     r"initial_state: retention=\"kl\" needs a memory with a positive entry in every row"),
])
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        _call(**kwargs)
