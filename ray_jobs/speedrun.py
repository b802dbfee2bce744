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

Settings (environment; the defaults are the single-P100 run):
    NANOCHAT_TIME_BUDGET 10h     total wall time (6h, 90m, 45s, ...)
    NANOCHAT_RUN        $NANOCHAT_BASE_DIR/speedrun   everything this run writes
    NANOCHAT_DATA       (unset)  a directory of parquet shards; unset = build the embedded corpus
    NANOCHAT_DEPTH 12, NANOCHAT_SEQ_LEN 2048, NANOCHAT_VOCAB 32768, NANOCHAT_DEVICE_BATCH 4 (16 GB at depth 12),
    NANOCHAT_TOTAL_BATCH 131072 (tokens per step), NANOCHAT_SAVE_EVERY 200, NANOCHAT_DEVICE (auto),
    NANOCHAT_EVAL_EXAMPLES (per task; default sized to the eval stages' share), NANOCHAT_MID_MIXTURE,
    NANOCHAT_SFT_MIXTURE (default: the stages' own mixtures)
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nanochat.budget import format_duration, parse_duration
from nanochat.common import base_dir

# (stage, share of the budget). Base training gets most: it is where the model learns; the
# evaluation shares are what 500 CORE examples per task / 200 chat problems per task take at depth 12.
STAGES: tuple[tuple[str, float], ...] = (
    ("shards", 0.01), ("tokenizer", 0.02), ("base", 0.70), ("base_eval", 0.04),
    ("mid", 0.12), ("sft", 0.07), ("chat_eval", 0.04), ("report", 0.0),
)
TRAINING = {"base", "mid", "sft"}
STARTUP_S = 20.0  # interpreter + torch import + data/tokenizer load before a stage's budget clock starts


@dataclass
class Settings:
    run: Path
    budget_s: float
    data: Path | None
    depth: int
    seq_len: int
    vocab: int
    device_batch: int
    total_batch: int
    save_every: int
    device: str
    eval_examples: int | None
    mid_mixture: str
    sft_mixture: str

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ = os.environ) -> Settings:
        def get(name: str, default: str) -> str:
            return env.get(name) or default

        examples = env.get("NANOCHAT_EVAL_EXAMPLES")
        return cls(
            run=Path(get("NANOCHAT_RUN", str(base_dir() / "speedrun"))).resolve(),
            budget_s=parse_duration(get("NANOCHAT_TIME_BUDGET", "10h")),
            data=Path(env["NANOCHAT_DATA"]).resolve() if env.get("NANOCHAT_DATA") else None,
            depth=int(get("NANOCHAT_DEPTH", "12")), seq_len=int(get("NANOCHAT_SEQ_LEN", "2048")),
            vocab=int(get("NANOCHAT_VOCAB", "32768")), device_batch=int(get("NANOCHAT_DEVICE_BATCH", "4")),
            total_batch=int(get("NANOCHAT_TOTAL_BATCH", "131072")), save_every=int(get("NANOCHAT_SAVE_EVERY", "200")),
            device=get("NANOCHAT_DEVICE", ""), eval_examples=int(examples) if examples else None,
            mid_mixture=get("NANOCHAT_MID_MIXTURE", ""), sft_mixture=get("NANOCHAT_SFT_MIXTURE", ""),
        )

    @property
    def data_dir(self) -> Path:
        return self.data or self.run / "data"

    def stage_dir(self, stage: str) -> Path:
        return self.run / "runs" / f"{stage}_d{self.depth}"


def marker(s: Settings, stage: str) -> Path:
    return s.run / "stages" / f"{stage}.done"


def spent(s: Settings) -> dict[str, float]:
    """Wall seconds of the stages finished by earlier invocations."""
    return {stage: json.loads(marker(s, stage).read_text())["seconds"] for stage, _ in STAGES if marker(s, stage).exists()}


def split_budget(remaining_s: float, todo: list[str]) -> dict[str, float]:
    """`remaining_s` over the stages in `todo`, in proportion to their shares."""
    shares = dict(STAGES)
    total = sum(shares[t] for t in todo) or 1.0
    return {t: remaining_s * shares[t] / total for t in todo}


def plan_text(s: Settings, done: dict[str, float], todo_budget: dict[str, float]) -> str:
    rows = [f"{'stage':<10} {'share':>6} {'seconds':>9}  status"]
    for stage, share in STAGES:
        if stage in done:
            rows.append(f"{stage:<10} {share:>6.0%} {done[stage]:>9.0f}  done (skipped)")
        else:
            rows.append(f"{stage:<10} {share:>6.0%} {todo_budget[stage]:>9.0f}  to run")
    return (f"speedrun plan: {format_duration(s.budget_s)} in all, depth {s.depth}, data "
            f"{s.data or 'embedded corpus'}, output {s.run}\n" + "\n".join(rows))


def eval_examples(s: Settings, seconds: float) -> int:
    """Examples per task for an evaluation stage: NANOCHAT_EVAL_EXAMPLES, else what its share allows
    (about 500 per task at the share of a 10 h depth-12 run; at least 8)."""
    if s.eval_examples is not None:
        return s.eval_examples
    return int(max(8, min(500, 500 * seconds / (0.04 * 36000))))


def stage_command(s: Settings, stage: str, seconds: float) -> list[str]:
    """The project's own entry point for `stage` with this run's settings (a `python -m` argv)."""
    common = ["--dtype", "auto", *(["--device", s.device] if s.device else [])]
    tok = ["--tokenizer-dir", str(s.run / "tokenizer")]
    budget = ["--time-budget", f"{max(seconds - STARTUP_S, 1.0):.0f}s"]
    loop = ["--device-batch-size", str(s.device_batch), "--save-every", str(s.save_every), "--resume",
            "--sample-every", "-1", *budget]
    if stage == "shards":
        return ["nanochat.dataset", "build", "--source", "embedded", "--out", str(s.data_dir), "--overwrite"]
    if stage == "tokenizer":
        return ["nanochat.scripts.tok_train", "--vocab-size", str(s.vocab), "--data-dir", str(s.data_dir),
                "--out", str(s.run / "tokenizer")]
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
        return ["nanochat.report", "--runs-dir", str(s.run / "runs"), "--depth", str(s.depth)]
    raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(t for t, _ in STAGES)}")


def main(argv: list[str] | None = None) -> dict[str, float]:
    if argv:
        raise SystemExit("speedrun takes no arguments: set NANOCHAT_* environment variables (see ray_jobs/speedrun.py)")
    s = Settings.from_env()
    done = spent(s)
    if s.data is not None:
        if not s.data.is_dir():
            raise SystemExit(f"NANOCHAT_DATA={s.data} is not a directory; point it at parquet shards "
                             "(python -m nanochat.dataset build --out DIR) or unset it for the embedded corpus")
        done.setdefault("shards", 0.0)  # nothing to build
    todo = [t for t, _ in STAGES if t not in done]
    remaining = s.budget_s - sum(done.values())
    print(plan_text(s, done, split_budget(remaining, todo)), flush=True)
    (s.run / "stages").mkdir(parents=True, exist_ok=True)
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
          + f"\nreport card: {s.run / 'runs' / 'report' / 'report.md'}", flush=True)
    return done


if __name__ == "__main__":
    main(sys.argv[1:])
