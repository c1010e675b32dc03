"""The demo's recall task, its training loop and the command line."""

import pytest
import torch

from titans_ext.__main__ import main
from titans_ext.demo.recall import IGNORE, RecallTask
from titans_ext.demo.run import distance_edges, format_table
from titans_ext.demo.train import (accuracy_by_question, elimination_recall, recall_by_distance, recall_loss,
                                   scored_answers, train)
from titans_ext.model import TitansLM


def test_recall_task_sequences():
    task = RecallTask(seq_len=64, n_pairs=3, n_keys=8, n_values=5, n_noise=4)
    tokens, targets, distances = task.sample(6, torch.Generator().manual_seed(0))
    assert tokens.shape == targets.shape == distances.shape == (6, 64)
    assert tokens.min() >= 0 and tokens.max() < task.vocab_size
    for row in range(6):
        asked = (targets[row] != IGNORE).nonzero().flatten()
        assert len(asked) == 3 and asked.min() >= 64 - 6  # the questions close the sequence
        for position in asked.tolist():
            key, value, distance = tokens[row, position], targets[row, position], distances[row, position]
            write = position - distance
            assert tokens[row, write] == key and tokens[row, write + 1] == value == tokens[row, position + 1]
            assert 0 <= key < 8 and 8 <= value < 13
        keys = tokens[row][tokens[row] < 8]
        assert len(keys) == 6 and len(set(keys.tolist())) == 3  # each key written once and asked once


def test_mqar_layout_puts_the_facts_first():
    task = RecallTask.mqar(n_pairs=3, filler=10, n_keys=8, n_values=5, n_noise=4)
    assert (task.seq_len, task.filler, task.layout) == (22, 10, "front")
    tokens, targets, distances = task.sample(4, torch.Generator().manual_seed(0))
    assert (tokens[:, 0:6:2] < 8).all() and (tokens[:, 1:6:2] >= 8).all()  # key value key value ...
    assert (tokens[:, 6:16] >= 13).all()  # the filler is noise
    asked = targets != IGNORE
    assert asked.sum(dim=1).tolist() == [3] * 4 and not asked[:, :16].any()
    assert distances[asked].min() >= 10 + 2 and distances[asked].max() <= 22 - 2
    needle = RecallTask(seq_len=16, n_pairs=1, n_keys=8, n_values=5, n_noise=4)
    longer = needle.resized(64)
    assert longer.seq_len == 64 and longer.vocab_size == needle.vocab_size and longer.n_pairs == 1


@pytest.mark.parametrize("kwargs, match", [
    ({"seq_len": 63}, "seq_len"), ({"n_pairs": 70}, "n_pairs"), ({"n_keys": 0}, "n_keys"),
    ({"n_pairs": 20, "n_keys": 10}, "n_pairs")])
def test_recall_task_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RecallTask(**kwargs)


def test_short_training_reduces_the_loss():
    torch.manual_seed(0)
    task = RecallTask(seq_len=32, n_pairs=2, n_keys=8, n_values=8, n_noise=8)
    model = TitansLM(task.vocab_size, dim=32, depth=1, block="mal", heads=2, window=8, chunk_size=4)
    batch = task.sample(64, torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = recall_loss(model, batch[0], batch[1]).item()
    losses = train(model, task, steps=40, batch_size=16, lr=1e-2, seed=2)
    with torch.no_grad():
        after = recall_loss(model, batch[0], batch[1]).item()
    assert len(losses) == 40
    assert after < before - 1.0, (before, after)
    accuracies, counts = recall_by_distance(model, task, distance_edges(8, 32), n_sequences=16)
    assert len(accuracies) == len(counts) == 3 and sum(counts) == 32


def test_recall_task_layout_errors():
    with pytest.raises(ValueError, match="layout"):
        RecallTask(layout="middle")
    with pytest.raises(ValueError, match="filler"):
        RecallTask.mqar(filler=5)
    with pytest.raises(ValueError, match="filler"):
        RecallTask.mqar(filler=-2)


def test_table_shows_mean_and_minimum_over_seeds():
    table = format_table([0, 8, 16], {"mac": [0.5, [0.25, 0.75]]}, [3, 4])
    lines = table.splitlines()
    assert lines[2].split()[-1] == "50.0%" and "50.0% (min 25.0%)" in lines[3]


def test_distance_edges():
    assert distance_edges(16, 128) == [0, 16, 32, 64, 128]
    assert distance_edges(16, 100) == [0, 16, 32, 64, 100]


def test_demo_command_runs(tmp_path, capsys):
    out = tmp_path / "plot.png"
    main(["demo", "--steps", "2", "--seq-len", "32", "--window", "8", "--pairs", "2", "--dim", "16",
          "--batch-size", "4", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "recall accuracy by distance" in printed and "no memory" in printed and str(out) in printed
    assert out.stat().st_size > 0


@pytest.mark.parametrize("flags, label", [(["--memory", "mlp"], "Titans (MAL, mlp)"),
                                          (["--preset", "memora", "--block", "lmm"], "Titans (LMM, memora)")])
def test_demo_memory_and_preset(tmp_path, capsys, flags, label):
    main(["demo", "--steps", "1", "--seq-len", "16", "--window", "8", "--pairs", "1", "--dim", "16",
          "--batch-size", "2", "--device", "cpu", "--out", str(tmp_path / "plot.png"), *flags])
    assert label in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_demo_on_cuda_without_a_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--device", "cuda"])
    assert exit_info.value.code == 2
    assert "--device cuda: no CUDA GPU is available here" in capsys.readouterr().err


class _EliminatingOracle(torch.nn.Module):
    """Answers each question with the first fact value not yet answered: the elimination
    strategy with the facts' values known and the keys ignored (MQAR's facts come first)."""

    def __init__(self, task):
        super().__init__()
        self.task = task

    def forward(self, tokens):
        task, n = self.task, self.task.n_pairs
        logits = torch.zeros(*tokens.shape, task.vocab_size)
        first_question = task.seq_len - 2 * n
        for row in range(tokens.shape[0]):
            left = tokens[row, 1:2 * n:2].tolist()
            for question in range(n):
                position = first_question + 2 * question
                logits[row, position, left[0]] = 1.0
                left.remove(tokens[row, position + 1].item())  # the answer, seen once given
        return logits, None


def test_recall_by_question_tells_elimination_from_recall():
    task = RecallTask.mqar(n_pairs=4, filler=8, n_keys=16, n_values=64, n_noise=4)
    answers = scored_answers(_EliminatingOracle(task), task, n_sequences=2000, seed=3)
    hits, distances, questions = answers
    assert len(hits) == len(distances) == len(questions) == 8000 and sorted(set(questions.tolist())) == [0, 1, 2, 3]
    measured = accuracy_by_question(answers, 4)
    # Values are drawn with repetition, which lifts elimination slightly above 1 / (n - j).
    for got, expected in zip(measured, elimination_recall(4)):
        assert expected - 0.04 <= got <= expected + 0.06, (measured, elimination_recall(4))
    assert measured[3] == 1.0
