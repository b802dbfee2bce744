"""ray_jobs.tune: the memory filter (pure) and the end of a sweep's MLflow runs. A real sweep (ASHA stopping a
trial, its MLflow runs, best_config.json training, --resume) runs once, as a user runs it: the demo's printed
sweep in tests/test_first_hour.py."""

from __future__ import annotations

import pytest

from nanochat.precision import GB
from nanochat.tracking import Tracker, default_uri
from nanochat.train import memory
from ray_jobs import tune as ray_tune

P100 = {"depth": 12, "seq_len": 2048, "vocab_size": 32768, "dtype": "float16", "compile": False}
BATCHES = [1, 2, 4, 8, 16, 32, 64]


def test_memory_filter_keeps_exactly_what_fits_a_16gb_p100():
    kept, dropped = ray_tune.feasible_batches(BATCHES, [2048, 524288], budget_bytes=16 * GB, **P100)
    # the filter and the memory model's own search for the largest batch must agree
    largest = memory.largest_fitting_batch(16 * GB, **P100)
    assert 1 <= largest < 64, "depth 12 at 2048 tokens: some batches fit 16 GB, 64 rows do not"
    assert {b for b, _ in kept} == {b for b in BATCHES if b <= largest}
    reasons = dict(dropped)
    assert len(kept) + len(dropped) == 2 * len(BATCHES)
    assert "does not fit" in reasons[(64, 524288)] and "16.0 GiB" in reasons[(64, 524288)]
    # 2 rows x 2048 tokens = 4096: a 2048-token step cannot be reached by accumulation
    assert "not a multiple" in reasons[(2, 2048)]
    assert (1, 2048) in kept and (largest, 524288) in kept
    assert f"dropped {len(dropped)} of {2 * len(BATCHES)}" in ray_tune.describe_drops(dropped, 2 * len(BATCHES))

    # more memory never drops more; no budget (CPU) drops only what accumulation cannot reach
    bigger, _ = ray_tune.feasible_batches(BATCHES, [2048, 524288], budget_bytes=80 * GB, **P100)
    assert set(kept) <= set(bigger)
    unlimited, left = ray_tune.feasible_batches(BATCHES, [2048, 524288], budget_bytes=None, **P100)
    assert all("not a multiple" in why for _, why in left)
    assert {b for b, t in unlimited if t == 524288} == set(BATCHES)
    # two workers double the tokens of one micro-step
    _, two = ray_tune.feasible_batches([1], [2048], budget_bytes=None, num_workers=2, **P100)
    assert [pair for pair, _ in two] == [(1, 2048)]


def test_gpu_memory_from_names():
    assert ray_tune.gpu_memory_of({"Tesla-P100-PCIE-16GB"}) == 16 * GB
    assert ray_tune.gpu_memory_of({"NVIDIA-A100-SXM4-80GB", "NVIDIA L4"}) == 24 * GB  # the smallest card decides
    assert ray_tune.gpu_memory_of({"Mystery GPU"}) is None


def test_runs_still_running_end_with_the_sweep(tmp_path):
    """A sweep's driver stopped by Ctrl-C (or Tune's own Ctrl-C handling, SIGTERM, an error) leaves no trial's
    run RUNNING; finished runs and other sweeps' runs keep their status."""
    store = default_uri(tmp_path)
    experiment_id = ray_tune.ensure_experiment(store, "sweeps")

    def trial_run(sweep: str) -> Tracker:
        tracker = Tracker.create(store, "sweeps", f"{sweep}/trial", {})
        tracker.client.set_tag(tracker.run_id, "sweep", sweep)
        return tracker

    def status(tracker: Tracker) -> str:
        return tracker.client.get_run(tracker.run_id).info.status

    running, finished, other = trial_run("a"), trial_run("a"), trial_run("b")
    finished.finish()
    with pytest.raises(KeyboardInterrupt), ray_tune.runs_end_with_the_sweep(store, experiment_id, "a"):
        raise KeyboardInterrupt
    assert (status(running), status(finished), status(other)) == ("KILLED", "FINISHED", "RUNNING")
    crashed = trial_run("b")
    with pytest.raises(RuntimeError), ray_tune.runs_end_with_the_sweep(store, experiment_id, "b"):
        raise RuntimeError("the driver broke")
    assert (status(other), status(crashed)) == ("FAILED", "FAILED")
