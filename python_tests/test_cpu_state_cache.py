"""The cache of the CPU forwards' saved states (titans_ext/ops/state_cache.py): a training loop
reuses its buffers, a reused buffer's old contents never reach a result, the cache never holds
more than the peak of live saved states, and its switches and environment variable."""

import gc
import threading

import pytest
import torch

import titans_ext
from titans_ext.reference import linear_memory_chunked, mlp_memory_chunked

from mlp_inputs import GRAD_NAMES as MLP_GRAD_NAMES
from mlp_inputs import OUT_NAMES as MLP_OUT_NAMES
from mlp_inputs import mlp_inputs, mlp_outputs_and_grads
from utils import GRAD_NAMES, TOLERANCE, assert_close, import_with_environment, memory_inputs, outputs_and_grads

@pytest.fixture(autouse=True)
def fresh_cache():
    """Each test starts from an enabled, empty cache and leaves it so."""
    titans_ext.set_cpu_state_cache(True)
    titans_ext.empty_cpu_state_cache()
    yield
    titans_ext.set_cpu_state_cache(True)
    titans_ext.empty_cpu_state_cache()


def mlp_states(T, H=2, D=16, E=2, C=16, dtype=torch.float64):
    """chunk_states of one MLP-memory forward (the raw operator, which returns them)."""
    (q, k, v, theta, eta, alpha), (w1, w2), (s1, s2) = mlp_inputs(1, T, H, D, E, dtype)
    return torch.ops.titans_ext.mlp_memory_fwd(q, k, v, theta, eta, alpha, w1, w2, s1, s2, C, True, "gelu", True)[-1]


def nbytes(x):
    return x.numel() * x.element_size()


def test_training_loop_reuses_the_saved_states_buffer():
    inputs, weights, moments = mlp_inputs(1, 70, 2, 16, 2, torch.float64)
    leaves = [x.requires_grad_() for x in inputs]
    before = titans_ext.cpu_state_cache_info()
    for _ in range(3):
        o, _ = titans_ext.mlp_memory(*leaves, weights, momentum=moments, chunk_size=16)
        o.sum().backward()
    info = titans_ext.cpu_state_cache_info()
    assert (info["misses"] - before["misses"], info["hits"] - before["hits"]) == (1, 2)
    assert info["live_bytes"] == 0 and info["cached_bytes"] == info["peak_bytes"] > 0


def test_the_same_buffer_comes_back():
    first = mlp_states(40)
    pointer, size = first.data_ptr(), nbytes(first)
    del first
    assert titans_ext.cpu_state_cache_info()["cached_bytes"] == size
    again = mlp_states(40)
    assert again.data_ptr() == pointer
    assert titans_ext.cpu_state_cache_info()["live_bytes"] == size


def poison_cache(make_states):
    """Leaves in the cache a NaN-filled buffer of the size make_states() allocates."""
    states = make_states()
    states.fill_(float("nan"))
    del states
    return titans_ext.cpu_state_cache_info()["hits"]


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("T", [48, 45])  # whole chunks, and a short last chunk
def test_mlp_memory_ignores_what_a_reused_buffer_held(read, T):
    B, H, D, E, C = 1, 2, 16, 2, 16
    inputs, weights, moments = mlp_inputs(B, T, H, D, E, torch.float64)
    ref = mlp_outputs_and_grads(mlp_memory_chunked, inputs, weights, moments, chunk_size=C, read=read)
    q, k, v, theta, eta, alpha = inputs
    hits = poison_cache(lambda: torch.ops.titans_ext.mlp_memory_fwd(
        q, k, v, theta, eta, alpha, *weights, *moments, C, read == "token", "gelu", True)[-1])
    out = mlp_outputs_and_grads(titans_ext.mlp_memory, inputs, weights, moments, chunk_size=C, read=read)
    assert titans_ext.cpu_state_cache_info()["hits"] == hits + 1
    for name, r, o in zip(MLP_OUT_NAMES + MLP_GRAD_NAMES, ref, out):
        assert_close(name, r, o, TOLERANCE[torch.float64])


@pytest.mark.parametrize("read", ["token", "chunk_start"])
@pytest.mark.parametrize("T", [48, 45])
def test_linear_memory_ignores_what_a_reused_buffer_held(read, T):
    B, H, Dk, Dv, C = 1, 2, 16, 24, 16
    inputs, init = memory_inputs(B, T, H, Dk, Dv, torch.float64)
    ref = outputs_and_grads(linear_memory_chunked, inputs, init, chunk_size=C, read=read)
    hits = poison_cache(lambda: torch.ops.titans_ext.linear_memory_fwd(
        *inputs, *init, C, read == "token", True)[-1])
    out = outputs_and_grads(titans_ext.linear_memory, inputs, init, chunk_size=C, read=read)
    assert titans_ext.cpu_state_cache_info()["hits"] == hits + 1
    for name, r, o in zip(["o", "M_T", "S_T"] + GRAD_NAMES, ref, out):
        assert_close(name, r, o, TOLERANCE[torch.float64])


def test_packed_sequences_ignore_what_a_reused_buffer_held():
    # cu_seqlens bounds the slots from above; the slots past the last sequence's are zeroed.
    cu_seqlens = torch.tensor([0, 7, 40, 45])
    inputs, init = memory_inputs(1, 45, 2, 16, 16, torch.float64, state=False)
    kwargs = dict(chunk_size=16, cu_seqlens=cu_seqlens)
    hits = poison_cache(lambda: torch.ops.titans_ext.linear_memory_fwd(
        *inputs, None, None, 16, True, True, cu_seqlens=cu_seqlens)[-1])
    out = outputs_and_grads(titans_ext.linear_memory, inputs, None, **kwargs)
    assert titans_ext.cpu_state_cache_info()["hits"] == hits + 1
    titans_ext.set_cpu_state_cache(False)
    fresh = outputs_and_grads(titans_ext.linear_memory, inputs, None, **kwargs)
    for name, f, o in zip(["o", "M_T", "S_T"] + GRAD_NAMES, fresh, out):
        assert torch.equal(f, o), name


def test_live_plus_cached_never_exceeds_the_peak():
    small = mlp_states(32)
    s = nbytes(small)
    both = [small, mlp_states(32)]  # two alive at once: the peak is 2 s
    del small
    both.clear()
    info = titans_ext.cpu_state_cache_info()
    assert (info["live_bytes"], info["cached_bytes"], info["peak_bytes"]) == (0, 2 * s, 2 * s)
    large = mlp_states(96)  # a new size: the cached small buffers that would push past the peak go
    b = nbytes(large)
    assert b > 2 * s
    info = titans_ext.cpu_state_cache_info()
    assert info["live_bytes"] == b and info["cached_bytes"] == 0 and info["peak_bytes"] == b
    del large
    kept = mlp_states(32)  # a miss, and the large buffer would push past the peak
    info = titans_ext.cpu_state_cache_info()
    assert (info["live_bytes"], info["cached_bytes"], info["peak_bytes"]) == (nbytes(kept), 0, b)


def test_empty_frees_what_is_cached_and_restarts_the_peak():
    live = mlp_states(32)
    cached = mlp_states(64)
    del cached
    titans_ext.empty_cpu_state_cache()
    info = titans_ext.cpu_state_cache_info()
    assert (info["live_bytes"], info["cached_bytes"], info["peak_bytes"]) == (nbytes(live), 0, nbytes(live))
    del live
    assert titans_ext.cpu_state_cache_info()["cached_bytes"] == info["live_bytes"]


def test_disabled_cache_allocates_fresh_keeps_what_it_holds_and_nothing_more():
    held = mlp_states(32)
    size = nbytes(held)
    del held
    live = mlp_states(32)  # the held buffer again
    titans_ext.set_cpu_state_cache(False)
    assert titans_ext.cpu_state_cache_info()["enabled"] is False
    before = titans_ext.cpu_state_cache_info()
    fresh = mlp_states(32)
    assert fresh.data_ptr() != live.data_ptr()
    del live, fresh  # the buffer taken while enabled is freed too, not kept
    info = titans_ext.cpu_state_cache_info()
    assert (info["live_bytes"], info["cached_bytes"]) == (0, 0)
    assert (info["hits"], info["misses"]) == (before["hits"], before["misses"])
    titans_ext.set_cpu_state_cache(True)
    mlp_states(32)
    assert titans_ext.cpu_state_cache_info()["misses"] == before["misses"] + 1
    assert titans_ext.cpu_state_cache_info()["peak_bytes"] == size


def test_disabling_keeps_the_cached_buffers_until_emptied():
    kept = mlp_states(32)
    pointer = kept.data_ptr()
    del kept
    titans_ext.set_cpu_state_cache(False)
    mlp_states(32)
    titans_ext.set_cpu_state_cache(True)
    assert mlp_states(32).data_ptr() == pointer
    titans_ext.set_cpu_state_cache(False)
    titans_ext.empty_cpu_state_cache()
    assert titans_ext.cpu_state_cache_info()["cached_bytes"] == 0


def test_set_cpu_state_cache_wants_a_bool():
    with pytest.raises(TypeError, match="enabled must be a bool, got int"):
        titans_ext.set_cpu_state_cache(0)


def test_a_buffer_released_on_another_thread_returns_to_the_cache():
    holder = [mlp_states(32)]
    size = nbytes(holder[0])
    worker = threading.Thread(target=holder.clear)
    worker.start()
    worker.join()
    gc.collect()
    assert titans_ext.cpu_state_cache_info()["cached_bytes"] == size


def test_saved_states_are_ordinary_tensors():
    states = mlp_states(32, dtype=torch.float32)
    assert states.is_contiguous() and states.dtype == torch.float32 and states.device.type == "cpu"
    view = states[0, 1]
    del states
    assert titans_ext.cpu_state_cache_info()["cached_bytes"] == 0  # the view keeps the buffer alive
    assert torch.isfinite(view).all()
    del view
    assert titans_ext.cpu_state_cache_info()["cached_bytes"] > 0


def _import_with_environment(value):
    return import_with_environment("TITANS_EXT_CPU_STATE_CACHE", value, "titans_ext.cpu_state_cache_info()['enabled']")


def test_environment_variable_turns_the_cache_off_at_import():
    result = _import_with_environment("0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "False"


def test_bad_environment_variable_fails_the_import_naming_it():
    result = _import_with_environment("off")
    assert result.returncode != 0
    assert "TITANS_EXT_CPU_STATE_CACHE" in result.stderr and "got 'off'" in result.stderr


@pytest.mark.parametrize("retention,objective,C", [("kl", "l2", 1), (("lq", 4), ("huber", 0.5), 16),
                                                   ("l2", ("yaad", 0.5), 16)])
def test_miras_options_ignore_what_a_reused_buffer_held(retention, objective, C):
    inputs, weights, moments = mlp_inputs(1, 45, 2, 16, 2, torch.float64)
    kwargs = dict(chunk_size=C, retention=retention, objective=objective)
    titans_ext.set_cpu_state_cache(False)
    fresh = mlp_outputs_and_grads(titans_ext.mlp_memory, inputs, weights, moments, **kwargs)
    titans_ext.set_cpu_state_cache(True)
    q, k, v, theta, eta, alpha = inputs
    hits = poison_cache(lambda: torch.ops.titans_ext.mlp_memory_fwd(
        q, k, v, theta, eta, alpha, *weights, *moments, C, True, "gelu", True)[-1])
    out = mlp_outputs_and_grads(titans_ext.mlp_memory, inputs, weights, moments, **kwargs)
    assert titans_ext.cpu_state_cache_info()["hits"] == hits + 1
    for name, f, o in zip(MLP_OUT_NAMES + MLP_GRAD_NAMES, fresh, out):
        assert torch.equal(f, o), name
