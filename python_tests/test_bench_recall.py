"""The recall benchmark (bench/recall.py) runs end to end at a tiny size, for both tasks."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ lives beside the package

from bench import recall  # noqa: E402

TINY = ["--steps", "2", "--dim", "16", "--depth", "1", "--heads", "2", "--batch-size", "4", "--eval-sequences", "8",
        "--seeds", "2", "--workers", "1", "--n-keys", "8", "--n-values", "8", "--n-noise", "8"]


@pytest.mark.parametrize("task, extra", [("mqar", ["--pairs", "2", "--filler", "16"]),
                                         ("needle", ["--seq-len", "16"])])
def test_benchmark_runs_and_writes_its_tables(tmp_path, capsys, task, extra):
    out = tmp_path / "recall"
    results = recall.main(["--task", task, *TINY, *extra, "--models", "mac", "mal", "full", "--out", str(out)])
    assert set(results) == {"mac", "mal", "full"} and all(len(runs) == 2 for runs in results.values())
    text = out.with_suffix(".md").read_text()
    assert "| mac |" in text and "CPU vs MAL" in text and "(min " in text
    assert out.with_suffix(".png").stat().st_size > 0
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["config"]["task"] == task and len(saved["results"]["mal"]) == 2
    if task == "needle":
        assert "at 4x" in text and saved["config"]["seq_len"] == 16
        assert "question 1" not in text  # one pair: nothing to eliminate
    else:
        assert "first question (elimination 50%)" in text and "| elimination | 50.0% | 100.0% |" in text
        assert all(len(run["by_question"]["1x"]) == 2 for run in saved["results"]["mac"])
    assert "recall beyond the window" in capsys.readouterr().out
