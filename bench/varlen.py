"""Packed variable-length sequences (cu_seqlens) against padding to the longest one, on the CPU
and, where there is a GPU, on CUDA.

    python -m bench.varlen [--sequences 8] [--scale 8] [--repeats 5] [--out bench/results/varlen.md]

N sequence lengths are drawn uniformly from 256..8192 (issue 18's length mix) and divided by
``--scale`` (8 by default: 32..1024, so that the whole run takes about a minute on a 2-core
machine); H=4, D=64, chunk 64, fp32, torch's default intra-op threads. Each op runs once on the
packed row (B=1, T = sum of the lengths, ``cu_seqlens``) and once on the same tokens padded at
the end to the longest length (B=N, padded tokens with theta=0, eta=1, alpha=0); a padded
sequence's outputs on its real tokens are those of its packed sequence (the padding follows
them), which the "error" column checks. Times are medians of forward and forward+backward over
rounds that time both layouts in turn (the load of a shared machine drifts); ratio = padded
time / packed time. What to expect: the kernels' work is proportional to the
tokens they run, so the ratio approaches N * max(len) / sum(len) (on a GPU only once the
sequences are long enough to fill it: the kernels run a block per (sequence, head) at least).
"""

import argparse
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import titans_ext

from .timing import markdown_table

H, D, CHUNK, EXPANSION, SEED = 4, 64, 64, 4, 0


def draw_lengths(n, scale, seed=SEED):
    g = torch.Generator().manual_seed(seed)
    return [max(1, int(x) // scale) for x in torch.randint(256, 8193, (n,), generator=g)]


def packed_inputs(lengths):
    """q, k, v [1, T, H, D] and gates [1, T, H] of the packed row, with its cu_seqlens."""
    g = torch.Generator().manual_seed(SEED + 1)
    T = sum(lengths)
    q = torch.randn(1, T, H, D, generator=g)
    k = torch.nn.functional.normalize(torch.randn(1, T, H, D, generator=g), dim=-1)
    v = torch.randn(1, T, H, D, generator=g)
    gates = [torch.rand(1, T, H, generator=g) * scale for scale in (0.1, 1.0, 0.1)]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return [q, k, v, *gates], cu_seqlens


def padded_inputs(packed, cu_seqlens):
    """The same tokens as N rows padded at the end to the longest: zeros, and gates that leave
    the memory alone as far as padding can (theta=0, eta=1, alpha=0; M += S still happens)."""
    bounds = cu_seqlens.tolist()
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    fills = (0.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    rows = []
    for x, fill in zip(packed, fills):
        padded = x.new_full((len(bounds) - 1, longest, *x.shape[2:]), fill)
        for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
            padded[i, :b - a] = x[0, a:b]
        rows.append(padded)
    return rows


def initial_state(op, n, device):
    g = torch.Generator().manual_seed(SEED + 2)
    if op == "linear_memory":
        return {"initial_state": tuple((0.1 * torch.randn(n, H, D, D, generator=g)).to(device) for _ in range(2))}
    N = EXPANSION * D
    return {"weights": ((torch.randn(n, H, N, D, generator=g) * D ** -0.5).to(device),
                        (torch.randn(n, H, D, N, generator=g) * N ** -0.5).to(device))}


def call(op, tokens, state, **kwargs):
    if op == "linear_memory":
        return titans_ext.linear_memory(*tokens, chunk_size=CHUNK, output_final_state=True, **state, **kwargs)
    return titans_ext.mlp_memory(*tokens, state["weights"], chunk_size=CHUNK, output_final_state=True, **kwargs)


def fwd_bwd(op, tokens, state, **kwargs):
    leaves = [x.detach().requires_grad_() for x in tokens]
    o, _ = call(op, leaves, state, **kwargs)
    torch.autograd.grad(o.square().sum(), leaves)


def interleaved_medians(op, layouts, n, repeats, device):
    """{layout name: (forward ms, forward+backward ms)}, medians of ``repeats`` rounds after one
    warm-up round. Each round times every layout in turn, so that the load of a shared machine,
    which drifts over seconds, weighs on all of them alike (the comparison is the point)."""
    def forward(tokens, state, kwargs):
        with torch.no_grad():
            call(op, tokens, state, **kwargs)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    samples = {name: ([], []) for name, _, _ in layouts}
    for round_ in range(repeats + 1):
        for name, tokens, kwargs in layouts:
            state = initial_state(op, n, device)
            for run, times in ((lambda: forward(tokens, state, kwargs), samples[name][0]),
                               (lambda: fwd_bwd(op, tokens, state, **kwargs), samples[name][1])):
                sync()
                start = time.perf_counter()
                run()
                sync()
                if round_:
                    times.append((time.perf_counter() - start) * 1e3)
    return {name: (statistics.median(fwd), statistics.median(both)) for name, (fwd, both) in samples.items()}


def output_error(packed_o, padded_o, cu_seqlens):
    """Relative RMS difference of the padded rows' outputs on the real tokens from the packed ones."""
    bounds = cu_seqlens.tolist()
    unpadded = torch.cat([padded_o[i, :b - a] for i, (a, b) in enumerate(zip(bounds, bounds[1:]))])
    ref = packed_o[0].double()
    return ((unpadded.double() - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--scale", type=int, default=8, help="divide the drawn lengths (256..8192) by this")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/varlen.md")
    args = parser.parse_args()

    load = os.getloadavg()[0]
    lengths = draw_lengths(args.sequences, args.scale)
    cpu_packed, cpu_cu_seqlens = packed_inputs(lengths)
    cpu_padded = padded_inputs(cpu_packed, cpu_cu_seqlens)
    n, T, longest = len(lengths), sum(lengths), max(lengths)
    header = ["device", "op", "layout", "fwd ms", "fwd+bwd ms", "real tokens/s (fwd+bwd)", "fwd ratio",
              "fwd+bwd ratio", "error"]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        packed, padded = [x.to(device) for x in cpu_packed], [x.to(device) for x in cpu_padded]
        cu_seqlens = cpu_cu_seqlens.to(device)
        for op in ("linear_memory", "mlp_memory"):
            with torch.no_grad():
                packed_o, _ = call(op, packed, initial_state(op, n, device), cu_seqlens=cu_seqlens)
                padded_o, _ = call(op, padded, initial_state(op, n, device))
            error = output_error(packed_o.cpu(), padded_o.cpu(), cpu_cu_seqlens)
            layouts = (("packed (cu_seqlens)", packed, {"cu_seqlens": cu_seqlens}),
                       ("padded to the longest", padded, {}))
            times = interleaved_medians(op, layouts, n, args.repeats, device)
            base = times["packed (cu_seqlens)"]
            for name, (fwd, both) in times.items():
                rows.append([device, op if op == "linear_memory" else f"mlp_memory (E = {EXPANSION})", name,
                             f"{fwd:.1f}", f"{both:.1f}", f"{T / both * 1e3:,.0f}", f"{fwd / base[0]:.2f}x",
                             f"{both / base[1]:.2f}x", f"{error:.1e}" if name != "packed (cu_seqlens)" else "-"])
            print(markdown_table(header, rows[-2:]), flush=True)

    gpu = f", CUDA on {torch.cuda.get_device_name()}" if "cuda" in devices else ""
    title = (f"Packed (cu_seqlens) vs padded, CPU{gpu}, N={n} sequences of lengths {lengths} (drawn from 256..8192, "
             f"divided by {args.scale}; T={T}, padded to {longest}: {n * longest / T:.2f}x the tokens), H={H}, "
             f"D={D}, chunk {CHUNK}, fp32 ({platform.machine()}, {os.cpu_count()} cores, load average {load:.1f} at "
             f"the start, {torch.get_num_threads()} threads, torch {torch.__version__}; "
             f"{datetime.date.today().isoformat()}); ratio = time / packed time; error = relative RMS difference "
             "of the padded outputs on the real tokens from the packed ones")
    table = markdown_table(header, rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(f"{title}\n\n{table}\n")
    print(f"\n{title}\n\n{table}\nwrote {args.out}")


if __name__ == "__main__":
    main()
