"""Static figures of the CUDA mlp_memory kernels (no GPU needed): what the launchers choose and what a
chunk costs, per configuration.

    python -m bench.mlp_traffic [--out bench/results/mlp_traffic.md]

For each (D, E, chunk C, input dtype), read "token":
- the hidden block NB (units of the state streamed together) and the dynamic shared memory of the
  forward and the backward kernel on an H100 (227 KiB per block) and an A100 (163 KiB), from the
  launchers' own layout code (``titans_emu::mlp_memory_plan``); "no fit" gives the bytes needed;
- the state bytes a chunk moves through L2 (csrc/cuda/mlp_memory.h): the forward reads W1, W2 in
  pass 1 and W1, S1, W2, S2 in pass 2 and writes the last four (fp32: 40 N D bytes), plus, with a
  gradient, the saved chunk-start state (reads 4 N D fp32, writes 4 N D in the inputs' dtype); the
  backward reads the saved state three times (2 + 4 + 2 N D), reads and writes the fp32 state
  cotangent in pass 2 (4 + 4 N D) and adds to dW1, dW2 in pass 3 (read and write 2 N D), and writes
  and reads a C x N fp32 scratch;
- those bytes per token and head, and the matmul FLOPs per token and head of
  docs/mlp_dual_form.md §5 (forward 11 u + 4 C (D + N), backward 22 u + 8 C (D + N), u = 2 D N),
  whose ratio is the arithmetic intensity of the streaming (one SM: ~5 TFLOP/s of mma.sync against
  ~115 GB/s of L2 bandwidth, a balance of ~43 FLOP/B);
- the block-wide barriers per chunk, counted from the kernels' code: forward 4 + 8 n_b, backward
  12 + 15 n_b, n_b = ceil(N / NB) hidden blocks (read "token"; each streamed block costs the two
  barriers of its cp.async double buffer plus those between its dependent products).
"""

import argparse
import math
from pathlib import Path

import torch

import titans_ext._emu  # noqa: F401  (registers titans_emu::mlp_memory_plan)

from .timing import markdown_table

DEVICES = {"H100": 227 * 1024, "A100": 163 * 1024}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def state_bytes_per_chunk(D, N, C, input_bytes):
    """(forward, forward saving the chunk-start state, backward) bytes of state moved per chunk."""
    nd = N * D
    forward = (2 + 4 + 4) * nd * 4
    saving = forward + 4 * nd * 4 + 4 * nd * input_bytes
    backward = (2 + 4 + 2) * nd * input_bytes + (4 + 4) * nd * 4 + 2 * 2 * nd * 4 + 2 * C * N * 4
    return forward, saving, backward


def flops_per_token(D, N, C):
    u = 2 * D * N
    return 11 * u + 4 * C * (D + N), 22 * u + 8 * C * (D + N)


def barriers_per_chunk(N, NB):
    blocks = math.ceil(N / NB) if NB else 0
    return 4 + 8 * blocks, 12 + 15 * blocks


def plan(D, E, C, dtype, max_bytes):
    fwd_block, fwd_bytes, bwd_block, bwd_bytes = torch.ops.titans_emu.mlp_memory_plan(D, E * D, C, dtype, True, 0,
                                                                                     max_bytes)

    def cell(block, n_bytes):
        return f"{block} / {n_bytes / 1024:.0f} KiB" if block else f"no fit ({n_bytes / 1024:.0f} KiB)"

    return fwd_block, bwd_block, cell(fwd_block, fwd_bytes), cell(bwd_block, bwd_bytes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/mlp_traffic.md")
    args = parser.parse_args(argv)
    rows = []
    for D in (64, 128):
        for E in (2, 4):
            for C in (16, 32, 64):
                for dtype_name, dtype in DTYPES.items():
                    N = E * D
                    h100 = plan(D, E, C, dtype, DEVICES["H100"])
                    a100 = plan(D, E, C, dtype, DEVICES["A100"])
                    fwd, saving, bwd = state_bytes_per_chunk(D, N, C, dtype.itemsize)
                    flops_fwd, flops_bwd = flops_per_token(D, N, C)
                    bar_fwd, bar_bwd = barriers_per_chunk(N, h100[0])[0], barriers_per_chunk(N, h100[1])[1]
                    rows.append((D, E, C, dtype_name, h100[2], h100[3], a100[2], a100[3],
                                 f"{fwd / C / 1024:.1f} / {bwd / C / 1024:.1f}",
                                 f"{flops_fwd / 1e3:.0f} / {flops_bwd / 1e3:.0f}",
                                 f"{flops_fwd * C / fwd:.0f} / {flops_bwd * C / bwd:.0f}",
                                 f"{bar_fwd} / {bar_bwd}" if h100[0] and h100[1] else ""))
    header = ["D", "E", "C", "dtype", "H100 fwd NB / smem", "H100 bwd NB / smem", "A100 fwd NB / smem",
              "A100 bwd NB / smem", "state KiB per token-head fwd / bwd", "kFLOP per token-head fwd / bwd",
              "FLOP per state byte fwd / bwd", "barriers per chunk fwd / bwd (H100)"]
    title = ("Static figures of the CUDA mlp_memory kernels (read \"token\", retention l2; from the launchers' "
             "layout code and csrc/cuda/mlp_memory.h; not measured)")
    table = markdown_table(header, rows)
    print(title + "\n\n" + table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(title + "\n\n" + table + "\n")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
