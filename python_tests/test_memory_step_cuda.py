"""The decode steps on CUDA tensors (csrc/cuda/memory_step.cuh, one fused kernel per step): streams
equal the chunked op token for token (float64) and the CPU step (fp32, bf16); no step synchronizes
the host (torch.cuda.set_sync_debug_mode("error")); a step captured in a CUDA graph and replayed
over a stream gives the eager steps' results. Skipped without a GPU; the same kernels run under the
CPU emulation in test_memory_step_emulated.py."""

import pytest
import torch

import titans_ext  # noqa: F401  (registers titans_ext::)
from titans_ext.model.memory import map_tensors
from titans_ext.ops.checks import CHECK_VALUES_ENV

from miras_cases import OBJECTIVES, RETENTIONS
from step_harness import (IN_PLACE_STEP_OPS, MEMORIES, STEP_OPS, check_in_place_stream, check_stream,
                          decode_model_stream, flat, make_stream, owned_state, replay_one_token_calls, step)
from utils import TOLERANCE, assert_close, syncs_are_errors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

OPS = {memory: getattr(torch.ops.titans_ext, name) for memory, name in STEP_OPS.items()}
IN_PLACE_OPS = {memory: getattr(torch.ops.titans_ext, name) for memory, name in IN_PLACE_STEP_OPS.items()}
SYNC_ERROR = r"called a synchronizing CUDA operation"


def cuda_stream(memory, B, T, H, D, dtype=torch.float64, retention="l2", seed=0):
    tokens, state = make_stream(memory, B, T, H, D, dtype=dtype, retention=retention, seed=seed)
    return [x.cuda() for x in tokens], _map(lambda x: x.cuda(), state)


def _map(fn, state):
    if state is None or isinstance(state, torch.Tensor):
        return None if state is None else fn(state)
    return type(state)(_map(fn, x) for x in state)


@pytest.mark.parametrize("retention", RETENTIONS)
@pytest.mark.parametrize("objective", ["l2", "lp3", "huber", "yaad"])
@pytest.mark.parametrize("memory", MEMORIES)
def test_float64_stream_equals_cpu_step(memory, objective, retention):
    # Every MIRAS option (the CPU step equals the chunked op, test_memory_step.py), rows of 40 over
    # a warp's lanes.
    tokens, state = cuda_stream(memory, 2, 9, 3, 40, retention=RETENTIONS[retention])
    delta = 0.2 + torch.rand(2, 9, 3, dtype=torch.float64)
    runs = []
    for device in ("cuda", "cpu"):
        options = dict(chunk_size=4, objective=OBJECTIVES[objective](delta.to(device)), retention=RETENTIONS[retention])
        dev_tokens, running, chunk_state = [x.to(device) for x in tokens], _map(lambda x: x.to(device), state), None
        outs = []
        for t in range(9):
            o, running, chunk_state = step(memory, OPS[memory], dev_tokens, t, running, chunk_state, **options)
            outs.append(o)
        runs.append([x.cpu() for x in outs + flat(running) + flat(chunk_state)])
    for i, (c, g) in enumerate(zip(runs[1], runs[0])):
        assert_close(f"output {i}", c, g, 1e-12)


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("memory", MEMORIES)
def test_l2_stream_equals_cuda_chunked_op(memory, read):
    if memory == "mlp" and not torch._C._dispatch_has_kernel_for_dispatch_key("titans_ext::mlp_memory_fwd", "CUDA"):
        pytest.skip("mlp_memory has no CUDA kernels in this build")
    tokens, state = cuda_stream(memory, 2, 70, 2, 64, dtype=torch.float32)
    check_stream(memory, OPS[memory], tokens, state, 16, 1e-4, read=read)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory", MEMORIES)
def test_matches_cpu_step(memory, dtype):
    tokens, state = cuda_stream(memory, 3, 20, 4, 64, dtype=torch.float32, retention="kl")
    tokens = [x.to(dtype) if i < 3 else x for i, x in enumerate(tokens)]
    runs = []
    for device in ("cuda", "cpu"):
        dev_tokens, running, chunk_state = [x.to(device) for x in tokens], _map(lambda x: x.to(device), state), None
        outs = []
        for t in range(20):
            o, running, chunk_state = step(memory, OPS[memory], dev_tokens, t, running, chunk_state, chunk_size=16,
                                           retention="kl", objective=("huber", 0.5))
            outs.append(o)
        runs.append([x.cpu().float() for x in outs + flat(running) + flat(chunk_state)])
    for i, (c, g) in enumerate(zip(runs[1], runs[0])):
        assert_close(f"output {i}", c, g, 1e-5 if dtype == torch.float32 else TOLERANCE[dtype])


@pytest.mark.parametrize("memory", MEMORIES)
def test_no_host_sync(monkeypatch, memory):
    tokens, state = cuda_stream(memory, 2, 6, 2, 32, dtype=torch.bfloat16)

    def run(position):
        running, chunk_state = state, None
        for t in range(6):
            _, running, chunk_state = step(memory, OPS[memory], tokens, t, running, chunk_state, chunk_size=4,
                                           position=position + t, retention=("lq", 4), objective=("huber", 0.5))

    monkeypatch.delenv(CHECK_VALUES_ENV, raising=False)
    for position in (0, torch.zeros((), dtype=torch.int64, device="cuda")):  # an int becomes a device fill
        with syncs_are_errors():
            run(position)
    monkeypatch.setenv(CHECK_VALUES_ENV, "1")  # reading the gates is a sync, and is caught
    with pytest.raises(RuntimeError, match=SYNC_ERROR):
        with syncs_are_errors():
            run(0)


def replay_over_stream(graph, static_o, token, tokens, position):
    """Replays ``graph`` once per token of ``tokens`` from position 0, each token first copied into
    the static ``token`` buffers; returns the outputs."""
    position.zero_()
    outs = []
    for t in range(tokens[0].shape[1]):
        for dst, src in zip(token, tokens):
            dst.copy_(src[:, t])
        graph.replay()
        outs.append(static_o.clone())
    torch.cuda.synchronize()
    return outs


def capture(fn):
    """``fn`` run once on a side stream (the warm-up), then captured: ``(graph, fn's outputs)``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("memory", MEMORIES)
def test_cuda_graph_capture_and_replay(memory, read):
    # One step captured with static buffers: the token's inputs, the states and the position, which
    # the graph advances itself. Replayed over a stream that crosses chunk boundaries, it gives the
    # eager steps' outputs and states.
    T, C = 11, 4
    tokens, state = cuda_stream(memory, 2, T, 2, 32, dtype=torch.float32, retention="kl")
    options = dict(chunk_size=C, read=read, retention="kl")
    eager_outs, running, chunk_state = [], state, None
    for t in range(T):
        o, running, chunk_state = step(memory, OPS[memory], tokens, t, running, chunk_state, **options)
        eager_outs.append(o)
    eager = eager_outs + flat(running) + flat(chunk_state)

    token = [x[:, 0].clone() for x in tokens]
    position = torch.zeros((), dtype=torch.int64, device="cuda")
    _, static_state, static_chunk = step(memory, OPS[memory], [x[:, None] for x in token], 0,
                                         _map(torch.clone, state), None, position=position, **options)
    static_state = _map(lambda x: x.clone(), static_state)
    static_chunk = _map(lambda x: x.clone(), static_chunk)
    static_state_init = [x.clone() for x in flat(state)]

    def one_step():
        o, new_state, new_chunk = step(memory, OPS[memory], [x[:, None] for x in token], 0, static_state,
                                       static_chunk, position=position, **options)
        for dst, src in zip(flat(static_state) + flat(static_chunk), flat(new_state) + flat(new_chunk)):
            dst.copy_(src)
        position.add_(1)
        return o

    graph, static_o = capture(one_step)

    for dst, src in zip(flat(static_state), static_state_init):
        dst.copy_(src)
    outs = replay_over_stream(graph, static_o, token, tokens, position)
    assert position.item() == T
    for i, (e, g) in enumerate(zip(eager, outs + flat(static_state) + flat(static_chunk))):
        assert torch.equal(e, g), f"output {i} differs between the replayed graph and the eager steps"


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("retention", ["l2", "lq4", "kl"])
@pytest.mark.parametrize("memory", MEMORIES)
def test_in_place_stream_equals_steps(memory, retention, read):
    # Rows of 40 over a warp's lanes; row 1 at position 2t (chunk starts at different tokens).
    tokens, state = cuda_stream(memory, 2, 9, 3, 40, retention=RETENTIONS[retention])
    positions = [torch.tensor([t, 2 * t], device="cuda") for t in range(9)]
    check_in_place_stream(memory, IN_PLACE_OPS[memory], OPS[memory], tokens, state, 4, positions, read=read,
                          retention=RETENTIONS[retention])


@pytest.mark.parametrize("memory", MEMORIES)
def test_in_place_step_captured_in_a_cuda_graph(memory):
    # The in-place step needs no copies into static buffers: it writes them. Replayed over a stream
    # that crosses chunk boundaries, the graph gives the eager in-place steps' outputs and buffers.
    T, C = 11, 4
    tokens, state = cuda_stream(memory, 2, T, 2, 32, dtype=torch.float32, retention="kl")
    function = getattr(titans_ext, IN_PLACE_STEP_OPS[memory])
    options = dict(chunk_size=C, read="chunk_start", retention="kl")

    def buffers():
        running = owned_state(state)
        return running, titans_ext.empty_chunk_state(running, read="chunk_start", retention="kl")

    eager_state, eager_chunk = buffers()
    with torch.no_grad():
        eager = [function(*(x[:, t] for x in tokens), position=t, state=eager_state, chunk_state=eager_chunk,
                          **options) for t in range(T)]
    static_state, static_chunk = buffers()
    initial = [x.clone() for x in flat(static_state)]
    token = [x[:, 0].clone() for x in tokens]
    position = torch.zeros((), dtype=torch.int64, device="cuda")

    def one_step():
        with torch.no_grad():
            o = function(*token, position=position, state=static_state, chunk_state=static_chunk, **options)
        position.add_(1)
        return o

    graph, static_o = capture(one_step)
    for dst, src in zip(flat(static_state), initial):
        dst.copy_(src)
    outs = replay_over_stream(graph, static_o, token, tokens, position)
    for i, (e, g) in enumerate(zip(eager + flat(eager_state) + flat(eager_chunk),
                                   outs + flat(static_state) + flat(static_chunk))):
        assert torch.equal(e, g), f"output {i} differs between the replayed graph and the eager in-place steps"


@pytest.mark.parametrize("memory", MEMORIES)
def test_generate_step_captured_in_a_cuda_graph(memory):
    # One token of a TitansLM of memory blocks (the shape of a generate step), captured once from a
    # state with a chunk-start state and replayed across chunk boundaries: the decode steps read the
    # position from the state (MemoryState.step_position), so the graph gives the eager logits.
    torch.manual_seed(0)
    model = titans_ext.TitansLM(64, dim=32, depth=2, block="lmm", memory=memory, memory_heads=2,
                                chunk_size=4).cuda()
    # 3 < chunk_size: the prompt runs as steps (the MLP's chunked op has no CUDA kernel yet) and ends
    # inside a chunk, so the state has a chunk-start state to capture.
    prompt = torch.randint(0, 64, (2, 3), device="cuda")
    fed = torch.randint(0, 64, (2, 9), device="cuda")
    state, eager = decode_model_stream(model, prompt, fed)
    static_state = map_tensors(torch.clone, state)
    token = fed[:, :1].clone()
    with torch.no_grad():
        graph, (static_logits, static_next) = capture(lambda: model(token, static_state))

        def run_token(next_token):
            token.copy_(next_token)
            graph.replay()
            return static_logits, static_next

        def check(t, logits):
            torch.testing.assert_close(logits, eager[t], rtol=1e-5, atol=1e-5)

        replay_one_token_calls(run_token, static_state, fed, check)
