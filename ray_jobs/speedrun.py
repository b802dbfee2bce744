"""The whole pipeline on one GPU inside a time budget; `ray_jobs/speedrun_p100.sh` runs this.

    # one P100 (or any GPU), 10 hours, depth 12, the embedded corpus
    NANOCHAT_TIME_BUDGET=10h bash ray_jobs/speedrun_p100.sh
    # submitted to a Ray cluster, pinned to an fp16 (P100/V100/T4) node (see docs/cluster.md)
    ray job submit --working-dir . --entrypoint-num-gpus 1 \\
        --entrypoint-label-selector '{"nanochat/precision": "fp16"}' -- bash ray_jobs/speedrun_p100.sh
    # tiny, on a CPU laptop (a few minutes)
    NANOCHAT_DEVICE=cpu NANOCHAT_DEPTH=2 NANOCHAT_SEQ_LEN=128 NANOCHAT_VOCAB=1024 NANOCHAT_TIME_BUDGET=4m \\
        bash ray_jobs/speedrun_p100.sh

Stages: shards -> tokenizer -> base -> base eval -> mid -> SFT -> chat eval -> report card. Each is
the project's own entry point (`python -m ...`, `--dtype auto`) in its own process, so the GPU memory
of one stage is free for the next. The budget is split by STAGES' shares (printed before anything
runs); the training stages get theirs as `--time-budget`, the evaluation stages are sized to theirs,
and whatever a stage leaves over (or overruns) is re-split over the stages still to come.

Resumable: a finished stage writes `$NANOCHAT_RUN/stages/<stage>.done` (its wall time) and is skipped
on the next invocation; the training stages always run with `--resume`, so an interrupted one goes on
from its latest checkpoint with the horizon its time budget fixed. The time already spent by finished
stages is taken off the budget.

Settings are the flags of SpeedrunConfig (`--help`; the defaults are the single-P100 run); each flag
takes its default from the environment variable NANOCHAT_<FLAG> when that is set (NANOCHAT_DEPTH=12,
NANOCHAT_TIME_BUDGET=10h, NANOCHAT_DATA=/shards, ...), so the shell wrapper needs no flags at all.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nanochat.checkpoint import stage_run_dir
from nanochat.common import base_dir
from nanochat.config import option, parse_config
from nanochat.errors import run_main
from nanochat.train.budget import format_duration, parse_duration

# (stage, share of the budget). Base training gets most: it is where the model learns; the
# evaluation shares are what 500 CORE examples per task / 200 chat problems per task take at depth 12.
STAGES: tuple[tuple[str, float], ...] = (
    ("shards", 0.01), ("tokenizer", 0.02), ("base", 0.70), ("base_eval", 0.04),
    ("mid", 0.12), ("sft", 0.07), ("chat_eval", 0.04), ("report", 0.0),
)
TRAINING = {"base", "mid", "sft"}
STARTUP_S = 20.0  # interpreter + torch import + data/tokenizer load before a stage's budget clock starts


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


def marker(s: SpeedrunConfig, stage: str) -> Path:
    return s.root / "stages" / f"{stage}.done"


def spent(s: SpeedrunConfig) -> dict[str, float]:
    """Wall seconds of the stages finished by earlier invocations."""
    return {stage: json.loads(marker(s, stage).read_text())["seconds"] for stage, _ in STAGES if marker(s, stage).exists()}


def split_budget(remaining_s: float, todo: list[str]) -> dict[str, float]:
    """`remaining_s` over the stages in `todo`, in proportion to their shares."""
    shares = dict(STAGES)
    total = sum(shares[t] for t in todo) or 1.0
    return {t: remaining_s * shares[t] / total for t in todo}


def plan_text(s: SpeedrunConfig, done: dict[str, float], todo_budget: dict[str, float]) -> str:
    rows = [f"{'stage':<10} {'share':>6} {'seconds':>9}  status"]
    for stage, share in STAGES:
        if stage in done:
            rows.append(f"{stage:<10} {share:>6.0%} {done[stage]:>9.0f}  done (skipped)")
        else:
            rows.append(f"{stage:<10} {share:>6.0%} {todo_budget[stage]:>9.0f}  to run")
    return (f"speedrun plan: {format_duration(s.budget_s)} in all, depth {s.depth}, data "
            f"{s.data_dir if s.data else 'embedded corpus'}, output {s.root}\n" + "\n".join(rows))


def eval_examples(s: SpeedrunConfig, seconds: float) -> int:
    """Examples per task for an evaluation stage: NANOCHAT_EVAL_EXAMPLES, else what its share allows
    (about 500 per task at the share of a 10 h depth-12 run; at least 8)."""
    if s.eval_examples is not None:
        return s.eval_examples
    return int(max(8, min(500, 500 * seconds / (0.04 * 36000))))


def stage_command(s: SpeedrunConfig, stage: str, seconds: float) -> list[str]:
    """The project's own entry point for `stage` with this run's settings (a `python -m` argv)."""
    common = ["--dtype", "auto", *(["--device", s.device] if s.device else [])]
    tok = ["--tokenizer-dir", str(s.root / "tokenizer")]
    budget = ["--time-budget", f"{max(seconds - STARTUP_S, 1.0):.0f}s"]
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
                "--eval-tokens", str(min(20 * 524288, 40 * s.total_batch))]
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
                "--max-problems", str(eval_examples(s, seconds)), "--max-new-tokens", "128"]
    if stage == "report":
        return ["nanochat.report", "--runs-dir", str(s.root / "runs"), "--depth", str(s.depth)]
    raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(t for t, _ in STAGES)}")


def main(argv: list[str] | None = None) -> dict[str, float]:
    s = parse_config(SpeedrunConfig, [*env_flags(os.environ), *(argv or [])], description=__doc__.splitlines()[0])
    done = spent(s)
    if s.data:
        if not s.data_dir.is_dir():
            raise SystemExit(f"--data / NANOCHAT_DATA {s.data_dir} is not a directory; point it at parquet shards "
                             "(python -m nanochat.dataset build --out DIR) or unset it for the embedded corpus")
        done.setdefault("shards", 0.0)  # nothing to build
    todo = [t for t, _ in STAGES if t not in done]
    remaining = s.budget_s - sum(done.values())
    print(plan_text(s, done, split_budget(remaining, todo)), flush=True)
    (s.root / "stages").mkdir(parents=True, exist_ok=True)
    # every stage's process imports this checkout, also under `ray job submit`'s working dir
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).resolve().parent.parent),
                                                                     os.environ.get("PYTHONPATH", "")) if p)}
    for i, stage in enumerate(todo):
        # re-split at each stage: time left over by (or overrun of) the stages before moves the rest
        seconds = split_budget(s.budget_s - sum(done.values()), todo[i:])[stage]
        argv_ = stage_command(s, stage, seconds)
        print(f"\n=== {stage}: {seconds:.0f} s planned\n+ python -m {shlex.join(argv_)}", flush=True)
        t0 = time.time()
        result = subprocess.run([sys.executable, "-m", *argv_], env=env)
        if result.returncode:
            raise SystemExit(f"stage {stage} failed (exit {result.returncode}); fix the error above and rerun: "
                             "finished stages are skipped and training resumes from its latest checkpoint")
        done[stage] = time.time() - t0
        marker(s, stage).write_text(json.dumps({"seconds": done[stage], "planned_s": seconds, "finished": time.time()}))
        print(f"=== {stage} done in {format_duration(done[stage])}", flush=True)
    total = sum(done.values())
    print(f"\nspeedrun finished: {format_duration(total)} of {format_duration(s.budget_s)}; "
          + ", ".join(f"{t} {done[t]:.0f}s" for t, _ in STAGES if t in done)
          + f"\nreport card: {s.root / 'runs' / 'report' / 'report.md'}", flush=True)
    return done


if __name__ == "__main__":
    run_main(main)
