"""The report card, built from hand-written runs roots shaped like the stages' own output.

Two pipelines: "bf16" (all four stages and their evaluations, on an H100) and "p100" (fp16 with a
GradScaler, emulated: base and sft done, sft not evaluated, mid never run, rl still running with a
half-written last line and no summary.json yet).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from nanochat.precision import GB, DeviceInfo, plan_for
from nanochat.report import main

H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 80 * GB)
BF16_PLAN = plan_for(H100).to_dict()
FP16_PLAN = plan_for(H100, emulate="p100").to_dict()  # fp16 + GradScaler, no compile, efficient attention
DEPTH = 12
CHAT_TASKS = {"ARC-Easy": 0.3876, "ARC-Challenge": 0.2875, "MMLU": 0.3111, "GSM8K": 0.0250, "HumanEval": 0.0671}


def write_stage(root: Path, stage: str, summary: dict | None, evaluation: dict | None = None,
                steps: int = 40, val_key: str = "val_bpb", slower: float = 1.0) -> Path:
    folder = root / f"{stage}_d{DEPTH}"
    folder.mkdir(parents=True)
    records = [{"step": s, "loss": 4.0 / s ** (0.3 / slower), "tok_per_s": 5e5, "skipped": False} for s in range(1, steps + 1)]
    for r in records[9::10]:
        r[val_key] = r["loss"] * 0.9
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    if evaluation is not None:
        (folder / ("base_eval.json" if stage == "base" else "chat_eval.json")).write_text(json.dumps(evaluation))
    return folder


def base_eval(core: float, plan: dict) -> dict:
    tasks = {"hellaswag": {"accuracy": 0.4125, "centered": 0.2167, "n": 500},
             "arc_easy": {"accuracy": 0.5502, "centered": 0.4003, "n": 2376, "shots": 10}}
    return {"stage": "base_eval", "core": core, "tasks": tasks, "wall_time_s": 600.0, "plan": plan}


def chat_eval(tasks: dict[str, float], chatcore: float | None) -> dict:
    result = {"stage": "chat_eval", "tasks": {t: {"accuracy": a, "n": 100} for t, a in tasks.items()},
              "wall_time_s": 300.0, "plan": BF16_PLAN}
    if chatcore is not None:
        result["chatcore"] = chatcore
    return result


def train_summary(stage: str, plan: dict, wall: float, **numbers) -> dict:
    return {"stage": stage, "steps": 40, "tok_per_s": 523456.7, "mfu": 0.4321, "wall_time_s": wall,
            "params": 560_988_160, "peak_memory_gib": 61.234, "skipped_steps": 0, "loss_scale": None,
            "plan": plan, **numbers}


@pytest.fixture
def bf16_root(tmp_path) -> Path:
    root = tmp_path / "bf16" / "runs"
    write_stage(root, "base", train_summary("base", BF16_PLAN, 3723, steps=1200, final_loss=2.8765, val_bpb=0.8123),
                base_eval(0.2219, BF16_PLAN))
    write_stage(root, "mid", train_summary("mid", BF16_PLAN, 1800, final_loss=1.9876, val_loss=1.8765),
                chat_eval(CHAT_TASKS, 0.0730), val_key="val_loss")
    sft_tasks = {t: a + 0.0100 for t, a in CHAT_TASKS.items()}
    write_stage(root, "sft", train_summary("sft", BF16_PLAN, 900, final_loss=1.5432, val_loss=1.6543),
                chat_eval(sft_tasks, 0.0912), val_key="val_loss")
    write_stage(root, "rl", train_summary("rl", BF16_PLAN, 1200, final_loss=0.1234, mean_reward=0.4567, pass_at_1=0.0455),
                {**chat_eval({"GSM8K": 0.0455}, None), "wall_time_s": 277.0}, val_key="reward")
    return root


@pytest.fixture
def p100_root(tmp_path) -> Path:
    root = tmp_path / "p100" / "runs"
    write_stage(root, "base", train_summary("base", FP16_PLAN, 7200, final_loss=2.9012, val_bpb=0.8345,
                                            skipped_steps=7, loss_scale=32768.0, mfu=None, peak_memory_gib=15.5),
                base_eval(0.2101, FP16_PLAN), slower=1.05)
    write_stage(root, "sft", train_summary("sft", FP16_PLAN, 1000, final_loss=1.6001, val_loss=1.7002),
                val_key="val_loss", slower=1.05)
    rl = write_stage(root, "rl", None, val_key="reward")  # still running
    with (rl / "metrics.jsonl").open("a") as f:
        f.write('{"step": 41, "lo')
    return root


def image_links(md: Path) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.read_text())


def table(text: str, heading: str) -> dict[str, list[str]]:
    """The markdown table right after `heading`, as {first cell: the other cells}."""
    lines = text.split(heading + "\n", 1)[1].lstrip("\n").splitlines()
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return {cells[0]: cells[1:] for cells in rows[:1] + rows[2:]}  # rows[1] is the |---| line


# -----------------------------------------------------------------------------
def test_card_shows_every_stage_and_the_cost(bf16_root):
    md = main(["--runs-dir", str(bf16_root), "--gpu-hourly-cost", "2", "--no-mlflow"])
    assert md == bf16_root / "report" / "report.md"
    text = md.read_text()

    assert text.startswith("# nanochat report card: bf16\n")
    assert "Stages: base ok, mid ok, sft ok, rl ok" in text
    # precision plan of each stage and each evaluation
    assert "| base | NVIDIA H100 80GB HBM3 | 9.0 | bfloat16 | off | on | flash | - |" in text
    assert "| sft eval | NVIDIA H100 80GB HBM3 | 9.0 | bfloat16 | off | on | flash | - |" in text
    assert "- torch: " in text and "- CPUs: " in text and "- Python: " in text
    # training: steps, params, final loss, val bpb, val loss, tok/s, MFU, memory, skipped, scale, wall time
    assert "| base | 1,200 | 561.0M | 2.8765 | 0.8123 | - | 523,457 | 43.2% | 61.23 GiB | 0 | - | 1h02m03s |" in text
    assert "| mid | 40 | 561.0M | 1.9876 | - | 1.8765 | 523,457 | 43.2% | 61.23 GiB | 0 | - | 30m00s |" in text
    assert "| sft | 40 | 561.0M | 1.5432 | - | 1.6543 |" in text
    assert "- rl also recorded: mean_reward 0.4567, pass_at_1 0.0455" in text
    # evaluation: CORE per task, chat tasks per stage
    assert "| hellaswag | 0.4125 | 0.2167 | 500 |" in text and "CORE: 0.2219" in text
    assert "### Chat evaluation (mid)" in text and "| ARC-Easy | 0.3876 | 100 |" in text
    assert "### Chat evaluation (sft)" in text and "| ARC-Easy | 0.3976 | 100 |" in text
    assert "ChatCORE: 0.0730" in text and "ChatCORE: 0.0912" in text
    # summary: metric rows x stage columns, in upstream's task order
    summary = table(text, "## Summary")
    assert list(summary)[:8] == ["Metric", "CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "ChatCORE"]
    assert summary["Metric"] == ["BASE", "MID", "SFT", "RL"]
    assert summary["CORE"] == ["0.2219", "-", "-", "-"]
    assert summary["GSM8K"] == ["-", "0.0250", "0.0350", "0.0455"]
    assert summary["mean_reward"] == ["-", "-", "-", "0.4567"]
    # 3723+600 + 1800+300 + 900+300 + 1200+277 s = 9100 s = 2.53 h
    assert summary["Wall time (train + eval)"] == ["1h12m03s", "35m00s", "20m00s", "24m37s"]
    assert "Total wall time: 2h31m40s\n" in text
    assert "## Time budget" not in text  # no speedrun.json: not a speedrun
    assert "Cost: $5.06 (2.53 GPU-hours x $2/GPU-hour)" in text

    links = image_links(md)
    assert set(links) == {"loss_base.png", "loss_mid.png", "loss_sft.png", "loss_rl.png", "eval.png"}
    assert all((md.parent / link).stat().st_size > 1000 for link in links)


def test_missing_and_unfinished_stages_are_reported_not_fatal(p100_root):
    text = main(["--runs-dir", str(p100_root), "--no-mlflow"]).read_text()
    assert "Stages: base ok, mid missing, sft ok, rl ok" in text
    assert f"- mid: missing (no mid_d12 folder in {p100_root})" in text
    assert "rl: no summary.json" in text and "skipped 1 unreadable line(s)" in text
    assert "Not evaluated: sft, rl." in text
    assert "| base | Tesla P100-PCIE-16GB | 6.0 | float16 | on | off | efficient | p100 |" in text
    assert "emulated on NVIDIA H100 80GB HBM3" in text  # the plan's reason
    assert "| base | 40 | 561.0M | 2.9012 | 0.8345 | - | 523,457 | - | 15.50 GiB | 7 | 32768 | 2h00m00s |" in text
    assert "| rl | - | - | - | - | - | - | - | - | - | - | - |" in text
    assert "Total wall time: 2h26m40s (rl recorded no wall time)" in text
    assert "Cost: not given" in text
    assert "loss_rl.png" in image_links(p100_root / "report" / "report.md")  # the 40 complete steps


def test_empty_runs_root(tmp_path):
    text = main(["--runs-dir", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"), "--no-mlflow"]).read_text()
    assert "Stages: base missing, mid missing, sft missing, rl missing" in text
    assert "No stages found." in text and "does not exist" in text
    assert "Total wall time: -" in text


def test_comparison_agrees_with_the_cards_and_mlflow(bf16_root, p100_root, tmp_path):
    out = tmp_path / "compare"
    md = main(["--runs-dir", f"bf16={bf16_root}", "--runs-dir", f"p100={p100_root}", "--out", str(out),
               "--gpu-hourly-cost", "1.5"])
    assert md == out / "report.md"
    text = md.read_text()
    assert "# nanochat pipeline comparison: bf16 vs p100" in text
    assert "[bf16](bf16/report.md)" in text and "[p100](p100/report.md)" in text

    base = table(text, "## base")
    assert base["Metric"] == ["bf16", "p100"]
    assert base["Plan"] == ["NVIDIA H100 80GB HBM3 (sm 9.0) bfloat16",
                            "Tesla P100-PCIE-16GB (sm 6.0) float16 + GradScaler, emulating p100"]
    assert base["CORE"] == ["0.2219", "0.2101"] and base["Val bpb"] == ["0.8123", "0.8345"]
    assert base["Skipped fp16 steps"] == ["0", "7"]
    assert table(text, "## mid")["Val loss"] == ["1.8765", "missing"]
    assert table(text, "## Totals")["Cost"] == ["$3.79", "$3.67"]  # 9100 s and 8800 s at $1.5/h

    # two routes to each number: the comparison column and the pipeline's own card agree
    card = table((out / "bf16" / "report.md").read_text(), "## Summary")
    column = card["Metric"].index("SFT")
    for title, values in table(text, "## sft").items():
        if title not in ("Metric", "Plan"):
            assert values[0] == card[title][column], title

    links = image_links(md)
    assert set(links) == {f"compare_{s}_loss.png" for s in ("base", "mid", "sft", "rl")}
    assert all((out / link).exists() for link in links)
    for label in ("bf16", "p100"):
        assert all((out / label / link).exists() for link in image_links(out / label / "report.md"))

    # MLflow: the default store is next to the first runs root
    client = MlflowClient(f"sqlite:///{bf16_root / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("nanochat").experiment_id])
    assert run.info.run_name == "report" and run.info.status == "FINISHED"
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "compare_base_loss.png", "bf16", "p100"} <= top
    assert {"p100/report.md", "p100/loss_base.png", "p100/eval.png"} <= {
        a.path for a in client.list_artifacts(run.info.run_id, "p100")}
    metrics = run.data.metrics
    assert metrics["bf16.base.core"] == pytest.approx(0.2219)
    assert metrics["p100.base.skipped_steps"] == 7
    assert metrics["bf16.sft.ARC-Easy"] == pytest.approx(0.3976)
    assert metrics["bf16.rl.mean_reward"] == pytest.approx(0.4567)
    assert metrics["bf16.total.cost_usd"] == pytest.approx(9100 / 3600 * 1.5)
    assert run.data.params["runs.p100"] == str(p100_root)


def test_speedrun_card_states_planned_against_actual_time_and_the_overrun(tmp_path):
    stages = {"tokenizer": {"planned_s": 8.0, "seconds": 6.0}, "base": {"planned_s": 100.0, "seconds": 131.0},
              "chat_eval": {"planned_s": 20.0, "seconds": 19.0}, "report": {"planned_s": 8.0, "seconds": None}}
    (tmp_path / "speedrun.json").write_text(json.dumps({"budget_s": 140.0, "stages": stages}))
    text = main(["--runs-dir", str(tmp_path), "--no-mlflow"]).read_text()
    rows = table(text, "## Time budget")
    assert rows["Stage"] == ["Planned", "Actual", "Over"]
    assert rows["tokenizer"] == ["0m08s", "0m06s", "-0m02s"] and rows["base"] == ["1m40s", "2m11s", "+0m31s"]
    assert rows["report"] == ["0m08s", "running", "-"]
    assert rows["total"] == ["2m20s", "2m36s", "+0m16s"]  # 6 + 131 + 19 s spent before the card
    assert ("Speedrun: 2m36s of 2m20s (report still running as this card was written): over the budget by 0m16s (11%)."
            in text)
