"""Context parallel linear memory (``titans_ext.distributed``) against one call of the op.

One launch of 4 gloo processes runs every case: world size 4 on the default group, 2 on the
groups {0, 1} and {2, 3} (whose group ranks are not the global ranks), 1 on each process alone.
Each process returns its shard's outputs, the final state (last rank) and the gradients of its
shard and of the initial state (rank 0); the tests compare them with one call of
``titans_ext.linear_memory`` on the whole sequence, backpropagating the same functional of the
outputs and the final state. Closeness rule (``utils.py``): relative RMS error at most 1e-10 in
float64 and 1e-5 in float32 (measured: ~3e-16 and ~3e-7), 1e-2 with bf16 inputs (measured ~3e-3:
the outputs' dependence on the start state passes through the op's bf16 outputs).
"""

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

import titans_ext
from titans_ext.distributed import linear_memory_cp, segment_map
from launcher import run_distributed
from utils import TOLERANCE, assert_close, memory_inputs, random_cotangents

B, H, DK, DV = 2, 2, 8, 4
WORLD_SIZE = 4
CP_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: TOLERANCE[torch.bfloat16]}
INPUT_NAMES = ["dq", "dk", "dv", "dtheta", "deta", "dalpha"]
BAD_SHARD = 6  # not a multiple of chunk_size 4


@dataclass(frozen=True)
class Case:
    shards: tuple  # tokens per rank, in rank order
    dtype: torch.dtype
    read: str
    initial_state: bool
    chunk_size: int = 4

    @property
    def id(self):
        dtype = str(self.dtype).replace("torch.", "")
        init = "init" if self.initial_state else "zero"
        return f"R{len(self.shards)}-{'_'.join(map(str, self.shards))}-C{self.chunk_size}-{dtype}-{self.read}-{init}"

    def data(self):
        """Inputs of the whole sequence, the initial state (or None) and cotangents of (o, M_T, S_T)."""
        inputs, init = memory_inputs(B, sum(self.shards), H, DK, DV, self.dtype, seed=len(self.shards),
                                     state=self.initial_state)
        state_dtype = inputs[3].dtype
        cotangents = random_cotangents([inputs[2], torch.empty(B, H, DV, DK, dtype=state_dtype),
                                        torch.empty(B, H, DV, DK, dtype=state_dtype)], seed=7)
        return inputs, init, cotangents


CASES = [
    Case((8, 13), torch.float64, "token", True),
    Case((8, 13), torch.float64, "chunk_start", False),
    Case((8, 13), torch.float32, "token", True),
    Case((12, 5), torch.float32, "chunk_start", True),
    Case((8, 13), torch.bfloat16, "token", True),
    Case((4, 12, 0, 7), torch.float64, "token", True),
    Case((4, 12, 0, 7), torch.float64, "chunk_start", True),
    Case((8, 4, 8, 8), torch.float32, "token", False),
    Case((8, 4, 8, 8), torch.float32, "chunk_start", True),
    Case((3, 1, 2, 5), torch.float64, "token", True, chunk_size=1),
    Case((11,), torch.float64, "token", True),
]

COMPILED_CASE = Case((8, 13), torch.float64, "token", True)


def _leaves(tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _loss(o, final_state, cotangents):
    loss = (o.double() * cotangents[0]).sum()
    if final_state is not None:
        loss = loss + sum((x.double() * c).sum() for x, c in zip(final_state, cotangents[1:]))
    return loss


def _run_shard(case, group):
    rank = dist.get_rank(group)
    inputs, init, cotangents = case.data()
    begin = sum(case.shards[:rank])
    shard = slice(begin, begin + case.shards[rank])
    leaves = _leaves(x[:, shard] for x in inputs)
    init_leaves = None if init is None else _leaves(init)
    o, final_state = linear_memory_cp(*leaves, group=group, chunk_size=case.chunk_size, initial_state=init_leaves,
                                      output_final_state=True, read=case.read)
    loss = _loss(o, final_state, [cotangents[0][:, shard], *cotangents[1:]])
    wrt = leaves + (init_leaves or [])
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return {"o": o.detach(), "final_state": None if final_state is None else [x.detach() for x in final_state],
            "grads": grads[:6], "init_grads": grads[6:]}


def _argument_errors(group):
    """Group rank 0 passes a shard that is not a multiple of chunk_size, then a NaN gate; the other
    rank makes no call, so an error raised after a collective would hang (and time out)."""
    if dist.get_rank(group) != 0:
        return None
    errors = {}
    inputs, _ = memory_inputs(1, BAD_SHARD, 1, 4, 4)
    nan_theta = memory_inputs(1, 8, 1, 4, 4)[0]
    nan_theta[3][0, 5, 0] = float("nan")
    for name, args in (("bad_shard", inputs), ("nan_gate", nan_theta)):
        try:
            linear_memory_cp(*args, group=group, chunk_size=4)
            errors[name] = "no error"
        except ValueError as exc:
            errors[name] = str(exc)
    return errors


def _compiled_and_eager(case, group):
    """Loss and gradients of a shard, eager and under torch.compile(fullgraph=True) with aot_eager
    (dynamo traces the collectives of both directions; inductor's code generation is too slow for CI)."""
    rank = dist.get_rank(group)
    inputs, init, cotangents = case.data()
    begin = sum(case.shards[:rank])
    shard = slice(begin, begin + case.shards[rank])
    inputs, cotangents = [x[:, shard] for x in inputs], [cotangents[0][:, shard], *cotangents[1:]]

    def loss(*shard_inputs):
        o, final_state = linear_memory_cp(*shard_inputs, group=group, chunk_size=case.chunk_size,
                                          initial_state=init, output_final_state=True, read=case.read)
        return _loss(o, final_state, cotangents)

    runs = []
    for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        leaves = _leaves(inputs)
        value = fn(*leaves)
        runs.append([value.detach(), *torch.autograd.grad(value, leaves)])
    return runs


def _cp_worker(rank, world_size, cases, compiled_case):
    groups = {world_size: [dist.group.WORLD], 2: [dist.new_group([0, 1]), dist.new_group([2, 3])],
              1: [dist.new_group([r]) for r in range(world_size)]}
    results = {}
    for case in cases:
        n = len(case.shards)
        results[case.id] = _run_shard(case, groups[n][rank // n])
    results["argument_errors"] = _argument_errors(groups[2][rank // 2])
    if rank < len(compiled_case.shards):
        results["compiled"] = _compiled_and_eager(compiled_case, groups[len(compiled_case.shards)][0])
    return results


@pytest.fixture(scope="module")
def cp_results(tmp_path_factory):
    return run_distributed(_cp_worker, WORLD_SIZE, tmp_path_factory.mktemp("context_parallel"), CASES,
                           COMPILED_CASE)


def _one_call(case):
    inputs, init, cotangents = case.data()
    leaves = _leaves(inputs)
    init_leaves = None if init is None else _leaves(init)
    o, final_state = titans_ext.linear_memory(*leaves, chunk_size=case.chunk_size, initial_state=init_leaves,
                                              output_final_state=True, read=case.read)
    grads = torch.autograd.grad(_loss(o, final_state, cotangents), leaves + (init_leaves or []))
    return o.detach(), [x.detach() for x in final_state], grads[:6], grads[6:]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_context_parallel_equals_one_call(cp_results, case):
    o, final_state, grads, init_grads = _one_call(case)
    tol = CP_TOLERANCE[case.dtype]
    n = len(case.shards)
    for first in range(0, WORLD_SIZE, n):  # each group that ran the case
        ranks = [cp_results[first + r][case.id] for r in range(n)]
        label = f"ranks {first}..{first + n - 1}"
        assert_close(f"o ({label})", o, torch.cat([r["o"] for r in ranks], dim=1), tol)
        for r in ranks[:-1]:
            assert r["final_state"] is None
        for name, ref, out in zip(("M_T", "S_T"), final_state, ranks[-1]["final_state"]):
            assert_close(f"{name} ({label})", ref, out, tol)
        for i, name in enumerate(INPUT_NAMES):
            assert_close(f"{name} ({label})", grads[i], torch.cat([r["grads"][i] for r in ranks], dim=1), tol)
        for name, ref, out in zip(("dM0", "dS0"), init_grads, ranks[0]["init_grads"]):
            assert_close(f"{name} ({label})", ref, out, tol)


def test_bad_shard_length_is_a_named_error(cp_results):
    for rank in (0, 2):  # group rank 0 of {0, 1} and of {2, 3}
        message = cp_results[rank]["argument_errors"]["bad_shard"]
        assert message.startswith(f"q: the shard of rank 0 of 2 has T = {BAD_SHARD} tokens"), message
        assert "multiple of chunk_size = 4" in message


def test_gate_values_are_checked_before_any_collective(cp_results):
    for rank in (0, 2):
        message = cp_results[rank]["argument_errors"]["nan_gate"]
        assert message == "theta: gates must be finite (found NaN or inf)", message


def test_torch_compile_traces_it(cp_results):
    for rank in range(len(COMPILED_CASE.shards)):
        eager, compiled = cp_results[rank]["compiled"]
        for name, a, b in zip(["loss"] + INPUT_NAMES, eager, compiled):
            assert_close(f"{name} (rank {rank})", a, b, CP_TOLERANCE[torch.float64])


@pytest.mark.parametrize("read", ["token", "chunk_start"])
def test_segment_maps_compose_to_one_call(read):
    """In one process: the maps of uneven, chunk-aligned segments (one empty), applied in turn from
    the initial state, give the outputs, final state and gradients of one call (float64)."""
    case = Case((8, 0, 12, 7), torch.float64, read, True)
    inputs, init, cotangents = case.data()
    leaves, init_leaves = _leaves(inputs), _leaves(init)
    start = torch.cat(init_leaves, dim=-1)
    outputs, begin = [], 0
    for length in case.shards:
        shard = [x[:, begin:begin + length] for x in leaves]
        begin += length
        P, Q, G, o_zero = segment_map(*shard, chunk_size=case.chunk_size, read=read)
        outputs.append(o_zero + torch.einsum("bhvn,bthn->bthv", start, G))
        start = start @ P + Q
    final_state = (start[..., :DK], start[..., DK:])
    o = torch.cat(outputs, dim=1)
    grads = torch.autograd.grad(_loss(o, final_state, cotangents), leaves + init_leaves)
    ref_o, ref_final, ref_grads, ref_init_grads = _one_call(case)
    tol = CP_TOLERANCE[torch.float64]
    assert_close("o", ref_o, o, tol)
    for name, ref, out in zip(("M_T", "S_T"), ref_final, final_state):
        assert_close(name, ref, out, tol)
    for name, ref, out in zip(INPUT_NAMES + ["dM0", "dS0"], list(ref_grads) + list(ref_init_grads), grads):
        assert_close(name, ref, out, tol)


@pytest.mark.parametrize("kwargs, match", [
    (dict(objective=("lp", 3)), "objective: context parallel supports only \"l2\""),
    (dict(objective=("huber", 1.0)), "objective: context parallel supports only \"l2\""),
    (dict(retention=("lq", 4)), "retention: context parallel supports only \"l2\""),
    (dict(retention="kl"), "retention: context parallel supports only \"l2\""),
])
def test_non_affine_options_are_named_errors(kwargs, match):
    inputs, _ = memory_inputs(1, 8, 1, 4, 4)
    with pytest.raises(ValueError, match=match):
        linear_memory_cp(*inputs, group=None, chunk_size=4, **kwargs)


def test_needs_an_initialized_process_group():
    inputs, _ = memory_inputs(1, 8, 1, 4, 4)
    with pytest.raises(RuntimeError, match="group: torch.distributed is not initialized"):
        linear_memory_cp(*inputs, group=None, chunk_size=4)


def test_argument_checks_of_the_op_apply():
    inputs, _ = memory_inputs(1, 8, 1, 4, 4)
    inputs[1] = inputs[1][:, :7]
    with pytest.raises(ValueError, match=r"k: expected shape \[B, T, H, Dk\]"):
        linear_memory_cp(*inputs, group=None, chunk_size=4)
