"""The whole pipeline on one GPU inside a time budget; `ray_jobs/speedrun_p100.sh` runs this.

    # one P100 (or any GPU), 10 hours, depth 12, the embedded corpus
    NANOCHAT_TIME_BUDGET=10h bash ray_jobs/speedrun_p100.sh
    # submitted to a Ray cluster, pinned to an fp16 (P100/V100/T4) node (see docs/cluster.md)
    ray job submit --working-dir . --entrypoint-num-gpus 1 \\
        --entrypoint-label-selector '{"nanochat/precision": "fp16"}' -- bash ray_jobs/speedrun_p100.sh
    # tiny, on a CPU (the demo's model: `python -m nanochat.scripts.demo` prints this for its own files)
    python -m ray_jobs.speedrun --data ~/.cache/nanochat/demo/data --depth 4 --seq-len 128 --vocab 2048 \\
        --device-batch 8 --total-batch 1024 --mid-mixture identity:300,arithmetic:300,spelling:200 \\
        --sft-mixture identity:300,arithmetic:300,spelling:200 --time-budget 2m30s

Stages: shards -> tokenizer -> base -> base eval -> mid -> SFT -> chat eval -> report card. Each is
the project's own entry point (`python -m ...`, `--dtype auto`) in its own process, so the GPU memory
of one stage is free for the next. Each stage is planned its floor (FLOOR_S: what it takes at the
smallest sizes) plus its share (STAGES) of the rest, printed before anything runs; a budget below the
floors is refused. The training stages get their plan, less their start-up, as `--time-budget`; the
evaluation stages are sized to theirs; whatever a stage leaves over (or overruns) is re-split over the
stages still to come, none ever planned less than its floor. The report card states planned against
actual time per stage (`<run>/runs/speedrun.json`).

Resumable: a finished stage writes `$NANOCHAT_RUN/stages/<stage>.done` (its wall time) and is skipped
on the next invocation; the training stages always run with `--resume`, so an interrupted one goes on
from its latest checkpoint with the horizon its time budget fixed. The time already spent by finished
stages, and by an interrupted one up to its latest checkpoint (work the rerun keeps), is taken off the
budget.

Settings are the flags of SpeedrunConfig (`--help`; the defaults are the single-P100 run); each flag
takes its default from the environment variable NANOCHAT_<FLAG> when that is set (NANOCHAT_DEPTH=12,
NANOCHAT_TIME_BUDGET=10h, NANOCHAT_DATA=/shards, ...), so the shell wrapper needs no flags at all.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nanochat.checkpoint import find_latest, stage_run_dir
from nanochat.common import base_dir
from nanochat.config import option, parse_config
from nanochat.errors import UsageError, run_main
from nanochat.report import SPEEDRUN_FILE
from nanochat.train.budget import format_duration, least_budget_s, parse_duration

# (stage, share of the budget). Base training gets most: it is where the model learns; the
# evaluation shares are what 500 CORE examples per task / 200 chat problems per task take at depth 12.
STAGES: tuple[tuple[str, float], ...] = (
    ("shards", 0.01), ("tokenizer", 0.02), ("base", 0.70), ("base_eval", 0.04),
    ("mid", 0.12), ("sft", 0.07), ("chat_eval", 0.04), ("report", 0.0),
)
# Seconds each stage takes at the smallest sizes (the demo's model on a 2-core CPU): the start-up of its
# process (a torch import alone is seconds there), for a training stage the calibration of its time budget
# as well (13 steps, an evaluation, samples and checkpoints: nanochat/train/budget.py), for an evaluation
# 8 examples per task, for the report card its plots and MLflow run. A budget that cannot give every
# stage its floor is refused; a stage is never planned less.
FLOOR_S = {"shards": 5.0, "tokenizer": 4.0, "base": 30.0, "base_eval": 8.0, "mid": 25.0, "sft": 25.0,
           "chat_eval": 10.0, "report": 12.0}
TRAINING = {"base", "mid", "sft"}
# a training stage's time outside its --time-budget (interpreter and torch import, tokenizer and data
# load, the model's build before the budget's clock starts; the last checkpoint's write after it):
# this first guess until a training stage of this run has measured it (a guess off by seconds moves
# only the first training stage's end, and the stages after it take up the difference)
STARTUP_S = 10.0
# the least --time-budget a training stage is given, whatever its start-up took; once a training stage
# of this run has measured what its calibration and final evaluation took, that (with a margin) instead:
# a stage given less would refuse its budget (nanochat/train/budget.py) and stop the run
MIN_TIME_BUDGET_S = 10.0
CALIBRATION_MARGIN = 1.25


@dataclass
class SpeedrunConfig:
    time_budget: str = option("10h", "total wall time (6h, 90m, 45s, ...)")
    run: str = option("", "everything this run writes; empty = $NANOCHAT_BASE_DIR/speedrun")
    data: str = option("", "a directory of parquet shards; empty = build the embedded corpus")
    depth: int = option(12, "model depth")
    seq_len: int = option(2048, "context length")
    vocab: int = option(32768, "tokenizer vocabulary size")
    device_batch: int = option(4, "rows per micro-batch (4 fits 16 GB at depth 12)")
    total_batch: int = option(131072, "tokens per optimizer step")
    save_every: int = option(200, "checkpoint every N steps")
    device: str = option("", "cuda | cpu | mps; empty = auto")
    eval_examples: int | None = option(None, "examples per evaluation task; unset = sized to the eval stages' share")
    mid_mixture: str = option("", "mid-training mixture; empty = the stage's own")
    sft_mixture: str = option("", "SFT mixture; empty = the stage's own")

    @property
    def root(self) -> Path:
        return Path(self.run or base_dir() / "speedrun").resolve()

    @property
    def budget_s(self) -> float:
        return parse_duration(self.time_budget)

    @property
    def data_dir(self) -> Path:
        return Path(self.data).resolve() if self.data else self.root / "data"

    def stage_dir(self, stage: str) -> Path:
        return stage_run_dir(stage, self.depth, self.root / "runs")


def env_flags(env: Mapping[str, str]) -> list[str]:
    """The NANOCHAT_<FLAG> environment variables that are set, as flags (explicit flags after them win)."""
    names = [(f"--{f.name.replace('_', '-')}", f"NANOCHAT_{f.name.upper()}") for f in dataclasses.fields(SpeedrunConfig)]
    return [arg for flag, var in names if env.get(var) for arg in (flag, env[var])]


def marker(s: SpeedrunConfig, stage: str, state: str = "done") -> Path:
    """stages/<stage>.done once it finished; stages/<stage>.started while it runs (or was interrupted)."""
    return s.root / "stages" / f"{stage}.{state}"


def finished(s: SpeedrunConfig) -> dict[str, dict]:
    """The markers of the stages finished by earlier invocations: {"seconds", "planned_s", ...}."""
    return {stage: json.loads(marker(s, stage).read_text()) for stage, _ in STAGES if marker(s, stage).exists()}


def kept_s(s: SpeedrunConfig, stage: str) -> float:
    """Seconds an interrupted `stage` ran up to its latest checkpoint, over every earlier invocation: work
    its rerun keeps (it resumes there), so time taken off the budget. 0 for a stage never interrupted."""
    if not marker(s, stage, "started").exists():
        return 0.0
    started = json.loads(marker(s, stage, "started").read_text())
    latest = find_latest(s.stage_dir(stage) / "checkpoints") if stage in TRAINING else None
    last_run = max(0.0, latest.stat().st_mtime - started["started"]) if latest is not None else 0.0
    return started["kept_s"] + last_run


def split_budget(remaining_s: float, todo: list[str], pace: float = 1.0) -> dict[str, float]:
    """`remaining_s` over the stages in `todo`: each its floor, plus its share of what the floors leave
    (nothing when they take it all: then the run will overrun, and no stage gets less than its floor).
    `pace` scales the floors of the stages that do not adapt to their plan (all but training): how long
    such stages took here against their plan."""
    floors = {t: FLOOR_S[t] * (1.0 if t in TRAINING else pace) for t in todo}
    shares = dict(STAGES)
    spare = max(0.0, remaining_s - sum(floors.values()))
    total = sum(shares[t] for t in todo) or 1.0
    return {t: floors[t] + spare * shares[t] / total for t in todo}


def check_budget(s: SpeedrunConfig, stages: list[str]) -> None:
    """Refuses a budget smaller than the floors of the stages this run has (whatever is done already)."""
    least = sum(FLOOR_S[t] for t in stages)
    if s.budget_s < least:
        raise UsageError(
            f"--time-budget {format_duration(s.budget_s)} is too small for the speedrun: its stages ({', '.join(stages)}) "
            f"take at least {format_duration(least)} at the smallest sizes (each one's start-up, the evaluations, "
            f"and in each training stage the calibration of its time budget); give --time-budget "
            f"{math.ceil(least / 60)}m or more")


def plan_text(s: SpeedrunConfig, done: dict[str, float], kept: dict[str, float], todo_budget: dict[str, float]) -> str:
    rows = [f"{'stage':<10} {'share':>6} {'seconds':>9}  status"]
    for stage, share in STAGES:
        if stage in done:
            rows.append(f"{stage:<10} {share:>6.0%} {done[stage]:>9.0f}  done (skipped)")
        elif stage in todo_budget:
            resumed = f", resumed after {kept[stage]:.0f} s kept" if kept.get(stage) else ""
            rows.append(f"{stage:<10} {share:>6.0%} {todo_budget[stage]:>9.0f}  to run{resumed}")
    left = s.budget_s - sum(done.values()) - sum(kept.values())
    over = sum(todo_budget.values()) - left
    tail = f"\nover budget by {over:.0f} s: the stages left get their floors" if over > 1 else ""
    return (f"speedrun plan: {format_duration(s.budget_s)} in all, depth {s.depth}, data "
            f"{s.data_dir if s.data else 'embedded corpus'}, output {s.root}\n" + "\n".join(rows) + tail)


def eval_examples(s: SpeedrunConfig, seconds: float) -> int:
    """Examples per task for an evaluation stage: NANOCHAT_EVAL_EXAMPLES, else what its share allows
    (about 500 per task at the share of a 10 h depth-12 run; at least 8)."""
    if s.eval_examples is not None:
        return s.eval_examples
    return int(max(8, min(500, 500 * seconds / (0.04 * 36000))))


def stage_command(s: SpeedrunConfig, stage: str, seconds: float, startup_s: float = STARTUP_S,
                  least_s: float = MIN_TIME_BUDGET_S) -> list[str]:
    """The project's own entry point for `stage` with this run's settings (a `python -m` argv); a training
    stage's --time-budget is its `seconds` less its `startup_s`, and at least `least_s`."""
    common = ["--dtype", "auto", *(["--device", s.device] if s.device else [])]
    tok = ["--tokenizer-dir", str(s.root / "tokenizer")]
    budget = ["--time-budget", f"{max(seconds - startup_s, least_s):.0f}s"]
    loop = ["--device-batch-size", str(s.device_batch), "--save-every", str(s.save_every), "--resume",
            "--sample-every", "-1", *budget]
    if stage == "shards":
        return ["nanochat.dataset", "build", "--source", "embedded", "--out", str(s.data_dir), "--overwrite"]
    if stage == "tokenizer":
        return ["nanochat.scripts.tok_train", "--vocab-size", str(s.vocab), "--data-dir", str(s.data_dir),
                "--out", str(s.root / "tokenizer")]
    if stage == "base":
        return ["nanochat.scripts.base_train", *common, *tok, *loop, "--depth", str(s.depth),
                "--max-seq-len", str(s.seq_len), "--total-batch-size", str(s.total_batch),
                "--data-dir", str(s.data_dir), "--run-dir", str(s.stage_dir("base")),
                # ten steps' tokens (a third of their compute): at the tiny sizes a larger evaluation would be
                # most of the time budget's calibration (an evaluation at its start, another at the end)
                "--eval-tokens", str(min(20 * 524288, 10 * s.total_batch))]
    if stage in ("mid", "sft"):
        module = {"mid": "nanochat.scripts.mid_train", "sft": "nanochat.scripts.chat_sft"}[stage]
        mixture = s.mid_mixture if stage == "mid" else s.sft_mixture
        batch = ["--total-batch-size", str(s.total_batch)] if stage == "mid" else []
        return [module, *common, *tok, *loop, *batch, "--depth", str(s.depth),
                "--init-from", str(s.stage_dir("base" if stage == "mid" else "mid")),
                "--run-dir", str(s.stage_dir(stage)), *(["--mixture", mixture] if mixture else [])]
    if stage == "base_eval":
        return ["nanochat.scripts.base_eval", *common, *tok, "--checkpoint", str(s.stage_dir("base")),
                "--max-per-task", str(eval_examples(s, seconds))]
    if stage == "chat_eval":
        return ["nanochat.scripts.chat_eval", *common, *tok, "--checkpoint", str(s.stage_dir("sft")),
                # an answer gets half the context at most: the other half is for the question
                "--max-problems", str(eval_examples(s, seconds)), "--max-new-tokens", str(min(128, s.seq_len // 2))]
    if stage == "report":
        return ["nanochat.report", "--runs-dir", str(s.root / "runs"), "--depth", str(s.depth)]
    raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(t for t, _ in STAGES)}")


def run_stage(stage: str, argv: list[str], seconds: float, env: dict[str, str]) -> float:
    """One stage's process, its wall seconds; a stage that fails stops the run (a rerun skips those done)."""
    print(f"\n=== {stage}: {seconds:.0f} s planned\n+ python -m {shlex.join(argv)}", flush=True)
    t0 = time.time()
    result = subprocess.run([sys.executable, "-m", *argv], env=env)
    if result.returncode:
        raise SystemExit(f"stage {stage} failed (exit {result.returncode}); fix the error above and rerun: "
                         "finished stages are skipped and training resumes from its latest checkpoint")
    wall = time.time() - t0
    print(f"=== {stage} done in {format_duration(wall)}", flush=True)
    return wall


def measured(s: SpeedrunConfig, stage: str, wall_s: float) -> tuple[float, float]:
    """What a finished training stage says about the next: (its seconds outside its time budget: its wall
    time less what its loop counted; the least budget the next one needs: a margin over the least this
    one could have kept to)."""
    summary = json.loads((s.stage_dir(stage) / "summary.json").read_text())
    least = max(MIN_TIME_BUDGET_S, CALIBRATION_MARGIN * least_budget_s(summary["time_budget"]))
    return max(0.0, wall_s - summary["elapsed_since_setup_s"]), least


def write_timing(s: SpeedrunConfig, timing: dict[str, dict]) -> None:
    """runs/speedrun.json, what the report card shows: the budget, each stage's planned and actual seconds
    (None while it runs), the stages in pipeline order."""
    path = s.root / "runs" / SPEEDRUN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"budget_s": s.budget_s, "stages": timing}, indent=2))


def overrun_text(total_s: float, budget_s: float) -> str:
    if total_s > budget_s:
        return f"over by {format_duration(total_s - budget_s)} ({(total_s - budget_s) / budget_s:.0%})"
    return f"{format_duration(budget_s - total_s)} left"


def main(argv: list[str] | None = None) -> dict[str, float]:
    s = parse_config(SpeedrunConfig, [*env_flags(os.environ), *(argv or [])], description=__doc__.splitlines()[0])
    if s.data and not s.data_dir.is_dir():
        raise UsageError(f"--data / NANOCHAT_DATA {s.data_dir} is not a directory; point it at parquet shards "
                         "(python -m nanochat.dataset build --out DIR) or unset it for the embedded corpus")
    stages = [t for t, _ in STAGES if not (s.data and t == "shards")]  # shards given: nothing to build
    check_budget(s, stages)
    earlier = finished(s)
    done = {t: m["seconds"] for t, m in earlier.items()}
    timing = {t: {"planned_s": earlier[t].get("planned_s"), "seconds": done[t]} for t in stages if t in done}
    todo = [t for t in stages if t not in done]
    kept = {t: kept_s(s, t) for t in todo}
    print(plan_text(s, {**done, **({"shards": 0.0} if s.data else {})}, kept,
                    split_budget(s.budget_s - sum(done.values()) - sum(kept.values()), todo)), flush=True)
    (s.root / "stages").mkdir(parents=True, exist_ok=True)
    # every stage's process imports this checkout, also under `ray job submit`'s working dir
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).resolve().parent.parent),
                                                                     os.environ.get("PYTHONPATH", "")) if p)}
    startup, least = STARTUP_S, MIN_TIME_BUDGET_S
    fixed = {"planned": 0.0, "actual": 0.0}  # the stages run here that do not adapt to their plan
    for i, stage in enumerate(todo):
        # re-split at each stage: time left over by (or overrun of) the stages before moves the rest, and the
        # floors of the evaluations and the report card follow the pace the others kept on this machine
        pace = fixed["actual"] / fixed["planned"] if fixed["planned"] else 1.0
        seconds = split_budget(s.budget_s - sum(done.values()) - sum(kept[t] for t in todo[i:]), todo[i:], pace)[stage]
        timing[stage] = {"planned_s": kept[stage] + seconds, "seconds": None}
        write_timing(s, timing)
        marker(s, stage, "started").write_text(json.dumps({"started": time.time(), "kept_s": kept[stage]}))
        wall = run_stage(stage, stage_command(s, stage, seconds, startup, least), seconds, env)
        if stage in TRAINING:  # the next training stage's time budget: room for the start-up measured here
            startup, least = measured(s, stage, wall)
        else:
            fixed["planned"], fixed["actual"] = fixed["planned"] + seconds, fixed["actual"] + wall
        done[stage] = timing[stage]["seconds"] = kept[stage] + wall
        write_timing(s, timing)
        marker(s, stage).write_text(json.dumps({**timing[stage], "budget_s": s.budget_s, "finished": time.time()}))
        marker(s, stage, "started").unlink()
    total = sum(done.values())
    print(f"\nspeedrun finished: {format_duration(total)} of {format_duration(s.budget_s)}, "
          f"{overrun_text(total, s.budget_s)}; " + ", ".join(f"{t} {done[t]:.0f}s" for t in stages if t in done)
          + f"\nreport card: {s.root / 'runs' / 'report' / 'report.md'}", flush=True)
    return done


if __name__ == "__main__":
    run_main(main)
