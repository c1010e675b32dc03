"""MIRAS objectives and the lq retention of the CUDA linear_memory kernels, forward AND backward
(csrc/cuda/linear_memory_{fwd,bwd,bwd_chunks}.cuh), run by the CPU SIMT emulation
(``titans_emu::linear_memory_fwd`` / ``_bwd``) against autograd of the float64 chunked reference
(itself checked against the token loop in test_miras_linear.py): outputs, final state and every
gradient, delta's (per channel and per token), the initial state's and lq's rho0 terms included.
The whole-state options (objective "yaad", retention "lq") run one block over all of Dv (one value
tile, or past 64 rows tiles of 64 in turn); kl's lag token runs with every objective and both reads. yaad's switch is discontinuous, so its 16-bit cases take thresholds clear of the token norms
(miras_cases.yaad_delta_clear_of_the_switch), and lq's start from a unit q-norm state.

Bounds as in test_mlp_memory_emulated.py (the kernels' MMA wrappers round operands as the GPU
does): fp64 1e-10, fp32 1e-4, bf16 relative RMS 1e-2 and a largest error of at most 3 % of the
reference's largest entry. The grid beyond the CI subset is marked slow (``pytest -m slow``).
"""

import itertools

import pytest
import torch

import titans_ext  # noqa: F401  (registers titans_ext::, used for the contract comparison)
import titans_ext._emu  # noqa: F401  (registers titans_emu::)
from titans_ext.ops.linear_memory import cuda_launch_plan
from titans_ext.reference import linear_memory_chunked

from miras_cases import (OBJECTIVES, RETENTIONS, assert_matches, needs_delta, op_miras_args,
                         yaad_delta_clear_of_the_switch)
from utils import GRAD_NAMES, memory_inputs, random_cotangents

emu = torch.ops.titans_emu
NAMES = ["o", "M_T", "S_T"] + GRAD_NAMES + ["d_delta"]
OBJECTIVE_IDS = ["l2", "lp3", "lp1.5", "huber", "pseudo_huber", "yaad"]


@pytest.fixture(autouse=True)
def deterministic_schedule():
    emu.set_schedule(-1)
    yield
    emu.set_schedule(-1)


class Case:
    """Inputs of one run: q, k, v, gates, an initial state (or none), the objective with a delta
    for those that take one (per channel, or per token with delta_kind="token") and random
    cotangents of o and of the final state."""

    def __init__(self, B, T, H, Dk, Dv, C, dtype, objective="l2", read="token", delta_kind="channel", init=True,
                 theta_scale=1.0, seed=0, retention="l2"):
        self.inputs, self.init = memory_inputs(B, T, H, Dk, Dv, dtype, seed=seed, state=init)
        self.inputs[3] = self.inputs[3] * theta_scale
        if self.init is not None and retention.startswith("lq"):  # unit q-norm, rho0 = 1 (as NeuralMemory starts)
            q = RETENTIONS[retention][1]
            m0 = self.init[0]
            self.init = (m0 / m0.abs().pow(q).sum(dim=(-2, -1), keepdim=True).pow(1 / q), self.init[1])
        if self.init is not None and retention == "kl":  # a positive memory, rows on the simplex
            self.init = (self.init[0].softmax(-1), self.init[1])
        self.chunk_size, self.read, self.dtype = C, read, dtype
        self.state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.delta = None
        if needs_delta(objective):  # thresholds inside the residuals' range: both branches occur
            g = torch.Generator().manual_seed(seed + 3)
            shape = (B, T, H) if delta_kind == "token" else (B, T, H, Dv)
            self.delta = 0.3 + 0.6 * torch.rand(shape, generator=g, dtype=torch.float64)
            if objective == "yaad":  # thresholds near the norms in fp32 / fp64, clear of them in 16 bits
                self.delta = yaad_delta_clear_of_the_switch(self.inputs, self.init, C, RETENTIONS[retention],
                                                            delta_kind == "token", seed + 3) \
                    if dtype in (torch.bfloat16, torch.float16) else self.delta * Dv ** 0.5
        self.objective, self.retention = OBJECTIVES[objective], RETENTIONS[retention]
        state = torch.empty(B, H, Dv, Dk, dtype=self.state_dtype)
        self.cotangents = random_cotangents([self.inputs[2], state, state], seed=seed + 1)

    def emulated(self):
        """The emulated forward and backward: o, final state, then every gradient (d_delta summed
        back to delta's shape)."""
        m0, s0 = (None, None) if self.init is None else self.init
        miras, token = op_miras_args(self.objective(self.delta), self.retention, self.inputs[2],
                                     self.state_dtype), self.read == "token"
        o, m, s, states = emu.linear_memory_fwd(*self.inputs, m0, s0, self.chunk_size, token, True, *miras)
        d_o, d_m, d_s = self.cotangents
        grads = list(emu.linear_memory_bwd(*self.inputs, states, d_o.to(o.dtype), d_m, d_s, self.chunk_size, token,
                                           *miras))
        if self.init is None:
            grads[6:8] = []
        if self.delta is None:
            assert grads.pop().numel() == 0
        elif self.delta.dim() == 3:
            grads[-1] = grads[-1].sum(-1)
        return [o, m, s] + grads

    def reference(self):
        """The same from autograd of the float64 chunked reference."""
        leaves = [x.detach().double().requires_grad_() for x in self.inputs]
        init = None if self.init is None else [x.detach().double().requires_grad_() for x in self.init]
        delta = None if self.delta is None else self.delta.clone().requires_grad_()
        o, (m, s) = linear_memory_chunked(*leaves, chunk_size=self.chunk_size, initial_state=init,
                                          output_final_state=True, read=self.read, objective=self.objective(delta),
                                          retention=self.retention)
        d_o = self.cotangents[0].to(self.dtype).double()  # bf16 runs see a rounded d_o
        loss = (o * d_o).sum() + (m * self.cotangents[1].double()).sum() + (s * self.cotangents[2].double()).sum()
        wrt = leaves + (init or []) + ([delta] if delta is not None else [])
        return [o.detach(), m.detach(), s.detach()] + list(torch.autograd.grad(loss, wrt))


def check(*args, grad_bounds=(None, 0.03), **kwargs):
    """grad_bounds: looser (relative RMS, largest error) bounds for the gradients, as assert_matches
    takes them (the values keep the dtype's)."""
    case = Case(*args, **kwargs)
    ref, out = case.reference(), case.emulated()
    assert_matches(NAMES[:3], ref[:3], out[:3], case.dtype)
    names = [name for name in NAMES[3:] if name not in ("dM0", "dS0") or case.init is not None]
    names = names[:len(ref) - 3]
    assert_matches(names, ref[3:], out[3:], case.dtype, *grad_bounds)


# ---- The CI subset: D = 16, every objective the kernels run, both reads, C in {1, 16}, fp32, T with a
# short last chunk (C = 1: the exact per-token recurrence).

@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("objective", OBJECTIVE_IDS)
@pytest.mark.parametrize("C, T", [(16, 37), (1, 6)], ids=["C16-T37", "C1-T6"])
def test_objectives_float32(C, T, objective, read):
    check(1, T, 2, 16, 16, C, torch.float32, objective=objective, read=read)


@pytest.mark.parametrize("objective", ["huber", "pseudo_huber", "yaad"])
def test_per_token_delta(objective):
    check(2, 19, 1, 16, 16, 8, torch.float32, objective=objective, delta_kind="token")


@pytest.mark.parametrize("objective, read", [("lp1.5", "token"), ("huber", "chunk_start"), ("yaad", "token")])
def test_float64(objective, read):
    # Dk != Dv with a partial value tile and slice; no initial state.
    check(1, 23, 2, 8, 20, 8, torch.float64, objective=objective, read=read, init=False)


# ---- lq (accumulator form): rho0 = ||A0||_q^(2-q) at each chunk start, over the whole state.

@pytest.mark.parametrize("objective, retention, read, C, T", [
    ("l2", "lq3", "token", 16, 37), ("yaad", "lq4", "chunk_start", 16, 37), ("huber", "lq3", "chunk_start", 1, 6),
    ("yaad", "lq3", "token", 1, 6), ("lp1.5", "lq4", "token", 64, 70)])
def test_lq_float32(objective, retention, read, C, T):
    check(1, T, 2, 16, 16, C, torch.float32, objective=objective, retention=retention, read=read)


@pytest.mark.parametrize("objective, retention, init", [("yaad", "lq4", False), ("pseudo_huber", "lq3", True)])
def test_lq_float64(objective, retention, init):
    # Two value slices in the backward (Dv = 20); without an initial state the first chunk's rho0 is 1.
    check(1, 23, 2, 8, 20, 8, torch.float64, objective=objective, retention=retention, init=init)


# ---- The whole-state options past one value tile (Dv > 64): the forward's block walks tiles of 64
# rows in turn, the state between them in the final state's outputs; a partial last tile (Dv = 80,
# 130), three tiles (130).

@pytest.mark.parametrize("objective, retention, read, C, T", [
    ("yaad", "l2", "token", 16, 37), ("l2", "lq3", "token", 16, 37), ("yaad", "lq4", "chunk_start", 16, 37),
    ("huber", "lq3", "token", 1, 5), ("yaad", "l2", "chunk_start", 1, 5), ("yaad", "kl", "token", 16, 37),
    ("yaad", "kl", "chunk_start", 16, 37), ("yaad", "kl", "token", 1, 5)])
def test_whole_state_past_one_tile_float32(objective, retention, read, C, T):
    # kl with yaad: the lag token's residuals of every tile first (its norm), then each tile's step
    # and its lagged state home, then yaad's pass.
    check(1, T, 2, 16, 80, C, torch.float32, objective=objective, retention=retention, read=read)


@pytest.mark.parametrize("objective, retention, init", [("yaad", "lq3", False), ("pseudo_huber", "lq4", True),
                                                       ("yaad", "kl", False)])
def test_whole_state_past_one_tile_float64(objective, retention, init):
    # Without an initial state: zeros, or kl's uniform 1 / Dk memory, copied home.
    check(1, 23, 2, 8, 130, 8, torch.float64, objective=objective, retention=retention, init=init)


@pytest.mark.parametrize("objective, retention", [("yaad", "l2"), ("l2", "lq3")])
def test_whole_state_past_one_tile_bf16(objective, retention):
    # theta as the grid takes it past D = 16 (at full theta the D = 32 recurrence grows until bf16's
    # rounding is several percent of the outputs, at Dv = 64 too).
    check(1, 45, 1, 32, 80, 16, torch.bfloat16, objective=objective, retention=retention, theta_scale=0.2)


def test_kl_yaad_past_one_tile_bf16():
    # kl's chunk size (test_kl_bf16), at the bf16 bounds.
    check(1, 45, 1, 32, 80, 8, torch.bfloat16, objective="yaad", retention="kl")


def test_whole_state_past_one_tile_per_token_delta():
    check(2, 19, 1, 16, 72, 8, torch.float32, objective="yaad", delta_kind="token", retention="lq3")


# ---- kl: each chunk's token 0 takes Memora's softmax step (the lag token), the rest is a chunk from
# its result. Under yaad the lag token's switch reads its residual norm at the memory before it and
# the rest's at the lagged memory (the backward's setup recomputes the lag step over all of Dv); read
# "chunk_start" reads the memory before the lag token (dQ and the reads' cotangent go to it).

@pytest.mark.parametrize("objective, read, C, T", [
    ("l2", "token", 16, 37), ("huber", "token", 1, 6), ("pseudo_huber", "token", 64, 70),
    ("yaad", "token", 16, 37), ("yaad", "token", 1, 6), ("l2", "chunk_start", 16, 37),
    ("lp3", "chunk_start", 1, 6), ("yaad", "chunk_start", 16, 37)])
def test_kl_float32(objective, read, C, T):
    check(1, T, 2, 16, 16, C, torch.float32, objective=objective, retention="kl", read=read)


def test_kl_yaad_per_token_delta():
    check(2, 19, 1, 16, 16, 8, torch.float32, objective="yaad", delta_kind="token", retention="kl")


@pytest.mark.parametrize("objective, read, init", [("lp3", "token", False), ("huber", "token", True),
                                                   ("yaad", "token", False), ("huber", "chunk_start", True),
                                                   ("yaad", "chunk_start", True)])
def test_kl_float64(objective, read, init):
    # Three value slices in the backward (Dv = 40); without an initial state the memory is 1 / Dk.
    check(1, 23, 2, 8, 40, 8, torch.float64, objective=objective, retention="kl", read=read, init=init)


@pytest.mark.parametrize("objective, read", [("l2", "token"), ("yaad", "token"), ("l2", "chunk_start")])
def test_kl_bf16(objective, read):
    # The lag step's backward divides by the memory (d log M) and centers each row's cotangent, so it
    # amplifies any rounding of the state it differentiates at several fold: at the bf16 bounds only
    # because the forward's state update takes the row-scaled errors as hi + lo (docs/kernels.md
    # §6.1.12; through one bf16 copy dk, dv were 1-1.5 % RMS and 3-5 % largest error off).
    check(1, 45, 1, 32, 32, 8, torch.bfloat16, objective=objective, retention="kl", read=read)


@pytest.mark.parametrize("objective, read", [("yaad", "token"), ("huber", "chunk_start"), ("yaad", "chunk_start")])
def test_kl_matches_the_cpu_op(objective, read):
    # The emulated kernels against titans_ext's CPU kernels on the same fp32 inputs: values and
    # every gradient (delta's included), at fp32's bounds.
    inputs, init = memory_inputs(1, 37, 2, 16, 24, torch.float32)
    init = (init[0].softmax(-1), init[1])
    delta = torch.full_like(inputs[2], 0.5 if objective == "huber" else 2.0, dtype=torch.float32)
    miras = op_miras_args((objective, delta), "kl", inputs[2], torch.float32)
    d_o, d_m, d_s = random_cotangents([inputs[2], init[0], init[1]], seed=4)
    token = read == "token"
    results = []
    for ops in (emu, torch.ops.titans_ext):
        o, m, s, states = ops.linear_memory_fwd(*inputs, *init, 16, token, True, *miras)
        results.append([o, m, s] + list(ops.linear_memory_bwd(*inputs, states, d_o, d_m, d_s, 16, token, *miras)))
    assert_matches(NAMES, results[1], results[0], torch.float32)


# ---- The CI subset: D = 64 over five chunks (bf16 recomputes every other chunk's start state in the
# backward, through the objective), D = 128.

@pytest.mark.parametrize("objective, retention", [("l2", "l2"), ("huber", "l2"), ("yaad", "lq3")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_dim_64_five_chunks(dtype, objective, retention):
    # bf16 under a whole-state option keeps every chunk's checkpoint (no recomputed step).
    check(1, 77, 1, 64, 64, 16, dtype, objective=objective, retention=retention)


@pytest.mark.parametrize("dtype, T", [(torch.float32, 20), (torch.float16, 37)])
def test_head_dim_128(dtype, T):
    # Several chunks: the backward carries the cotangent through dm0 / ds0 (it does not fit beside
    # the chunk's tiles in fp32 or fp16, test_plans_of_a_non_l2_objective); fp16 also recomputes
    # every other chunk's start state through the objective.
    check(1, T, 1, 128, 128, 16, dtype, objective="pseudo_huber")


@pytest.mark.parametrize("objective, retention, read", [
    ("huber", "l2", "token"), ("yaad", "l2", "token"), ("l2", ("lq", 3), "token"), ("yaad", ("lq", 4), "token"),
    ("huber", "kl", "token"), ("yaad", "kl", "token"), ("l2", "kl", "chunk_start"), ("yaad", ("lq", 3), "wide"),
    ("l2", ("lq", 4), "wide"), ("yaad", "kl", "wide")])
def test_state_carried_across_calls_equals_one_call(objective, retention, read):
    # A stream split at a chunk boundary: the second call starts from the first's final state (lq's
    # accumulator A_T, whose next chunk fixes its own rho0; kl's memory after the chunk). "wide":
    # token reads at Dv = 80, past one value tile.
    inputs, init = memory_inputs(1, 48, 2, 16, 80 if read == "wide" else 16, torch.float32)
    if retention == "kl":
        init = (init[0].softmax(-1), init[1])
    delta = torch.full_like(inputs[2], 0.5 if objective == "huber" else 2.0, dtype=torch.float32)

    def run(piece, state, rows):
        miras = op_miras_args((objective, delta[:, rows]) if objective != "l2" else "l2", retention, piece[2],
                              torch.float32)
        return emu.linear_memory_fwd(*piece, *state, 16, read != "chunk_start", False, *miras)[:3]

    o, m, s = run(inputs, init, slice(None))
    o1, m1, s1 = run([x[:, :32] for x in inputs], init, slice(0, 32))
    o2, m2, s2 = run([x[:, 32:] for x in inputs], (m1, s1), slice(32, None))
    assert torch.equal(o, torch.cat([o1, o2], dim=1)) and torch.equal(m, m2) and torch.equal(s, s2)


def test_backward_contract_matches_the_cpu_op():
    # Same outputs as titans_ext::linear_memory_bwd (d_delta included): shapes and dtypes.
    inputs, init = memory_inputs(1, 20, 2, 8, 6, torch.bfloat16)
    miras = op_miras_args(("huber", 0.5), "l2", inputs[2], torch.float32)
    o, m, s, states = emu.linear_memory_fwd(*inputs, *init, 16, True, True, *miras)
    cpu_states = torch.ops.titans_ext.linear_memory_fwd(*inputs, *init, 16, True, True, *miras)[3]
    d_o, d_m = torch.randn_like(o), torch.randn_like(m)
    emulated = emu.linear_memory_bwd(*inputs, states, d_o, d_m, None, 16, True, *miras)
    cpu = torch.ops.titans_ext.linear_memory_bwd(*inputs, cpu_states, d_o, d_m, None, 16, True, *miras)
    assert len(emulated) == len(cpu) == len(GRAD_NAMES) + 1
    for name, e, c in zip(GRAD_NAMES + ["d_delta"], emulated, cpu):
        assert e.shape == c.shape and e.dtype == c.dtype, name


# ---- The launch plans: a non-l2 objective's backward takes one group per sequence (the reverse scan
# runs the l2 map only), and a delta adds its read (and d_delta's write) to the traffic.

def test_plans_of_a_non_l2_objective():
    B, T, H, D, C = 1, 4096, 2, 64, 16
    l2 = cuda_launch_plan(B, T, H, D, D, C, torch.bfloat16, emulated=True)
    huber = cuda_launch_plan(B, T, H, D, D, C, torch.bfloat16, objective=("huber", 0.5), emulated=True)
    assert l2["backward"]["n_groups"] > 1, "the l2 shape should split the sequence (else the test proves nothing)"
    assert huber["backward"]["n_groups"] == 1
    assert [k["name"] for k in huber["backward"]["kernels"]] == ["linear_memory_bwd_chunks"]
    delta_bytes = B * T * H * D * 4
    assert huber["forward"]["kernels"][0]["bytes_read"] == l2["forward"]["kernels"][0]["bytes_read"] + delta_bytes
    lp = cuda_launch_plan(B, T, H, D, D, C, torch.bfloat16, objective=("lp", 3), emulated=True)
    assert lp["forward"] == l2["forward"] and lp["backward"]["n_groups"] == 1
    assert not huber["backward"]["global_carry"]
    # fp32 at Dk = Dv = 128: the carried cotangent of all Dv (128 KiB) does not fit beside the chunk,
    # so it goes through dm0 / ds0 (read twice and written once per chunk).
    wide_l2 = cuda_launch_plan(B, 200, H, 128, 128, 32, torch.float32, emulated=True)
    wide = cuda_launch_plan(B, 200, H, 128, 128, 32, torch.float32, objective=("lp", 3), emulated=True)
    assert wide["backward"]["fits"] and wide["backward"]["global_carry"] and wide["backward"]["n_groups"] == 1
    state_bytes, n_chunks = 2 * B * H * 128 * 128 * 4, -(-200 // 32)
    [chunks] = wide["backward"]["kernels"]
    assert chunks["smem_bytes"] <= 227 * 1024
    assert chunks["bytes_written"] == wide_l2["backward"]["kernels"][-1]["bytes_written"] + n_chunks * state_bytes


def test_plans_of_the_whole_state_options():
    # One value tile over all of Dv in the forward, one group per sequence in the backward, and every
    # chunk's checkpoint for bf16 too (twice the l2 retention's).
    B, T, H, D, C = 1, 4096, 2, 64, 16
    l2 = cuda_launch_plan(B, T, H, D, 48, C, torch.bfloat16, emulated=True)
    for objective in [("yaad", 0.5), "l2"]:
        plan = cuda_launch_plan(B, T, H, D, 48, C, torch.bfloat16, objective=objective,
                                retention=("lq", 3) if objective == "l2" else "l2", emulated=True)
        assert plan["forward"]["tile_v"] == 64 and plan["forward"]["kernels"][0]["blocks"] == B * H
        assert plan["backward"]["n_groups"] == 1
        assert plan["forward"]["buffers"][0]["bytes"] == 2 * l2["forward"]["buffers"][0]["bytes"]
    # Past one tile (Dv = 128): one block per head walks two tiles of 64; the state's trips home per
    # chunk (written once, read once, M once more for yaad's residuals with the values, once more for
    # lq's rho0) add to the traffic.
    n_chunks, state_bytes = T // C, B * H * 128 * D * 4  # one of M, S of every head in fp32
    wide_l2 = cuda_launch_plan(B, T, H, D, 128, C, torch.bfloat16, emulated=True)["forward"]
    for objective, retention, extra_reads in [(("yaad", 0.5), "l2", 1), ("l2", ("lq", 3), 1),
                                              (("yaad", 0.5), ("lq", 3), 2)]:
        plan = cuda_launch_plan(B, T, H, D, 128, C, torch.bfloat16, objective=objective, retention=retention,
                                emulated=True)["forward"]
        assert plan["tile_v"] == 64 and plan["block_tiles"] == 2 and plan["kernels"][0]["blocks"] == B * H
        yaad = objective != "l2"
        delta_and_values = B * T * H * 128 * (4 + 2) if yaad else 0
        [kernel], [l2_kernel] = plan["kernels"], wide_l2["kernels"]
        assert kernel["bytes_written"] - plan["buffers"][0]["bytes"] == \
            l2_kernel["bytes_written"] - wide_l2["buffers"][0]["bytes"] + 2 * n_chunks * state_bytes
        assert kernel["bytes_read"] == \
            l2_kernel["bytes_read"] + delta_and_values + (2 + extra_reads) * n_chunks * state_bytes
    # kl with yaad past one tile: the lag token's pass (M, token 0's values) and its step's ([M; S]
    # read, the lagged [M; S] written) besides yaad's.
    yaad = cuda_launch_plan(B, T, H, D, 128, C, torch.bfloat16, objective=("yaad", 0.5), emulated=True)["forward"]
    kl_yaad = cuda_launch_plan(B, T, H, D, 128, C, torch.bfloat16, objective=("yaad", 0.5), retention="kl",
                               emulated=True)["forward"]
    assert kl_yaad["block_tiles"] == 2
    assert kl_yaad["kernels"][0]["bytes_written"] == yaad["kernels"][0]["bytes_written"] + 2 * n_chunks * state_bytes
    assert kl_yaad["kernels"][0]["bytes_read"] == \
        yaad["kernels"][0]["bytes_read"] + 3 * n_chunks * state_bytes + B * H * n_chunks * 128 * 2
    # kl: row-local, so any value tile, but every chunk's checkpoint and one group per sequence.
    kl = cuda_launch_plan(B, T, H, D, 48, C, torch.bfloat16, retention="kl", emulated=True)
    assert kl["forward"]["tile_v"] == l2["forward"]["tile_v"] and kl["backward"]["n_groups"] == 1
    assert kl["forward"]["buffers"][0]["bytes"] == 2 * l2["forward"]["buffers"][0]["bytes"]
    # kl with yaad: yaad's tile; the backward's setup lags every row (two more passes over the
    # checkpoint, token 0's values twice more per chunk) besides kl's lag backward (M and S).
    yaad = cuda_launch_plan(B, T, H, D, 48, C, torch.bfloat16, objective=("yaad", 0.5), emulated=True)
    kl_yaad = cuda_launch_plan(B, T, H, D, 48, C, torch.bfloat16, objective=("yaad", 0.5), retention="kl",
                               emulated=True)
    assert kl_yaad["forward"]["tile_v"] == 64 and kl_yaad["forward"]["kernels"][0]["bytes_read"] == \
        yaad["forward"]["kernels"][0]["bytes_read"]
    checkpoint_half, value_rows = B * H * (T // C) * 48 * D * 2, B * H * (T // C) * 48 * 2
    assert kl_yaad["backward"]["kernels"][0]["bytes_read"] == \
        yaad["backward"]["kernels"][0]["bytes_read"] + 4 * checkpoint_half + 2 * value_rows


# ---- The rest of the grid (pytest -m slow): D in {16, 64, 128}, C in {1, 16, 64}, every dtype, the
# reads and objectives taken in turn across the cases.

_GRID = list(itertools.product([16, 64, 128], [1, 16, 64], [torch.float32, torch.bfloat16, torch.float16]))
_OPTIONS = list(itertools.product(["token", "chunk_start"], OBJECTIVE_IDS, ["l2", "lq3"]))


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_GRID)))
def test_grid(index):
    D, C, dtype = _GRID[index]
    read, objective, retention = _OPTIONS[(5 * index) % len(_OPTIONS)]
    T = 3 * C + 5 if C > 1 else 9
    plan = cuda_launch_plan(1, T, 2, D, D, C, dtype, read=read, objective=OBJECTIVES[objective](0.5),
                            retention=RETENTIONS[retention], emulated=True)
    if not (plan["forward"]["fits"] and plan["backward"]["fits"]):
        pytest.skip("beyond the kernels' shared memory on an H100 (docs/kernels.md §6.1.10)")
    check(1, T, 2, D, D, C, dtype, objective=objective, read=read, retention=retention,
          theta_scale=0.2 if D > 16 else 1.0)
