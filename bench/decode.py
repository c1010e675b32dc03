"""Decode benchmark: tokens per second of one token at a time, the step ops against the streaming
path they replace.

    python -m bench.decode [--device cpu|cuda] [--tokens 256] [--threads 2] [--model] [--breakdown] [--out PATH]

For each memory (linear; MLP with expansion E) and chunk size (16 and 64), a stream of ``--tokens``
tokens is decoded one token per call, on inputs prepared beforehand (the projections are not timed).
Each call's inputs are prepared too: the token's views ``x[:, t]`` for the step, the views
``x[:, t0:t + 1]`` since the chunk boundary for the replay. In a real decode a token's q, k, v and
gates arrive as fresh tensors from the projections; slicing them from the stream inside the timed
loop (10-25 µs per token for the six inputs, both paths alike) measured the harness, not the paths.

- step op: ``titans_ext.linear_memory_step`` / ``mlp_memory_step``, carrying the running and the
  chunk-start state (O(state) per token);
- step op, in place: ``titans_ext.linear_memory_step_`` / ``mlp_memory_step_``, the same step on a
  decode state the loop owns (cloned from the initial state once per run), updated in place: what
  the model's streaming path runs;
- chunked op, replay: what the model's streaming path did before the step ops (and still does
  under autograd, which the steps lack; what any caller of the chunked op must do): keep the state
  at the last chunk boundary and, per token, run the chunked op on the tokens since that boundary
  plus the new one (``t % C + 1`` tokens, returning the state when they complete the chunk), so a
  token costs O(C) memory work.

With ``--breakdown``, also one step call layer by layer (the public function with value checks on
and off, the operator through and below the dispatcher's autograd layer), in µs per call.

With ``--model``, also ``TitansLM.generate`` (cached, so the decode steps; an LMM model of two
blocks: embedding, memory, feed-forward, head) in generated tokens per second.

Every row is timed in one run, in turns (one decode of each row per round, a warm-up round, the
median of ``--repeats`` rounds), so a drifting machine load weighs on all rows alike; ratios
compare rows of the same run. On the CPU each op row is timed with value checks on (the default
there) and off. The targets of issue 18: the step's tokens/s at chunk 16 and 64 within 10 % of
each other, and >= 5x the replay at chunk 64.
"""

import argparse
import datetime
import os
import platform
from pathlib import Path

import torch

import titans_ext
from titans_ext.ops.checks import CHECK_VALUES_ENV

from .timing import interleaved_medians_ms, markdown_table


STEP, IN_PLACE, REPLAY = "step op", "step op, in place", "chunked op, replay"


def stream(memory, B, T, H, D, expansion, device, dtype):
    """Per-token inputs [B, T, ...] and an initial state (the chunked op's format)."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(device)

    q = torch.nn.functional.normalize(rand(B, T, H, D), dim=-1).to(dtype)
    k = torch.nn.functional.normalize(rand(B, T, H, D), dim=-1).to(dtype)
    v = rand(B, T, H, D).to(dtype)
    gates = [(torch.rand(B, T, H, generator=g) * scale).to(device) for scale in (0.05, 0.9, 0.1)]
    if memory == "linear":
        state = (rand(B, H, D, D, scale=0.1), torch.zeros(B, H, D, D, device=device))
    else:
        N = expansion * D
        weights = (rand(B, H, N, D, scale=D ** -0.5), rand(B, H, D, N, scale=N ** -0.5))
        state = (weights, tuple(torch.zeros_like(w) for w in weights))
    return [q, k, v, *gates], state


def decode_with_steps(memory, tokens, state, chunk_size, in_place=False):
    """The step ops on the stream; ``in_place``: the in-place ones, on a copy of ``state`` made once
    per run (what the model's streaming path runs)."""
    name = "linear_memory_step" if memory == "linear" else "mlp_memory_step"
    step = getattr(titans_ext, name + "_" if in_place else name)
    per_token = [tuple(x[:, t] for x in tokens) for t in range(tokens[0].shape[1])]

    def run():
        with torch.no_grad():
            running = owned_copy(state) if in_place else state
            chunk_state = titans_ext.empty_chunk_state(running) if in_place else None
            for t, token in enumerate(per_token):
                out = step(*token, position=t, state=running, chunk_state=chunk_state, chunk_size=chunk_size)
                if not in_place:
                    _, running, chunk_state = out
    return run


def owned_copy(state):
    """A copy of a step state (nested tuples of tensors) that an in-place step may update."""
    from titans_ext.model.memory import owned_copy  # the builds with in-place steps have it

    return owned_copy(state)


def chunked_call(memory, inputs, state, chunk_size, output_final_state):
    if memory == "linear":
        return titans_ext.linear_memory(*inputs, initial_state=state, chunk_size=chunk_size,
                                        output_final_state=output_final_state)
    weights, momentum = state
    return titans_ext.mlp_memory(*inputs, weights, momentum=momentum, chunk_size=chunk_size,
                                 output_final_state=output_final_state)


def decode_with_replay(memory, tokens, state, chunk_size):
    """The streaming path before the step ops: per token, the chunked op on the tokens since the
    last chunk boundary and the new one, from the boundary state."""
    since_boundary = [[x[:, t - t % chunk_size:t + 1] for x in tokens] for t in range(tokens[0].shape[1])]

    def run():
        boundary = state
        with torch.no_grad():
            for inputs in since_boundary:
                complete = inputs[0].shape[1] == chunk_size
                _, final = chunked_call(memory, inputs, boundary, chunk_size, complete)
                if complete:
                    boundary = final
    return run


def step_call_breakdown(memory, tokens, state, chunk_size, calls):
    """Functions that each make ``calls`` calls of one decode step in the middle of a chunk, from
    the outside in: the public function with value checks on and off, the operator through the
    dispatcher's autograd layer, and the operator below it (what the public function reaches).
    Their differences are the per-call costs of the Python wrapper and of the autograd layer."""
    step = titans_ext.linear_memory_step if memory == "linear" else titans_ext.mlp_memory_step
    token = [x[:, 0] for x in tokens]
    with torch.no_grad():
        _, running, chunk_state = step(*token, position=0, state=state, chunk_size=chunk_size)
    position = torch.tensor(1)
    if memory == "linear":
        op = torch.ops.titans_ext.linear_memory_step.default
        op_args = (*token, *running, chunk_state.weights, chunk_state.scale, None, position, chunk_size, True,
                   0, 2.0, 0.0, None, 0, 2.0)
    else:
        op = torch.ops.titans_ext.mlp_memory_step.default
        op_args = (*token, *running[0], *running[1], *chunk_state.weights, chunk_state.scale, None, None, position,
                   chunk_size, True, "gelu", 0, 2.0, 0.0, None, 0, 2.0)

    def public(env, function=step, state=running, chunk_state=chunk_state):
        def run():
            os.environ[CHECK_VALUES_ENV] = env
            try:
                with torch.no_grad():
                    for _ in range(calls):
                        function(*token, position=1, state=state, chunk_state=chunk_state, chunk_size=chunk_size)
            finally:
                os.environ.pop(CHECK_VALUES_ENV)
        return run

    def operator(below_autograd):
        def run():
            with torch.no_grad():
                for _ in range(calls):
                    if below_autograd:
                        with torch._C._AutoDispatchBelowADInplaceOrView():
                            op(*op_args)
                    else:
                        op(*op_args)
        return run

    rows = [("public function, value checks on", public("1")), ("public function, value checks off", public("0")),
            ("operator via torch.ops", operator(False)), ("operator below the autograd layer", operator(True))]
    if not hasattr(titans_ext, "linear_memory_step_"):
        return rows
    in_place = titans_ext.linear_memory_step_ if memory == "linear" else titans_ext.mlp_memory_step_
    return rows + [("in-place public function, value checks off",
                    public("0", in_place, owned_copy(running), owned_copy(chunk_state)))]


def decode_with_model(B, T, H, D, chunk_size, device):
    torch.manual_seed(0)
    model = titans_ext.TitansLM(256, dim=H * D, depth=2, block="lmm", memory_heads=H, chunk_size=chunk_size).to(device)
    prompt = torch.randint(0, 256, (B, 8), device=device)
    return lambda: model.generate(prompt, T)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--expansion", type=int, default=4, help="hidden width / D of the MLP memory")
    parser.add_argument("--tokens", type=int, default=256, help="tokens decoded per timed run")
    parser.add_argument("--chunk-sizes", default="16,64")
    parser.add_argument("--model", action="store_true", help="also time TitansLM.generate (an LMM model)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--breakdown", action="store_true",
                        help="also time one step call layer by layer (public function, operator) in µs per call")
    parser.add_argument("--out", default=None, help="default: bench/results/decode.md (decode_cuda.md on CUDA)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    B, T, H, D = args.batch, args.tokens, args.heads, args.head_dim
    chunk_sizes = [int(c) for c in args.chunk_sizes.split(",")]
    load_before = os.getloadavg()[0]

    rows_to_time = []  # (memory, chunk size, path, value checks setting, function)

    def value_checks(env, fn):
        def run():
            os.environ[CHECK_VALUES_ENV] = env
            try:
                fn()
            finally:
                os.environ.pop(CHECK_VALUES_ENV)
        return run

    # Value checks (gate ranges; README "Ops") run on CPU tensors by default and cost a step a few
    # small reductions per call; both settings are timed (the chunked op checks too).
    value_check_settings = {"on": "1", "off": "0"} if device.type == "cpu" else {"off": "0"}
    for memory in ("linear", "mlp"):
        tokens, state = stream(memory, B, T, H, D, args.expansion, device, dtype)
        for checks, env in value_check_settings.items():
            for C in chunk_sizes:
                rows_to_time.append((memory, C, STEP, checks,
                                     value_checks(env, decode_with_steps(memory, tokens, state, C))))
                if hasattr(titans_ext, "linear_memory_step_"):  # absent from builds before the in-place steps
                    rows_to_time.append((memory, C, IN_PLACE, checks,
                                         value_checks(env, decode_with_steps(memory, tokens, state, C, True))))
                rows_to_time.append((memory, C, REPLAY, checks,
                                     value_checks(env, decode_with_replay(memory, tokens, state, C))))
    if args.model:
        for C in chunk_sizes:
            rows_to_time.append(("model", C, "TitansLM.generate (lmm)", "-", decode_with_model(B, T, H, D, C, device)))
    breakdown_calls = 64
    breakdown = []  # (memory, layer, function)
    if args.breakdown:
        for memory in ("linear", "mlp"):
            tokens, state = stream(memory, B, 1, H, D, args.expansion, device, dtype)
            breakdown += [(memory, *row) for row in step_call_breakdown(memory, tokens, state, max(chunk_sizes),
                                                                          breakdown_calls)]
    medians = interleaved_medians_ms([row[-1] for row in rows_to_time + breakdown], device, warmup=1,
                                     repeats=args.repeats)
    breakdown_us = [ms * 1e3 / breakdown_calls for ms in medians[len(rows_to_time):]]
    medians = medians[:len(rows_to_time)]
    results = [dict(memory=memory, chunk_size=C, path=path, checks=checks, tokens_per_s=T / ms * 1e3)
               for (memory, C, path, checks, _), ms in zip(rows_to_time, medians)]

    def speed(memory, C, path, checks):
        return next(r["tokens_per_s"] for r in results
                    if (r["memory"], r["chunk_size"], r["path"], r["checks"]) == (memory, C, path, checks))

    rows = []
    for r in results:
        vs_replay = ""
        if r["path"] in (STEP, IN_PLACE):
            vs_replay = f"{r['tokens_per_s'] / speed(r['memory'], r['chunk_size'], REPLAY, r['checks']):.1f}x"
        rows.append((r["memory"], r["chunk_size"], r["path"], r["checks"], f"{r['tokens_per_s']:.0f}", vs_replay))
    lo, hi = min(chunk_sizes), max(chunk_sizes)
    paths = [path for path in (STEP, IN_PLACE) if any(r["path"] == path for r in results)]
    verdicts = [f"- {memory}, value checks {checks}, {path}: chunk {lo} / chunk {hi}: "
                f"{speed(memory, lo, path, checks) / speed(memory, hi, path, checks):.2f} (target within 10 %); "
                f"/ replay at chunk {hi}: "
                f"{speed(memory, hi, path, checks) / speed(memory, hi, REPLAY, checks):.1f}x (target >= 5x)"
                for memory in ("linear", "mlp") for checks in value_check_settings for path in paths]
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = (f"{cpu_model()}, {os.cpu_count()} cores, ISA {torch.backends.cpu.get_cpu_capability()}, "
                   f"{args.threads} threads, load average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after")
    title = (f"Decode, one token per call: B={B}, H={H}, D={D}, MLP expansion {args.expansion}, {args.dtype} inputs, "
             f"{T} tokens per run, median of {args.repeats} interleaved runs after a warm-up ({machine}; torch "
             f"{torch.__version__}; {datetime.date.today().isoformat()})")
    table = markdown_table(["memory", "chunk", "path", "value checks", "tokens/s", "step / replay"], rows)
    text = title + "\n\n" + table + "\n\n" + "\n".join(verdicts) + "\n"
    if breakdown:
        text += (f"\nOne step call in the middle of a chunk (chunk {max(chunk_sizes)}), µs per call, median of "
                 f"{args.repeats} interleaved runs of {breakdown_calls} calls:\n\n")
        rows = [(memory, layer, f"{us:.0f}") for (memory, layer, _), us in zip(breakdown, breakdown_us)]
        text += markdown_table(["memory", "layer", "µs per call"], rows)
        text += "\n"
    print("\n" + text)
    out = Path(args.out or ("bench/results/decode_cuda.md" if device.type == "cuda" else "bench/results/decode.md"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
