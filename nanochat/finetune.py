"""Fine-tuning a trained checkpoint on conversations: what mid-training and SFT share.

Both stages load the previous stage's model, train it with the same step, schedule, GradScaler
and loop as base training (nanochat/scripts/base_train.py) on a mixture of conversations
(nanochat/tasks), and differ only in their defaults: mid-training packs conversations into full
rows and trains at the base learning rates; SFT pads one conversation per row and starts from a
small fraction of them (as upstream nanochat does). Validation is the masked loss on held-out
conversations of the same mixture.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from nanochat import checkpoint
from nanochat.chat import ChatLoader, Conversation, render_conversation, render_for_completion
from nanochat.common import base_dir, init_process
from nanochat.config import CommonConfig, option
from nanochat.engine import Engine
from nanochat.scripts.base_train import LoopConfig, Run, grad_accum_steps, run_single_process
from nanochat.tasks import load_mixture
from nanochat.tokenizer import Tokenizer, default_tokenizer_dir
from nanochat.training import TrainStep, maybe_compile

CHAT_SAMPLES = ["Hello! Who are you?", "What is 23 times 17?", "How many r are in the word strawberry?"]


@dataclass
class StartFromConfig(CommonConfig):
    """Stages that continue from the previous stage's checkpoint (mid, SFT, RL)."""

    STAGE: ClassVar[str] = ""  # names the run dir and the checkpoint's stage
    PREVIOUS: ClassVar[str] = ""  # the stage whose checkpoint it starts from

    depth: int = option(12, "depth of the model (locates the default --init-from and --run-dir)")
    init_from: str = option("", "checkpoint to start from (step dir, checkpoint root or run dir); empty = the previous stage's run")

    def default_run_dir(self) -> Path:
        return base_dir() / "runs" / f"{self.STAGE}_d{self.depth}"

    def init_checkpoint(self, runs_root: Path | None = None) -> Path:
        """--init-from, or the latest checkpoint of the previous stage's run in `runs_root`
        (default $NANOCHAT_BASE_DIR/runs, where the plain scripts write)."""
        previous = (runs_root or base_dir() / "runs") / f"{self.PREVIOUS}_d{self.depth}"
        return checkpoint.resolve_checkpoint(self.init_from or previous)


@dataclass
class FinetuneConfig(StartFromConfig, LoopConfig):
    PACK: ClassVar[bool] = True  # conversations packed into full rows (mid) or one per padded row (SFT)

    mixture: str = option("", "conversation mixture, e.g. 'identity:200,arithmetic:2000,jsonl=/data/chats.jsonl' (see nanochat/tasks)")
    val_conversations: int = option(200, "conversations of the mixture held out for validation")
    num_epochs: int = option(1, "passes over the mixture when --num-iterations is -1")
    init_lr_frac: float = option(1.0, "learning rates as a fraction of --matrix-lr/--embedding-lr/--unembedding-lr")
    max_seq_len: int = option(-1, "row length in tokens; -1 = the model's context length")


@dataclass
class FinetuneRun(Run):
    train_conversations: list[Conversation] = dataclasses.field(default_factory=list)
    val_conversations: list[Conversation] = dataclasses.field(default_factory=list)
    engine: Engine | None = None  # made on the first samples() call and kept: its decoder's graphs are reused

    def loader(self, conversations: list[Conversation], rank: int = 0, world: int = 1, state: dict | None = None) -> ChatLoader:
        return ChatLoader(conversations, self.tokenizer, self.cfg.device_batch_size, self.model.config.sequence_len,
                          self.device, pack=self.cfg.PACK, seed=self.cfg.seed, rank=rank, world=world, state=state)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss per assistant token over the held-out conversations (one pass)."""
        loader = self.loader(self.val_conversations)
        batches = max(1, math.ceil(len(self.val_conversations) / self.cfg.device_batch_size))
        total, count = torch.zeros((), device=self.device), 0
        self.model.eval()
        for _ in range(batches):
            x, y = next(loader)
            with self.plan.compute_context():
                total += self.model(x, y, loss_reduction="sum")
            count += int((y != -1).sum())
        self.model.train()
        return {"val_loss": total.item() / max(count, 1)}

    def samples(self) -> dict[str, str]:
        engine = self.engine = self.engine or Engine(self.model, self.tokenizer, self.plan)
        self.model.eval()
        out = {q: engine.complete(render_for_completion(self.tokenizer, {"messages": [{"role": "user", "content": q}]}),
                                  max_tokens=48, temperature=0.0) for q in CHAT_SAMPLES}
        self.model.train()
        return out


def split_mixture(cfg: FinetuneConfig) -> tuple[list[Conversation], list[Conversation]]:
    conversations = load_mixture(cfg.mixture, seed=cfg.seed)
    held_out = min(cfg.val_conversations, len(conversations) // 10)
    if len(conversations) - held_out < 1:
        raise ValueError(f"the mixture {cfg.mixture!r} has only {len(conversations)} conversations")
    return conversations[held_out:], conversations[: max(held_out, 1)]


def epoch_steps(cfg: FinetuneConfig, tokenizer: Tokenizer, conversations: list[Conversation], rows_per_step: int,
                seq_len: int) -> int:
    """Optimizer steps for --num-epochs passes: packed rows hold as many conversations as their
    tokens fill, padded rows one conversation each."""
    if not cfg.PACK:
        return max(1, cfg.num_epochs * len(conversations) // rows_per_step)
    tokens = sum(len(render_conversation(tokenizer, c)[0]) for c in conversations)
    return max(1, cfg.num_epochs * tokens // (rows_per_step * seq_len))


def load_start(cfg: FinetuneConfig, device: torch.device) -> tuple[torch.nn.Module, dict, Path]:
    path = cfg.init_checkpoint()
    model, meta = checkpoint.load_model(path, device)
    if cfg.max_seq_len not in (-1, model.config.sequence_len):
        model.config.sequence_len = cfg.max_seq_len  # rows may be shorter or longer (rotary tables cover 10x)
    return model.train(), meta, path


def setup(cfg: FinetuneConfig, device: torch.device, world_size: int = 1, rank: int = 0, sync: Callable | None = None) -> FinetuneRun:
    """The previous stage's model with a fresh optimizer, the mixture split, and the step function."""
    _, plan = init_process(cfg, device)
    tokenizer = Tokenizer.load(cfg.tokenizer_dir or default_tokenizer_dir())
    model, start_meta, start_path = load_start(cfg, device)
    if start_meta["tokenizer"] != tokenizer.fingerprint():
        raise checkpoint.CheckpointError(f"{start_path} was trained with another tokenizer than {cfg.tokenizer_dir or default_tokenizer_dir()}")
    f = cfg.init_lr_frac
    optimizer = model.setup_optimizer(matrix_lr=cfg.matrix_lr * f, embedding_lr=cfg.embedding_lr * f,
                                      unembedding_lr=cfg.unembedding_lr * f, weight_decay=cfg.weight_decay,
                                      ns_dtype=getattr(torch, plan.muon_dtype))
    scaler = plan.make_grad_scaler()
    seq_len = model.config.sequence_len
    grad_accum = grad_accum_steps(cfg, seq_len, world_size)
    tokens_per_step = grad_accum * cfg.device_batch_size * seq_len * world_size
    # padded SFT rows change width with every batch and would recompile each time: "auto" keeps them eager
    step_fn = TrainStep(maybe_compile(model, plan, "off" if cfg.compile == "auto" and not cfg.PACK else cfg.compile),
                        optimizer, plan, grad_accum, scaler, cfg.max_bad_steps, sync)
    train_convs, val_convs = split_mixture(cfg)
    rows_per_step = grad_accum * cfg.device_batch_size * world_size
    num_iterations = cfg.num_iterations if cfg.num_iterations > 0 else epoch_steps(cfg, tokenizer, train_convs, rows_per_step, seq_len)
    meta = {"stage": cfg.STAGE, "model_config": dataclasses.asdict(model.config), "tokenizer": tokenizer.fingerprint(),
            "plan": plan.to_dict(), "train_config": dataclasses.asdict(cfg), "init_from": str(start_path)}
    return FinetuneRun(cfg, device, plan, tokenizer, model, optimizer, scaler, step_fn, grad_accum, tokens_per_step,
                       num_iterations, meta, world_size, is_main=rank == 0,
                       train_conversations=train_convs, val_conversations=val_convs)


def make_batches(run: FinetuneRun, rank: int = 0, world: int = 1, position: dict | None = None) -> ChatLoader:
    """This worker's share of the training conversations, resuming at `position`."""
    return run.loader(run.train_conversations, rank, world, position)


def main(cfg: FinetuneConfig, device: torch.device) -> dict:
    """The plain (single-process) run of a fine-tuning stage; ray_jobs/train.py runs the same setup/train."""
    run = setup(cfg, device)
    print(f"precision plan:\n{run.plan.summary()}\nstarting from {run.meta['init_from']}\n{run.describe()}\n"
          f"conversations: {len(run.train_conversations):,} train, {len(run.val_conversations):,} held out")
    run_dir = Path(cfg.run_dir or cfg.default_run_dir())
    return run_single_process(run, run_dir, cfg.resume, lambda position: make_batches(run, position=position))
