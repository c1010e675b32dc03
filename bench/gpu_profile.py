"""Where the time of one titans_ext.linear_memory fwd+bwd goes on the GPU, kernel by kernel.

    python -m bench.gpu_profile [--seq-len 8192] [--out $OUT/profile.md]

The headline shape of bench/gpu.py (B=8, H=16, D=64, chunk 64, bf16). Each CUDA kernel's device
time comes from torch.profiler over several fwd+bwd calls after a warm-up, and is also given per
chunk step of one block (the forward walks every chunk, the backward's scan all but the first
group's, the chunk kernel its group's, as the launch plan says): the number to hold against one
chunk step's latency (docs/design.md §3) and the launch rules' cost model
(csrc/cuda/linear_memory_launch.cuh), whose constants it calibrates.
"""

import argparse
import collections
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import titans_ext
from titans_ext.ops.linear_memory import cuda_launch_plan

from .gpu import linear_memory_inputs
from .timing import markdown_table


def kernel_times_us(fn, calls):
    """Mean device time per call of every CUDA kernel that fn launches, by kernel name."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    totals = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time_total / calls
    return totals


def short_name(kernel):
    """The kernel's function name without its template arguments and parameter list."""
    name = kernel.split("(")[0].split("<")[0]
    return name.replace("void ", "").split("::")[-1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--out", default="bench/results/gpu_profile.md")
    args = parser.parse_args(argv)

    B, H, D, C, T = 8, 16, 64, 64, args.seq_len
    x = linear_memory_inputs(B, T, H, D, torch.device("cuda"))

    def fwd_bwd():
        o = titans_ext.linear_memory(*x, chunk_size=C)[0]
        o.backward(torch.ones_like(o))

    for _ in range(3):
        fwd_bwd()
    times = kernel_times_us(fwd_bwd, args.calls)
    n_chunks, group = -(-T // C), cuda_launch_plan(B, T, H, D, D, C, torch.bfloat16)["backward"]["group"]
    steps = {"linear_memory_fwd_kernel": n_chunks, "linear_memory_bwd_scan_kernel": n_chunks - group,
             "linear_memory_bwd_chunks_kernel": group}
    rows = []
    for kernel, us in times.most_common():
        name = short_name(kernel)
        per_chunk = f"{us / steps[name]:.2f}" if steps.get(name) else ""
        rows.append((name, f"{us:.1f}", per_chunk))
    rows.append(("all kernels", f"{sum(times.values()):.1f}", ""))
    title = (f"Device time per fwd+bwd call by kernel, B={B}, T={T}, H={H}, D={D}, chunk {C}, bf16, "
             f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    table = markdown_table(["kernel", "us per call", "us per chunk step"], rows)
    print(title + "\n\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(title + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
