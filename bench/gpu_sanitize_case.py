"""Small CUDA cases for compute-sanitizer (memcheck, racecheck, synccheck, initcheck): forward and
backward of titans_ext.linear_memory for shapes that exercise every code path of the kernels
(both read modes, bf16 / fp32 / fp64 / fp16, several value tiles with a partial last one, a short
last chunk, Dk = 128, T = 1, sequences of six chunks, so that the pipelines refill their buffers,
and backward chunk groups of one and of two chunks). Run by bench/gpu_check.sh; exits non-zero if
a result is not finite.

    compute-sanitizer --tool memcheck python3 -m bench.gpu_sanitize_case            # every case
    compute-sanitizer --tool synccheck python3 -m bench.gpu_sanitize_case long_bf16  # one case
"""

import argparse

import torch

import titans_ext

# name: (B, T, H, Dk, Dv, chunk_size, dtype, read)
CASES = {
    "long_bf16": (1, 5 * 32 + 7, 2, 128, 72, 32, torch.bfloat16, "token"),
    # Enough heads for the backward to take groups of two chunks on an H100 (132 SMs): the chunk
    # kernel carries the cotangent from one chunk of its group to the next, after the scan.
    "bf16_groups": (2, 5 * 32 + 7, 16, 64, 64, 32, torch.bfloat16, "token"),
    "bf16_tiles": (1, 70, 2, 64, 40, 32, torch.bfloat16, "token"),
    "fp32_dk128": (1, 37, 1, 128, 24, 16, torch.float32, "chunk_start"),
    "fp64": (1, 20, 1, 16, 16, 32, torch.float64, "token"),
    "fp16_one_token": (2, 1, 1, 32, 8, 16, torch.float16, "token"),
}


def run(B, T, H, Dk, Dv, C, dtype, read):
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device="cuda", generator=g)).requires_grad_()

    q, k, v = rand(B, T, H, Dk).to(dtype), rand(B, T, H, Dk).to(dtype), rand(B, T, H, Dv).to(dtype)
    gates = [torch.rand(B, T, H, device="cuda", generator=g) * s for s in (0.3, 1.0, 0.5)]
    init = tuple(rand(B, H, Dv, Dk, scale=0.3).to(torch.float64 if dtype == torch.float64 else torch.float32)
                 for _ in range(2))
    leaves = [x.detach().requires_grad_() for x in [q, k, v, *gates, *init]]
    o, (m, s) = titans_ext.linear_memory(*leaves[:6], chunk_size=C, initial_state=tuple(leaves[6:]),
                                         output_final_state=True, read=read)
    grads = torch.autograd.grad(o.float().square().sum() + m.sum() + s.sum(), leaves)
    torch.cuda.synchronize()
    bad = [i for i, x in enumerate([o, m, s, *grads]) if not torch.isfinite(x).all()]
    assert not bad, f"non-finite results {bad} for {(B, T, H, Dk, Dv, C, dtype, read)}"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", metavar="CASE", help=f"cases to run: {', '.join(CASES)} (default: all)")
    names = parser.parse_args().cases or list(CASES)
    unknown = [name for name in names if name not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; choose from {list(CASES)}")
    for name in names:
        run(*CASES[name])
    print(f"{len(names)} linear_memory cases ran (forward and backward): {', '.join(names)}")
