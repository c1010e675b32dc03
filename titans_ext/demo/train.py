"""Training and evaluation on the recall task: a short loop, and recall accuracy by distance."""

import math

import torch
import torch.nn.functional as F

from .recall import IGNORE


def recall_loss(model, tokens, targets):
    """Cross-entropy of the answers (positions with a target) under ``model``; scalar."""
    logits, _ = model(tokens)
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


def train(model, task, *, steps, batch_size=32, lr=3e-3, device="cpu", seed=0, progress=None):
    """Trains ``model`` on fresh batches of ``task`` with AdamW (warmup, cosine decay, clipping).

    ``progress``: an optional callable ``(step, loss)`` called after each step (e.g. a tqdm bar).
    Returns the list of training losses.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(steps // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    model.train()
    losses = []
    for step in range(steps):
        tokens, targets, _ = (t.to(device) for t in task.sample(batch_size, generator))
        loss = recall_loss(model, tokens, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step, losses[-1])
    return losses


@torch.no_grad()
def recall_by_distance(model, task, edges, *, n_sequences=256, batch_size=64, device="cpu", seed=12345):
    """Recall accuracy of ``model`` on fresh sequences, by distance between write and question.

    ``edges``: increasing distance bounds; bucket i holds the answers with
    ``edges[i] < distance <= edges[i + 1]``. Returns ``(accuracies, counts)``, one per bucket.
    """
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    correct = torch.zeros(len(edges) - 1)
    counts = torch.zeros(len(edges) - 1)
    for start in range(0, n_sequences, batch_size):
        tokens, targets, distances = task.sample(min(batch_size, n_sequences - start), generator)
        logits, _ = model(tokens.to(device))
        hits = (logits.argmax(dim=-1).cpu() == targets)
        scored = targets != IGNORE
        bucket = torch.bucketize(distances[scored], torch.tensor(edges), right=False) - 1
        inside = (bucket >= 0) & (bucket < len(edges) - 1)
        correct.index_add_(0, bucket[inside], hits[scored][inside].float())
        counts.index_add_(0, bucket[inside], torch.ones(int(inside.sum())))
    model.train()
    return (correct / counts.clamp(min=1)).tolist(), counts.long().tolist()
