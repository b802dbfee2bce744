"""ray_jobs.train on a real local Ray cluster (CPU, gloo): equivalence with the plain script,
checkpoints, MLflow, and recovery from a killed worker with its checkpoints in object storage."""

from __future__ import annotations

import json
import re
import shutil
import statistics
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from nanochat import checkpoint
from nanochat.checkpoint import find_latest
from nanochat.dataset import build_shards, list_shards
from nanochat.runlog import read_metrics
from nanochat.scripts import base_train
from nanochat.tracking import Tracker
from nanochat.train.stages import STAGES
from ray_jobs import train as ray_train
from tests.test_storage import s3, upload_shards  # noqa: F401  (s3: moto's S3 server, started once per session)

STEPS = 16


def tiny(data_dir: Path | str, tokenizer_dir: Path, *extra: str) -> list[str]:
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


def test_killed_worker_resumes_from_its_checkpoint(local_ray, data_dir, tokenizer_dir, s3, tracking_server,  # noqa: F811
                                                   monkeypatch):
    # a real SIGKILL of rank 1 right after step 6; the last checkpoint before it is step 4, in an S3 bucket:
    # the restarted workers restore it from there, and the data factory starts the stream at its position;
    # the shards in a bucket too (Ray Data and the workers' validation read them there), and MLflow on a
    # tracking server, as on a cluster without a shared disk
    monkeypatch.setenv(ray_train.FAULT_ENV, "1:6")
    args = tiny(upload_shards(data_dir, s3), tokenizer_dir, "--device-batch-size", "4", "--num-workers", "2", "--storage-path", s3.uri("runs"),
                "--name", "base_d2", "--save-every", "4", "--report-every", "2", "--eval-every", "-1", "--max-failures", "1",
                "--keep-last", "10", "--mlflow-uri", tracking_server[0])
    summary = ray_train.main(args)
    assert summary["steps"] == STEPS and summary["mlflow_uri"] == tracking_server[0]
    mlflow_losses(summary)  # steps 5-6 were trained again after the kill, and logged once
    storage = ray_train.RunStorage.of(args[args.index("--storage-path") + 1], "base_d2")
    saved = storage.fs.get_file_info(pafs.FileSelector(storage.path))
    assert sorted(i.base_name for i in saved if i.base_name.startswith("step_")) == [f"step_{s:06d}" for s in (4, 8, 12, 16)]
    assert summary["checkpoint"] == storage.show(f"{storage.path}/step_{STEPS:06d}")
    assert checkpoint.read_state(f"{storage.path}/step_{STEPS:06d}", storage.fs)["meta"]["run_id"] == \
        checkpoint.run_owner(storage.path, storage.fs), "the run's own checkpoints, and run.json in the bucket"
    # the driver reads the checkpoint Ray Train would restore from the bucket: a second start needs --resume
    with pytest.raises(SystemExit, match=f"holds checkpoints \\(latest: step_{STEPS:06d}\\) of run"):
        ray_train.main(args)

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

    # the next stage starts from that run's latest checkpoint in the bucket (the default --init-from in the
    # same --storage-path): each worker downloads it, and the run records where it came from
    mid = ray_train.main(["--stage", "mid", "--device", "cpu", "--tokenizer-dir", str(tokenizer_dir), "--depth", "2",
                          "--storage-path", args[args.index("--storage-path") + 1], "--mixture", "identity:20,spelling:20",
                          "--val-conversations", "8", "--device-batch-size", "2", "--total-batch-size", "128", "--num-iterations", "2",
                          "--save-every", "-1", "--eval-every", "-1", "--sample-every", "-1", "--num-workers", "1",
                          "--mlflow-uri", tracking_server[0]])
    assert mid["stage"] == "mid" and mid["steps"] == 2
    mid_storage = ray_train.RunStorage.of(args[args.index("--storage-path") + 1], "mid_d2")
    meta = checkpoint.read_state(f"{mid_storage.path}/step_000002", mid_storage.fs)["meta"]
    assert meta["init_from"] == storage.show(f"{storage.path}/step_{STEPS:06d}")


def test_a_second_run_in_the_same_place_needs_resume(one_worker):
    args, _ = one_worker
    with pytest.raises(SystemExit, match="--resume"):
        ray_train.main(args)
    # with --resume it restores the finished checkpoint and has nothing left to train
    resumed = ray_train.main([*args, "--resume"])
    assert resumed["steps"] == STEPS and resumed["final_loss"] is None, "restored at the end: no step trained again"


def test_the_driver_checks_the_shard_set_of_the_checkpoint_ray_train_restores(one_worker, data_dir, tmp_path):
    # the driver reads the checkpoint Ray Train registered last in the run folder of a real run (step 16),
    # before Ray starts: a shard added since is refused, and accepted with --allow-new-shards
    args, _ = one_worker
    more = Path(shutil.copytree(data_dir, tmp_path / "data"))
    build_shards(["an extra document. " * 50] * 8, tmp_path / "extra", docs_per_row_group=4, row_groups_per_shard=1, val_docs=4)
    shutil.copy(list_shards(tmp_path / "extra")[0], more / f"shard_{len(list_shards(data_dir)):05d}.parquet")

    def preflight(*extra: str) -> str:
        cfg = ray_train.parse_config(ray_train.config_class("base"), [*args, "--data-dir", str(more), "--resume", *extra])
        storage = ray_train.RunStorage.of(cfg.storage_path, cfg.name)
        return ray_train.preflight(cfg, STAGES["base"], storage)

    with pytest.raises(SystemExit, match=r"added shard_\d+\.parquet.*pass --allow-new-shards"):
        preflight()
    storage = ray_train.RunStorage.of(args[args.index("--storage-path") + 1], "one")
    assert preflight("--allow-new-shards") == checkpoint.run_owner(storage.path)
    assert storage.latest_checkpoint().path == f"{storage.path}/step_{STEPS:06d}"


def test_restarts_default_to_some_on_a_cluster_and_none_on_one_machine():
    assert ray_train.failures_allowed(-1, alive_nodes=4) == ray_train.CLUSTER_MAX_FAILURES > 0
    assert ray_train.failures_allowed(-1, alive_nodes=1) == 0
    assert ray_train.failures_allowed(2, alive_nodes=1) == 2 and ray_train.failures_allowed(0, alive_nodes=4) == 0
