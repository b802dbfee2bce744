"""ray_jobs.tune: the memory filter (pure), and a real tiny sweep on a local Ray cluster (CPU) whose
best_config.json base_train accepts, whose trials are MLflow runs of the base dir's store that end
with ASHA's verdict and log nothing after it."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
from mlflow.tracking import MlflowClient

from nanochat.config import parse_config
from nanochat.precision import GB
from nanochat.scripts import base_train
from nanochat.tracking import Tracker, default_uri
from nanochat.train import memory
from nanochat.train.base import BaseTrainConfig
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


# -----------------------------------------------------------------------------
# A real sweep: 2 trials of a depth-2 model, one at a time so that ASHA's decisions are
# deterministic (the same seed samples the same trials, and CPU training is deterministic): the
# first (nanochat's defaults) runs to the end; the second reaches the first rung after it and is
# stopped there when its bpb is worse than the first trial's, as it is with this seed. More trials
# add nothing to check (with 4, the later two were stopped as well) but a trainer start each.

SAMPLES = 2
BUDGET = 16384  # tokens per trial: 16 steps of 1024 or 32 steps of 512


def sweep_args(data_dir, tokenizer_dir, *extra: str) -> list[str]:
    """The sweep's flags: its outputs and MLflow runs go to the defaults under $NANOCHAT_BASE_DIR."""
    return [
        "--device", "cpu", "--data-dir", str(data_dir), "--tokenizer-dir", str(tokenizer_dir),
        "--depth", "2", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-sizes", "4,8",
        "--total-batch-sizes", "512,1024", "--token-budget", str(BUDGET), "--evals-per-trial", "4",
        "--grace-evals", "1", "--reduction-factor", "2", "--eval-tokens", "1024", "--num-samples", str(SAMPLES),
        "--max-concurrent", "1", "--tokenize-workers", "1", "--search-seed", "0", "--name", "sweep", *extra,
    ]


@pytest.mark.timeout(900)  # about 1-2 min on a 2-core machine: Ray starts a trainer per trial
def test_tiny_sweep_stops_early_logs_everything_and_its_best_config_trains(local_ray, data_dir, tokenizer_dir, tmp_path,
                                                                           monkeypatch):
    base = tmp_path / "nanochat"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))  # read by the driver only: it hands the trials every path
    started = time.perf_counter()
    args = sweep_args(data_dir, tokenizer_dir)
    out = ray_tune.main(args)
    print(f"sweep of {SAMPLES} trials: {time.perf_counter() - started:.0f} s")
    exp = base / "ray_results" / "sweep"

    trials = out["trials"]
    assert len(trials) == SAMPLES and not [t for t in trials if t["status"] == "error"]
    stopped = [t for t in trials if t["status"] == "stopped early"]
    assert stopped, "ASHA stopped no trial"
    assert all(t["tokens"] < BUDGET for t in stopped)
    assert any(t["status"] == "completed" and t["tokens"] == BUDGET for t in trials)
    # the first trial is nanochat's defaults: the baseline the sweep reports against
    defaults = BaseTrainConfig()
    assert any(t["matrix_lr"] == defaults.matrix_lr and t["embedding_lr"] == defaults.embedding_lr for t in trials)

    # every trial is one MLflow run, in the base dir's one store, experiment = the sweep, with its
    # parameters and its bpb; each ends with ASHA's verdict and logs nothing after the step it was judged
    # on: the last evaluation in MLflow is the one Tune saw last
    assert out["mlflow_uri"] == default_uri() == f"sqlite:///{base / 'mlflow.db'}"
    client = MlflowClient(out["mlflow_uri"])
    experiment = client.get_experiment_by_name("sweep")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(t["trial_id"] for t in trials)
    for run in runs:
        row = next(t for t in trials if t["trial_id"] == run.data.tags["trial_id"])
        assert float(run.data.params["matrix_lr"]) == pytest.approx(row["matrix_lr"])
        assert int(run.data.params["device_batch_size"]) == row["device_batch_size"]
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_bpb"))
        assert history[-1] == (row["steps"], pytest.approx(row["val_bpb"]))
        assert max(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == row["steps"]
        assert run.info.status == ("FINISHED" if row["status"] == "completed" else "KILLED")

    # outputs; best_config.json holds only base_train settings, and base_train trains with them
    best_file = exp / "best_config.json"
    best = json.loads(best_file.read_text())
    assert best == out["best_config"]
    assert set(best) <= {f.name for f in dataclasses.fields(BaseTrainConfig)}
    winner = min((t for t in trials if t["status"] == "completed"), key=lambda t: t["val_bpb"])
    assert {k: best[k] for k in ray_tune.TUNED} == {k: winner[k] for k in ray_tune.TUNED}
    assert (exp / "trials.csv").read_text().count("\n") == SAMPLES + 1
    assert (exp / "bpb_vs_params.png").stat().st_size > 0
    tiny = ["--config", str(best_file), "--device", "cpu", "--data-dir", str(data_dir), "--tokenizer-dir",
            str(tokenizer_dir), "--num-iterations", "2", "--eval-every", "-1", "--sample-every", "-1",
            "--save-every", "-1", "--eval-tokens", "1024", "--run-dir", str(tmp_path / "from_best")]
    loaded = parse_config(BaseTrainConfig, tiny)
    assert {k: getattr(loaded, k) for k in best} == best
    summary = base_train.main(tiny)
    assert summary["steps"] == 2 and summary["final_loss"] > 0

    # the same place again needs --resume; resuming the finished sweep trains nothing and rewrites
    # the same outputs, still one MLflow run per trial
    with pytest.raises(SystemExit, match="--resume"):
        ray_tune.main(args)
    best_file.unlink()
    again = ray_tune.main([*args, "--resume"])
    assert json.loads(best_file.read_text()) == best
    assert sorted(t["trial_id"] for t in again["trials"]) == sorted(t["trial_id"] for t in trials)
    assert len(client.search_runs([experiment.experiment_id])) == SAMPLES


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
