"""Global-memory traffic and buffers of the CUDA linear_memory kernels, per token and head.

    python -m bench.traffic --shape B,T,H,Dk,Dv,C --dtype bf16 [--read token] [--device emulated|cuda]
        [--objective l2|lp|huber|pseudo_huber|yaad] [--retention l2|lq|kl]

For the forward without a gradient (no checkpoints), the forward with one and the backward: every
kernel's bytes read and written in global memory per token-head (each tensor a kernel touches
counted once: the figure Nsight Compute's dram__bytes measures when L2 serves the re-reads of
blocks that share a tile), its grid and shared memory, the totals, and the buffers each direction
allocates beyond its inputs and ordinary outputs (checkpoints, group cotangents). The figures come
from the plans the launchers themselves use (titans_ext.ops.linear_memory.cuda_launch_plan), so
they need no GPU: by default for the device the CPU emulation describes (an H100: 132 SMs, 227 KiB
of shared memory per block; --sm-count and --smem-per-block describe another), or --device cuda
for the current GPU. A MIRAS objective or retention changes the launches (docs/kernels.md
§6.1.12): delta's read and write; a non-l2 option's backward walks each sequence whole; yaad and lq
run one forward value tile over all of Dv, keep every chunk's checkpoint and re-read its state, and
so do kl's checkpoints and lag backward.
"""

import argparse

import torch

from titans_ext.ops.linear_memory import cuda_launch_plan

from .timing import markdown_table

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
MIB = 1 << 20


# The options' forms for the plans (the thresholds and exponents do not change the launches).
OBJECTIVES = {"l2": "l2", "lp": ("lp", 3), "huber": ("huber", 1.0), "pseudo_huber": ("pseudo_huber", 1.0),
              "yaad": ("yaad", 1.0)}
RETENTIONS = {"l2": "l2", "lq": ("lq", 3), "kl": "kl"}


def plans(B, T, H, Dk, Dv, C, dtype, read="token", initial_state=False, final_cotangent=False, emulated=True,
          objective="l2", retention="l2"):
    """(no-grad plan, grad plan): the second holds the backward."""
    common = dict(read=read, has_initial_state=initial_state, has_final_cotangent=final_cotangent, emulated=emulated,
                  objective=OBJECTIVES[objective], retention=RETENTIONS[retention])
    return (cuda_launch_plan(B, T, H, Dk, Dv, C, dtype, save_states=False, **common),
            cuda_launch_plan(B, T, H, Dk, Dv, C, dtype, save_states=True, **common))


def per_token_head(plan, token_heads):
    """[(kernel, blocks, smem KiB, read B, written B)] per token-head, and the (read, written) totals."""
    rows = [(k["name"], k["blocks"], k["smem_bytes"] / 1024, k["bytes_read"] / token_heads,
             k["bytes_written"] / token_heads) for k in plan["kernels"]]
    return rows, (sum(r[3] for r in rows), sum(r[4] for r in rows))


def buffer_mib(plan):
    return sum(b["bytes"] for b in plan["buffers"]) / MIB


def summary(B, T, H, Dk, Dv, C, dtype, **kwargs):
    """Per-token-head totals and buffers (MiB) of the three directions, for bench/gpu.py's table."""
    no_grad, grad = plans(B, T, H, Dk, Dv, C, dtype, **kwargs)
    token_heads = B * T * H
    fwd = per_token_head(no_grad["forward"], token_heads)[1]
    fwd_grad = per_token_head(grad["forward"], token_heads)[1]
    bwd = per_token_head(grad["backward"], token_heads)[1]
    return {"fwd_bytes": sum(fwd), "fwd_grad_bytes": sum(fwd_grad), "bwd_bytes": sum(bwd),
            "checkpoint_mib": buffer_mib(grad["forward"]), "no_grad_mib": buffer_mib(no_grad["forward"]),
            "bwd_scratch_mib": buffer_mib(grad["backward"])}


def report(B, T, H, Dk, Dv, C, dtype_name, **kwargs):
    no_grad, grad = plans(B, T, H, Dk, Dv, C, DTYPES[dtype_name], **kwargs)
    token_heads = B * T * H
    device = grad["device"]
    options = f"objective {kwargs.get('objective', 'l2')}, retention {kwargs.get('retention', 'l2')}"
    lines = [f"linear_memory, B={B} T={T} H={H} Dk={Dk} Dv={Dv} C={C} {dtype_name}, read {kwargs.get('read', 'token')}, "
             f"{options}; "
             f"device: {device['sm_count']} SMs, {device['max_shared_bytes'] / 1024:.0f} KiB shared memory per block. "
             "Bytes per token-head; every tensor a kernel touches counted once.", ""]
    table = []
    for direction, plan, extra in (("forward, no grad", no_grad["forward"], f"tile {no_grad['forward']['tile_v']}"),
                                   ("forward, grad", grad["forward"], f"tile {grad['forward']['tile_v']}"),
                                   ("backward", grad["backward"],
                                    f"group {grad['backward']['group']} of {-(-T // C)} chunks, slice "
                                    f"{grad['backward']['slice']}")):
        rows, (read, written) = per_token_head(plan, token_heads)
        for name, blocks, smem, r, w in rows:
            table.append((direction, name, blocks, f"{smem:.1f}", f"{r:.0f}", f"{w:.0f}", f"{r + w:.0f}", extra))
        table.append((direction, "**total**", "", "", f"{read:.0f}", f"{written:.0f}", f"**{read + written:.0f}**",
                      ""))
        if not plan["fits"]:
            table.append((direction, "(does not fit the device's shared memory)", "", "", "", "", "", ""))
    lines.append(markdown_table(["direction", "kernel", "blocks", "smem KiB", "read", "written", "total", "launch"],
                                table))
    buffers = [(direction, b["name"], f"{b['bytes'] / MIB:.1f}")
               for direction, plan in (("forward, no grad", no_grad["forward"]), ("forward, grad", grad["forward"]),
                                       ("backward", grad["backward"]))
               for b in plan["buffers"]]
    lines += ["", markdown_table(["direction", "buffer", "MiB"], buffers or [("any", "none", "0")])]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="8,8192,16,64,64,64", help="B,T,H,Dk,Dv,C")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--read", choices=["token", "chunk_start"], default="token")
    parser.add_argument("--initial-state", action="store_true", help="the forward reads (M0, S0)")
    parser.add_argument("--final-cotangent", action="store_true", help="the backward reads (dM_T, dS_T)")
    parser.add_argument("--objective", choices=list(OBJECTIVES), default="l2")
    parser.add_argument("--retention", choices=list(RETENTIONS), default="l2")
    parser.add_argument("--device", choices=["emulated", "cuda"], default="emulated")
    parser.add_argument("--sm-count", type=int, help="emulated device: SMs (default 132)")
    parser.add_argument("--smem-per-block", type=int, help="emulated device: shared memory per block, bytes")
    args = parser.parse_args(argv)
    B, T, H, Dk, Dv, C = (int(x) for x in args.shape.split(","))
    emulated = args.device == "emulated"
    if emulated and (args.sm_count or args.smem_per_block):
        import titans_ext._emu  # noqa: F401

        torch.ops.titans_emu.set_device_limits(args.sm_count or 132, args.smem_per_block or 227 * 1024)
    print(report(B, T, H, Dk, Dv, C, args.dtype, read=args.read, initial_state=args.initial_state,
                 final_cotangent=args.final_cotangent, emulated=emulated, objective=args.objective,
                 retention=args.retention))


if __name__ == "__main__":
    main()
