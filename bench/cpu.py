"""CPU benchmark: fwd+bwd of titans_ext's ops against the references and titans-pytorch.

    python -m bench.cpu [--seq-len 2048] [--threads 2] [--repeats 7] [--out bench/results/cpu.md]

Shape (issues 3 and 4): B=1, T=2048, H=4, D=64, chunk 64, fp32; the MLP memory with
expansion E=4 (hidden width 256), exact GELU. Every row is timed in this one run,
on this machine, with warm-up and the median of several runs; ratios compare rows of the same
run only (CPU timings are noisy across runs). titans-pytorch rows appear when the package is
installed: its ``NeuralMemory`` with a depth-1 (linear) and depth-2 (MLP, expansion 4) memory,
``batch_size`` equal to the chunk size (gradients at chunk-start weights, as in our ops). Its
module includes the q/k/v projections and gate layers, so those rows include that work too.
"""

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch

import titans_ext
from titans_ext.reference import (linear_memory_chunked, linear_memory_recurrent, mlp_memory_chunked,
                                  mlp_memory_recurrent)

from .timing import markdown_table, median_ms


def memory_inputs(B, T, H, D, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, T, H, D, generator=g)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=g), dim=-1)
    v = torch.randn(B, T, H, D, generator=g)
    theta = torch.rand(B, T, H, generator=g) * 0.1
    eta = torch.rand(B, T, H, generator=g) * 0.9
    alpha = torch.rand(B, T, H, generator=g) * 0.1
    return [x.requires_grad_(requires_grad) for x in (q, k, v, theta, eta, alpha)]


def mlp_weights(B, H, D, expansion, requires_grad=True):
    """Initial weights (W1, W2) of the MLP memory, learned parameters: gradients flow to them."""
    g = torch.Generator().manual_seed(1)
    N = expansion * D
    w1 = torch.randn(B, H, N, D, generator=g) * D ** -0.5
    w2 = torch.randn(B, H, D, N, generator=g) * N ** -0.5
    return tuple(w.requires_grad_(requires_grad) for w in (w1, w2))


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
    parser.add_argument("--out", default="bench/results/cpu.md")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    B, T, H, D, C = args.batch, args.seq_len, args.heads, args.head_dim, args.chunk_size
    cpu = torch.device("cpu")
    inputs = memory_inputs(B, T, H, D)
    mlp_args = dict(weights=mlp_weights(B, H, D, args.expansion), chunk_size=C)
    implementations = {
        "linear_memory": [("titans_ext (C++)", titans_ext.linear_memory, {"chunk_size": C}),
                          ("PyTorch chunked reference", linear_memory_chunked, {"chunk_size": C}),
                          ("token-by-token reference", linear_memory_recurrent, {"chunk_size": C})],
        "mlp_memory": [("titans_ext (C++)", titans_ext.mlp_memory, mlp_args),
                       ("PyTorch chunked reference", mlp_memory_chunked, mlp_args),
                       ("token-by-token reference", mlp_memory_recurrent, mlp_args)],
    }
    try:
        import titans_pytorch  # noqa: F401
        has_titans_pytorch = True
    except ImportError:
        has_titans_pytorch = False
        print("titans-pytorch is not installed: its rows are skipped (pip install titans-pytorch)")
    # titans-pytorch's counterpart of each op: its MemoryMLP of depth 1 (linear) or 2.
    titans_pytorch_depth = {"linear_memory": 1, "mlp_memory": 2}
    cases = []
    for op, impls in implementations.items():
        cases += [(op, impl, op_fwd_bwd(fn, inputs, **kwargs)) for impl, fn, kwargs in impls
                  if not (args.skip_token_loop and "token" in impl)]
        if has_titans_pytorch:
            depth = titans_pytorch_depth[op]
            cases.append((op, f"titans-pytorch NeuralMemory, depth {depth}",
                          titans_pytorch_fwd_bwd(B, T, H, D, C, depth, args.expansion)))

    results = []
    for op, impl, fn in cases:
        slow = "token" in impl
        ms = median_ms(fn, cpu, warmup=1 if slow else 2, repeats=3 if slow else args.repeats)
        results.append({"op": op, "impl": impl, "ms": ms})
        print(f"{op:15s} {impl:40s} {ms:10.2f} ms", flush=True)

    ours = {r["op"]: r["ms"] for r in results if r["impl"].startswith("titans_ext")}
    rows = [(r["op"], r["impl"], f"{r['ms']:.2f}", f"{r['ms'] / ours[r['op']]:.1f}x") for r in results]
    machine = f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    title = (f"CPU fwd+bwd, B={B}, T={T}, H={H}, D={D}, chunk {C}, fp32 ({machine}; "
             f"{datetime.date.today().isoformat()}); ratio = time / titans_ext time of the same op")
    table = markdown_table(["op", "implementation", "median ms", "ratio"], rows)
    print("\n" + title + "\n\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(title + "\n\n" + table + "\n")
    out.with_suffix(".json").write_text(json.dumps({"config": vars(args), "results": results}, indent=2))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
