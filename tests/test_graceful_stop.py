"""Checkpoints that do not stall training and a SIGTERM that loses nothing: the background writer, the
step-time split in the metrics, and a real SIGTERM to a running base_train followed by --resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from nanochat.checkpoint import BackgroundWriter, CheckpointError, find_latest, load_checkpoint, snapshot
from nanochat.runlog import read_metrics
from nanochat.scripts import base_train
from nanochat.train.step import PHASES


def train_args(data_dir: Path, tokenizer_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "--device", "cpu", "--data-dir", str(data_dir), "--tokenizer-dir", str(tokenizer_dir), "--run-dir", str(run_dir),
        "--depth", "1", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "256",
        "--eval-tokens", "256", "--sample-every", "-1", "--eval-every", "-1", "--report-every", "3", *extra,
    ]


def test_background_writer_writes_the_state_of_the_step_it_was_given(tmp_path):
    model = nn.Linear(4, 4)
    at_step_1 = model.weight.detach().clone()
    writer = BackgroundWriter()
    writer.submit(tmp_path, snapshot(1, model=model, optimizer=None, scaler=None, loader_state={"row": 1}, meta={}))
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on while step 1 is written: the file must not see this
    assert writer.wait() == tmp_path / "step_000001"
    saved = torch.load(tmp_path / "step_000001" / "model.pt")
    assert torch.equal(saved["weight"], at_step_1)
    assert load_checkpoint(find_latest(tmp_path), restore_rng=False)["loader_state"] == {"row": 1}


def test_background_writer_reports_a_failed_write(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    writer = BackgroundWriter()
    writer.submit(blocker, snapshot(1, model=nn.Linear(2, 2), optimizer=None, scaler=None, loader_state=None, meta={}))
    with pytest.raises(CheckpointError, match="in the background failed"):
        writer.wait()


def test_sigterm_saves_at_the_next_step_and_resume_continues(data_dir, tokenizer_dir, tmp_path):
    run = tmp_path / "run"
    args = train_args(data_dir, tokenizer_dir, run, "--num-iterations", "400", "--save-every", "-1")
    proc = subprocess.Popen([sys.executable, "-m", "nanochat.scripts.base_train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 180
    while not (run / "metrics.jsonl").exists() or len(read_metrics(run / "metrics.jsonl")) < 4:
        assert proc.poll() is None and time.time() < deadline, "the training subprocess ended before the signal"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, output

    logged = [r["step"] for r in read_metrics(run / "metrics.jsonl")]
    stopped_at = logged[-1]
    assert stopped_at < 400, "the signal came too late to test a stop"
    assert find_latest(run / "checkpoints") == run / "checkpoints" / f"step_{stopped_at:06d}", "saved at the step boundary"
    assert f"stopped by SIGTERM after step {stopped_at}" in output and "--resume" in output

    summary = base_train.main(train_args(data_dir, tokenizer_dir, run, "--num-iterations", str(stopped_at + 6),
                                         "--save-every", "-1", "--resume"))
    assert summary["steps"] == stopped_at + 6
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, stopped_at + 7)), "continued from the saved step, each step once"
    # every --report-every steps the record carries the step-time split
    split = [r for r in records if r["step"] % 3 == 0]
    assert split and all(r[f"{phase}_s"] >= 0 for r in split for phase in PHASES)
    assert all("compute_s" not in r for r in records if r["step"] % 3)
