"""ray_jobs/speedrun_p100.sh end to end on CPU, tiny: killed in base training, rerun (resumes from
its checkpoint, finishes every stage, writes the report card), run again (skips everything)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from nanochat.checkpoint import find_latest, load_checkpoint
from nanochat.runlog import read_metrics
from ray_jobs.speedrun import STAGES, split_budget

REPO = Path(__file__).resolve().parent.parent
MIXTURE = "identity:40,arithmetic:80,spelling:40"


def env_for(run: Path, data_dir: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "NANOCHAT_RUN": str(run), "NANOCHAT_DATA": str(data_dir),
            "NANOCHAT_DEVICE": "cpu", "NANOCHAT_DEPTH": "1", "NANOCHAT_SEQ_LEN": "64", "NANOCHAT_VOCAB": "512",
            "NANOCHAT_DEVICE_BATCH": "4", "NANOCHAT_TOTAL_BATCH": "256", "NANOCHAT_SAVE_EVERY": "5",
            "NANOCHAT_EVAL_EXAMPLES": "2", "NANOCHAT_TIME_BUDGET": "90s",
            "NANOCHAT_MID_MIXTURE": MIXTURE, "NANOCHAT_SFT_MIXTURE": MIXTURE}


def speedrun(env: dict[str, str]) -> subprocess.CompletedProcess:
    out = subprocess.run(["bash", str(REPO / "ray_jobs" / "speedrun_p100.sh")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out


def test_budget_split_follows_the_shares():
    todo = [t for t, _ in STAGES]
    split = split_budget(1000.0, todo)
    assert sum(split.values()) == pytest.approx(1000.0) and split["base"] == pytest.approx(700.0)
    # time left over by finished stages goes to the rest, in proportion
    rest = split_budget(500.0, ["mid", "sft"])
    assert rest["mid"] / rest["sft"] == pytest.approx(12 / 7)


@pytest.fixture(scope="module")
def killed_and_rerun(tmp_path_factory, data_dir):
    run = tmp_path_factory.mktemp("speedrun")
    env = env_for(run, data_dir)
    proc = subprocess.Popen(["bash", str(REPO / "ray_jobs" / "speedrun_p100.sh")], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpts = run / "runs" / "base_d1" / "checkpoints"
    deadline = time.time() + 300
    # the checkpoint written when the time budget fixed the horizon (3 warm-up + 10 timed steps) carries it
    while not (ckpts / "step_000013").exists():
        assert proc.poll() is None and time.time() < deadline, "the speedrun ended before base training could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the wrapper, the speedrun and base_train alike
    proc.wait()
    killed_at = load_checkpoint(find_latest(ckpts), restore_rng=False)
    assert not (run / "stages" / "base.done").exists()
    return run, env, killed_at, speedrun(env)


def test_rerun_resumes_base_and_completes_every_stage(killed_and_rerun):
    run, _, killed_at, out = killed_and_rerun
    assert f"resumed from {run / 'runs' / 'base_d1' / 'checkpoints'}" in out.stdout
    summary = json.loads((run / "runs" / "base_d1" / "summary.json").read_text())
    # the horizon fixed before the kill was kept by the resumed run
    assert summary["steps"] == killed_at["meta"]["time_budget"]["num_iterations"] > killed_at["step"]
    assert [r["step"] for r in read_metrics(run / "runs" / "base_d1" / "metrics.jsonl")] == list(range(1, summary["steps"] + 1))
    for stage, _ in STAGES:  # NANOCHAT_DATA given: no shards to build, so no marker for them
        assert (run / "stages" / f"{stage}.done").exists() == (stage != "shards"), stage
    card = (run / "runs" / "report" / "report.md").read_text()
    assert "base" in card and "sft" in card
    assert json.loads((run / "runs" / "sft_d1" / "chat_eval.json").read_text())["tasks"]
    assert "speedrun plan" in out.stdout and "tokens per parameter" in out.stdout


def test_second_invocation_skips_finished_stages(killed_and_rerun):
    run, env, _, _ = killed_and_rerun
    card = run / "runs" / "report" / "report.md"
    before = card.stat().st_mtime
    out = speedrun(env)
    assert out.stdout.count("done (skipped)") == len(STAGES) and "=== " not in out.stdout
    assert card.stat().st_mtime == before
