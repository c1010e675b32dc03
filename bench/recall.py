"""Recall benchmark: every Titans block against attention with a window, and full attention.

    python -m bench.recall                  # MQAR, every model, 3 seeds (the default CPU setting)
    python -m bench.recall --quick          # one seed; mac, mag, mal, lmm and swa
    python -m bench.recall --task needle    # one needle, trained at --seq-len, evaluated at 2x and 4x
    python -m bench.recall --device cuda --dim 256 --filler 1024 --steps 3000   # larger scale

Tasks (:class:`titans_ext.demo.recall.RecallTask`, the demo's task):

- ``mqar`` (multi-query associative recall, Zoology): ``--pairs`` facts ``key value``, then
  ``--filler`` noise tokens, then the keys asked again in another order; each answer lies at
  least ``filler`` tokens back, beyond the attention window.
- ``needle``: one fact at a random place in ``--seq-len`` tokens of noise, asked at the end;
  trained at ``--seq-len``, evaluated at 1x, 2x and 4x that length (length generalization).

Models: ``TitansLM`` with the block ``mac``, ``mag``, ``mal`` or ``lmm`` (Titans), ``swa`` (the
same model without memory: attention inside the window only) and ``full`` (``swa`` whose window
covers the longest evaluated sequence: causal attention over everything, the upper bound a
window cannot reach). Every model is trained with the same budget and the same seeds (a seed
fixes the initialization and the stream of training batches) by the demo's loop: AdamW, linear
warm-up over the first 5 % of the steps, then cosine decay to zero (one cycle), gradient norm
clipped at 1. Recall is measured on fresh sequences, by distance between the fact and its
question, and summarized as recall beyond the window (mean and minimum over seeds). With
several pairs it is also shown by the question's place in the order asked, against elimination:
a model that knows the facts' values but not which key holds which, and leaves out the values
already answered, reaches 25 / 33 / 50 / 100 % at 4 questions, about 52 % in all, without
recalling anything by key. The first question's recall is the one elimination cannot lift.

Default CPU setting (issue 16), pinned in ``DEFAULTS``: dim 128, depth 2, 4 heads, attention
window / MAC segment 16, memory chunk 4, 4 pairs after 64 filler tokens (80 tokens, 64 keys,
64 values, 64 noise tokens; chance 1/64), AdamW 3e-3, batch 32, 600 steps, 3 seeds. Trainings
run in parallel worker processes (``--workers``, default one per core, one thread each).
"""

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from titans_ext.demo.recall import RecallTask
from titans_ext.demo.run import build_model, distance_edges, format_accuracy, format_table, save_plot
from titans_ext.demo.train import (accuracy_by_distance, accuracy_by_question, elimination_recall, scored_answers,
                                   train)

from .timing import markdown_table

TITANS_BLOCKS = ("mac", "mag", "mal", "lmm")
MODELS = (*TITANS_BLOCKS, "swa", "full")
QUICK_MODELS = (*TITANS_BLOCKS, "swa")
LENGTH_FACTORS = (1, 2, 4)  # needle: evaluated at these multiples of the training length
WARMUP_STEPS = 5  # left out of the CPU time per step


@dataclass(frozen=True)
class Config:
    """One benchmark setting; ``DEFAULTS`` is the pinned CPU setting."""

    task: str = "mqar"
    dim: int = 128
    depth: int = 2
    heads: int = 4
    window: int = 16
    chunk_size: int = 4
    pairs: int = 4
    filler: int = 64
    layout: str = "front"  # mqar: the facts first ("front") or at random places ("scattered")
    seq_len: int = 64  # needle: the training length
    n_keys: int = 64
    n_values: int = 64
    n_noise: int = 64
    lr: float = 3e-3
    batch_size: int = 32
    steps: int = 600
    eval_sequences: int = 512
    device: str = "cpu"

    def train_task(self):
        if self.task == "mqar":
            return RecallTask(4 * self.pairs + self.filler, self.pairs, self.n_keys, self.n_values, self.n_noise,
                              layout=self.layout)
        return RecallTask(self.seq_len, 1, self.n_keys, self.n_values, self.n_noise, layout="scattered")

    def eval_tasks(self):
        """``{label: task}``: the training task, and for the needle its longer versions."""
        task = self.train_task()
        if self.task == "mqar":
            return {"1x": task}
        return {f"{factor}x": task.resized(factor * task.seq_len) for factor in LENGTH_FACTORS}

    def longest(self):
        return max(task.seq_len for task in self.eval_tasks().values())


DEFAULTS = Config()


@dataclass
class Result:
    """One trained model: recall per distance bucket of each evaluated task, and its step times."""

    model: str
    seed: int
    accuracies: dict  # {eval label: [accuracy per bucket]}
    counts: dict      # {eval label: [answers per bucket]}
    by_question: dict  # {eval label: [accuracy per question, the first asked first]}
    step_ms: float    # median wall time of a training step
    cpu_step_ms: float  # process CPU time per training step
    final_loss: float
    seconds: float


def model_window(config, model):
    """The attention window (MAC: the segment) of ``model``: the full sequence for ``full``."""
    return config.longest() if model == "full" else config.window


def run_job(config, model, seed, threads):
    """Trains and evaluates one model (in a worker process, or in this one)."""
    torch.set_num_threads(threads)
    device = torch.device(config.device)
    task = config.train_task()
    torch.manual_seed(seed)
    args = argparse.Namespace(dim=config.dim, depth=config.depth, heads=config.heads,
                              window=model_window(config, model), chunk_size=config.chunk_size)
    net = build_model(task, "swa" if model == "full" else model, args).to(device)
    started = time.perf_counter()
    stamps = [(started, time.process_time())]  # wall and CPU clocks after each step

    def progress(step, loss):
        stamps.append((time.perf_counter(), time.process_time()))

    losses = train(net, task, steps=config.steps, batch_size=config.batch_size, lr=config.lr, device=device,
                   seed=seed, progress=progress)
    step_ms = statistics.median(b[0] - a[0] for a, b in zip(stamps, stamps[1:])) * 1e3
    warm = min(WARMUP_STEPS, config.steps - 1)  # the first steps pay one-time costs
    cpu_step_ms = (stamps[-1][1] - stamps[1 + warm][1]) * 1e3 / max(config.steps - 1 - warm, 1)
    edges = distance_edges(config.window, config.longest())
    accuracies, counts, by_question = {}, {}, {}
    for label, eval_task in config.eval_tasks().items():
        answers = scored_answers(net, eval_task, n_sequences=config.eval_sequences, device=device, seed=10_000 + seed)
        accuracies[label], counts[label] = accuracy_by_distance(answers, edges)
        by_question[label] = accuracy_by_question(answers, eval_task.n_pairs)
    return Result(model, seed, accuracies, counts, by_question, step_ms, cpu_step_ms,
                  sum(losses[-20:]) / len(losses[-20:]), time.perf_counter() - started)


def beyond_window(result, label):
    """Recall over the answers beyond the attention window (every bucket after the first)."""
    accuracies, counts = result.accuracies[label][1:], result.counts[label][1:]
    answers = sum(counts)
    return sum(a * n for a, n in zip(accuracies, counts)) / answers if answers else float("nan")


def run_all(config, models, seeds, workers, log=print):
    """Trains every (model, seed); returns ``{model: [Result per seed]}``."""
    jobs = [(model, seed) for seed in seeds for model in models]
    threads = max(1, (os.cpu_count() or 1) // workers)
    results = {model: [] for model in models}

    def report(result):
        results[result.model].append(result)
        done = sum(len(r) for r in results.values())
        log(f"[{done}/{len(jobs)}] {result.model} seed {result.seed}: recall beyond the window "
            f"{beyond_window(result, next(iter(result.accuracies))):.1%}, {result.step_ms:.0f} ms/step "
            f"(CPU {result.cpu_step_ms:.0f} ms/step), {result.seconds:.0f} s")

    if workers == 1:
        for model, seed in jobs:
            report(run_job(config, model, seed, threads))
    else:
        # spawn: the workers start without the parent's thread pools (forking those can hang).
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [pool.submit(run_job, config, model, seed, threads) for model, seed in jobs]
            for future in concurrent.futures.as_completed(futures):
                report(future.result())
    for model in models:
        results[model].sort(key=lambda r: r.seed)
    return results


def populated(edges, counts):
    """Bucket indices that hold answers."""
    return [i for i in range(len(edges) - 1) if counts[i] > 0]


def summary_table(results, labels):
    """Markdown: recall beyond the window (mean, min, per seed) per model and evaluated length,
    with several pairs the recall of the first question asked (mean, min; see
    :func:`question_table`), and the training step times (median over seeds) with their ratio to
    MAL's."""
    reference = results.get("mal")
    reference_cpu = statistics.median(r.cpu_step_ms for r in reference) if reference else None
    last = labels[-1]
    n_pairs = len(next(iter(results.values()))[0].by_question[last])
    header = ["model"]
    for label in labels:
        suffix = "" if len(labels) == 1 else f" at {label}"
        header += [f"recall beyond the window{suffix}: mean", "min"]
    header.append("per seed")
    if n_pairs > 1:
        header += [f"first question (elimination {elimination_recall(n_pairs)[0]:.0%}): mean", "min"]
    header += ["ms/step", "CPU ms/step", "CPU vs MAL"]
    rows = []
    for model, runs in results.items():
        row = [model]
        for label in labels:
            values = [beyond_window(r, label) for r in runs]
            row += [f"{sum(values) / len(values):.1%}", f"{min(values):.1%}"]
        row.append(" / ".join(f"{beyond_window(r, last):.1%}" for r in runs))
        if n_pairs > 1:
            first = [r.by_question[last][0] for r in runs]
            row += [f"{sum(first) / len(first):.1%}", f"{min(first):.1%}"]
        cpu = statistics.median(r.cpu_step_ms for r in runs)
        row += [f"{statistics.median(r.step_ms for r in runs):.0f}", f"{cpu:.0f}",
                f"{cpu / reference_cpu:.2f}x" if reference_cpu else "-"]
        rows.append(row)
    return markdown_table(header, rows)


def question_table(results, label):
    """Markdown: recall by the question's place in the order asked (mean over seeds), against
    the elimination strategy (``titans_ext.demo.train.accuracy_by_question``): a model that
    knows the facts' values but not which key holds which reaches about 52 % over 4 questions
    (25 / 33 / 50 / 100 %), all of it from leaving out the values already answered."""
    n_pairs = len(next(iter(results.values()))[0].by_question[label])
    header = ["model"] + [f"question {j + 1}" for j in range(n_pairs)]
    rows = [[model] + [f"{statistics.mean(r.by_question[label][j] for r in runs):.1%}" for j in range(n_pairs)]
            for model, runs in results.items()]
    rows.append(["elimination"] + [f"{p:.1%}" for p in elimination_recall(n_pairs)])
    return markdown_table(header, rows)


def distance_rows(results, label):
    """``{model: [per-seed accuracies per bucket]}`` for format_table and save_plot."""
    return {model: [[r.accuracies[label][i] for r in runs] for i in range(len(runs[0].accuracies[label]))]
            for model, runs in results.items()}


def report(config, results, seeds, workers, elapsed, load, out):
    """Prints the tables and writes ``out``.md, .json and .png; returns the markdown."""
    labels = list(config.eval_tasks())
    edges = distance_edges(config.window, config.longest())
    chance = 1 / config.n_values
    task = config.train_task()
    layout = "facts first" if config.layout == "front" else "facts at random places"
    described = (f"MQAR ({layout}): {config.pairs} pairs, {config.filler} filler tokens ({task.seq_len} tokens)"
                 if config.task == "mqar" else
                 f"needle in a haystack: one pair in {task.seq_len} tokens, evaluated at "
                 + ", ".join(f"{t.seq_len}" for t in config.eval_tasks().values()) + " tokens")
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {workers} worker(s) x "
               f"{max(1, (os.cpu_count() or 1) // workers)} thread(s), device {config.device}, torch {torch.__version__}")
    lines = [f"# Recall benchmark ({config.task})", "",
             f"{described}; {config.n_keys} keys, {config.n_values} values (chance {chance:.1%}), {config.n_noise} "
             f"noise tokens. dim {config.dim}, depth {config.depth}, {config.heads} heads, window/segment "
             f"{config.window}, memory chunk {config.chunk_size}; AdamW {config.lr:g}, batch {config.batch_size}, "
             f"{config.steps} steps; seeds {list(seeds)}; {config.eval_sequences} evaluation sequences per length.", "",
             f"Machine: {machine}. Load average {load[0]:.1f} at the start, {load[1]:.1f} at the end; "
             f"{elapsed / 60:.1f} min in all.", "",
             summary_table(results, labels), ""]
    for label in labels:
        counts = next(iter(results.values()))[0].counts[label]
        keep = populated(edges, counts)
        bucket_edges = [edges[keep[0]]] + [edges[i + 1] for i in keep]  # populated buckets are contiguous
        rows = {model: [per_bucket[i] for i in keep] for model, per_bucket in distance_rows(results, label).items()}
        title = "Recall by distance (mean, min over seeds)" + ("" if len(labels) == 1 else f", {label} length")
        lines += [f"{title}:", "", "```", format_table(bucket_edges, rows, [counts[i] for i in keep]), "```", ""]
    if config.task == "mqar" and config.pairs > 1:
        lines += ["Recall by the question's place in the order asked (mean over seeds); elimination: knowing the "
                  "facts' values but not which key holds which, and leaving out those already answered:", "",
                  question_table(results, labels[0]), ""]
    text = "\n".join(lines)
    print(text)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(
        {"config": asdict(config), "seeds": list(seeds), "workers": workers, "elapsed_s": elapsed, "load": load,
         "edges": edges, "results": {m: [asdict(r) for r in runs] for m, runs in results.items()}}, indent=1))
    if config.task == "mqar":
        label = labels[0]
        counts = next(iter(results.values()))[0].counts[label]
        keep = populated(edges, counts)
        save_plot(out.with_suffix(".png"), [edges[keep[0]]] + [edges[i + 1] for i in keep],
                  {m: [acc[i] for i in keep] for m, acc in distance_rows(results, label).items()}, config.window,
                  chance, f"MQAR recall by distance, {task.seq_len} tokens, window {config.window}")
    else:
        save_plot(out.with_suffix(".png"), edges, distance_rows(results, labels[-1]), config.window, chance,
                  f"Needle recall by distance at {labels[-1]} the training length ({task.seq_len})")
    print(f"written: {out.with_suffix('.md')}, .json, .png")
    return text


def _parser():
    d = DEFAULTS
    parser = argparse.ArgumentParser(prog="python -m bench.recall", description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("mqar", "needle"), default=d.task)
    parser.add_argument("--quick", action="store_true", help="one seed; mac, mag, mal, lmm and swa")
    parser.add_argument("--models", nargs="+", choices=MODELS, help=f"models to train (default {' '.join(MODELS)})")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..n-1 (default 3; 1 with --quick)")
    parser.add_argument("--workers", type=int, help="parallel trainings (default: one per core on CPU, 1 on GPU)")
    for name, value in asdict(d).items():
        if name not in ("task", "device", "layout"):
            parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                                help=f"(default {value})")
    parser.add_argument("--layout", choices=("front", "scattered"), default=d.layout,
                        help="mqar: the facts first, or at random places before the questions (default front)")
    parser.add_argument("--device", default=d.device)
    parser.add_argument("--out", help="output path without suffix (default bench/results/recall_<task>[_quick])")
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    config = replace(DEFAULTS, **{name: getattr(args, name) for name in asdict(DEFAULTS)})
    models = tuple(args.models or (QUICK_MODELS if args.quick else MODELS))
    seeds = range(1 if args.quick else args.seeds)
    workers = args.workers or (1 if config.device != "cpu" else min(os.cpu_count() or 1, len(models) * len(seeds)))
    out = args.out or f"bench/results/recall_{config.task}{'_quick' if args.quick else ''}"
    load_start, started = os.getloadavg()[0], time.time()
    print(f"{config.task}: {len(models)} models x {len(seeds)} seeds, {config.steps} steps each, {workers} worker(s)")
    results = run_all(config, models, seeds, workers)
    report(config, results, seeds, workers, time.time() - started, (load_start, os.getloadavg()[0]), out)
    return results


if __name__ == "__main__":
    main()
