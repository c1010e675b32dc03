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
def scored_answers(model, task, *, n_sequences=256, batch_size=64, device="cpu", seed=12345):
    """``model``'s answers on fresh sequences of ``task`` -> ``(hits, distances, question)``, one
    entry per asked key (1-d): whether the predicted value is right, the distance between write
    and question, and the question's place in the order asked (0 = first)."""
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    first_question = task.seq_len - 2 * task.n_pairs  # the questions fill the last n_pairs slots
    hits, distances, questions = [], [], []
    for start in range(0, n_sequences, batch_size):
        tokens, targets, distance = task.sample(min(batch_size, n_sequences - start), generator)
        logits, _ = model(tokens.to(device))
        scored = targets != IGNORE
        positions = torch.arange(task.seq_len).expand_as(targets)
        hits.append((logits.argmax(dim=-1).cpu() == targets)[scored])
        distances.append(distance[scored])
        questions.append((positions[scored] - first_question) // 2)
    model.train()
    return torch.cat(hits), torch.cat(distances), torch.cat(questions)


def recall_by_distance(model, task, edges, **evaluation):
    """Recall accuracy of ``model`` on fresh sequences, by distance between write and question:
    :func:`accuracy_by_distance` of :func:`scored_answers` (``evaluation``: its options)."""
    return accuracy_by_distance(scored_answers(model, task, **evaluation), edges)


def accuracy_by_distance(answers, edges):
    """``answers`` of :func:`scored_answers` by distance: ``edges`` are increasing bounds, bucket i
    holds the answers with ``edges[i] < distance <= edges[i + 1]``. Returns ``(accuracies,
    counts)``, one per bucket."""
    hits, distances, _ = answers
    bucket = torch.bucketize(distances, torch.tensor(edges), right=False) - 1
    inside = (bucket >= 0) & (bucket < len(edges) - 1)
    return _accuracies(hits[inside], bucket[inside], len(edges) - 1)


def accuracy_by_question(answers, n_pairs):
    """``answers`` of :func:`scored_answers` by the question's place in the order asked:
    ``n_pairs`` accuracies, the first question's first.

    It tells recall by key from elimination: a model that knows which values the sequence's
    facts hold but not which key holds which, and leaves out the values already answered, is
    right at the j-th question (0-based) with probability ``1 / (n_pairs - j)``, always at the
    last (:func:`elimination_recall`). Recall above that at the first questions is recall by key.
    """
    hits, _, questions = answers
    return _accuracies(hits, questions, n_pairs)[0]


def elimination_recall(n_pairs):
    """Recall by question order of the elimination strategy of :func:`accuracy_by_question`
    (distinct values; values drawn with repetition make it slightly higher)."""
    return [1 / (n_pairs - j) for j in range(n_pairs)]


def _accuracies(hits, group, n_groups):
    correct = torch.zeros(n_groups).index_add_(0, group, hits.float())
    counts = torch.zeros(n_groups).index_add_(0, group, torch.ones(len(group)))
    return (correct / counts.clamp(min=1)).tolist(), counts.long().tolist()
