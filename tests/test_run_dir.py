"""A run directory holds one run: a second run is refused, a checkpoint of another run is never resumed,
a second live writer is kept out, a step cut short between its renames comes back, and a changed shard
set is refused on resume unless allowed. Tiny base_train runs through the real command line.

    python -m pytest tests/test_run_dir.py -q
"""

from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanochat.checkpoint import OWNER_FILE, CheckpointError, RunLock, find_latest, read_meta
from nanochat.dataset import build_shards, list_shards
from nanochat.runlog import read_metrics
from nanochat.scripts import base_train


def tiny(data_dir: Path, tokenizer_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--device", "cpu", "--data-dir", str(data_dir), "--tokenizer-dir", str(tokenizer_dir), "--run-dir", str(run_dir),
            "--depth", "2", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "256",
            "--eval-tokens", "256", "--eval-every", "-1", "--sample-every", "-1", "--num-iterations", "2", *extra]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir, tokenizer_dir) -> Path:
    """A finished two-step run (checkpoint at step 2); tests work on copies of it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    base_train.main(tiny(data_dir, tokenizer_dir, run))
    return run


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def owner(run: Path) -> str:
    return json.loads((run / OWNER_FILE).read_text())["run_id"]


def test_every_checkpoint_carries_the_run_id_of_its_directory(finished):
    assert read_meta(finished)["run_id"] == owner(finished)


def test_a_second_run_in_a_run_dir_is_refused_and_the_first_kept(finished, data_dir, tokenizer_dir, tmp_path):
    run = copy_of(finished, tmp_path)
    metrics = (run / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError) as refused:
        base_train.main(tiny(data_dir, tokenizer_dir, run, "--seed", "1"))
    assert str(refused.value) == (f"{run} already holds checkpoints (latest: step_000002) of run {owner(finished)}; "
                                  "pass --resume to continue that run, or --run-dir DIR for a new one")
    assert (run / "metrics.jsonl").read_text() == metrics and owner(run) == owner(finished)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002"]


def test_resume_refuses_a_checkpoint_another_run_wrote(finished, data_dir, tokenizer_dir, tmp_path):
    other = tmp_path / "other"
    base_train.main(tiny(data_dir, tokenizer_dir, other, "--seed", "1"))
    run = copy_of(finished, tmp_path)
    # two runs' checkpoints in one directory, the newest the other run's
    shutil.copytree(other / "checkpoints" / "step_000002", run / "checkpoints" / "step_000003")
    with pytest.raises(CheckpointError) as refused:
        base_train.main(tiny(data_dir, tokenizer_dir, run, "--resume", "--num-iterations", "4"))
    assert (f"{run / 'checkpoints' / 'step_000003'} was written by run {owner(other)}, but {run / OWNER_FILE} says "
            f"{run} belongs to run {owner(finished)}") in str(refused.value)
    assert owner(other) != owner(finished)
    assert find_latest(run / "checkpoints").name == "step_000003", "nothing was written"


def test_a_second_live_writer_is_refused(data_dir, tokenizer_dir, tmp_path):
    run = tmp_path / "live"
    first = subprocess.Popen([sys.executable, "-m", "nanochat.scripts.base_train",
                              *tiny(data_dir, tokenizer_dir, run, "--num-iterations", "100000")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock, deadline = run / "writer.lock", time.time() + 60
        while not (lock.exists() and f"pid {first.pid} " in lock.read_text()):
            assert first.poll() is None and time.time() < deadline, "the first run ended before it held the lock"
            time.sleep(0.05)
        with pytest.raises(CheckpointError, match=f"{run} is in use by another run \\(pid {first.pid} on {socket.gethostname()}, since "):
            base_train.main(tiny(data_dir, tokenizer_dir, run, "--resume"))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with RunLock(run):  # the kernel released the killed holder's lock
        pass


def test_a_step_orphaned_by_a_cut_save_is_restored_and_resumed(finished, data_dir, tokenizer_dir, tmp_path, capsys, caplog):
    run = copy_of(finished, tmp_path)
    # the first of a re-save's two renames (nanochat/checkpoint.py _publish), then the process died
    step = run / "checkpoints" / "step_000002"
    step.rename(run / "checkpoints" / ".old-step_000002-4242-0badcafe")
    with caplog.at_level(logging.WARNING, logger="nanochat.checkpoint"):
        summary = base_train.main(tiny(data_dir, tokenizer_dir, run, "--resume", "--num-iterations", "3"))
    assert f"restored {step} from .old-step_000002-4242-0badcafe" in caplog.text
    assert f"resumed run {owner(finished)} from {step} at step 2" in capsys.readouterr().out
    assert summary["steps"] == 3 and [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]


@pytest.fixture
def more_shards(data_dir, tmp_path) -> Path:
    """The shards plus one more: the validation shard becomes training data."""
    out = Path(shutil.copytree(data_dir, tmp_path / "data"))
    build_shards(["an extra document. " * 50] * 8, tmp_path / "extra", docs_per_row_group=4, row_groups_per_shard=1, val_docs=4)
    shutil.copy(list_shards(tmp_path / "extra")[0], out / "shard_00004.parquet")
    return out


def test_resume_on_a_changed_shard_set_needs_allow_new_shards(finished, more_shards, tokenizer_dir, tmp_path):
    run = copy_of(finished, tmp_path)
    with pytest.raises(CheckpointError) as refused:
        base_train.main(tiny(more_shards, tokenizer_dir, run, "--resume", "--num-iterations", "3"))
    assert ("added shard_00004.parquet; the validation shard was shard_00003.parquet, now shard_00004.parquet"
            in str(refused.value) and "--allow-new-shards" in str(refused.value))
    assert find_latest(run / "checkpoints").name == "step_000002", "nothing was written"

    summary = base_train.main(tiny(more_shards, tokenizer_dir, run, "--resume", "--num-iterations", "3", "--allow-new-shards"))
    assert summary["steps"] == 3
    assert read_meta(run)["shards"]["names"][-1] == "shard_00004.parquet", "later checkpoints record the new set"
