"""CPU benchmark: fwd+bwd of titans_ext's ops, under every CPU kernel variant the machine supports,
against the references and titans-pytorch.

    python -m bench.cpu [--seq-len 2048] [--threads 2] [--repeats 7] [--out bench/results/cpu.md]
    python -m bench.cpu --smoke      # seconds: each op against the chunked reference, per variant

Shape (issues 3, 4 and 13): B=1, T=2048, H=4, D=64, chunk 64, fp32 and fp64; the MLP memory with
expansion E=4 (hidden width 256), exact GELU. titans_ext runs once per instruction-set variant of
its CPU kernels (titans_ext.supported_cpu_isas(); the variant is a column), and in fp32 once more
in the native variant with the cache of saved states off (titans_ext/ops/state_cache.py: each
forward's saved states fresh memory, as a program without the cache has them). titans-pytorch rows
appear when the package is installed: its ``NeuralMemory`` with a depth-1 (linear) and depth-2
(MLP, expansion 4) memory, ``batch_size`` equal to the chunk size (gradients at chunk-start
weights, as in our ops). Its module includes the q/k/v projections and gate layers, so those rows
include that work too.

Timing: the rows a ratio compares are timed interleaved (bench/timing.py's
interleaved_samples_ms): per op and dtype, one call of every row (each variant of ours, the chunked
reference, titans-pytorch; for fp32 linear_memory also a batch of torch.bmm calls, the FLOP
bound's rate) per round, after warm-up rounds, and a row's time is its median over the rounds. On
a shared machine the load drifts by tens of percent within a run; interleaving lets the drift weigh
on both sides of a ratio alike. Each target ratio is printed as the ratio of the medians with the
min-max of its per-round ratios (the same round's samples), so a reader sees how firm it is. The
token-by-token reference (no target compares it) is timed on its own afterwards. The load average
is printed before and after.

The FLOP bound of an op is the FLOPs of its chunk algebra at the shape (matmuls, dense C x C
tiles: docs/backward_linear.md §4, docs/mlp_dual_form.md §5) divided by the rate torch.bmm reaches
on 64 x 64 x 64 fp32 products with the same threads.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
from pathlib import Path

import torch

import titans_ext
from titans_ext.reference import (linear_memory_chunked, linear_memory_recurrent, mlp_memory_chunked,
                                  mlp_memory_recurrent)

from .timing import interleaved_samples_ms, markdown_table, round_ratios

# The issue-13 targets, checked in the summary (fp32 unless said).
TARGETS = {
    "linear_memory vs chunked reference": 5.0,
    "linear_memory vs FLOP bound": 1.5,   # at most this many times the bound
    "mlp_memory vs chunked reference": 3.0,
    "mlp_memory vs titans-pytorch depth 2": 6.0,
    "fp64 vs chunked reference": 3.0,
}
# Row names (the implementation column).
OURS, CHUNKED, TITANS_PYTORCH = "titans_ext (C++)", "PyTorch chunked reference", "titans-pytorch NeuralMemory"
NO_CACHE = "titans_ext (C++), state cache off"
BMM = "torch.bmm 64 x 64 x 64 (x 64)"
# CPU flags that decide which variants can run (x86 /proc/cpuinfo "flags", aarch64 "Features").
SIMD_FLAGS = ("sse2", "sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
              "amx_tile", "asimd", "sve", "sve2")


def cpu_description():
    """(model name, SIMD flags present) of this machine's CPU."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Hardware") and value.strip():
                model = value.strip()
            elif key in ("flags", "Features"):
                flags.update(value.split())
    except OSError:
        pass
    return model, [f for f in SIMD_FLAGS if f in flags]


def load_average():
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def linear_memory_flops(B, T, H, Dk, Dv, C):
    """Matmul FLOPs of fwd+bwd with token reads (docs/backward_linear.md §4), short last chunk included."""
    total = 0
    for t0 in range(0, T, C):
        L = min(C, T - t0)
        F1, F2 = 2 * L * Dk * Dv, 2 * L * L
        total += 5 * F1 + F2 * (Dk + Dv) + 11 * F1 + F2 * (3 * Dk + 2 * Dv)
    return B * H * total


def mlp_memory_flops(B, T, H, D, N, C):
    """Matmul FLOPs of the CPU kernels' fwd+bwd with token reads, the backward's recompute included
    (docs/mlp_dual_form.md §5: 11u + 4C(D+N) forward, 24u + 10C(D+N) backward per token, the
    forward keeping R and Zq)."""
    total = 0
    for t0 in range(0, T, C):
        L = min(C, T - t0)
        u = 2 * D * N
        total += L * (35 * u) + L * L * (14 * (D + N))
    return B * H * total


BMM_FLOP = 2 * 64 ** 4  # one torch.bmm of 64 products of 64 x 64 x 64 matrices


def bmm_batch(calls):
    """A function running `calls` torch.bmm of 64 products of 64 x 64 x 64 fp32 matrices: one
    interleaved sample long enough for the timer (its time / calls is one bmm's)."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(64, 64, 64, generator=g) for _ in range(2))
    out = torch.empty(64, 64, 64)

    def run():
        for _ in range(calls):
            torch.bmm(a, b, out=out)
    return run


def memory_inputs(B, T, H, D, dtype=torch.float32, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, D, generator=g)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=g), dim=-1)
    v = torch.randn(B, T, H, D, generator=g)
    theta = torch.rand(B, T, H, generator=g) * 0.1
    eta = torch.rand(B, T, H, generator=g) * 0.9
    alpha = torch.rand(B, T, H, generator=g) * 0.1
    return [x.to(dtype).requires_grad_(requires_grad) for x in (q, k, v, theta, eta, alpha)]


def mlp_weights(B, H, D, expansion, dtype=torch.float32, requires_grad=True):
    """Initial weights (W1, W2) of the MLP memory, learned parameters: gradients flow to them."""
    g = torch.Generator().manual_seed(1)
    N = expansion * D
    w1 = torch.randn(B, H, N, D, generator=g) * D ** -0.5
    w2 = torch.randn(B, H, D, N, generator=g) * N ** -0.5
    return tuple(w.to(dtype).requires_grad_(requires_grad) for w in (w1, w2))


def op_fwd_bwd(fn, inputs, **kwargs):
    def run():
        o, _ = fn(*inputs, **kwargs)
        o.backward(torch.ones_like(o))
    return run


def titans_pytorch_fwd_bwd(B, T, H, D, C, depth, expansion):
    from titans_pytorch import MemoryMLP, NeuralMemory

    torch.manual_seed(0)
    model = NeuralMemory(dim=H * D, heads=H, dim_head=D, chunk_size=C, batch_size=C,
                         model=MemoryMLP(dim=D, depth=depth, expansion_factor=float(expansion)))
    x = torch.randn(B, T, H * D, requires_grad=True)

    def run():
        out, _ = model(x)
        out.backward(torch.ones_like(out))
    return run


def variants_native_first():
    supported = titans_ext.supported_cpu_isas()
    return supported[::-1]


def in_variant(name, fn):
    """fn, run with the CPU kernels switched to variant name."""
    def run():
        titans_ext.set_cpu_isa(name)
        fn()
    return run


def without_state_cache(fn):
    """fn, run with the saved-state cache off (titans_ext/ops/state_cache.py): its forward's saved
    states are fresh memory, as without the cache; the buffers the cache holds stay for the rows
    that use it."""
    def run():
        titans_ext.set_cpu_state_cache(False)
        try:
            fn()
        finally:
            titans_ext.set_cpu_state_cache(True)
    return run


def smoke(args):
    """Each op against the chunked reference at a small shape, once per variant: a guard that a
    slow variant shows up in every CI log (not a timed test: it prints, it does not fail)."""
    B, T, H, D, C = 1, 256, 2, 32, 32
    model, flags = cpu_description()
    print(f"bench.cpu --smoke: {model}; SIMD flags: {' '.join(flags) or 'n/a'}; variants "
          f"{', '.join(titans_ext.supported_cpu_isas())}; {args.threads} threads; load {load_average()}")
    print(f"fwd+bwd, B={B}, T={T}, H={H}, D={D}, chunk {C}, fp32, E=4; ratio = chunked reference time / titans_ext time "
          f"(medians of {args.repeats} interleaved rounds; rounds: min-max of the per-round ratios)")
    cpu = torch.device("cpu")
    inputs = memory_inputs(B, T, H, D)
    ops = {"linear_memory": (titans_ext.linear_memory, linear_memory_chunked, {"chunk_size": C}),
           "mlp_memory": (titans_ext.mlp_memory, mlp_memory_chunked,
                          {"chunk_size": C, "weights": mlp_weights(B, H, D, 4)})}
    native = titans_ext.cpu_isa()
    variants = variants_native_first()
    try:
        for op, (ours, reference, kwargs) in ops.items():
            fns = [in_variant(v, op_fwd_bwd(ours, inputs, **kwargs)) for v in variants]
            samples = interleaved_samples_ms(fns + [op_fwd_bwd(reference, inputs, **kwargs)], cpu, warmup=1,
                                             repeats=args.repeats)
            ref_ms = statistics.median(samples[-1])
            for variant, ours_samples in zip(variants, samples):
                ms = statistics.median(ours_samples)
                spread = round_ratios(samples[-1], ours_samples)
                print(f"  {op:14s} [{variant:7s}] {ms:8.2f} ms   reference {ref_ms:8.2f} ms   {ref_ms / ms:5.1f}x"
                      f"  (rounds {spread[0]:.1f}-{spread[-1]:.1f}x)", flush=True)
    finally:
        titans_ext.set_cpu_isa(native)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--expansion", type=int, default=4, help="hidden width / D of the MLP memory")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--skip-token-loop", action="store_true", help="skip the slow token-by-token reference")
    parser.add_argument("--smoke", action="store_true", help="a few seconds: each op against the chunked "
                        "reference at a small shape, per variant; prints only")
    parser.add_argument("--out", default="bench/results/cpu.md")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.smoke:
        args.repeats = min(args.repeats, 5)
        smoke(args)
        return

    B, T, H, D, C, E = args.batch, args.seq_len, args.heads, args.head_dim, args.chunk_size, args.expansion
    model, flags = cpu_description()
    variants = variants_native_first()
    load_before = load_average()
    header = (f"CPU: {model} ({platform.machine()}); SIMD flags: {' '.join(flags) or 'n/a'}; titans_ext variants: "
              f"{', '.join(variants)} (native {variants[0]}); {args.threads} threads; torch {torch.__version__}")
    print(header + f"\nload average before: {load_before}", flush=True)
    cpu = torch.device("cpu")
    try:
        import titans_pytorch  # noqa: F401
        has_titans_pytorch = True
    except ImportError:
        has_titans_pytorch = False
        print("titans-pytorch is not installed: its rows are skipped (pip install titans-pytorch)")

    # Groups of rows timed interleaved, one per (op, dtype): (op, dtype, [(implementation, variant, fn)]);
    # the token-by-token rows are timed on their own.
    groups, token_loop = [], []
    bmm_calls = 50
    for dtype in (torch.float32, torch.float64):
        inputs = memory_inputs(B, T, H, D, dtype)
        mlp_args = dict(weights=mlp_weights(B, H, D, E, dtype), chunk_size=C)
        ops = {"linear_memory": (titans_ext.linear_memory, linear_memory_chunked, linear_memory_recurrent,
                                 {"chunk_size": C}, 1),
               "mlp_memory": (titans_ext.mlp_memory, mlp_memory_chunked, mlp_memory_recurrent, mlp_args, 2)}
        for op, (ours, chunked, recurrent, kwargs, depth) in ops.items():
            rows = [(OURS, variant, in_variant(variant, op_fwd_bwd(ours, inputs, **kwargs))) for variant in variants]
            if dtype == torch.float32:
                rows.append((NO_CACHE, variants[0], in_variant(variants[0], without_state_cache(
                    op_fwd_bwd(ours, inputs, **kwargs)))))
            rows.append((CHUNKED, "", op_fwd_bwd(chunked, inputs, **kwargs)))
            if dtype == torch.float32 and has_titans_pytorch:
                rows.append((f"{TITANS_PYTORCH}, depth {depth}", "", titans_pytorch_fwd_bwd(B, T, H, D, C, depth, E)))
            if dtype == torch.float32 and op == "linear_memory":
                rows.append((BMM, "", bmm_batch(bmm_calls)))
            groups.append((op, dtype, rows))
            if dtype == torch.float32 and not args.skip_token_loop:
                token_loop.append((op, dtype, "token-by-token reference", "", op_fwd_bwd(recurrent, inputs, **kwargs)))

    native = titans_ext.cpu_isa()
    results = []

    def record(op, dtype, impl, variant, samples):
        dtype_name = str(dtype).removeprefix("torch.")
        ms = statistics.median(samples)
        results.append({"op": op, "dtype": dtype_name, "impl": impl, "variant": variant, "ms": ms, "samples": samples})
        print(f"{op:14s} {dtype_name:8s} {impl:40s} {variant:7s} {ms:10.2f} ms  "
              f"(rounds {min(samples):.2f}-{max(samples):.2f})", flush=True)

    try:
        for op, dtype, rows in groups:
            samples = interleaved_samples_ms([fn for _, _, fn in rows], cpu, warmup=2, repeats=args.repeats)
            for (impl, variant, _), row_samples in zip(rows, samples):
                if impl == BMM:
                    row_samples = [ms / bmm_calls for ms in row_samples]
                record(op, dtype, impl, variant, row_samples)
        for op, dtype, impl, variant, fn in token_loop:
            record(op, dtype, impl, variant, interleaved_samples_ms([fn], cpu, warmup=1, repeats=3)[0])
    finally:
        titans_ext.set_cpu_isa(native)
    load_after = load_average()

    def samples_of(op, impl, variant="", dtype="float32"):
        return next(r["samples"] for r in results
                    if (r["op"], r["dtype"], r["impl"], r["variant"]) == (op, dtype, impl, variant))

    def ms_of(op, impl, variant="", dtype="float32"):
        return statistics.median(samples_of(op, impl, variant, dtype))

    rows = []
    for r in results:
        if r["impl"] == BMM:
            continue
        basis = ms_of(r["op"], OURS, variants[0], r["dtype"])
        rows.append((r["op"], r["dtype"], r["impl"], r["variant"] or "-", f"{r['ms']:.2f}", f"{r['ms'] / basis:.2f}x"))
    flops = {"linear_memory": linear_memory_flops(B, T, H, D, D, C), "mlp_memory": mlp_memory_flops(B, T, H, D, E * D, C)}
    bmm_samples = samples_of("linear_memory", BMM)
    bmm = BMM_FLOP / (statistics.median(bmm_samples) * 1e-3) / 1e9
    summary = [f"torch.bmm on 64 x 64 x 64 fp32 products, {args.threads} threads: {bmm:.1f} GFLOP/s "
               f"(rounds {BMM_FLOP / max(bmm_samples) / 1e6:.1f}-{BMM_FLOP / min(bmm_samples) / 1e6:.1f}; "
               f"timed interleaved with the linear_memory fp32 rows)"]
    for op, n in flops.items():
        summary.append(f"{op}: {n / 1e9:.3f} GFLOP fwd+bwd (chunk algebra, dense C x C tiles) -> FLOP bound "
                       f"{n / (bmm * 1e9) * 1e3:.2f} ms")
    # The FLOP bound per round: the linear op's FLOPs at that round's torch.bmm rate.
    bound_samples = [flops["linear_memory"] / BMM_FLOP * ms for ms in bmm_samples]

    def check(numerator, denominator, target, at_most=False):
        """The ratio of the medians of two rows' samples against target, with its per-round min-max."""
        value = statistics.median(numerator) / statistics.median(denominator)
        spread = round_ratios(numerator, denominator)
        ok = value <= target if at_most else value >= target
        return (f"{value:.2f}x ({'<=' if at_most else '>='} {target:g}: {'met' if ok else 'NOT met'}; "
                f"rounds {spread[0]:.2f}-{spread[-1]:.2f}x)")

    for variant in variants:
        def ours(op, dtype="float32"):
            return samples_of(op, OURS, variant, dtype)

        line = [f"[{variant}] linear_memory: "
                + check(samples_of("linear_memory", CHUNKED), ours("linear_memory"),
                        TARGETS["linear_memory vs chunked reference"]) + " the chunked reference, "
                + check(ours("linear_memory"), bound_samples, TARGETS["linear_memory vs FLOP bound"], at_most=True)
                + " its FLOP bound",
                f"[{variant}] mlp_memory: "
                + check(samples_of("mlp_memory", CHUNKED), ours("mlp_memory"),
                        TARGETS["mlp_memory vs chunked reference"]) + " the chunked reference"]
        if has_titans_pytorch:
            line[-1] += ", " + check(samples_of("mlp_memory", f"{TITANS_PYTORCH}, depth 2"), ours("mlp_memory"),
                                     TARGETS["mlp_memory vs titans-pytorch depth 2"]) + " titans-pytorch depth 2"
        line.append(f"[{variant}] fp64: linear_memory "
                    + check(samples_of("linear_memory", CHUNKED, dtype="float64"), ours("linear_memory", "float64"),
                            TARGETS["fp64 vs chunked reference"])
                    + ", mlp_memory "
                    + check(samples_of("mlp_memory", CHUNKED, dtype="float64"), ours("mlp_memory", "float64"),
                            TARGETS["fp64 vs chunked reference"]) + " the chunked reference")
        summary += line
    summary.append(f"[{variants[0]}] the saved-state cache: linear_memory "
                   + ", mlp_memory ".join(check(samples_of(op, NO_CACHE, variants[0]), samples_of(op, OURS, variants[0]),
                                                1.0) for op in ("linear_memory", "mlp_memory"))
                   + " faster with it (fp32; the row 'state cache off' allocates them fresh each call)")

    title = (f"CPU fwd+bwd, B={B}, T={T}, H={H}, D={D}, chunk {C}, MLP E={E} ({datetime.date.today().isoformat()})\n\n"
             f"{header}; load average before {load_before}, after {load_after}\n\n"
             f"median ms: median of {args.repeats} interleaved rounds (module docstring); ratio = time / time of "
             f"titans_ext's native variant ({variants[0]}) for the same op and dtype; in the targets below, rounds = "
             f"min-max of the per-round ratios")
    table = markdown_table(["op", "dtype", "implementation", "variant", "median ms", "ratio"], rows)
    text = title + "\n\n" + table + "\n\n" + "\n".join(f"- {s}" for s in summary) + "\n"
    print("\n" + text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(
        {"config": vars(args), "cpu": model, "simd_flags": flags, "variants": variants, "torch": torch.__version__,
         "load_before": load_before, "load_after": load_after, "bmm_gflops": bmm, "flops": flops,
         "results": results}, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
