"""bench.train_step's estimate of bench.recall's wall time (the timing itself is a benchmark, not a test)."""

from bench.train_step import MODELS, makespan, recall_estimates


def test_makespan_gives_each_job_to_the_first_free_worker():
    assert makespan([3, 1, 1, 1], 2) == 3
    assert makespan([1, 1, 1], 2) == 2
    assert makespan([2, 2, 1], 1) == 5


def test_recall_estimates_count_every_training():
    # 1 s per step and 600 steps: 10 minutes a training; 18 trainings (3 seeds) and 5 (--quick) on 2 workers.
    estimate = recall_estimates({model: 1000.0 for model in MODELS}, 600)
    assert estimate == {"full (3 seeds)": 90.0, "--quick": 30.0}
