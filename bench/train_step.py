"""Training-step time of every model of the recall benchmark, and the wall time of its runs.

    python -m bench.train_step                          # this tree, 1 and 2 threads
    python -m bench.train_step --baseline /work/main    # and another checkout, interleaved

One training step of ``bench.recall``'s default CPU setting (``bench.recall.DEFAULTS``: the demo's
step on a fresh MQAR batch: forward, backward, gradient clipping, AdamW), per model and thread
count: the median wall time and the process CPU time per step over ``--steps`` steps after
``--warmup``. Each checkout (``--baseline``: the code to compare with, e.g. a git worktree of
main; it needs its compiled extension) runs in a worker process of its own that imports
``titans_ext`` from it; the checkouts are timed in turns, model by model and round by round, so
that a load that drifts (a shared machine) weighs on both alike and their ratios stay
comparable; speed-ups and ratios are of the CPU times, which a load inflates less than the wall
times. From the 1-thread CPU times it estimates the wall time of ``python -m bench.recall``
(all models, 3 seeds) and of ``--quick`` on 2 workers of one thread each (bench.recall's
default on 2 cores), trainings only: the jobs in bench.recall's order, each to the first free
worker.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

THIS_TREE = str(Path(__file__).resolve().parents[1])
MODELS = ("mac", "mag", "mal", "lmm", "swa", "full")
QUICK_MODELS = ("mac", "mag", "mal", "lmm", "swa")


def step_allocations(step):
    """``{"mib": ..., "aten_calls": ...}``: the bytes the operators allocate and how many run in one
    call of ``step``, counted by torch.profiler: the work a step does, which a machine's load
    does not change."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    events = profiler.key_averages()
    return {"mib": sum(max(e.self_cpu_memory_usage, 0) for e in events) / 2 ** 20,
            "aten_calls": sum(e.count for e in events if e.key.startswith("aten::"))}


def time_steps(config, model, steps, warmup, allocations=False):
    """In a worker: ``{"wall_ms": median, "cpu_ms": mean per step}`` of ``steps`` training steps of ``model``
    (``config``: bench.recall's Config as a dict) after ``warmup`` steps; with ``allocations``
    :func:`step_allocations` of the next step instead."""
    import torch

    from titans_ext.demo.recall import RecallTask
    from titans_ext.demo.train import recall_loss
    from titans_ext.model import TitansLM

    task = RecallTask(4 * config["pairs"] + config["filler"], config["pairs"], config["n_keys"], config["n_values"],
                      config["n_noise"], layout=config["layout"])
    torch.manual_seed(0)
    window = task.seq_len if model == "full" else config["window"]
    net = TitansLM(task.vocab_size, dim=config["dim"], depth=config["depth"], block="swa" if model == "full" else model,
                   heads=config["heads"], window=window, chunk_size=config["chunk_size"])
    optimizer = torch.optim.AdamW(net.parameters(), lr=config["lr"], weight_decay=0.01, betas=(0.9, 0.98))
    generator = torch.Generator().manual_seed(0)

    def step():
        tokens, targets, _ = task.sample(config["batch_size"], generator)
        loss = recall_loss(net, tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()

    for _ in range(warmup):
        step()
    if allocations:
        return step_allocations(step)
    wall = []
    cpu_start = time.process_time()
    for _ in range(steps):
        started = time.perf_counter()
        step()
        wall.append((time.perf_counter() - started) * 1e3)
    return {"wall_ms": statistics.median(wall), "cpu_ms": (time.process_time() - cpu_start) * 1e3 / steps}


def worker(root, threads):
    """A worker process: imports titans_ext from ``root``, answers one JSON line per request line."""
    sys.path.insert(0, root)
    import torch

    import titans_ext

    torch.set_num_threads(threads)
    print(json.dumps({"titans_ext": titans_ext.__file__}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(time_steps(request["config"], request["model"], request["steps"], request["warmup"],
                                    request.get("allocations", False))), flush=True)


class Worker:
    """A worker process on ``root`` with ``threads`` threads."""

    def __init__(self, root, threads):
        self.process = subprocess.Popen([sys.executable, __file__, "--worker", root, str(threads)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root)
        self.imported = json.loads(self.process.stdout.readline())["titans_ext"]
        if not self.imported.startswith(str(Path(root).resolve())):
            raise RuntimeError(f"--baseline: the worker for {root} imported titans_ext from {self.imported}")

    def time(self, config, model, steps, warmup, allocations=False):
        request = dict(config=config, model=model, steps=steps, warmup=warmup, allocations=allocations)
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def makespan(durations, workers):
    """Wall time of jobs taken in order, each by the first free worker (a process pool)."""
    free = [0.0] * workers
    for duration in durations:
        free[free.index(min(free))] += duration
    return max(free)


def recall_estimates(step_ms, steps):
    """Minutes of bench.recall's trainings: ``{"full (3 seeds)": ..., "--quick": ...}`` on 2 workers,
    from the 1-thread wall time per step of each model."""
    full = [step_ms[m] * steps / 6e4 for _ in range(3) for m in MODELS]
    quick = [step_ms[m] * steps / 6e4 for m in QUICK_MODELS]
    return {"full (3 seeds)": makespan(full, 2), "--quick": makespan(quick, 2)}


def main(argv=None):
    from .recall import DEFAULTS
    from .timing import markdown_table

    parser = argparse.ArgumentParser(prog="python -m bench.train_step", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per model and round (default 8)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; the median of the rounds is kept (default 2)")
    parser.add_argument("--baseline", help="another checkout to time against (its titans_ext built in place)")
    parser.add_argument("--out", default="bench/results/train_step", help="output path without suffix")
    args = parser.parse_args(argv)
    config = {name: getattr(DEFAULTS, name) for name in DEFAULTS.__dataclass_fields__}
    trees = {"this": THIS_TREE} if args.baseline is None else {"baseline": args.baseline, "this": THIS_TREE}
    loads = [os.getloadavg()[0]]
    timings = {}  # (tree, threads, model) -> [per-round results]
    for threads in args.threads:
        workers = {name: Worker(root, threads) for name, root in trees.items()}
        for round_ in range(args.rounds):
            for model in args.models:
                for name, worker_ in workers.items():
                    result = worker_.time(config, model, args.steps, args.warmup)
                    timings.setdefault((name, threads, model), []).append(result)
                    print(f"round {round_} {threads} thread(s) {model:>4} {name:>8}: {result['wall_ms']:.0f} ms "
                          f"(CPU {result['cpu_ms']:.0f} ms), load {os.getloadavg()[0]:.1f}", flush=True)
        for worker_ in workers.values():
            worker_.close()
        loads.append(os.getloadavg()[0])

    # The work of a step, deterministic: one profiled step per model and checkout, 1 thread.
    workers = {name: Worker(root, 1) for name, root in trees.items()}
    allocations = {(name, model): worker_.time(config, model, 0, 1, allocations=True)
                   for model in args.models for name, worker_ in workers.items()}
    for worker_ in workers.values():
        worker_.close()

    def wall(name, threads, model):
        return statistics.median(r["wall_ms"] for r in timings[(name, threads, model)])

    def cpu(name, threads, model):
        return statistics.median(r["cpu_ms"] for r in timings[(name, threads, model)])

    header = ["model"]
    for threads in args.threads:
        for name in trees:
            header += [f"{name}: ms/step, {threads} thread(s)", "CPU ms"]
        if len(trees) > 1:
            header.append(f"speed-up, {threads} thread(s)")
    header.append(f"CPU vs MAL (this, {args.threads[0]} thread(s))")
    rows = []
    for model in args.models:
        row = [model]
        for threads in args.threads:
            for name in trees:
                row += [f"{wall(name, threads, model):.0f}", f"{cpu(name, threads, model):.0f}"]
            if len(trees) > 1:
                row.append(f"{cpu('baseline', threads, model) / cpu('this', threads, model):.2f}x")
        mal = cpu("this", args.threads[0], "mal") if "mal" in args.models else None
        row.append(f"{cpu('this', args.threads[0], model) / mal:.2f}x" if mal else "-")
        rows.append(row)
    lines = [f"Training step of bench.recall's default setting (dim {config['dim']}, depth {config['depth']}, "
             f"{config['heads']} heads, window/segment {config['window']}, memory chunk {config['chunk_size']}, "
             f"{4 * config['pairs'] + config['filler']} tokens, batch {config['batch_size']}): median wall time over "
             f"{args.steps} steps after {args.warmup}, median of {args.rounds} rounds; CPU: process time per step "
             "(the speed-ups and ratios use it: on a loaded machine the wall time also counts the waits). "
             f"Load average {' -> '.join(f'{x:.1f}' for x in loads)} (1 min, at the start and after each thread count).",
             "", markdown_table(header, rows), ""]
    header = ["model"] + [f"{name}: {column}" for name in trees for column in ("MiB allocated", "operator calls")]
    rows = [[model] + [f"{allocations[(name, model)][key]:.0f}" for name in trees for key in ("mib", "aten_calls")]
            for model in args.models]
    lines += ["The work of one step (torch.profiler, 1 thread, after one step; the same on any machine): the "
              "bytes the operators allocate and the number of aten operator calls, forward, backward and "
              "optimizer:", "", markdown_table(header, rows), ""]
    if 1 in args.threads and set(MODELS) <= set(args.models):
        estimate_rows = []
        for name in trees:
            estimate = recall_estimates({m: cpu(name, 1, m) for m in MODELS}, DEFAULTS.steps)
            estimate_rows.append([name] + [f"{minutes:.1f}" for minutes in estimate.values()])
        lines += [f"Estimated minutes of bench.recall's trainings ({DEFAULTS.steps} steps each, 2 workers x 1 thread, "
                  "from the 1-thread CPU times above, which a worker's wall time matches on an idle machine; evaluation and "
                  "process start not included):", "",
                  markdown_table(["code", *recall_estimates({m: 1.0 for m in MODELS}, 1)], estimate_rows), ""]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(
        {"config": config, "trees": trees, "loads": loads, "args": vars(args),
         "timings": {" ".join(map(str, key)): value for key, value in timings.items()},
         "allocations": {" ".join(key): value for key, value in allocations.items()}}, indent=1))
    return timings


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]))
    else:
        main()
