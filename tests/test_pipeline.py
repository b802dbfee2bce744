"""The whole pipeline on CPU with a tiny model: base -> mid -> SFT -> RL, each stage from the
previous stage's checkpoint, fp16 + GradScaler where asked, the Ray driver for a chat stage, and
the report card with every stage's metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nanochat import checkpoint, report
from nanochat.runlog import read_metrics
from nanochat.scripts import base_eval, base_train, chat_eval, chat_rl, chat_sft, mid_train
from ray_jobs import train as ray_train

MIXTURE = "identity:60,arithmetic:120,spelling:60,mmlu_aux:60"


def common(tokenizer_dir: Path, *extra: str) -> list[str]:
    return ["--device", "cpu", "--tokenizer-dir", str(tokenizer_dir), "--depth", "2", *extra]


def finetune_args(tokenizer_dir: Path, runs: Path, stage: str, previous: str, *extra: str) -> list[str]:
    return common(tokenizer_dir, "--init-from", str(runs / f"{previous}_d2"), "--run-dir", str(runs / f"{stage}_d2"),
                  "--mixture", MIXTURE, "--val-conversations", "16", "--sample-every", "-1", "--eval-every", "-1", "--save-every", "-1", *extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir, tokenizer_dir) -> Path:
    """A runs root with base_d2, mid_d2, sft_d2 and rl_d2 trained by the plain scripts (a context of
    128 tokens: RL's word problems and the eval prompts must fit in what the model was trained on)."""
    root = tmp_path_factory.mktemp("runs")
    base_train.main(common(tokenizer_dir, "--data-dir", str(data_dir), "--run-dir", str(root / "base_d2"), "--head-dim", "32", "--sample-every", "-1",
                           "--max-seq-len", "128", "--device-batch-size", "4", "--total-batch-size", "512",
                           "--num-iterations", "20", "--eval-tokens", "1024", "--eval-every", "-1", "--save-every", "-1"))
    mid_train.main(finetune_args(tokenizer_dir, root, "mid", "base", "--device-batch-size", "4", "--total-batch-size", "512",
                                 "--num-iterations", "12"))
    # SFT and RL in fp16 on the CPU: the same GradScaler step as every other stage
    chat_sft.main(finetune_args(tokenizer_dir, root, "sft", "mid", "--device-batch-size", "4", "--num-iterations", "4",
                                "--dtype", "float16"))
    chat_rl.main(common(tokenizer_dir, "--init-from", str(root / "sft_d2"), "--run-dir", str(root / "rl_d2"),
                        "--num-iterations", "2", "--examples-per-step", "2", "--num-samples", "4", "--device-batch-size", "2",
                        "--max-new-tokens", "16", "--eval-problems", "4", "--dtype", "float16"))
    evaluation = ("--device", "cpu", "--tokenizer-dir", str(tokenizer_dir))
    base_eval.main([*evaluation, "--checkpoint", str(root / "base_d2"), "--tasks", "arc_easy,winogrande", "--max-per-task", "4"])
    for stage in ("sft", "rl"):
        chat_eval.main([*evaluation, "--checkpoint", str(root / f"{stage}_d2"), "--tasks", "arc_easy,spelling",
                        "--max-problems", "4", "--max-new-tokens", "16"])
    return root


def test_each_stage_starts_from_the_previous_one(runs):
    for stage, previous in (("mid", "base"), ("sft", "mid"), ("rl", "sft")):
        ckpt = checkpoint.find_latest(runs / f"{stage}_d2" / "checkpoints")
        meta = checkpoint.load_checkpoint(ckpt, restore_rng=False)["meta"]
        assert meta["stage"] == stage
        assert Path(meta["init_from"]).parent.parent == runs / f"{previous}_d2"
    mid = read_metrics(runs / "mid_d2" / "metrics.jsonl")
    assert len(mid) == 12 and mid[-1]["val_loss"] > 0
    assert mid[-1]["loss"] < mid[0]["loss"], "mid-training did not lower the loss"


def test_fp16_stages_use_the_grad_scaler(runs):
    sft = read_metrics(runs / "sft_d2" / "metrics.jsonl")
    assert all(r["loss_scale"] is not None for r in sft) and sum(r["skipped"] for r in sft) < len(sft)
    rl = json.loads((runs / "rl_d2" / "summary.json").read_text())
    assert rl["stage"] == "rl" and rl["steps"] == 2 and rl["loss_scale"] is not None
    assert 0 <= rl["final_reward"] <= 1 and 0 <= rl["pass_at_1"] <= 1


def test_sft_stage_through_the_ray_driver(runs, tokenizer_dir, tmp_path, local_ray):
    summary = ray_train.main(["--stage", "sft", *finetune_args(tokenizer_dir, runs, "sft", "mid", "--device-batch-size", "2",
                                                                "--num-iterations", "4", "--save-every", "2"),
                              "--num-workers", "2", "--storage-path", str(tmp_path / "ray"), "--name", "sft_ray"])
    assert summary["stage"] == "sft" and summary["steps"] == 4 and summary["val_loss"] > 0
    latest = checkpoint.find_latest(tmp_path / "ray" / "sft_ray")
    state = checkpoint.load_checkpoint(latest, restore_rng=False)
    assert state["meta"]["stage"] == "sft" and len(state["loader_state"]["workers"]) == 2


def test_report_card_has_every_stage(runs):
    card = report.main(["--runs-dir", str(runs), "--no-mlflow"]).read_text()
    stages = report.collect(runs).stages
    assert set(stages) == {"base", "mid", "sft", "rl"}
    assert report.fmt(stages["base"].summary["val_bpb"], "float") in card
    assert report.fmt(stages["mid"].summary["val_loss"], "float") in card
    assert report.fmt(stages["sft"].summary["val_loss"], "float") in card
    assert report.fmt(stages["rl"].summary["pass_at_1"], "float") in card
    assert report.fmt(stages["base"].evaluation["core"], "float") in card
    for stage in ("sft", "rl"):
        assert report.fmt(stages[stage].evaluation["tasks"]["spelling"]["accuracy"], "float") in card


@pytest.mark.parametrize("module", [base_train, mid_train, chat_sft, chat_rl, base_eval, chat_eval])
def test_every_stage_prints_its_help(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "--dtype" in capsys.readouterr().out
