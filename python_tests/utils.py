"""Shared test helpers: input factories and the closeness rule.

Closeness rule (flash-linear-attention's): the relative RMS error
``rms(ref - out) / rms(ref)`` must stay below a per-dtype bound. Bounds used across the suite:
float64 1e-10 (the kernels and the references differ only in summation order), float32
2e-5 for values / 1e-4 for gradients, bf16 inputs 1e-2 (inputs are rounded, state is fp32).
"""

import contextlib
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-2,
}


def shape_id(shape):
    """pytest id of a (B, T, H, Dk, Dv, chunk_size) case."""
    return "B{}-T{}-H{}-Dk{}-Dv{}-C{}".format(*shape)


def err_ratio(ref, out):
    ref, out = ref.double(), out.double()
    return ((ref - out).pow(2).mean().sqrt() / (ref.pow(2).mean().sqrt() + 1e-30)).item()


def assert_close(name, ref, out, ratio):
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in the output"
    assert not torch.isnan(ref).any(), f"{name}: NaN in the reference"
    if ref.numel() == 0:
        return
    err = err_ratio(ref, out)
    assert err <= ratio, f"{name}: relative RMS error {err:.3e} > {ratio:.1e} (max abs diff {(ref.double() - out.double()).abs().max().item():.3e})"


def memory_inputs(B, T, H, Dk, Dv, dtype=torch.float32, seed=0, theta_max=0.3, state=True, device="cpu"):
    """Random q, k, v, gates and an initial state; keys are l2-normalized as the layers do."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q = rand(B, T, H, Dk)
    k = torch.nn.functional.normalize(rand(B, T, H, Dk), dim=-1)
    v = rand(B, T, H, Dv)
    theta = torch.rand(B, T, H, generator=g, dtype=torch.float64) * theta_max
    eta = torch.rand(B, T, H, generator=g, dtype=torch.float64)
    alpha = torch.rand(B, T, H, generator=g, dtype=torch.float64) * 0.5
    inputs = [x.to(dtype) for x in (q, k, v)] + [x.to(dtype if dtype == torch.float64 else torch.float32)
                                                 for x in (theta, eta, alpha)]
    inputs = [x.to(device) for x in inputs]
    init = None
    if state:
        state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        init = tuple((0.3 * rand(B, H, Dv, Dk)).to(state_dtype).to(device) for _ in range(2))
    return inputs, init


def random_cotangents(tensors, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype).to(t.device) for t in tensors]


def outputs_and_grads(fn, inputs, init, **kwargs):
    """Runs fn(*inputs, initial_state=init, output_final_state=True), backpropagates a random
    functional of o AND the final state, returns [o, M_T, S_T, grads of inputs and init]."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    init_leaves = None if init is None else tuple(x.detach().clone().requires_grad_() for x in init)
    o, (m, s) = fn(*leaves, initial_state=init_leaves, output_final_state=True, **kwargs)
    outs = [o, m, s]
    cot = random_cotangents(outs)
    loss = sum((a.double() * b.double()).sum() for a, b in zip(outs, cot))
    wrt = leaves + (list(init_leaves) if init_leaves else [])
    grads = torch.autograd.grad(loss, wrt)
    return [x.detach() for x in outs] + list(grads)


GRAD_NAMES = ["dq", "dk", "dv", "dtheta", "deta", "dalpha", "dM0", "dS0"]


def assert_compile_matches_eager(step, tensors, names):
    """torch.compile(step, fullgraph=True) gives the eager loss and gradients of ``step(*tensors)``.

    Inductor fuses elementwise work (a gate's sigmoid, the loss) differently from eager mode,
    so the rule is fp32 rounding: relative RMS 1e-6 on the loss, 1e-5 on each gradient.
    """
    leaves = [x.detach().clone().requires_grad_() for x in tensors]
    eager_loss = step(*leaves)
    eager_grads = torch.autograd.grad(eager_loss, leaves)
    compiled_leaves = [x.detach().clone().requires_grad_() for x in tensors]
    loss = torch.compile(step, fullgraph=True)(*compiled_leaves)
    grads = torch.autograd.grad(loss, compiled_leaves)
    assert_close("loss", eager_loss, loss, 1e-6)
    for name, a, b in zip(names, eager_grads, grads):
        assert_close(name, a, b, 1e-5)


def opcheck_linear_memory(shape, chunk_size, device="cpu"):
    """torch.library.opcheck of linear_memory_fwd (with and without requires_grad) and _bwd."""
    B, T, H, Dk, Dv = shape
    for requires_grad in (False, True):
        inputs, init = memory_inputs(B, T, H, Dk, Dv, torch.float32, device=device)
        args = [x.requires_grad_(requires_grad) for x in inputs + list(init)]
        torch.library.opcheck(torch.ops.titans_ext.linear_memory_fwd.default, (*args, chunk_size, True, True))
    q, k, v, theta, eta, alpha, m0, s0 = (x.detach() for x in args)
    o, m, s, states = torch.ops.titans_ext.linear_memory_fwd(q, k, v, theta, eta, alpha, m0, s0, chunk_size, True, True)
    bwd_args = (q, k, v, theta, eta, alpha, states, torch.randn_like(o), torch.randn_like(m), None, chunk_size, True)
    torch.library.opcheck(torch.ops.titans_ext.linear_memory_bwd.default, bwd_args)


# The CPU SIMT emulation's modes (csrc/device/emu/runtime.h): a random thread order, cp.async
# copies landing at random before their wait, shared-memory writes hidden from other threads
# until a fence, blocks interleaved. Each takes a seed; -1 turns it off.
EMULATION_MODES = ("schedule", "copy_landing", "write_visibility", "block_interleaving")


def set_emulation_modes(seed, modes=EMULATION_MODES):
    """Turns the named emulation modes on with ``seed`` (off for ``seed=-1``) and the others off."""
    import titans_ext._emu  # noqa: F401  (registers titans_emu::)

    for mode in EMULATION_MODES:
        getattr(torch.ops.titans_emu, f"set_{mode}")(seed if mode in modes else -1)


@pytest.fixture
def all_emulation_modes(request):
    """Every emulation mode on for one test, with a seed of its own (stable across runs; printed,
    so a failure can be reproduced); the orderly default again afterwards."""
    seed = zlib.crc32(request.node.nodeid.encode()) % 1000
    print(f"emulation modes on, seed {seed}")
    set_emulation_modes(seed)
    yield seed
    set_emulation_modes(-1)


@contextlib.contextmanager
def syncs_are_errors():
    """Every synchronizing CUDA call torch makes inside the block raises (set_sync_debug_mode("error"))."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.synchronize()


def import_with_environment(variable, value, expression):
    """A fresh interpreter that sets the environment variable, imports titans_ext and prints
    ``expression``: the completed process (returncode, stdout, stderr)."""
    env = dict(os.environ, **{variable: value})
    return subprocess.run([sys.executable, "-c", f"import titans_ext; print({expression})"],
                          cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True,
                          timeout=300)
