"""ray_jobs.train on a real local Ray cluster (CPU, gloo): equivalence with the plain script,
checkpoints, MLflow, and recovery from a killed worker."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest

from nanochat.checkpoint import find_latest
from nanochat.runlog import read_metrics
from nanochat.scripts import base_train
from nanochat.tracking import Tracker
from ray_jobs import train as ray_train

STEPS = 16


def tiny(data_dir: Path, tokenizer_dir: Path, *extra: str) -> list[str]:
    return [
        "--device", "cpu", "--data-dir", str(data_dir), "--tokenizer-dir", str(tokenizer_dir),
        "--depth", "2", "--head-dim", "32", "--max-seq-len", "64", "--total-batch-size", "512",
        "--num-iterations", str(STEPS), "--eval-tokens", "1024", "--sample-every", "-1", "--seed", "7", *extra,
    ]


@pytest.fixture(scope="module")
def one_worker(local_ray, data_dir, tokenizer_dir, tmp_path_factory) -> tuple[list[str], dict]:
    """(argv, summary) of a one-worker run with checkpoints at steps 8 and 16 (the session's shared Ray)."""
    argv = tiny(data_dir, tokenizer_dir, "--device-batch-size", "8", "--num-workers", "1", "--eval-every", "-1",
                "--storage-path", str(tmp_path_factory.mktemp("ray")), "--name", "one", "--save-every", "8")
    return argv, ray_train.main(argv)


def mlflow_losses(summary: dict) -> list[float]:
    steps, losses = zip(*Tracker(summary["mlflow_uri"], summary["mlflow_run_id"]).history("loss"), strict=True)
    assert list(steps) == list(range(1, STEPS + 1)), "MLflow holds every step exactly once"
    return list(losses)


def printed_lines(captured: pytest.CaptureResult) -> list[str]:
    """What a run printed, worker lines included (Ray forwards them to the driver), without Ray's colours."""
    return re.sub(r"\x1b\[[0-9;]*m", "", captured.out + captured.err).split("\n")


def test_ray_training_matches_the_single_process_script(one_worker, data_dir, tokenizer_dir, tmp_path, capfd):
    plain_args = ("--eval-every", "-1", "--save-every", "-1", "--run-dir", str(tmp_path / "plain"))
    base_train.main(tiny(data_dir, tokenizer_dir, "--device-batch-size", "8", *plain_args))
    plain = [r["loss"] for r in read_metrics(tmp_path / "plain" / "metrics.jsonl")]

    # one worker: Ray Data streams exactly the plain loader's rows, so the run is the same run
    assert mlflow_losses(one_worker[1]) == pytest.approx(plain, abs=1e-4)

    # two workers x 4 rows = the same global batch and identical initial weights, but Ray Data's
    # split hands each worker other rows than the single process reads, so after the first step
    # the curves agree only within the noise of which text is seen (the all-reduce itself is
    # checked exactly in test_training.py)
    capfd.readouterr()
    two = ray_train.main(tiny(data_dir, tokenizer_dir, "--device-batch-size", "4", "--num-workers", "2",
                              "--storage-path", str(tmp_path / "ray"), "--name", "two", "--save-every", "8", "--eval-every", "-1"))
    # quiet: the workers' plan and the summary once each, the progress bar in whole lines (no redraws by
    # carriage return, no empty worker lines)
    printed = printed_lines(capfd.readouterr())
    workers = [line for line in printed if re.match(r"\(RayTrainWorker pid=\d+", line)]
    plans = [line for line in printed if "precision plan:" in line]
    assert len(plans) == 1 and re.match(r"\(RayTrainWorker pid=\d+.*\) \[workers 0, 1 on \S+\] precision plan: CPU, float32", plans[0])
    assert [line for line in printed if "summary:" in line] == [f"summary: {json.dumps(two)}"]
    assert any(re.search(r"\) base: +\d+%\|.*\| \d+/16 ", line) for line in workers)
    assert not [line for line in workers if not line.split(")", 1)[1].strip()], "empty worker lines"
    assert not [line for line in printed if "\r" in line], "carriage-return redraws"
    assert two["steps"] == STEPS and two["skipped_steps"] == 0
    distributed = mlflow_losses(two)
    assert abs(plain[0] - distributed[0]) < 0.1
    assert statistics.mean(distributed[-8:]) == pytest.approx(statistics.mean(plain[-8:]), rel=0.2)
    assert statistics.mean(distributed[-8:]) < 0.8 * distributed[0]
    # checkpoints went through Ray Train into storage, in the project's own format, with MLflow artifacts
    latest = find_latest(tmp_path / "ray" / "two")
    assert latest is not None and latest.name == f"step_{STEPS:06d}"
    tracker = Tracker(two["mlflow_uri"], two["mlflow_run_id"])
    assert {p.path for p in tracker.client.list_artifacts(tracker.run_id)} >= {"loss_curves.png", "summary.json"}


def test_killed_worker_resumes_from_its_checkpoint(local_ray, data_dir, tokenizer_dir, tmp_path, monkeypatch):
    # a real SIGKILL of rank 1 right after step 6; the last checkpoint before it is step 4
    monkeypatch.setenv(ray_train.FAULT_ENV, "1:6")
    summary = ray_train.main(tiny(data_dir, tokenizer_dir, "--device-batch-size", "4", "--num-workers", "2",
                                  "--storage-path", str(tmp_path), "--name", "faulty", "--save-every", "4", "--report-every", "2",
                                  "--eval-every", "-1", "--max-failures", "1", "--keep-last", "10"))
    assert summary["steps"] == STEPS
    mlflow_losses(summary)  # steps 5-6 were trained again after the kill, and logged once
    assert sorted(p.name for p in (tmp_path / "faulty").glob("step_*")) == [f"step_{s:06d}" for s in (4, 8, 12, 16)]

    # a step goes to MLflow once the checkpoint that covers it is persisted: steps 5-6 of the run that was
    # killed never reached it, those in MLflow are the restarted run's, and the restart is marked at step 4
    client = Tracker(summary["mlflow_uri"], summary["mlflow_run_id"]).client
    loss_at = {m.step: m for m in client.get_metric_history(summary["mlflow_run_id"], "loss")}
    [restart] = client.get_metric_history(summary["mlflow_run_id"], "restarted_at_step")
    assert (restart.step, restart.value) == (4, 4)
    assert loss_at[4].timestamp < restart.timestamp <= loss_at[5].timestamp
    # with the step-time split, every 2 steps
    for phase in ("data_s", "compute_s", "exposed_comm_s", "optimizer_s"):
        assert [m.step for m in client.get_metric_history(summary["mlflow_run_id"], phase)] == list(range(2, STEPS + 1, 2))


def test_a_second_run_in_the_same_place_needs_resume(one_worker):
    args, _ = one_worker
    with pytest.raises(SystemExit, match="--resume"):
        ray_train.main(args)
    # with --resume it restores the finished checkpoint and has nothing left to train
    resumed = ray_train.main([*args, "--resume"])
    assert resumed["steps"] == STEPS and resumed["final_loss"] is None, "restored at the end: no step trained again"


def test_restarts_default_to_some_on_a_cluster_and_none_on_one_machine():
    assert ray_train.failures_allowed(-1, alive_nodes=4) == ray_train.CLUSTER_MAX_FAILURES > 0
    assert ray_train.failures_allowed(-1, alive_nodes=1) == 0
    assert ray_train.failures_allowed(2, alive_nodes=1) == 2 and ray_train.failures_allowed(0, alive_nodes=4) == 0
