"""Packed variable-length sequences (``cu_seqlens``, docs/design.md §6) in both memories.

The definition is "each sequence runs as its own call": every test compares one packed call
with the op called once per sequence (values, final states and the gradients of a random
functional of both, the initial states' included), over sequences shorter than a chunk, of
length 1 and of length 0, at odd chunk sizes, with every MIRAS option the CPU kernels take.
"""

import re
from pathlib import Path

import pytest
import torch

import titans_ext
from titans_ext.reference import (linear_memory_chunked, linear_memory_recurrent, mlp_memory_chunked,
                                  mlp_memory_recurrent)

from miras_cases import OBJECTIVES, RETENTIONS, needs_delta
from utils import TOLERANCE, assert_close, assert_compile_matches_eager, memory_inputs, random_cotangents

# Sequences shorter than a chunk, of length 0 (first, inside and last) and 1, and longer ones.
LENGTHS = (0, 5, 1, 0, 11, 3, 8, 0)


def offsets(lengths, dtype=torch.int32):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype)


def _linear_case(lengths=LENGTHS, H=2, Dk=5, Dv=3, dtype=torch.float64, seed=0, kl=False):
    """Packed inputs [1, T, ...] and an initial state [N, H, Dv, Dk]."""
    T, N = sum(lengths), len(lengths)
    inputs, _ = memory_inputs(1, T, H, Dk, Dv, dtype, seed=seed, theta_max=0.2, state=False)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(seed + 1)
    init = [0.3 * torch.randn(N, H, Dv, Dk, generator=g, dtype=torch.float64).to(state_dtype) for _ in range(2)]
    if kl:  # a positive memory on the simplex rows
        init[0] = torch.softmax(3 * init[0], dim=-1)
    return inputs, tuple(init)


def _mlp_case(lengths=LENGTHS, H=2, D=4, E=2, dtype=torch.float64, seed=0, kl=False):
    """Packed inputs [1, T, ...], weights and momenta [N, H, ...]."""
    T, N = sum(lengths), len(lengths)
    inputs, _ = memory_inputs(1, T, H, D, D, dtype, seed=seed, theta_max=0.2, state=False)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(seed + 1)

    def rand(*shape, scale):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(state_dtype)

    W = [rand(N, H, E * D, D, scale=D ** -0.5), rand(N, H, D, E * D, scale=(E * D) ** -0.5)]
    if kl:
        W = [torch.softmax(3 * w, dim=-1) for w in W]
    S = (rand(N, H, E * D, D, scale=0.1 * D ** -0.5), rand(N, H, D, E * D, scale=0.1 * (E * D) ** -0.5))
    return inputs, tuple(W), S


def _per_token_delta(v, seed=3):
    g = torch.Generator().manual_seed(seed)
    return 0.3 + torch.rand(v.shape[:3], generator=g, dtype=torch.float64).to(v.dtype)


def _values_and_grads(run, tensors):
    """``run(*leaves) -> (o, nested final state)`` on fresh leaves of ``tensors``: o and the final
    state's tensors, then the gradients in every leaf of a random functional of them."""
    leaves = [x.detach().clone().requires_grad_() for x in tensors]
    o, final = run(*leaves)
    outs = [o, *_flatten(final)]
    loss = sum((a.double() * b.double()).sum() for a, b in zip(outs, random_cotangents(outs)))
    return [x.detach() for x in outs] + list(torch.autograd.grad(loss, leaves, allow_unused=True))


def _flatten(state):
    if isinstance(state, torch.Tensor):
        return [state]
    return [x for s in state for x in _flatten(s)]


def _compare(ref, out, ratio):
    assert len(ref) == len(out)
    for i, (r, o) in enumerate(zip(ref, out)):
        if r is None or o is None:  # a leaf that reaches no output in either run (an unused delta)
            assert r is None or not r.any(), f"output {i}"
            assert o is None or not o.any(), f"output {i}"
            continue
        assert_close(f"output/gradient {i}", r, o, ratio)


def _linear_packed(fn, cu, objective_of=lambda d: "l2", **options):
    def run(q, k, v, theta, eta, alpha, m0, s0, *delta):
        return fn(q, k, v, theta, eta, alpha, initial_state=(m0, s0), output_final_state=True, cu_seqlens=cu,
                  objective=objective_of(delta[0] if delta else None), **options)
    return run


def _linear_separately(fn, cu, objective_of=lambda d: "l2", **options):
    """The op once per sequence (B = 1 slices), outputs concatenated along T, states along N."""
    bounds = cu.tolist()

    def run(q, k, v, theta, eta, alpha, m0, s0, *delta):
        outputs, finals = [], []
        for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
            tokens = [x[:, a:b] for x in (q, k, v, theta, eta, alpha)]
            objective = objective_of(delta[0][:, a:b] if delta else None)
            o, final = fn(*tokens, initial_state=(m0[i:i + 1], s0[i:i + 1]), output_final_state=True,
                          objective=objective, **options)
            outputs.append(o)
            finals.append(final)
        return torch.cat(outputs, dim=1), tuple(torch.cat(f, dim=0) for f in zip(*finals))
    return run


def _mlp_packed(fn, cu, momentum=True, **options):
    def run(q, k, v, theta, eta, alpha, w1, w2, s1=None, s2=None):
        return fn(q, k, v, theta, eta, alpha, (w1, w2), momentum=(s1, s2) if momentum else None,
                  output_final_state=True, cu_seqlens=cu, **options)
    return run


def _mlp_separately(fn, cu, momentum=True, **options):
    bounds = cu.tolist()

    def run(q, k, v, theta, eta, alpha, w1, w2, s1=None, s2=None):
        outputs, finals = [], []
        for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
            tokens = [x[:, a:b] for x in (q, k, v, theta, eta, alpha)]
            rows = slice(i, i + 1)
            o, final = fn(*tokens, (w1[rows], w2[rows]), momentum=(s1[rows], s2[rows]) if momentum else None,
                          output_final_state=True, **options)
            outputs.append(o)
            finals.append(_flatten(final))
        return torch.cat(outputs, dim=1), tuple(torch.cat(f, dim=0) for f in zip(*finals))
    return run


# ---- linear_memory


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("chunk_size", [1, 3, 4, 64])
def test_linear_packed_equals_each_sequence_alone(chunk_size, read, dtype):
    inputs, init = _linear_case(dtype=dtype)
    cu = offsets(LENGTHS)
    options = dict(chunk_size=chunk_size, read=read)
    ref = _values_and_grads(_linear_separately(titans_ext.linear_memory, cu, **options), inputs + list(init))
    out = _values_and_grads(_linear_packed(titans_ext.linear_memory, cu, **options), inputs + list(init))
    _compare(ref, out, 1e-12 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_linear_packed_objectives(objective):
    inputs, init = _linear_case()
    cu = offsets(LENGTHS, torch.int64)
    delta = [_per_token_delta(inputs[2])] if needs_delta(objective) else []
    options = dict(chunk_size=4, objective_of=OBJECTIVES[objective])
    ref = _values_and_grads(_linear_separately(titans_ext.linear_memory, cu, **options), inputs + list(init) + delta)
    out = _values_and_grads(_linear_packed(titans_ext.linear_memory, cu, **options), inputs + list(init) + delta)
    _compare(ref, out, 1e-12)


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("retention", list(RETENTIONS))
def test_linear_packed_retentions(retention, read):
    inputs, init = _linear_case(kl=retention == "kl")
    cu = offsets(LENGTHS)
    options = dict(chunk_size=3, read=read, retention=RETENTIONS[retention])
    ref = _values_and_grads(_linear_separately(titans_ext.linear_memory, cu, **options), inputs + list(init))
    out = _values_and_grads(_linear_packed(titans_ext.linear_memory, cu, **options), inputs + list(init))
    _compare(ref, out, 1e-12)


def test_linear_packed_matches_references():
    """The references take cu_seqlens too (each sequence its own call, delta sliced per token):
    the op against the chunked reference and the token loop, float64."""
    inputs, init = _linear_case(lengths=(3, 0, 6, 1))
    cu = offsets((3, 0, 6, 1))
    delta = [_per_token_delta(inputs[2])]
    options = dict(chunk_size=4, objective_of=OBJECTIVES["huber"], retention=("lq", 3))
    out = _values_and_grads(_linear_packed(titans_ext.linear_memory, cu, **options), inputs + list(init) + delta)
    for reference in (linear_memory_chunked, linear_memory_recurrent):
        ref = _values_and_grads(_linear_packed(reference, cu, **options), inputs + list(init) + delta)
        _compare(ref, out, TOLERANCE[torch.float64])


def test_linear_empty_sequence_keeps_its_initial_state():
    inputs, init = _linear_case(lengths=(4, 0, 2))
    cu = offsets((4, 0, 2))
    leaves = [x.detach().clone().requires_grad_() for x in init]
    _, (m, s) = titans_ext.linear_memory(*inputs, initial_state=leaves, output_final_state=True, cu_seqlens=cu,
                                         chunk_size=2)
    assert torch.equal(m[1], init[0][1]) and torch.equal(s[1], init[1][1])
    d_m, d_s = random_cotangents([m, s])
    dm0, ds0 = torch.autograd.grad((m * d_m).sum() + (s * d_s).sum(), leaves)
    assert torch.equal(dm0[1], d_m[1]) and torch.equal(ds0[1], d_s[1])


@pytest.mark.parametrize("read", ["token", "chunk_start"])
def test_linear_state_carried_across_packed_calls(read):
    """Sequences split at a chunk boundary into two packed calls, the second starting from the
    first's final states, equal one packed call (values and gradients)."""
    first, second = (4, 8, 0, 4), (3, 5, 2, 0)
    whole = [a + b for a, b in zip(first, second)]
    inputs, init = _linear_case(lengths=whole)
    cu_first, cu_second, cu_whole = offsets(first), offsets(second), offsets(whole)
    bounds = cu_whole.tolist()
    part1 = [torch.cat([x[:, a:a + n] for a, n in zip(bounds, first)], dim=1) for x in inputs]
    part2 = [torch.cat([x[:, a + n:b] for a, n, b in zip(bounds, first, bounds[1:])], dim=1) for x in inputs]
    options = dict(chunk_size=4, read=read)

    def two_calls(*tensors):
        p1, p2, state = tensors[:6], tensors[6:12], tensors[12:]
        o1, state = titans_ext.linear_memory(*p1, initial_state=state, output_final_state=True, cu_seqlens=cu_first,
                                             **options)
        o2, state = titans_ext.linear_memory(*p2, initial_state=state, output_final_state=True,
                                             cu_seqlens=cu_second, **options)
        # back to the packed order of the single call
        b1, b2 = cu_first.tolist(), cu_second.tolist()
        o = torch.cat([torch.cat([o1[:, b1[i]:b1[i + 1]], o2[:, b2[i]:b2[i + 1]]], dim=1)
                       for i in range(len(first))], dim=1)
        return o, state

    def one_call(*tensors):
        p1, p2, state = tensors[:6], tensors[6:12], tensors[12:]
        b1, b2 = cu_first.tolist(), cu_second.tolist()
        packed = [torch.cat([torch.cat([x1[:, b1[i]:b1[i + 1]], x2[:, b2[i]:b2[i + 1]]], dim=1)
                             for i in range(len(first))], dim=1) for x1, x2 in zip(p1, p2)]
        return titans_ext.linear_memory(*packed, initial_state=state, output_final_state=True, cu_seqlens=cu_whole,
                                        **options)

    tensors = part1 + part2 + list(init)
    _compare(_values_and_grads(one_call, tensors), _values_and_grads(two_calls, tensors), 1e-12)


# ---- mlp_memory


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("read,activation,momentum", [("token", "gelu", True), ("chunk_start", "silu", True),
                                                     ("token", "silu", False)])
@pytest.mark.parametrize("chunk_size", [1, 3, 4])
def test_mlp_packed_equals_each_sequence_alone(chunk_size, read, activation, momentum, dtype):
    inputs, weights, moments = _mlp_case(dtype=dtype)
    cu = offsets(LENGTHS)
    options = dict(chunk_size=chunk_size, read=read, activation=activation, momentum=momentum)
    tensors = inputs + list(weights) + (list(moments) if momentum else [])
    ref = _values_and_grads(_mlp_separately(titans_ext.mlp_memory, cu, **options), tensors)
    out = _values_and_grads(_mlp_packed(titans_ext.mlp_memory, cu, **options), tensors)
    _compare(ref, out, 1e-12 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("objective,retention", [("lp3", "l2"), ("huber", "l2"), ("yaad", "l2"), ("l2", "lq3"),
                                                 ("l2", "kl"), ("pseudo_huber", "lq4")])
def test_mlp_packed_miras(objective, retention):
    inputs, weights, moments = _mlp_case(kl=retention == "kl")
    cu = offsets(LENGTHS, torch.int64)
    delta = _per_token_delta(inputs[2]) if needs_delta(objective) else None
    options = dict(chunk_size=3, objective=OBJECTIVES[objective](delta), retention=RETENTIONS[retention])
    tensors = inputs + list(weights) + list(moments)
    if delta is not None:  # a tensor delta is sliced per sequence by the separate calls
        def separately(*leaves):
            bounds = cu.tolist()
            outputs, finals = [], []
            for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
                rows = slice(i, i + 1)
                o, final = titans_ext.mlp_memory(
                    *(x[:, a:b] for x in leaves[:6]), tuple(w[rows] for w in leaves[6:8]),
                    momentum=tuple(s[rows] for s in leaves[8:]), output_final_state=True, chunk_size=3,
                    objective=(OBJECTIVES[objective](delta)[0], delta[:, a:b]), retention=RETENTIONS[retention])
                outputs.append(o)
                finals.append(_flatten(final))
            return torch.cat(outputs, dim=1), tuple(torch.cat(f, dim=0) for f in zip(*finals))
        ref = _values_and_grads(separately, tensors)
    else:
        ref = _values_and_grads(_mlp_separately(titans_ext.mlp_memory, cu, **options), tensors)
    out = _values_and_grads(_mlp_packed(titans_ext.mlp_memory, cu, **options), tensors)
    _compare(ref, out, 1e-12)


def test_mlp_packed_matches_references():
    lengths = (3, 0, 5, 1)
    inputs, weights, moments = _mlp_case(lengths=lengths, H=1, D=3)
    cu = offsets(lengths)
    options = dict(chunk_size=2, retention=("lq", 3), objective=("lp", 3))
    tensors = inputs + list(weights) + list(moments)
    out = _values_and_grads(_mlp_packed(titans_ext.mlp_memory, cu, **options), tensors)
    for reference in (mlp_memory_chunked, mlp_memory_recurrent):
        _compare(_values_and_grads(_mlp_packed(reference, cu, **options), tensors), out, TOLERANCE[torch.float64])


def test_mlp_empty_sequence_keeps_its_initial_state():
    inputs, weights, moments = _mlp_case(lengths=(0, 3))
    _, ((W1, W2), (S1, S2)) = titans_ext.mlp_memory(*inputs, weights, momentum=moments, output_final_state=True,
                                                    cu_seqlens=offsets((0, 3)), chunk_size=2)
    for final, initial in zip((W1, W2, S1, S2), weights + moments):
        assert torch.equal(final[0], initial[0])
        assert not torch.equal(final[1], initial[1])


# ---- argument errors


def _bad_offsets_call(op, cu, B=1, T=6, rows=None):
    inputs, init = _linear_case(lengths=(T,), dtype=torch.float32)
    if B != 1:
        inputs = [x.expand(B, *x.shape[1:]) for x in inputs]
    rows = cu.numel() - 1 if rows is None else rows
    if op == "linear":
        init = tuple(x.expand(rows, *x.shape[1:]) for x in init)
        return lambda: titans_ext.linear_memory(*inputs, initial_state=init, cu_seqlens=cu, chunk_size=4)
    _, weights, _ = _mlp_case(lengths=(T,), H=2, D=5, dtype=torch.float32)
    weights = tuple(w.expand(rows, *w.shape[1:]) for w in weights)
    return lambda: titans_ext.mlp_memory(*inputs[:2], inputs[0], *inputs[3:], weights, cu_seqlens=cu, chunk_size=4)


@pytest.mark.parametrize("op", ["linear", "mlp"])
@pytest.mark.parametrize("cu,B,message", [
    (torch.tensor([1, 3, 6]), 1, "starting at 0"),
    (torch.tensor([0, 3, 5]), 1, "ending at T = 6"),
    (torch.tensor([0, 4, 3, 6]), 1, "non-decreasing offsets, got 4 then 3"),
    (torch.tensor([0, 3, 6]), 2, "need B = 1"),
    (torch.tensor([0]), 1, "N + 1 offsets, N >= 1"),
    (torch.tensor([[0, 6]]), 1, "1-d tensor"),
], ids=["start", "end", "decreasing", "batch", "no-sequence", "2-d"])
def test_bad_offsets_raise_named_errors(op, cu, B, message):
    with pytest.raises(ValueError, match=f"cu_seqlens: .*{re.escape(message)}"):
        _bad_offsets_call(op, cu, B=B, rows=1 if cu.numel() < 2 or cu.dim() != 1 else None)()


@pytest.mark.parametrize("op", ["linear", "mlp"])
def test_offsets_dtype_and_state_rows(op):
    with pytest.raises(TypeError, match="cu_seqlens: expected dtype int32 or int64, got float32"):
        _bad_offsets_call(op, torch.tensor([0.0, 6.0]), rows=1)()
    name = "initial_state\\[0\\]" if op == "linear" else "weights\\[0\\]"
    with pytest.raises(ValueError, match=f"{name}: expected shape \\[N, H, "):
        _bad_offsets_call(op, torch.tensor([0, 2, 6]), rows=3)()


def test_offsets_checked_by_the_kernel_without_value_checks(monkeypatch):
    """TITANS_EXT_CHECK_VALUES=0 skips the Python value checks; the CPU binding, which reads the
    offsets anyway, still refuses bad ones before any kernel runs."""
    monkeypatch.setenv("TITANS_EXT_CHECK_VALUES", "0")
    with pytest.raises(RuntimeError, match="cu_seqlens must be non-decreasing"):
        _bad_offsets_call("linear", torch.tensor([0, 4, 3, 6]))()
    with pytest.raises(RuntimeError, match="cu_seqlens must run from 0 to T = 6"):
        _bad_offsets_call("mlp", torch.tensor([0, 3, 5]))()


# ---- opcheck and torch.compile


# The CUDA kernels take cu_seqlens too (python_tests/test_varlen_emulated.py runs them emulated).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_linear(requires_grad, device):
    inputs, init = _linear_case(dtype=torch.float32)
    cu = offsets(LENGTHS).to(device)
    args = [x.to(device).requires_grad_(requires_grad) for x in inputs + list(init)]
    torch.library.opcheck(torch.ops.titans_ext.linear_memory_fwd.default, (*args, 4, True, True),
                          {"cu_seqlens": cu})
    q, k, v, theta, eta, alpha, m0, s0 = (x.detach() for x in args)
    o, m, s, states = torch.ops.titans_ext.linear_memory_fwd(q, k, v, theta, eta, alpha, m0, s0, 4, True, True,
                                                             cu_seqlens=cu)
    bwd_args = (q, k, v, theta, eta, alpha, states, torch.randn_like(o), torch.randn_like(m), None, 4, True)
    torch.library.opcheck(torch.ops.titans_ext.linear_memory_bwd.default, bwd_args, {"cu_seqlens": cu})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_mlp(requires_grad, device):
    inputs, weights, moments = _mlp_case(dtype=torch.float32)
    cu = offsets(LENGTHS, torch.int64).to(device)
    args = [x.to(device).requires_grad_(requires_grad) for x in inputs + list(weights) + list(moments)]
    torch.library.opcheck(torch.ops.titans_ext.mlp_memory_fwd.default, (*args, 3, True, "gelu", True),
                          {"cu_seqlens": cu})
    q, k, v, theta, eta, alpha, w1, w2, s1, s2 = (x.detach() for x in args)
    o, w1_T, w2_T, s1_T, s2_T, states = torch.ops.titans_ext.mlp_memory_fwd(
        q, k, v, theta, eta, alpha, w1, w2, s1, s2, 3, True, "gelu", True, cu_seqlens=cu)
    bwd_args = (q, k, v, theta, eta, alpha, states, torch.randn_like(o), torch.randn_like(w1_T), None, None,
                torch.randn_like(s2_T), w1.shape[2], 3, True, "gelu")
    torch.library.opcheck(torch.ops.titans_ext.mlp_memory_bwd.default, bwd_args, {"cu_seqlens": cu})


def test_saved_states_have_a_static_shape():
    """chunk_states has (T + N (C - 1)) // C slots per head whatever the lengths (torch.compile
    needs shapes that do not depend on the offsets); the slots no sequence uses are zeros."""
    inputs, init = _linear_case(lengths=(8, 0, 4), dtype=torch.float32)
    _, _, _, states = torch.ops.titans_ext.linear_memory_fwd(*inputs, *init, 4, True, True,
                                                             cu_seqlens=offsets((8, 0, 4)))
    assert states.shape[2] == (12 + 3 * 3) // 4
    assert not states[:, :, 3:].any() and states[:, :, :3].any()


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    inputs, init = _linear_case(dtype=torch.float32)
    mlp_tokens, weights, moments = _mlp_case(dtype=torch.float32)
    cu = offsets(LENGTHS).to(device)

    def step(*tensors):
        o, (m, s) = titans_ext.linear_memory(*tensors[:3], tensors[3].sigmoid(), *tensors[4:6], chunk_size=4,
                                             initial_state=tensors[6:8], output_final_state=True, cu_seqlens=cu)
        o2, ((W1, W2), (S1, S2)) = titans_ext.mlp_memory(*tensors[8:14], tensors[14:16], momentum=tensors[16:],
                                                         chunk_size=3, output_final_state=True, cu_seqlens=cu)
        return o.square().sum() + m.sum() + s.sum() + o2.square().sum() + sum(x.sum() for x in (W1, W2, S1, S2))

    tensors = [x.to(device) for x in inputs + list(init) + mlp_tokens + list(weights) + list(moments)]
    names = [f"gradient {i}" for i in range(len(tensors))]
    assert_compile_matches_eager(step, tensors, names)


def test_readme_example_runs():
    """The README's cu_seqlens example, with small heads."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
                   if "cu_seqlens = torch.nn.functional.pad" in b)
    inputs, init = _linear_case(lengths=(300, 17, 0, 2048), H=1, Dk=4, Dv=4, dtype=torch.float32)
    namespace = dict(zip(("q", "k", "v", "theta", "eta", "alpha"), inputs), M0=init[0], S0=init[1], torch=torch,
                     titans_ext=titans_ext)
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["cu_seqlens"].tolist() == [0, 300, 317, 317, 2365]
    assert namespace["o"].shape == (1, 2365, 1, 4) and namespace["M"].shape == (4, 1, 4, 4)
    assert torch.equal(namespace["M"][2], init[0][2])
