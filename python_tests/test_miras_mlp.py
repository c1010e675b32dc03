"""MIRAS options of mlp_memory (objectives, lq / kl retention) against the float64 token loop.

The token loop differentiates each objective's per-token loss through the MLP with autograd and
applies the retention literally to each weight; the C++ kernels apply the error map f inside the
dual form and its handwritten backward (f', d f / d delta, the lq scales' rho0 terms and the kl softmax).
"""

import pytest
import torch

import titans_ext
from titans_ext.reference import mlp_memory_chunked, mlp_memory_recurrent

from miras_cases import OBJECTIVES, RETENTIONS, compare, needs_delta, values_and_grads
from mlp_inputs import GRAD_NAMES, OUT_NAMES, mlp_inputs, opcheck_mlp_memory_bwd
from utils import TOLERANCE, assert_close, random_cotangents

F64 = TOLERANCE[torch.float64]
NAMES = OUT_NAMES + GRAD_NAMES + ["d_delta"]


def _inputs(T=11, B=2, H=2, D=4, E=2, seed=0, retention="l2"):
    inputs, weights, momentum = mlp_inputs(B, T, H, D, E, torch.float64, seed=seed)
    if retention == "kl":  # positive weights with rows on the simplex
        weights = tuple(torch.softmax(3 * w, dim=-1) for w in weights)
    return inputs, weights, momentum


def _delta(objective, kind, inputs, seed=3):
    """Thresholds inside the residuals' range (entries ~0.5, token norms ~1.5 for these inputs),
    so both branches occur: scalar, per token [B, T, H] or per channel [B, T, H, D]."""
    low, width = (1.0, 0.9) if objective == "yaad" else (0.2, 0.7)
    B, T, H, D = inputs[2].shape
    if kind == "scalar":
        return torch.tensor(low + width / 2, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    shape = (B, T, H) if kind == "token" else (B, T, H, D)
    return low + width * torch.rand(shape, generator=g, dtype=torch.float64)


def _run(fn, inputs, weights, momentum, objective, delta=None, **kwargs):
    """o, final state and the gradients of a random functional of them (delta's included)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    w_leaves = tuple(x.detach().clone().requires_grad_() for x in weights)
    m_leaves = tuple(x.detach().clone().requires_grad_() for x in momentum)
    delta_leaf = None if delta is None else delta.detach().clone().requires_grad_()
    o, ((W1, W2), (S1, S2)) = fn(*leaves, w_leaves, momentum=m_leaves, output_final_state=True,
                                 objective=OBJECTIVES[objective](delta_leaf), **kwargs)
    outs = [o, W1, W2, S1, S2]
    wrt = leaves + list(w_leaves) + list(m_leaves) + ([delta_leaf] if delta is not None else [])
    return values_and_grads(outs, wrt)


def _compare(ref, out, ratio=F64):
    compare(NAMES, ref, out, ratio)


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_objective_matches_token_loop(objective, read):
    inputs, weights, momentum = _inputs()
    delta = _delta(objective, "token", inputs) if needs_delta(objective) else None
    kwargs = dict(chunk_size=4, read=read)
    ref = _run(mlp_memory_recurrent, inputs, weights, momentum, objective, delta, **kwargs)
    out = _run(titans_ext.mlp_memory, inputs, weights, momentum, objective, delta, **kwargs)
    _compare(ref, out)


@pytest.mark.parametrize("delta_kind", ["scalar", "channel"])
@pytest.mark.parametrize("objective", ["huber", "pseudo_huber", "yaad"])
def test_delta_shapes(objective, delta_kind):
    inputs, weights, momentum = _inputs(T=9, seed=1)
    delta = _delta(objective, delta_kind, inputs)
    ref = _run(mlp_memory_recurrent, inputs, weights, momentum, objective, delta, chunk_size=4, activation="silu")
    out = _run(titans_ext.mlp_memory, inputs, weights, momentum, objective, delta, chunk_size=4, activation="silu")
    _compare(ref, out)
    assert out[-1].shape == delta.shape


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("objective, retention", [("l2", "lq4"), ("lp3", "lq4"), ("huber", "lq3"), ("l2", "kl"),
                                                  ("lp3", "kl"), ("pseudo_huber", "kl"), ("yaad", "kl")])
def test_retention_matches_token_loop(objective, retention, read):
    inputs, weights, momentum = _inputs(retention=retention)
    delta = _delta(objective, "channel", inputs) if needs_delta(objective) else None
    kwargs = dict(chunk_size=4, read=read, retention=RETENTIONS[retention])
    ref = _run(mlp_memory_recurrent, inputs, weights, momentum, objective, delta, **kwargs)
    out = _run(titans_ext.mlp_memory, inputs, weights, momentum, objective, delta, **kwargs)
    _compare(ref, out)


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("chunk_size", [1, 3, 8])
@pytest.mark.parametrize("retention", ["lq4", "kl"])
def test_retention_chunk_sizes(retention, chunk_size, read):
    """C = 1 makes every token its own chunk: kl's lag token (the exact Memora recurrence on both
    weights), lq's reads at rho(A_{t-1}) A_t for each weight. C = 8 leaves a last chunk of 5
    tokens, C = 3 one of a single token."""
    inputs, weights, momentum = _inputs(T=13, retention=retention)
    kwargs = dict(chunk_size=chunk_size, read=read, retention=RETENTIONS[retention])
    _compare(_run(mlp_memory_recurrent, inputs, weights, momentum, "lp3", **kwargs),
             _run(titans_ext.mlp_memory, inputs, weights, momentum, "lp3", **kwargs))


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("objective, retention", [("huber", "lq4"), ("yaad", "kl"), ("lp1.5", "l2")])
def test_chunked_reference_matches_token_loop(objective, retention, read):
    inputs, weights, momentum = _inputs(retention=retention)
    delta = _delta(objective, "channel", inputs) if needs_delta(objective) else None
    kwargs = dict(chunk_size=4, read=read, retention=RETENTIONS[retention])
    _compare(_run(mlp_memory_recurrent, inputs, weights, momentum, objective, delta, **kwargs),
             _run(mlp_memory_chunked, inputs, weights, momentum, objective, delta, **kwargs), 1e-9)


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("chunk_size", [1, 4, 8])
@pytest.mark.parametrize("objective, retention", [("lp3", "lq4"), ("l2", "lq3")])
def test_lq_chunked_reference_matches_token_loop(objective, retention, chunk_size, read):
    """The accumulator form of docs/miras.md §2.3 (each weight with its own rho0) in both
    references, through o and the final state: C = 1, and C = 4, 8 with a short last chunk."""
    inputs, weights, momentum = _inputs(T=11)
    kwargs = dict(chunk_size=chunk_size, read=read, retention=RETENTIONS[retention])
    _compare(_run(mlp_memory_recurrent, inputs, weights, momentum, objective, **kwargs),
             _run(mlp_memory_chunked, inputs, weights, momentum, objective, **kwargs), 1e-9)


@pytest.mark.parametrize("fn", [titans_ext.mlp_memory, mlp_memory_chunked, mlp_memory_recurrent])
def test_lq_reads_the_scaled_accumulator(fn):
    """With nothing written (theta = 0, alpha = 0, no momentum) the accumulators stay A1, A2
    across chunks and every token reads q + rho2 A2 gelu(rho1 A1 q), rho_i = ||A_i||_4^(-2):
    the carried weights are never rescaled. Gradients against autograd of that closed form."""
    inputs, weights, _ = _inputs(T=10)
    q, k, v, theta, eta, alpha = inputs
    zero = torch.zeros_like(theta)
    q_leaf = q.clone().requires_grad_()
    A = tuple(w.clone().requires_grad_() for w in weights)
    o, (A_T, S_T) = fn(q_leaf, k, v, zero, eta, zero, A, chunk_size=4, output_final_state=True,
                       retention=("lq", 4))
    rho1, rho2 = (w.pow(4).sum(dim=(-2, -1), keepdim=True).pow(-0.5) for w in A)
    hidden = torch.nn.functional.gelu(torch.einsum("bhnd,bthd->bthn", rho1 * A[0], q_leaf))
    expected = q_leaf + torch.einsum("bhdn,bthn->bthd", rho2 * A[1], hidden)
    for name, a, b in zip(["W1_T", "W2_T"], weights, A_T):
        assert_close(name, a, b.detach(), 1e-15)
    assert max(s.abs().max() for s in S_T) == 0
    assert_close("o", expected.detach(), o.detach(), 1e-14)
    cot_o, *cot_A = random_cotangents([o, *A_T])
    loss = (o * cot_o).sum() + sum((a * c).sum() for a, c in zip(A_T, cot_A))
    expected_loss = (expected * cot_o).sum() + sum((a * c).sum() for a, c in zip(A, cot_A))
    grads = torch.autograd.grad(loss, [q_leaf, *A])
    expected_grads = torch.autograd.grad(expected_loss, [q_leaf, *A])
    for name, a, b in zip(["dq", "dW1", "dW2"], expected_grads, grads):
        assert_close(name, a, b, 1e-13)


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("fn", [titans_ext.mlp_memory, mlp_memory_chunked])
def test_lq_with_q2_equals_l2(fn, read):
    """rho0 = ||A0||_2^0 = 1 and its derivative vanishes: ("lq", 2) is the l2 retention."""
    inputs, weights, momentum = _inputs(T=11)
    kwargs = dict(chunk_size=4, read=read)
    _compare(_run(fn, inputs, weights, momentum, "lp3", retention="l2", **kwargs),
             _run(fn, inputs, weights, momentum, "lp3", retention=("lq", 2), **kwargs), 1e-14)


def test_lq_zero_initial_accumulator():
    """W2 = 0: its first chunk runs with rho0 = 1, and rho0's gradient term vanishes there."""
    inputs, (W1, W2), momentum = _inputs(T=11)
    weights = (W1, torch.zeros_like(W2))
    kwargs = dict(chunk_size=4, retention=("lq", 4))
    _compare(_run(mlp_memory_recurrent, inputs, weights, momentum, "lp3", **kwargs),
             _run(titans_ext.mlp_memory, inputs, weights, momentum, "lp3", **kwargs))


@pytest.mark.parametrize("objective", ["huber", "yaad"])
def test_residuals_exactly_at_delta(objective):
    """With W2 = 0 the residuals at the chunk-start weights are exactly k - v: delta = |k - v|
    (huber, per channel) or ||k - v|| (yaad, per token) puts every residual of the one chunk on
    the threshold, where the inside branch applies (f = 2r, f' = 2, no delta gradient)."""
    inputs, (W1, W2), momentum = _inputs(T=8)
    weights = (W1, torch.zeros_like(W2))
    r = inputs[1] - inputs[2]
    delta = r.abs() if objective == "huber" else torch.linalg.vector_norm(r, dim=-1)
    ref = _run(mlp_memory_recurrent, inputs, weights, momentum, objective, delta, chunk_size=8)
    out = _run(titans_ext.mlp_memory, inputs, weights, momentum, objective, delta, chunk_size=8)
    _compare(ref, out)
    l2 = _run(titans_ext.mlp_memory, inputs, weights, momentum, "l2", chunk_size=8)
    _compare(l2, out[:-1], 1e-14)
    assert out[-1].abs().max() == 0


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("objective, retention", [("lp3", "lq4"), ("huber", "kl"), ("yaad", "l2")])
def test_stream_split_at_chunk_boundary_equals_one_call(objective, retention, read):
    inputs, weights, momentum = _inputs(T=14, retention=retention)
    delta = _delta(objective, "channel", inputs).requires_grad_() if needs_delta(objective) else None
    leaves = [x.clone().requires_grad_() for x in inputs]
    w_leaves = tuple(x.clone().requires_grad_() for x in weights)
    m_leaves = tuple(x.clone().requires_grad_() for x in momentum)
    kwargs = dict(chunk_size=4, read=read, retention=RETENTIONS[retention], output_final_state=True)

    def call(x, w, m, d):
        return titans_ext.mlp_memory(*x, w, momentum=m, objective=OBJECTIVES[objective](d), **kwargs)

    o_full, (w_full, m_full) = call(leaves, w_leaves, m_leaves, delta)
    split = lambda x, sl: None if x is None else x[:, sl]  # noqa: E731
    o1, (w1, m1) = call([x[:, :8] for x in leaves], w_leaves, m_leaves, split(delta, slice(0, 8)))
    o2, (w2, m2) = call([x[:, 8:] for x in leaves], w1, m1, split(delta, slice(8, None)))
    o_split = torch.cat([o1, o2], dim=1)
    full, parts = [o_full, *w_full, *m_full], [o_split, *w2, *m2]
    for name, a, b in zip(OUT_NAMES, full, parts):
        assert_close(name, a, b, 1e-12)
    wrt = leaves + list(w_leaves) + list(m_leaves) + ([delta] if delta is not None else [])
    g_full = torch.autograd.grad(sum(x.sum() for x in full), wrt)
    g_split = torch.autograd.grad(sum(x.sum() for x in parts), wrt)
    for name, a, b in zip(NAMES[len(OUT_NAMES):], g_full, g_split):
        assert_close(name, a, b, 1e-12)


@pytest.mark.parametrize("retention, read", [("kl", "token"), ("lq4", "token"), ("lq4", "chunk_start")])
def test_float32_matches_float64_reference(retention, read):
    inputs, weights, momentum = _inputs(T=13, retention=retention)
    delta = _delta("pseudo_huber", "token", inputs)
    kwargs = dict(chunk_size=8, read=read, retention=RETENTIONS[retention])
    ref = _run(mlp_memory_recurrent, inputs, weights, momentum, "pseudo_huber", delta, **kwargs)
    out = _run(titans_ext.mlp_memory, [x.float() for x in inputs], tuple(w.float() for w in weights),
               tuple(m.float() for m in momentum), "pseudo_huber", delta.float(), **kwargs)
    _compare(ref, out, TOLERANCE[torch.float32])


def _opcheck_args(requires_grad):
    inputs, weights, momentum = mlp_inputs(2, 7, 2, 4, 2, torch.float32)
    weights = tuple(torch.softmax(w, dim=-1) for w in weights)
    tensors = [x.requires_grad_(requires_grad) for x in [*inputs, *weights, *momentum]]
    delta = (0.5 + torch.rand(2, 7, 2, 4)).requires_grad_(requires_grad)
    return (*tensors, 3, True, "gelu", True, 4, 2.0, 0.0, delta, 2, 2.0)  # yaad, kl


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_forward(requires_grad):
    torch.library.opcheck(torch.ops.titans_ext.mlp_memory_fwd.default, _opcheck_args(requires_grad))


def test_opcheck_backward():
    opcheck_mlp_memory_bwd(_opcheck_args(False))


def _call(**kwargs):
    inputs, weights, _ = _inputs(T=6)
    kwargs.setdefault("weights", weights)
    return titans_ext.mlp_memory(*inputs, kwargs.pop("weights"), chunk_size=4, **kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(objective="l1"), ValueError, r"objective: expected"),
    (dict(objective=("lp", 1.5)), ValueError, r"objective: lp with p=1.5 < 2 needs eps > 0"),
    (dict(objective=("huber", 0.0)), ValueError, r"delta: expected delta > 0, got 0.0"),
    (dict(objective=("yaad", torch.tensor([0.5, 0.0]))), ValueError, r"delta: expected delta > 0 everywhere"),
    (dict(objective=("huber", torch.ones(2, 6, 2, 3))), ValueError, r"delta: expected a tensor broadcastable"),
    (dict(retention="l1"), ValueError, r'retention: expected "l2", \("lq", q\) or "kl"'),
    (dict(retention=("lq", 0.5)), ValueError, r"retention: lq needs q > 1, got q=0.5"),
    (dict(retention="kl", weights=(torch.zeros(2, 2, 8, 4, dtype=torch.float64),
                                   torch.ones(2, 2, 4, 8, dtype=torch.float64))), ValueError,
     r"weights: retention=\"kl\" needs a memory with a positive entry in every row"),
])
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        _call(**kwargs)
