"""Context parallel linear memory on the CPU: gloo with 1 and 2 processes, checked, then timed.

    python -m bench.context_parallel [--seq-len 4096] [--worlds 1,2] [--repeats 5] [--out bench/results/context_parallel.md]

Shape: B=1, T=4096 split evenly over the ranks, H=4, Dk=Dv=64, chunk 64, fp32, one thread per
process. Each run first checks its outputs, the final state and every gradient against one call
of ``titans_ext.linear_memory`` on the whole sequence in this process (relative RMS error, the
worst of all of them), then times forward and forward+backward: the median of several runs on
each rank, the slowest rank reported. The single call is timed here with one thread too.

What to expect: a rank runs the op once on 2 Dk + Dv value rows of its T / R tokens, so its work
is (2 Dk + Dv) / (R Dv) of the single call (3 / R at Dk = Dv), plus all-gathers of
``B H (2Dk + Dv) 2Dk`` numbers forward and ``B H Dv 2Dk`` backward: context parallel is for
sequences that do not fit one device and for R > 3, not a speed-up at R = 2.
"""

import argparse
import datetime
import json
import os
import platform
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import titans_ext
from titans_ext.distributed import linear_memory_cp

from .timing import markdown_table, median_ms

B, H, SEED = 1, 4, 0


def make_inputs(T, D):
    """Inputs of the whole sequence, an initial state, and cotangents of (o, M_T, S_T)."""
    g = torch.Generator().manual_seed(SEED)
    q = torch.randn(B, T, H, D, generator=g)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, generator=g), dim=-1)
    v = torch.randn(B, T, H, D, generator=g)
    gates = [torch.rand(B, T, H, generator=g) * scale for scale in (0.1, 1.0, 0.1)]
    init = [0.1 * torch.randn(B, H, D, D, generator=g) for _ in range(2)]
    cotangents = [torch.randn(B, T, H, D, generator=g)] + [torch.randn(B, H, D, D, generator=g) for _ in range(2)]
    return [q, k, v, *gates], init, cotangents


def fwd_bwd(fn, inputs, init, cotangents, **kwargs):
    """fn's outputs and the gradients of <(o, final state), cotangents> w.r.t. the inputs and the initial state."""
    leaves = [x.detach().requires_grad_() for x in inputs + init]
    o, final_state = fn(*leaves[:6], initial_state=tuple(leaves[6:]), output_final_state=True, **kwargs)
    outputs = [o] + ([] if final_state is None else list(final_state))
    loss = sum((x * c).sum() for x, c in zip(outputs, cotangents))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [x.detach() for x in outputs], grads


def rel_rms(ref, out):
    return ((ref.double() - out.double()).pow(2).mean().sqrt() / ref.double().pow(2).mean().sqrt()).item()


def _rank(rank, world_size, workdir, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{workdir / 'store'}", rank=rank, world_size=world_size)
    inputs, init, cotangents = make_inputs(args.seq_len, args.dim)
    shard_len = args.seq_len // world_size
    shard = slice(rank * shard_len, (rank + 1) * shard_len)
    inputs = [x[:, shard] for x in inputs]
    cotangents = [cotangents[0][:, shard]] + cotangents[1:]
    kwargs = dict(group=dist.group.WORLD, chunk_size=args.chunk_size)
    outputs, grads = fwd_bwd(linear_memory_cp, inputs, init, cotangents, **kwargs)

    def forward():
        with torch.no_grad():
            linear_memory_cp(*inputs, initial_state=tuple(init), output_final_state=True, **kwargs)

    # Every rank runs each function the same number of times: they meet in collectives.
    times = {"fwd": median_ms(forward, torch.device("cpu"), warmup=1, repeats=args.repeats),
             "fwd+bwd": median_ms(lambda: fwd_bwd(linear_memory_cp, inputs, init, cotangents, **kwargs),
                                  torch.device("cpu"), warmup=1, repeats=args.repeats)}
    dist.destroy_process_group()
    torch.save((outputs, grads, times), workdir / f"rank{rank}.pt")


def run_context_parallel(world_size, args):
    """Returns (outputs, grads, times) of a run on ``world_size`` processes, shards put back together."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(world_size, Path(tmp), args), nprocs=world_size)
        results = [torch.load(Path(tmp) / f"rank{rank}.pt") for rank in range(world_size)]
    o = torch.cat([outputs[0] for outputs, _, _ in results], dim=1)
    final_state = results[-1][0][1:]
    token_grads = [torch.cat([grads[i] for _, grads, _ in results], dim=1) for i in range(6)]
    times = {key: max(r[2][key] for r in results) for key in ("fwd", "fwd+bwd")}
    return [o, *final_state], token_grads + list(results[0][1][6:]), times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--worlds", default="1,2", help="process counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results/context_parallel.md")
    args = parser.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    for w in worlds:
        if (args.seq_len // w) % args.chunk_size:
            parser.error(f"--seq-len / {w} processes must be a multiple of --chunk-size")

    load = os.getloadavg()[0]  # timings on a shared machine mean little without it
    torch.set_num_threads(1)
    inputs, init, cotangents = make_inputs(args.seq_len, args.dim)
    kwargs = dict(chunk_size=args.chunk_size)
    ref_outputs, ref_grads = fwd_bwd(titans_ext.linear_memory, inputs, init, cotangents, **kwargs)

    def forward():
        with torch.no_grad():
            titans_ext.linear_memory(*inputs, initial_state=tuple(init), output_final_state=True, **kwargs)

    cpu = torch.device("cpu")
    single = {"fwd": median_ms(forward, cpu, warmup=1, repeats=args.repeats),
              "fwd+bwd": median_ms(lambda: fwd_bwd(titans_ext.linear_memory, inputs, init, cotangents, **kwargs),
                                   cpu, warmup=1, repeats=args.repeats)}
    rows = [("linear_memory, one call", 1, f"{single['fwd']:.2f}", f"{single['fwd+bwd']:.2f}", "1.0x", "-")]
    results = []
    for world_size in worlds:
        outputs, grads, times = run_context_parallel(world_size, args)
        error = max(rel_rms(a, b) for a, b in zip(ref_outputs + list(ref_grads), outputs + grads))
        results.append({"processes": world_size, **times, "max_rel_rms_error": error})
        rows.append(("linear_memory_cp (gloo)", world_size, f"{times['fwd']:.2f}", f"{times['fwd+bwd']:.2f}",
                     f"{times['fwd+bwd'] / single['fwd+bwd']:.1f}x", f"{error:.1e}"))
        print(f"{world_size} processes: fwd {times['fwd']:.2f} ms, fwd+bwd {times['fwd+bwd']:.2f} ms, "
              f"worst relative RMS error {error:.1e}", flush=True)

    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load:.1f} "
               f"at the start, 1 thread per process, torch {torch.__version__}")
    title = (f"Context parallel linear memory on the CPU, B={B}, T={args.seq_len}, H={H}, Dk=Dv={args.dim}, "
             f"chunk {args.chunk_size}, fp32 ({machine}; {datetime.date.today().isoformat()}); ratio = fwd+bwd "
             "time / one call's; error = worst relative RMS error of o, the final state and every gradient "
             "against one call")
    table = markdown_table(["implementation", "processes", "fwd ms", "fwd+bwd ms", "ratio", "error"], rows)
    print("\n" + title + "\n\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(title + "\n\n" + table + "\n")
    out.with_suffix(".json").write_text(json.dumps({"config": vars(args), "load_average": load, "single": single,
                                                    "results": results}, indent=2))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
