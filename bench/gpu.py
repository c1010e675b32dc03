"""GPU benchmark: fwd+bwd of titans_ext.linear_memory and mlp_memory against their peers, bf16.

    python -m bench.gpu [--seq-lens 2048 8192 32768] [--mlp-seq-len 8192] [--out $OUT/gpu.md]

Shape (issue 6): B=4, H=8, D=64, chunk 64, bf16 inputs. Rows, each timed in this run on this
device (CUDA events through median_ms: warm-up, then the median of several runs):
- titans_ext.linear_memory (forward alone and fwd+bwd);
- flash-linear-attention (pip fla-core) ``chunk_ttt_linear`` and ``chunk_gated_delta_rule``;
- titans-pytorch ``NeuralMemory`` with a depth-1 memory and ``batch_size`` = chunk size
  (it includes its projections; skipped above --titans-pytorch-max-len, it is slow);
- PyTorch SDPA, causal (flash backend), as the attention yardstick.
Missing peers are reported and skipped. The forward's achieved bandwidth is bytes that must
move (q, k, v, o in bf16, gates in fp32) over time, against the HBM peak (bus width x memory
clock x 2, as torch reports them) and a measured device-to-device copy.

The deep memory (issue 14) has a table of its own at one shape, B=4, T=8192, H=8, D=64, E=4,
chunk 64, bf16: titans_ext.mlp_memory forward and fwd+bwd, titans-pytorch ``NeuralMemory`` with a
depth-2 memory of expansion 4 (``batch_size`` = chunk size, its projections included) and
titans_ext.linear_memory at the same shape, as time ratios from this one run, with each op's
achieved TFLOP/s: the FLOPs of docs/mlp_dual_form.md §5 (matmuls, dense C x C tiles, the
backward without the recomputed forward), u = 2 D E D per token and head:
    mlp forward 11 u + 4 C (D + E D), backward 22 u + 8 C (D + E D);
    linear forward 10 D^2 + 4 C D, backward 20 D^2 + 8 C D.
The one-block-per-(batch, head) design (csrc/cuda/mlp_memory.h) uses B H = 32 of an H100's 132
SMs at this shape, so the rate is also given per busy SM.
"""

import argparse
import datetime
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import titans_ext

from .timing import markdown_table, median_ms


def linear_memory_inputs(B, T, H, D, device, dtype=torch.bfloat16):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, T, H, D, device=device, generator=g).to(dtype)
    k = F.normalize(torch.randn(B, T, H, D, device=device, generator=g), dim=-1).to(dtype)
    v = torch.randn(B, T, H, D, device=device, generator=g).to(dtype)
    theta = torch.rand(B, T, H, device=device, generator=g) * 0.1
    eta = torch.rand(B, T, H, device=device, generator=g) * 0.9
    alpha = torch.rand(B, T, H, device=device, generator=g) * 0.1
    return [x.requires_grad_() for x in (q, k, v, theta, eta, alpha)]


def fwd_bwd(forward):
    def run():
        out = forward()
        out.backward(torch.ones_like(out))
    return run


def titans_ext_cases(B, T, H, D, C, device):
    x = linear_memory_inputs(B, T, H, D, device)

    def forward():
        return titans_ext.linear_memory(*x, chunk_size=C)[0]

    def forward_only():
        with torch.no_grad():
            titans_ext.linear_memory(*x, chunk_size=C)

    return [("titans_ext linear_memory", fwd_bwd(forward)), ("titans_ext linear_memory (fwd only)", forward_only)]


def fla_cases(B, T, H, D, C, device):
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.ttt import chunk_ttt_linear
    except ImportError as exc:
        print(f"flash-linear-attention (fla-core) not importable ({exc}): its rows are skipped")
        return []
    q, k, v, theta, eta, alpha = [x.detach() for x in linear_memory_inputs(B, T, H, D, device)]
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    w = torch.ones(H, D, device=device, requires_grad=True)
    b = torch.zeros(H, D, device=device, requires_grad=True)
    ttt_eta = (theta[..., None] * 0 + 0.1).to(torch.bfloat16).requires_grad_()
    g = F.logsigmoid(torch.randn(B, T, H, device=device)).requires_grad_()
    beta = torch.rand(B, T, H, device=device).to(torch.bfloat16).requires_grad_()

    def ttt():
        return chunk_ttt_linear(q, k, v, w, b, eta=ttt_eta, chunk_size=16)[0]

    def gdn():
        return chunk_gated_delta_rule(q, k, v, g, beta)[0]

    return [("fla chunk_ttt_linear", fwd_bwd(ttt)), ("fla chunk_gated_delta_rule", fwd_bwd(gdn))]


def titans_pytorch_cases(B, T, H, D, C, device, max_len):
    if T > max_len:
        return []
    try:
        from titans_pytorch import MemoryMLP, NeuralMemory
    except ImportError as exc:
        print(f"titans-pytorch not importable ({exc}): its rows are skipped")
        return []
    model = NeuralMemory(dim=H * D, heads=H, dim_head=D, chunk_size=C, batch_size=C,
                         model=MemoryMLP(dim=D, depth=1)).to(device)
    x = torch.randn(B, T, H * D, device=device, requires_grad=True)
    return [("titans-pytorch NeuralMemory, depth 1", fwd_bwd(lambda: model(x)[0]))]


def sdpa_cases(B, T, H, D, device):
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def attention():
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return [("SDPA flash, causal", fwd_bwd(attention))]


def mlp_flops(D, E, C, backward):
    """Matmul FLOPs per token and head of mlp_memory (docs/mlp_dual_form.md §5, read "token")."""
    u, N = 2 * D * E * D, E * D
    forward = 11 * u + 4 * C * (D + N)
    return forward + (22 * u + 8 * C * (D + N) if backward else 0)


def linear_flops(D, C, backward):
    """Matmul FLOPs per token and head of linear_memory (docs/design.md §3)."""
    forward = 10 * D * D + 4 * C * D
    return forward + (20 * D * D + 8 * C * D if backward else 0)


def mlp_inputs(B, T, H, D, E, device):
    """linear_memory_inputs with unit-norm queries and the MLP's initial weights and momenta
    (learned parameters: gradients flow to them)."""
    q, k, v, theta, eta, alpha = linear_memory_inputs(B, T, H, D, device)
    q = F.normalize(q.detach().float(), dim=-1).to(q.dtype).requires_grad_()
    g = torch.Generator(device=device).manual_seed(1)
    N = E * D
    w1 = torch.randn(B, H, N, D, device=device, generator=g) * D ** -0.5
    w2 = torch.randn(B, H, D, N, device=device, generator=g) * N ** -0.5
    weights = tuple(w.requires_grad_() for w in (w1, w2))
    momentum = tuple(torch.zeros_like(w).requires_grad_() for w in (w1, w2))
    return [q, k, v, theta, eta, alpha], weights, momentum


def mlp_memory_cases(B, T, H, D, E, C, device):
    """(name, run, flops per token and head) of the deep-memory table."""
    x, weights, momentum = mlp_inputs(B, T, H, D, E, device)
    lin = linear_memory_inputs(B, T, H, D, device)

    def mlp():
        return titans_ext.mlp_memory(*x, weights, momentum=momentum, chunk_size=C)[0]

    def linear():
        return titans_ext.linear_memory(*lin, chunk_size=C)[0]

    def no_grad(forward):
        def run():
            with torch.no_grad():
                forward()
        return run

    cases = [("titans_ext mlp_memory", fwd_bwd(mlp), mlp_flops(D, E, C, True)),
             ("titans_ext mlp_memory (fwd only)", no_grad(mlp), mlp_flops(D, E, C, False)),
             ("titans_ext linear_memory", fwd_bwd(linear), linear_flops(D, C, True)),
             ("titans_ext linear_memory (fwd only)", no_grad(linear), linear_flops(D, C, False))]
    try:
        from titans_pytorch import MemoryMLP, NeuralMemory
    except ImportError as exc:
        print(f"titans-pytorch not importable ({exc}): its rows are skipped")
        return cases
    model = NeuralMemory(dim=H * D, heads=H, dim_head=D, chunk_size=C, batch_size=C,
                         model=MemoryMLP(dim=D, depth=2, expansion_factor=float(E))).to(device)
    inp = torch.randn(B, T, H * D, device=device, requires_grad=True)
    # Its memory's inner gradients are taken inside the forward, so its forward alone runs with
    # grad mode on and nothing backpropagated.
    cases += [("titans-pytorch NeuralMemory, depth 2", fwd_bwd(lambda: model(inp)[0]), None),
              ("titans-pytorch NeuralMemory, depth 2 (fwd only)", lambda: model(inp), None)]
    return cases


def mlp_memory_table(args, device):
    """The deep-memory table: time, ratio to titans_ext.mlp_memory in the same direction, TFLOP/s."""
    B, T, H, D, E, C = args.batch, args.mlp_seq_len, args.heads, args.head_dim, args.expansion, args.chunk_size
    results = []
    for name, fn, flops in mlp_memory_cases(B, T, H, D, E, C, device):
        try:
            ms = median_ms(fn, device, warmup=2, repeats=args.repeats)
        except Exception as exc:  # a peer failing must not hide the other rows
            print(f"mlp table {name}: failed ({type(exc).__name__}: {exc})")
            continue
        results.append({"impl": name, "ms": ms, "flops": None if flops is None else flops * B * T * H})
        print(f"T={T:6d} {name:48s} {ms:9.3f} ms", flush=True)
    torch.cuda.empty_cache()
    ours = {fwd_only: next((r["ms"] for r in results if r["impl"] == "titans_ext mlp_memory"
                            + (" (fwd only)" if fwd_only else "")), None) for fwd_only in (False, True)}
    busy_sms = min(B * H, torch.cuda.get_device_properties(device).multi_processor_count)
    rows = []
    for r in results:
        base = ours["fwd only" in r["impl"]]
        ratio = f"{r['ms'] / base:.2f}x" if base else ""
        rate = ""
        if r["flops"] is not None:
            tflops = r["flops"] / (r["ms"] * 1e-3) / 1e12
            rate = f"{tflops:.1f} ({tflops / busy_sms * 1e3:.0f} GFLOP/s per busy SM)"
        rows.append((r["impl"], f"{r['ms']:.3f}", ratio, rate))
    title = (f"GPU deep memory, B={B}, T={T}, H={H}, D={D}, E={E}, chunk {C}, bf16, "
             f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, {datetime.date.today().isoformat()}; "
             f"ratio = time / titans_ext mlp_memory time in the same direction (fwd+bwd, or fwd only); "
             f"TFLOP/s per docs/mlp_dual_form.md §5")
    table = markdown_table(["implementation", "median ms", "ratio", "TFLOP/s"], rows)
    return title, table, results


def hbm_peak_bandwidth(device):
    """The device's HBM peak from its memory bus width and clock (double data rate), in bytes/s,
    or None where torch does not report them."""
    props = torch.cuda.get_device_properties(device)
    bus_bits, clock_khz = getattr(props, "memory_bus_width", 0), getattr(props, "memory_clock_rate", 0)
    return 2 * bus_bits / 8 * clock_khz * 1e3 if bus_bits and clock_khz else None


def copy_bandwidth(device, n_bytes=1 << 30):
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=3, repeats=10)
    return 2 * n_bytes / (ms * 1e-3)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--titans-pytorch-max-len", type=int, default=8192)
    parser.add_argument("--expansion", type=int, default=4, help="hidden width / D of the deep memory")
    parser.add_argument("--mlp-seq-len", type=int, default=8192, help="T of the deep-memory table (0: skip it)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="bench/results/gpu.md")
    args = parser.parse_args(argv)

    device = torch.device("cuda")
    B, H, D, C = args.batch, args.heads, args.head_dim, args.chunk_size
    copy = copy_bandwidth(device)
    hbm = hbm_peak_bandwidth(device)
    peak = hbm or copy
    print(f"{torch.cuda.get_device_name(device)}: device-to-device copy {copy / 1e12:.2f} TB/s, HBM peak "
          + (f"{hbm / 1e12:.2f} TB/s" if hbm else "not reported (the copy stands in for it)"))
    results = []
    for T in args.seq_lens:
        cases = (titans_ext_cases(B, T, H, D, C, device) + fla_cases(B, T, H, D, C, device)
                 + titans_pytorch_cases(B, T, H, D, C, device, args.titans_pytorch_max_len)
                 + sdpa_cases(B, T, H, D, device))
        for name, fn in cases:
            try:
                ms = median_ms(fn, device, warmup=3, repeats=args.repeats)
            except Exception as exc:  # a peer failing at one size must not hide the other rows
                print(f"T={T} {name}: failed ({type(exc).__name__}: {exc})")
                continue
            results.append({"T": T, "impl": name, "ms": ms})
            print(f"T={T:6d} {name:40s} {ms:9.3f} ms", flush=True)
        torch.cuda.empty_cache()

    # Bytes a forward must move: q, k, v, o (bf16) and three fp32 gates per token-head.
    rows = []
    for r in results:
        ours = next(x["ms"] for x in results if x["T"] == r["T"] and x["impl"] == "titans_ext linear_memory")
        extra = ""
        if r["impl"].endswith("(fwd only)"):
            n_bytes = B * r["T"] * H * (4 * D * 2 + 3 * 4)
            achieved = n_bytes / (r["ms"] * 1e-3)
            extra = (f"{achieved / 1e12:.2f} TB/s: {achieved / peak * 100:.0f}% of HBM peak, "
                     f"{achieved / copy * 100:.0f}% of copy")
        ratio = "" if "fwd only" in r["impl"] else f"{r['ms'] / ours:.2f}x"
        rows.append((r["T"], r["impl"], f"{r['ms']:.3f}", ratio, extra))
    title = (f"GPU fwd+bwd, B={B}, H={H}, D={D}, chunk {C}, bf16, {torch.cuda.get_device_name(device)}, "
             f"torch {torch.__version__}, {datetime.date.today().isoformat()}; ratio = time / titans_ext time "
             f"at the same T (> 1: titans_ext is faster)")
    table = markdown_table(["T", "implementation", "median ms", "ratio", "forward bandwidth"], rows)
    print("\n" + title + "\n\n" + table)
    text = title + "\n\n" + table + "\n"
    mlp_results = []
    if args.mlp_seq_len:
        mlp_title, mlp_table, mlp_results = mlp_memory_table(args, device)
        print("\n" + mlp_title + "\n\n" + mlp_table)
        text += "\n" + mlp_title + "\n\n" + mlp_table + "\n"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"config": vars(args), "copy_bytes_per_s": copy,
                                                    "hbm_peak_bytes_per_s": hbm, "results": results,
                                                    "mlp_results": mlp_results}, indent=2))


if __name__ == "__main__":
    main()
