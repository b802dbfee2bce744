"""base_train and base_loss end to end on CPU, through their real command lines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanochat.checkpoint import find_latest
from nanochat.dataloader import DataLoader
from nanochat.dataset import list_shards, split_shards
from nanochat.errors import UsageError
from nanochat.eval.bpb import eval_steps, split_tokens
from nanochat.runlog import read_metrics
from nanochat.scripts import base_loss, base_train


def train_args(data_dir: Path, tokenizer_dir: Path, run_dir: Path, *extra: str, eval_tokens: str | None = "1024") -> list[str]:
    return [
        "--device", "cpu", "--data-dir", str(data_dir), "--tokenizer-dir", str(tokenizer_dir), "--run-dir", str(run_dir),
        "--depth", "2", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size", "4",
        "--total-batch-size", "512", *(["--eval-tokens", eval_tokens] if eval_tokens else []), "--sample-every", "-1", *extra,
    ]


def test_training_learns_and_base_loss_reports_bpb(data_dir, tokenizer_dir, tmp_path):
    run = tmp_path / "run"
    summary = base_train.main(train_args(data_dir, tokenizer_dir, run, "--num-iterations", "60", "--eval-every", "30", "--save-every", "-1"))
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    assert len(losses) == 60
    start, end = sum(losses[:3]) / 3, sum(losses[-5:]) / 5
    assert end < 0.7 * start, f"loss did not fall: {start:.3f} -> {end:.3f}"
    assert summary["skipped_steps"] == 0 and summary["val_bpb"] > 0

    result = base_loss.main(["--device", "cpu", "--data-dir", str(data_dir), "--tokenizer-dir", str(tokenizer_dir),
                             "--run-dir", str(run), "--device-batch-size", "4", "--eval-tokens", "1024", "--max-new-tokens", "4"])
    assert 0 < result["val_bpb"] < 10 and 0 < result["train_bpb"] < 10
    # base_loss evaluates the saved model on the same val tokens as training's final eval
    assert abs(result["val_bpb"] - summary["val_bpb"]) < 1e-4
    assert all(isinstance(text, str) for text in result["samples"].values())


def test_killed_run_resumes_to_the_same_parameters(data_dir, tokenizer_dir, tmp_path):
    schedule = ["--num-iterations", "40", "--save-every", "4", "--eval-every", "-1", "--keep-last", "20"]
    reference = tmp_path / "reference"
    base_train.main(train_args(data_dir, tokenizer_dir, reference, *schedule))

    # the same run in a subprocess, SIGKILLed as soon as its step-8 checkpoint exists
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "nanochat.scripts.base_train", *train_args(data_dir, tokenizer_dir, killed, *schedule)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step_000008").exists():
        assert proc.poll() is None and time.time() < deadline, "the training subprocess ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted_at = find_latest(killed / "checkpoints")
    assert interrupted_at is not None and interrupted_at.name != "step_000040", "the kill came too late to test a resume"

    summary = base_train.main(train_args(data_dir, tokenizer_dir, killed, *schedule, "--resume"))
    assert summary["steps"] == 40
    ref = torch.load(reference / "checkpoints" / "step_000040" / "model.pt")
    got = torch.load(killed / "checkpoints" / "step_000040" / "model.pt")
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref), "the resumed run diverged from the uninterrupted one"
    steps = [r["step"] for r in read_metrics(killed / "metrics.jsonl")]
    assert steps == list(range(1, 41)), "the metrics log must be continuous, each step once"


def test_total_batch_must_divide(data_dir, tokenizer_dir, tmp_path):
    with pytest.raises(ValueError, match="not a multiple of device batch x seq len x workers = 256"):
        base_train.main(train_args(data_dir, tokenizer_dir, tmp_path, "--total-batch-size", "1000", "--num-iterations", "1"))


def test_evaluation_reads_the_validation_split_at_most_once(data_dir, tokenizer, capsys):
    """More --eval-tokens than the split holds: the full batches of one pass, said once. Two routes to that
    count: the split's tokens counted, and the loader, whose stream starts over on the batch after them."""
    shards = split_shards(list_shards(data_dir), "val")
    held = split_tokens(shards, tokenizer, limit=10**12)
    steps, rows = eval_steps(10**9, 4, 64, shards, tokenizer)
    assert rows == 4 and steps == held // (4 * 65)  # rows of T + 1 tokens
    assert capsys.readouterr().out == (f"eval: --eval-tokens 1,000,000,000 > the validation split's {held:,} tokens: "
                                       f"evaluating {steps * 4 * 64:,} ({steps} batches of 4 x 64)\n")
    loader = DataLoader(shards, tokenizer, 4, 64, prefetch=0)
    for _ in range(steps):
        next(loader)
    assert loader.epoch == 0
    next(loader)
    assert loader.epoch == 1
    # fewer tokens asked than the split holds: as asked, nothing said
    assert eval_steps(1024, 4, 64, shards, tokenizer) == (4, 4) and capsys.readouterr().out == ""
    # a split smaller than one batch (a small corpus at a big GPU's micro-batch): one batch of the rows it holds
    assert eval_steps(10**9, 10**6, 64, shards, tokenizer) == (1, held // 65)
    with pytest.raises(UsageError, match=f"holds {held:,} tokens, fewer than one row of {held + 1}: lower --max-seq-len"):
        eval_steps(10**9, 4, held, shards, tokenizer)


def test_default_eval_tokens_read_the_validation_split_once(data_dir, tokenizer_dir, tokenizer, tmp_path, capsys):
    summary = base_train.main(train_args(data_dir, tokenizer_dir, tmp_path / "run", "--num-iterations", "2",
                                         "--save-every", "-1", eval_tokens=None))  # the default: 10,485,760
    out = capsys.readouterr().out
    assert out.count("eval: --eval-tokens 10,485,760 > the validation split's ") == 1
    held = split_tokens(split_shards(list_shards(data_dir), "val"), tokenizer, limit=10**12)
    assert f"the validation split's {held:,} tokens: evaluating {held // (4 * 65) * 4 * 64:,}" in out
    assert summary["val_bpb"] > 0
