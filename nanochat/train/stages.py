"""The training stages, base -> mid -> SFT -> RL, in one registry: each `Stage` names its flags
(the config's STAGE/PREVIOUS: its name and the stage it starts from), how a process builds its Run,
that process's batches and the loop. The plain scripts run a stage through `run_plain`;
ray_jobs/train.py runs the same pieces on Ray."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat import checkpoint
from nanochat.checkpoint import BackgroundWriter, stage_run_dir
from nanochat.common import default_device
from nanochat.config import parse_config
from nanochat.runlog import MetricsLog
from nanochat.train import base, finetune, rl
from nanochat.train.harness import GracefulStop, StopRequested, with_step_split
from nanochat.train.loop import Run, StageConfig, restore_run, snapshot_run, train


@dataclass(frozen=True)
class Stage:
    config: type[StageConfig]
    setup: Callable[..., Run]  # (cfg, device, world_size=1, rank=0) -> this process's Run
    batches: Callable[..., Iterator]  # (run, rank, world, position) -> this worker's batches, with state_dict()
    loop: Callable[..., dict] = train  # (run, batches, start_step, log, save) -> summary
    shards: bool = False  # trains on the parquet shards (ray_jobs.train streams them through Ray Data)

    @property
    def name(self) -> str:
        return self.config.STAGE

    @property
    def previous(self) -> str:
        return self.config.PREVIOUS


STAGES = {stage.name: stage for stage in (
    Stage(base.BaseTrainConfig, base.setup, base.shard_batches, shards=True),
    Stage(finetune.MidTrainConfig, finetune.setup, finetune.make_batches),
    Stage(finetune.ChatSFTConfig, finetune.setup, finetune.make_batches),
    Stage(rl.ChatRLConfig, rl.setup, rl.problem_stream, loop=rl.train),
)}


def run_plain(name: str, argv: list[str] | None, description: str) -> dict:
    """A stage's single-process run, each training script's main(): the run dir claimed (a run dir holds
    one run: another is refused without --resume, a second live writer always), setup, --resume from the
    latest checkpoint, the loop (metrics.jsonl, checkpoints written in the background with the data
    position), summary.json. SIGTERM saves at the next step boundary and exits with status 143 (128 + SIGTERM)."""
    stage = STAGES[name]
    cfg = parse_config(stage.config, argv, description=description)
    run_dir = Path(cfg.run_dir or stage_run_dir(name, cfg.depth))
    ckpt_dir = run_dir / "checkpoints"
    with checkpoint.RunLock(run_dir):  # held until the last checkpoint is on disk
        if cfg.resume and ckpt_dir.is_dir():
            checkpoint.restore_orphans(ckpt_dir)
        run_id, latest = checkpoint.open_run_dir(run_dir, ckpt_dir, cfg.resume, "--run-dir DIR")  # before setup: fail fast
        run = stage.setup(cfg, torch.device(cfg.device or default_device()))
        run.meta["run_id"] = run_id
        print(f"precision plan:\n{run.plan.summary()}\n{run.describe()}")
        return _train_plain(stage, cfg, run, run_dir, latest)


def _train_plain(stage: Stage, cfg: StageConfig, run: Run, run_dir: Path, latest: Path | None) -> dict:
    """run_plain from the restore on, under the run dir's lock."""
    ckpt_dir = run_dir / "checkpoints"
    start_step, position = 0, None
    if latest is not None:
        start_step, position = restore_run(run, latest)
        print(f"resumed run {run.meta['run_id']} from {latest} at step {start_step}")
    elif cfg.resume:
        print(f"--resume: no complete checkpoint in {ckpt_dir}, starting from scratch")
    checkpoint.claim_run_dir(run_dir, run.meta["run_id"])
    batches = stage.batches(run, 0, 1, position)
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=start_step if latest else None)
    writer = BackgroundWriter()

    def save(step: int) -> None:  # the state of this step boundary, written while training goes on
        writer.submit(ckpt_dir, snapshot_run(run, step, batches.state_dict()), cfg.keep_last)

    def save_now(step: int) -> Path | None:
        save(step)
        return writer.wait()

    with GracefulStop() as stop:
        try:
            summary = stage.loop(run, batches, start_step, stop.wrap(with_step_split(run, metrics.log, cfg.report_every), save_now), save)
        except StopRequested as stopped:
            print(f"{stopped}: checkpoint {stopped.checkpoint}; continue with the same command and --resume")
            raise SystemExit(128 + signal.SIGTERM) from None
        finally:
            writer.wait()
            if hasattr(batches, "close"):  # the base stage's DataLoader: its prefetch thread ends with the run
                batches.close()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print("summary:", json.dumps(summary))
    return summary
