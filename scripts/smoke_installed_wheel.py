"""Smoke test of an installed titans_ext wheel; scripts/check_wheel.sh runs it in a fresh venv from
an empty folder (``python -I``), so the package comes from the wheel and not from a source tree.

It checks what a binary can get wrong on a torch other than the one it was built with: the import
(and its build-stamp check), the operators' schemas, fake kernels and autograd registration
(``torch.library.opcheck`` of the forward and backward op of both memories), the values and
gradients of both ops against the plain-PyTorch references in float64 under every CPU kernel
variant the machine runs (one case with MIRAS options, so float, optional-tensor and string
arguments cross the stable ABI too), both ops in
one ``torch.compile(fullgraph=True)`` graph with the default backend (inductor) against eager mode,
and an error raised in C++ arriving as a Python RuntimeError. With a CUDA build and a GPU, linear_memory runs
on CUDA too (against the float64 reference, at float32's tolerance).

    python -I scripts/smoke_installed_wheel.py
"""

import os
import sysconfig

import torch

import titans_ext
from titans_ext import _build_info
from titans_ext.reference import linear_memory_chunked, mlp_memory_chunked

# Relative RMS error bounds of the test suite (python_tests/utils.py): the kernels and the
# references differ only in summation order in float64; the CUDA kernels compute in float32.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def check_imported_from_the_wheel():
    site_packages = os.path.realpath(sysconfig.get_paths()["purelib"])
    package = os.path.realpath(os.path.dirname(titans_ext.__file__))
    if os.path.dirname(package) != site_packages:
        raise SystemExit(f"titans_ext was imported from {package}, not from the installed wheel in {site_packages}")
    print(f"import: titans_ext {titans_ext.__version__} from {package}")
    print(f"        torch {torch.__version__} (CUDA {torch.version.cuda}); build: "
          + ", ".join(f"{name}={getattr(_build_info, name)!r}"
                      for name in ("TORCH_TARGET", "TORCH_BUILT_WITH", "CUDA_VERSION", "CUDA_ARCHS")))


def randn(generator, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=generator, dtype=torch.float64)


def gates(generator, B, T, H):
    """theta in [0, 0.3), eta in [0.5, 1), alpha in [0, 0.2): inside the ops' stability bound."""
    return [low + (high - low) * torch.rand(B, T, H, generator=generator, dtype=torch.float64)
            for low, high in ((0.0, 0.3), (0.5, 1.0), (0.0, 0.2))]


def linear_inputs(B=2, T=21, H=2, Dk=8, Dv=6, seed=0):
    """q, k, v, theta, eta, alpha and an initial state (M0, S0); keys l2-normalized as in the layers."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = randn(g, B, T, H, Dk), torch.nn.functional.normalize(randn(g, B, T, H, Dk), dim=-1), randn(g, B, T, H, Dv)
    return [q, k, v, *gates(g, B, T, H)], [randn(g, B, H, Dv, Dk, scale=0.3) for _ in range(2)]


def mlp_inputs(B=2, T=19, H=2, D=4, E=2, seed=1):
    """q, k, v, gates, initial weights (W1, W2) and momenta (S1, S2), scaled so M(x) ~ x."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.nn.functional.normalize(randn(g, B, T, H, D), dim=-1) for _ in range(2))
    v = randn(g, B, T, H, D, scale=0.5)
    N = E * D
    weights = [randn(g, B, H, N, D, scale=D ** -0.5), randn(g, B, H, D, N, scale=N ** -0.5)]
    momenta = [0.1 * w for w in (randn(g, B, H, N, D, scale=D ** -0.5), randn(g, B, H, D, N, scale=N ** -0.5))]
    return [q, k, v, *gates(g, B, T, H)], weights, momenta


def relative_rms(reference, value):
    reference, value = reference.double().cpu(), value.double().cpu()
    return ((reference - value).norm() / reference.norm().clamp_min(1e-300)).item()


def outputs_and_grads(call, tensors, device, dtype):
    """``call(*leaves)`` -> (o, tensors of the final state); backpropagates a fixed random functional
    of all outputs and returns the outputs and the gradients of every leaf, on the CPU in float64."""
    leaves = [t.to(device=device, dtype=dtype).requires_grad_() for t in tensors]
    outputs = call(*leaves)
    g = torch.Generator().manual_seed(7)
    cotangents = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in outputs]
    loss = sum((o * c).sum() for o, c in zip(outputs, cotangents))
    grads = torch.autograd.grad(loss, leaves)
    return [t.detach().double().cpu() for t in (*outputs, *grads)]


def compare(name, run, tensors, device="cpu", dtype=torch.float64):
    """``run(op_or_reference)`` -> a call of the op; compares the op on ``device``/``dtype`` with
    the reference in float64 on the CPU, values and gradients."""
    expected = outputs_and_grads(run("reference"), tensors, "cpu", torch.float64)
    actual = outputs_and_grads(run("op"), tensors, device, dtype)
    worst = max(relative_rms(e, a) for e, a in zip(expected, actual))
    bound = TOLERANCE[dtype]
    if not worst <= bound:  # also catches NaN
        raise AssertionError(f"{name}: relative RMS error {worst:.2e} against the reference > {bound:.0e}")
    print(f"forward+backward: {name}: {len(expected)} outputs and gradients, worst relative RMS error {worst:.1e} "
          f"(bound {bound:.0e})")


def linear_case(read="token", objective=None, retention="l2"):
    """``objective``: a MIRAS objective whose threshold delta is the call's last tensor, or None for l2."""
    ops = {"op": titans_ext.linear_memory, "reference": linear_memory_chunked}

    def run(which):
        def call(q, k, v, theta, eta, alpha, m0, s0, *delta):
            o, (m, s) = ops[which](q, k, v, theta, eta, alpha, chunk_size=8, initial_state=(m0, s0),
                                   output_final_state=True, read=read,
                                   objective=(objective, *delta) if objective else "l2", retention=retention)
            return o, m, s
        return call
    return run


def mlp_case(activation="gelu", objective="l2"):
    ops = {"op": titans_ext.mlp_memory, "reference": mlp_memory_chunked}

    def run(which):
        def call(q, k, v, theta, eta, alpha, w1, w2, s1, s2):
            o, ((w1, w2), (s1, s2)) = ops[which](q, k, v, theta, eta, alpha, (w1, w2), chunk_size=8,
                                                 momentum=(s1, s2), output_final_state=True,
                                                 activation=activation, objective=objective)
            return o, w1, w2, s1, s2
        return call
    return run


def check_cpu_ops():
    """Every CPU kernel variant the machine runs (the wheel holds them all, picked at run time)."""
    native = titans_ext.cpu_isa()
    print(f"CPU kernel variants: {titans_ext.supported_cpu_isas()} supported, {native!r} in use")
    for isa in titans_ext.supported_cpu_isas():
        titans_ext.set_cpu_isa(isa)
        check_cpu_ops_against_references(f"[{isa}] ")
    titans_ext.set_cpu_isa(native)


def check_cpu_ops_against_references(prefix):
    inputs, state = linear_inputs()
    compare(prefix + "linear_memory (l2)", linear_case(), inputs + state)
    delta = torch.full((1, 1, inputs[0].shape[2]), 0.4, dtype=torch.float64)  # a per-head Huber threshold
    compare(prefix + 'linear_memory (objective ("huber", delta tensor), retention ("lq", 3.0), read "chunk_start")',
            linear_case(read="chunk_start", objective="huber", retention=("lq", 3.0)), inputs + state + [delta])
    inputs, weights, momenta = mlp_inputs()
    compare(prefix + "mlp_memory (gelu, l2)", mlp_case(), inputs + weights + momenta)
    compare(prefix + 'mlp_memory (silu, objective ("lp", 3.0))', mlp_case("silu", ("lp", 3.0)),
            inputs + weights + momenta)


def check_opcheck(device="cpu"):
    """opcheck of the forward op (with and without inputs that require grad) and of the backward op."""
    inputs, state = linear_inputs()
    tensors = [t.to(device=device, dtype=torch.float32) for t in inputs + state]
    for requires_grad in (False, True):
        args = [t.detach().requires_grad_(requires_grad) for t in tensors]
        torch.library.opcheck(torch.ops.titans_ext.linear_memory_fwd.default, (*args, 8, True, True))
    o, m, s, states = torch.ops.titans_ext.linear_memory_fwd(*tensors, 8, True, True)
    torch.library.opcheck(torch.ops.titans_ext.linear_memory_bwd.default,
                          (*tensors[:6], states, torch.randn_like(o), torch.randn_like(m), None, 8, True))
    print(f"opcheck: linear_memory_fwd, linear_memory_bwd ({device})")
    if device != "cpu":
        return  # the MLP memory has CPU kernels only
    inputs, weights, momenta = mlp_inputs()
    tensors = [t.float() for t in inputs + weights + momenta]
    for requires_grad in (False, True):
        args = [t.detach().requires_grad_(requires_grad) for t in tensors]
        torch.library.opcheck(torch.ops.titans_ext.mlp_memory_fwd.default, (*args, 8, True, "gelu", True))
    o, w1, w2, s1, s2, states = torch.ops.titans_ext.mlp_memory_fwd(*tensors, 8, True, "gelu", True)
    hidden = weights[0].shape[2]
    torch.library.opcheck(torch.ops.titans_ext.mlp_memory_bwd.default,
                          (*tensors[:6], states, torch.randn_like(o), torch.randn_like(w1), None, None,
                           torch.randn_like(s2), hidden, 8, True, "gelu"))
    print("opcheck: mlp_memory_fwd, mlp_memory_bwd (cpu)")


def check_torch_compile():
    """Both ops and their backward in one graph compiled by inductor, against eager mode: what
    register_fake and register_autograd promise, checked on this torch's dynamo and inductor.
    float32 at the test suite's compile tolerance (python_tests/utils.py): inductor fuses the gates'
    sigmoid and the loss differently from eager mode."""
    linear, state = linear_inputs()
    mlp, weights, momenta = mlp_inputs()
    tensors = [t.float() for t in linear + state + mlp + weights + momenta]

    def loss(q, k, v, theta, eta, alpha, m0, s0, mq, mk, mv, mtheta, meta, malpha, w1, w2, s1, s2):
        gates = [torch.sigmoid(g) for g in (theta, eta, alpha)]
        o, (m, _) = titans_ext.linear_memory(q, k, v, *gates, chunk_size=8, initial_state=(m0, s0),
                                             output_final_state=True)
        mo, _ = titans_ext.mlp_memory(mq, mk, mv, mtheta, meta, malpha, (w1, w2), chunk_size=8,
                                      momentum=(s1, s2))
        return o.square().sum() + m.sum() + (mo * mv).sum()

    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        value = fn(*leaves)
        results.append([value.detach(), *torch.autograd.grad(value, leaves)])
    worst_loss = relative_rms(results[0][0], results[1][0])
    worst_grad = max(relative_rms(e, c) for e, c in zip(results[0][1:], results[1][1:]))
    if not (worst_loss <= 1e-6 and worst_grad <= 1e-5):
        raise AssertionError(f"torch.compile: relative RMS error {worst_loss:.1e} on the loss (bound 1e-6), "
                             f"{worst_grad:.1e} on the gradients (bound 1e-5) against eager mode")
    print(f"torch.compile (inductor, fullgraph): both ops forward+backward, relative RMS error "
          f"{worst_loss:.1e} on the loss, {worst_grad:.1e} on {len(tensors)} gradients against eager")


def check_cpp_error_reaches_python():
    inputs, state = linear_inputs()
    wrong_states = torch.zeros(1, dtype=torch.float64)
    try:
        torch.ops.titans_ext.linear_memory_bwd(*inputs, wrong_states, torch.zeros_like(inputs[2]), None, None, 8, True)
    except RuntimeError as error:
        if "chunk_states does not match" not in str(error):
            raise AssertionError(f"the C++ check's message did not arrive: {error}") from error
        print("error: a failed C++ check arrives as a RuntimeError with its message")
    else:
        raise AssertionError("linear_memory_bwd accepted chunk_states of the wrong shape")


def main():
    check_imported_from_the_wheel()
    check_opcheck("cpu")
    check_cpu_ops()
    check_torch_compile()
    check_cpp_error_reaches_python()
    if _build_info.CUDA_VERSION is not None and torch.cuda.is_available():
        check_opcheck("cuda")
        inputs, state = linear_inputs(B=2, T=70, H=2, Dk=32, Dv=16)
        compare(f"linear_memory on {torch.cuda.get_device_name()}", linear_case(), inputs + state, "cuda",
                torch.float32)
    elif _build_info.CUDA_VERSION is not None:
        print("CUDA: a CUDA build, but torch sees no GPU here: the CUDA ops were not run")
    print("smoke test passed")


if __name__ == "__main__":
    main()
