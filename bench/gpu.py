"""GPU benchmark: titans_ext.linear_memory and mlp_memory against their peers, bf16, with the
linear memory's traffic and memory.

    python -m bench.gpu [--shapes headline fla] [--mlp-seq-len 8192] [--out $OUT/gpu.md]

Shapes (B, T, H, D with Dk = Dv = D, chunk 64): the headline shape B=8 T=8192 H=16 D=64, and
flash-linear-attention's benchmark set B1 T8192 H96 D128, B2 T16384 H16 D128, B4 T2048 H16
D128, B8 T1024 H8 D64. Rows, each timed in this run on this device (median_ms: warm-up, then
the median wall time of several runs, each ended by a device synchronize):
- titans_ext.linear_memory: fwd+bwd, and the forward alone under torch.no_grad();
- flash-linear-attention (pip fla-core) ``chunk_gated_delta_rule`` (log-space decay g, beta) and
  ``chunk_ttt_linear`` (TTT-Linear, its default chunk 16; layer-norm weight and bias per head,
  a learning rate per token), both fwd+bwd;
- titans-pytorch ``NeuralMemory`` with a depth-1 memory and ``batch_size`` = chunk size (it
  includes its projections; only up to --titans-pytorch-max-tokens token-heads, it is slow);
- PyTorch SDPA, causal (flash backend), as the attention yardstick.
Missing peers are reported and skipped. Next to titans_ext's times: the global traffic per
token-head of its launches (their plans, as bench.traffic prints them), the bandwidth that
traffic achieves in the measured time against the HBM peak (bus width x memory clock x 2, as
torch reports them) and a measured device-to-device copy, and the buffers the launch allocates
(checkpoints, backward scratch). ``vs fla gdr``: fla chunk_gated_delta_rule's time over
titans_ext's fwd+bwd at the same shape (> 1: titans_ext is faster).

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
from .traffic import summary

HEADLINE = [(8, 8192, 16, 64)]
FLA_SET = [(1, 8192, 96, 128), (2, 16384, 16, 128), (4, 2048, 16, 128), (8, 1024, 8, 64)]
SHAPE_SETS = {"headline": HEADLINE, "fla": FLA_SET}
OURS, OURS_FWD = "titans_ext linear_memory", "titans_ext linear_memory (fwd, no grad)"
FLA_GDR = "fla chunk_gated_delta_rule"
MLP_SHAPE = (4, 8192, 8, 64)  # B, T (--mlp-seq-len), H, D of the deep-memory table


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

    return [(OURS, fwd_bwd(forward)), (OURS_FWD, forward_only)]


def fla_cases(B, T, H, D, C, device):
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.ttt import chunk_ttt_linear
    except ImportError as exc:
        print(f"flash-linear-attention (fla-core) not importable ({exc}): its rows are skipped")
        return []
    q, k, v = (x.detach().requires_grad_() for x in linear_memory_inputs(B, T, H, D, device)[:3])
    g = torch.Generator(device=device).manual_seed(1)
    # Gated delta rule: log-space decay [B, T, H] and beta [B, T, H].
    decay = F.logsigmoid(torch.randn(B, T, H, device=device, generator=g)).requires_grad_()
    beta = torch.rand(B, T, H, device=device, generator=g).to(torch.bfloat16).requires_grad_()
    # TTT-Linear: layer-norm weight and bias [H, D] and a learning rate [B, T, H, 1], all in the
    # inputs' dtype (Dk = Dv, as it requires).
    ln_w = torch.ones(H, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    ln_b = torch.zeros(H, D, device=device, dtype=torch.bfloat16, requires_grad=True)
    lr = (torch.rand(B, T, H, 1, device=device, generator=g) * 0.01).to(torch.bfloat16).requires_grad_()

    def gated_delta_rule():
        return chunk_gated_delta_rule(q, k, v, decay, beta)[0]

    def ttt_linear():
        return chunk_ttt_linear(q, k, v, ln_w, ln_b, lr, chunk_size=16)[0]

    return [(FLA_GDR, fwd_bwd(gated_delta_rule)), ("fla chunk_ttt_linear", fwd_bwd(ttt_linear))]


def titans_pytorch_cases(B, T, H, D, C, device, max_tokens):
    if B * T * H > max_tokens:
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


def mlp_memory_table(B, T, H, D, E, C, repeats, device):
    """The deep-memory table: time, ratio to titans_ext.mlp_memory in the same direction, TFLOP/s."""
    results = []
    for name, fn, flops in mlp_memory_cases(B, T, H, D, E, C, device):
        try:
            ms = median_ms(fn, device, warmup=2, repeats=repeats)
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


def shape_name(shape):
    return "B{} T{} H{} D{}".format(*shape)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPE_SETS), default=["headline", "fla"])
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--titans-pytorch-max-tokens", type=int, default=1 << 16, help="B * T * H at most")
    parser.add_argument("--expansion", type=int, default=4, help="hidden width / D of the deep memory")
    parser.add_argument("--mlp-seq-len", type=int, default=8192, help="T of the deep-memory table (0: skip it)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="bench/results/gpu.md")
    args = parser.parse_args(argv)

    device = torch.device("cuda")
    C = args.chunk_size
    copy = copy_bandwidth(device)
    hbm = hbm_peak_bandwidth(device)
    peak = hbm or copy
    print(f"{torch.cuda.get_device_name(device)}: device-to-device copy {copy / 1e12:.2f} TB/s, HBM peak "
          + (f"{hbm / 1e12:.2f} TB/s" if hbm else "not reported (the copy stands in for it)"))
    shapes = [shape for name in args.shapes for shape in SHAPE_SETS[name]]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results, plans = [], {}
    for shape in shapes:
        B, T, H, D = shape
        plans[shape] = summary(B, T, H, D, D, C, torch.bfloat16, emulated=False)
        cases = (titans_ext_cases(B, T, H, D, C, device) + fla_cases(B, T, H, D, C, device)
                 + titans_pytorch_cases(B, T, H, D, C, device, args.titans_pytorch_max_tokens)
                 + sdpa_cases(B, T, H, D, device))
        for name, fn in cases:
            try:
                ms = median_ms(fn, device, warmup=3, repeats=args.repeats)
            except Exception as exc:  # a peer failing at one size must not hide the other rows
                print(f"{shape_name(shape)} {name}: failed ({type(exc).__name__}: {exc})")
                continue
            results.append({"shape": shape, "impl": name, "ms": ms})
            print(f"{shape_name(shape):22s} {name:40s} {ms:9.3f} ms", flush=True)
        torch.cuda.empty_cache()
        # Written after every shape, so a run stopped by a time limit leaves the shapes it finished.
        title, table = results_table(results, plans, C, device, peak, copy)
        out.write_text(title + "\n\n" + table + "\n")
        out.with_suffix(".json").write_text(json.dumps(
            {"config": vars(args), "copy_bytes_per_s": copy, "hbm_peak_bytes_per_s": hbm,
             "plans": {shape_name(s): p for s, p in plans.items()},
             "results": [{**r, "shape": shape_name(r["shape"])} for r in results]}, indent=2))
    print("\n" + title + "\n\n" + table)
    if args.mlp_seq_len:
        B, _, H, D = MLP_SHAPE
        mlp_title, mlp_table, mlp_results = mlp_memory_table(B, args.mlp_seq_len, H, D, args.expansion, C,
                                                              args.repeats, device)
        print("\n" + mlp_title + "\n\n" + mlp_table)
        out.write_text(title + "\n\n" + table + "\n\n" + mlp_title + "\n\n" + mlp_table + "\n")
        record = json.loads(out.with_suffix(".json").read_text())
        out.with_suffix(".json").write_text(json.dumps({**record, "mlp_results": mlp_results}, indent=2))


def results_table(results, plans, C, device, peak, copy):
    """(title, markdown table) of the rows measured so far."""
    rows = []
    for r in results:
        shape, name, ms = r["shape"], r["impl"], r["ms"]
        same = {x["impl"]: x["ms"] for x in results if x["shape"] == shape}
        plan = plans[shape]
        ratio = f"{ms / same[OURS]:.2f}x" if OURS in same and name != OURS_FWD else ""
        traffic = bandwidth = buffers = ""
        if name in (OURS, OURS_FWD):
            per_token_head = (plan["fwd_bytes"] if name == OURS_FWD else plan["fwd_grad_bytes"] + plan["bwd_bytes"])
            achieved = per_token_head * shape[0] * shape[1] * shape[2] / (ms * 1e-3)
            traffic = f"{per_token_head:.0f}"
            bandwidth = f"{achieved / 1e12:.2f} ({achieved / peak * 100:.0f}% of peak, {achieved / copy * 100:.0f}% of copy)"
            buffers = (f"{plan['no_grad_mib']:.0f}" if name == OURS_FWD
                       else f"checkpoints {plan['checkpoint_mib']:.0f}, scratch {plan['bwd_scratch_mib']:.0f}")
        if name == OURS and FLA_GDR in same:
            ratio += f", vs fla gdr {same[FLA_GDR] / ms:.2f}x"
        rows.append((shape_name(shape), name, f"{ms:.3f}", ratio, traffic, bandwidth, buffers))
    title = (f"GPU, chunk {C}, bf16, {torch.cuda.get_device_name(device)}, torch {torch.__version__}, "
             f"{datetime.date.today().isoformat()}. ratio = time / titans_ext fwd+bwd time at the same shape "
             f"(> 1: titans_ext is faster); traffic: global bytes per token-head of titans_ext's launches; "
             f"buffers in MiB")
    return title, markdown_table(["shape", "implementation", "median ms", "ratio", "traffic B/token-head",
                                  "achieved TB/s", "buffers MiB"], rows)


if __name__ == "__main__":
    main()
