"""The speedrun as a user pastes it: the tiny CPU recipe the demo prints (tokenizer -> base -> base eval ->
mid -> SFT -> chat eval -> report card on the demo's shards), killed in base training and rerun (it resumes
from its checkpoint with the horizon its budget fixed, and the time kept is taken off the budget), lands
within 15% of its budget with every stage finished and the report card stating planned against actual
time; a third invocation skips everything."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanochat import dataset
from nanochat.checkpoint import find_latest, load_checkpoint
from nanochat.errors import UsageError
from nanochat.report import fmt
from nanochat.runlog import read_metrics
from nanochat.scripts import demo
from nanochat.train.budget import parse_duration
from ray_jobs import speedrun
from ray_jobs.speedrun import FLOOR_S, STAGES, SpeedrunConfig, split_budget, stage_command

REPO = Path(__file__).resolve().parent.parent
RUN_STAGES = [t for t, _ in STAGES if t != "shards"]  # the recipe brings its shards (--data)


def run_printed(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    out = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out


def test_each_stage_gets_its_floor_then_its_share_of_the_rest():
    todo = [t for t, _ in STAGES]
    split = split_budget(1000.0, todo)
    spare = 1000.0 - sum(FLOOR_S.values())
    assert sum(split.values()) == pytest.approx(1000.0)
    assert split["base"] == pytest.approx(FLOOR_S["base"] + 0.70 * spare) and split["report"] == FLOOR_S["report"]
    # time left over by finished stages goes to the rest, in proportion
    rest = split_budget(500.0, ["mid", "sft"])
    assert (rest["mid"] - FLOOR_S["mid"]) / (rest["sft"] - FLOOR_S["sft"]) == pytest.approx(12 / 7)
    # overrun: the stages left get their floors, never less (never a negative plan)
    assert split_budget(-133.0, ["sft", "chat_eval"]) == {"sft": FLOOR_S["sft"], "chat_eval": FLOOR_S["chat_eval"]}
    # on a machine where the stages that cannot adapt took half their plan, their floors halve
    assert split_budget(0.0, ["sft", "chat_eval"], pace=0.5) == {"sft": FLOOR_S["sft"], "chat_eval": FLOOR_S["chat_eval"] / 2}


def test_a_training_stage_never_gets_a_token_time_budget():
    def budget(**measured: float) -> str:
        argv = stage_command(SpeedrunConfig(), "sft", FLOOR_S["sft"], **measured)
        return argv[argv.index("--time-budget") + 1]

    assert budget(startup_s=60.0) == f"{speedrun.MIN_TIME_BUDGET_S:.0f}s"
    # what an earlier training stage's calibration took, with a margin: less would be refused
    assert budget(startup_s=10.0, least_s=31.0) == "31s"


def test_a_budget_below_the_floors_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(UsageError, match=r"--time-budget 1m00s is too small for the speedrun: .* give --time-budget \d+m or more"):
        speedrun.main(["--time-budget", "1m", "--run", str(tmp_path / "run"), "--data", str(tmp_path)])
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def printed_run(tmp_path_factory):
    """The demo's printed speedrun command on the demo's shards, in a fresh $NANOCHAT_BASE_DIR: SIGKILLed
    once base training has fixed its horizon (3 warm-up + 10 timed steps, then a checkpoint), then run
    again to the end. Returns (run root, the killed checkpoint, the rerun's output, both runs' wall time,
    the budget, argv, env)."""
    home = tmp_path_factory.mktemp("home") / "nanochat"
    out = tmp_path_factory.mktemp("demo") / "demo"
    files = demo.DemoFiles(out, base=out / "run", chat=out / "sft")
    dataset.main(["build", "--source", "embedded", "--out", str(files.data)])  # the demo's shards
    printed = demo.speedrun_command(demo.DemoConfig(), files)
    argv = [sys.executable, *printed[1:]]  # `python` of the printed line: this interpreter
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("NANOCHAT_")},
           "NANOCHAT_BASE_DIR": str(home), "PYTHONUNBUFFERED": "1"}
    run = home / "speedrun"
    ckpts = run / "runs" / f"base_d{demo.DemoConfig().depth}" / "checkpoints"
    log = home.parent / "killed.log"
    t0 = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while not (ckpts / "step_000013").exists():
        assert proc.poll() is None and time.time() < deadline, \
            f"the speedrun ended before base training could be killed:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the speedrun and base_train alike
    proc.wait()
    killed_at = load_checkpoint(find_latest(ckpts), restore_rng=False)
    assert not (run / "stages" / "base.done").exists()
    rerun = run_printed(argv, env)
    wall = time.monotonic() - t0
    return run, killed_at, rerun, wall, parse_duration(printed[printed.index("--time-budget") + 1]), argv, env


def test_printed_recipe_finishes_every_stage_within_15_percent_of_its_budget(printed_run):
    run, _, out, wall, budget, _, _ = printed_run
    for stage, _ in STAGES:
        assert (run / "stages" / f"{stage}.done").exists() == (stage in RUN_STAGES), stage
    assert 0.85 * budget <= wall <= 1.15 * budget, f"a {budget:.0f} s budget took {wall:.0f} s:\n{out.stdout[-3000:]}"
    assert "speedrun plan" in out.stdout and "tokens per parameter" in out.stdout
    assert json.loads((run / "runs" / "sft_d4" / "chat_eval.json").read_text())["tasks"]


def test_rerun_resumes_base_with_the_horizon_fixed_before_the_kill(printed_run):
    run, killed_at, out, _, _, _, _ = printed_run
    base = run / "runs" / "base_d4"
    assert re.search(rf"resumed run \S+ from {re.escape(str(base / 'checkpoints'))}/step_\d+ at step \d+", out.stdout)
    assert re.search(r"base .* to run, resumed after \d+ s kept", out.stdout)
    summary = json.loads((base / "summary.json").read_text())
    assert summary["steps"] == killed_at["meta"]["time_budget"]["num_iterations"] > killed_at["step"]
    assert [r["step"] for r in read_metrics(base / "metrics.jsonl")] == list(range(1, summary["steps"] + 1))


def test_report_card_states_planned_against_actual_time(printed_run):
    run, _, _, _, budget, _, _ = printed_run
    card = (run / "runs" / "report" / "report.md").read_text()
    assert "Stages: base ok, mid ok, sft ok" in card
    lines = card.split("## Time budget\n\n")[1].split("\n\n")[0].splitlines()[2:]  # below the header and |---|
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}
    assert list(rows) == [*RUN_STAGES, "total"]
    for stage in RUN_STAGES[:-1]:  # the card is written by the last stage: its own time is not in it yet
        marker = json.loads((run / "stages" / f"{stage}.done").read_text())
        assert rows[stage][:2] == [fmt(marker["planned_s"], "duration"), fmt(marker["seconds"], "duration")], stage
    assert rows["report"][1] == "running" and rows["total"][0] == fmt(budget, "duration")
    assert re.search(r"Speedrun: \S+ of \S+ \(report still running as this card was written\): (over|within)", card)


def test_third_invocation_skips_finished_stages(printed_run):
    run, _, _, _, _, argv, env = printed_run
    card = run / "runs" / "report" / "report.md"
    before = card.stat().st_mtime
    out = run_printed(argv, env)
    assert out.stdout.count("done (skipped)") == len(STAGES) and "=== " not in out.stdout
    assert card.stat().st_mtime == before
