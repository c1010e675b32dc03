"""The demo: a Titans model against the same model without memory, on long-range recall.

Both models are trained on the same stream of :class:`RecallTask` batches; then their recall
accuracy is measured by distance between a fact and its question, printed as a table and
plotted. Beyond the attention's reach only the memory can answer.
"""

import time

import torch

from ..model import TitansLM
from .recall import RecallTask
from .train import recall_by_distance, train


def distance_edges(window, seq_len):
    """Bucket edges: within the window, then doubling distances up to the sequence length."""
    edges = [0, window]
    while edges[-1] < seq_len:
        edges.append(min(2 * edges[-1], seq_len))
    return edges


def build_model(task, block, args):
    # The memory options (--memory, --preset) concern the Titans model only; the baseline has none,
    # and bench.recall's settings leave them at TitansLM's defaults.
    memory = {} if block == "swa" else dict(memory=getattr(args, "memory", None), preset=getattr(args, "preset", None))
    return TitansLM(task.vocab_size, dim=args.dim, depth=args.depth, block=block, heads=args.heads,
                    window=args.window, chunk_size=args.chunk_size, **memory)


def format_accuracy(value):
    """An accuracy, or the mean and minimum of several (one per seed), as text."""
    if isinstance(value, (int, float)):
        return f"{value:.1%}"
    return f"{sum(value) / len(value):.1%} (min {min(value):.1%})"


def format_table(edges, rows, counts):
    """``rows``: ``{name: accuracies}`` -> a text table with one line per distance bucket.

    An accuracy may be a list, one per seed: the cell shows their mean and minimum.
    """
    names = list(rows)
    header = f"{'distance':>12} {'answers':>8} " + " ".join(f"{name:>22}" for name in names)
    lines = [header, "-" * len(header)]
    for i in range(len(edges) - 1):
        cells = " ".join(f"{format_accuracy(rows[name][i]):>22}" for name in names)
        lines.append(f"{f'{edges[i] + 1}-{edges[i + 1]}':>12} {counts[i]:>8} {cells}")
    return "\n".join(lines)


def save_plot(path, edges, rows, window, chance, title):
    """Recall by distance bucket, one line per model; where an accuracy is a list (one per
    seed), the line is the mean and a band spans the seeds' minimum to maximum."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    labels = [f"{edges[i] + 1}-{edges[i + 1]}" for i in range(len(edges) - 1)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, accuracies in rows.items():
        per_seed = [[a] if isinstance(a, (int, float)) else list(a) for a in accuracies]
        line, = ax.plot(labels, [100 * sum(a) / len(a) for a in per_seed], marker="o", label=name)
        if any(len(a) > 1 for a in per_seed):
            ax.fill_between(labels, [100 * min(a) for a in per_seed], [100 * max(a) for a in per_seed],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    ax.axhline(100 * chance, color="gray", linestyle=":", label="chance")
    if window in edges[1:-1]:  # mark where the window ends
        end = edges.index(window) - 0.5
        ax.axvline(end, color="gray", linestyle="--", linewidth=0.8)
        ax.text(end + 0.05, 50, f"beyond the window ({window} tokens)", color="gray", fontsize=8)
    ax.set_xlabel("distance between fact and question (tokens)")
    ax.set_ylabel("recall accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args):
    """Trains both models, prints the table and saves the plot; returns ``{name: accuracies}``."""
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    task = RecallTask(seq_len=args.seq_len, n_pairs=args.pairs, n_keys=16, n_values=16, n_noise=16)
    described = "".join(f", {x}" for x in (args.preset, args.memory) if x)
    models = {f"Titans ({args.block.upper()}{described})": build_model(task, args.block, args),
              "no memory (window only)": build_model(task, "swa", args)}
    print(f"task: {task.seq_len} tokens, {task.n_pairs} facts per sequence, answers among {task.n_values} values; "
          f"attention window {args.window} tokens; {args.steps} training steps per model on {device}")
    rows, started = {}, time.time()
    edges = distance_edges(args.window, args.seq_len)
    for name, model in models.items():
        model.to(device)
        with tqdm(total=args.steps, desc=name, unit="step") as bar:
            def progress(step, loss):
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")

            train(model, task, steps=args.steps, batch_size=args.batch_size, lr=args.lr, device=device,
                  seed=args.seed, progress=progress)
        rows[name], counts = recall_by_distance(model, task, edges, device=device)
    print(f"\nrecall accuracy by distance (chance {1 / task.n_values:.1%}), "
          f"trained and evaluated in {time.time() - started:.0f} s:\n")
    print(format_table(edges, rows, counts))
    save_plot(args.out, edges, rows, args.window, 1 / task.n_values,
              f"Recall by distance, {task.seq_len}-token sequences, window {args.window}")
    print(f"\nplot saved to {args.out}")
    return rows
