"""Fine-tuning a trained checkpoint on conversations: what mid-training and SFT share.

Both load the previous stage's model and train it with base training's step and loop on a mixture
of conversations (nanochat/tasks); they differ only in their defaults (MidTrainConfig packs rows,
ChatSFTConfig pads one conversation per row, at 2% of the learning rates). Validation is the
masked loss on held-out conversations of the same mixture.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

import torch

from nanochat import checkpoint
from nanochat.chat import ChatLoader, Conversation, render_conversation, render_for_completion
from nanochat.config import option
from nanochat.distributed import all_reduce_sum, sum_counts, world
from nanochat.gpt import GPT
from nanochat.infer.engine import Engine
from nanochat.tasks import MID_MIXTURE, SFT_MIXTURE, load_mixture
from nanochat.tokenizer import Tokenizer
from nanochat.train.loop import LoopConfig, Run, StageConfig, build_run, grad_accum_steps, start_process

CHAT_SAMPLES = ["Hello! Who are you?", "What is 23 times 17?", "How many r are in the word strawberry?"]


@dataclass
class StartFromConfig(StageConfig):
    """Stages that continue from the previous stage's checkpoint (mid, SFT, RL)."""

    depth: int = option(12, "depth of the model (locates the default --init-from and --run-dir)")
    init_from: str = option("", "checkpoint to start from (step dir, checkpoint root or run dir); empty = the previous stage's run")
    init_lr_frac: float = option(1.0, "learning rates as a fraction of --matrix-lr/--embedding-lr/--unembedding-lr")

    def init_checkpoint(self, runs_root: Path | None = None) -> Path:
        """--init-from, or the latest checkpoint of the previous stage's run in `runs_root`
        (default $NANOCHAT_BASE_DIR/runs, where the plain scripts write)."""
        return checkpoint.resolve_checkpoint(self.init_from or checkpoint.stage_run_dir(self.PREVIOUS, self.depth, runs_root))


S = TypeVar("S", bound=StartFromConfig)


def resolve_start(cfg: S) -> S:
    """`cfg` with --init-from pinned to the start checkpoint's step dir and --tokenizer-dir defaulted to the
    tokenizer that checkpoint recorded (an explicit flag wins), so a stage needs no --tokenizer-dir after
    the one before it. Call it before the tokenizer loads (start_process)."""
    start = cfg.init_checkpoint()
    tokenizer_dir = checkpoint.tokenizer_dir_for(checkpoint.read_meta(start), cfg.tokenizer_dir, start)
    return dataclasses.replace(cfg, init_from=str(start), tokenizer_dir=str(tokenizer_dir))


def load_start(cfg: StartFromConfig, device: torch.device, tokenizer: Tokenizer) -> tuple[GPT, Path]:
    """The previous stage's model (in train mode) and its step dir; refuses another tokenizer."""
    path = cfg.init_checkpoint()
    model, meta = checkpoint.load_model(path, device)
    checkpoint.check_tokenizer(meta, tokenizer.fingerprint(), tokenizer.directory or cfg.tokenizer_dir, path)
    return model.train(), path


@dataclass
class FinetuneConfig(StartFromConfig, LoopConfig):
    PACK: ClassVar[bool] = True  # conversations packed into full rows (mid) or one per padded row (SFT)

    mixture: str = option("", "conversation mixture, e.g. 'identity:200,arithmetic:2000,jsonl=/data/chats.jsonl' (see nanochat/tasks)")
    val_conversations: int = option(200, "conversations of the mixture held out for validation")
    num_epochs: int = option(1, "passes over the mixture when --num-iterations is -1")
    max_seq_len: int = option(-1, "row length in tokens; -1 = the model's context length")


@dataclass
class MidTrainConfig(FinetuneConfig):
    STAGE: ClassVar[str] = "mid"
    PREVIOUS: ClassVar[str] = "base"
    PACK: ClassVar[bool] = True

    mixture: str = option(MID_MIXTURE, "conversation mixture (see nanochat/tasks): name[:count],...,jsonl=PATH")


@dataclass
class ChatSFTConfig(FinetuneConfig):
    STAGE: ClassVar[str] = "sft"
    PREVIOUS: ClassVar[str] = "mid"
    PACK: ClassVar[bool] = False

    mixture: str = option(SFT_MIXTURE, "conversation mixture (see nanochat/tasks): name[:count],...,jsonl=PATH")
    device_batch_size: int = option(8, "conversations per forward/backward (one per row, padded)")
    total_batch_size: int = option(-1, "tokens per optimizer step (rows x seq len); -1 = one micro-batch")
    init_lr_frac: float = option(0.02, "learning rates as a fraction of the base ones")
    warmdown_ratio: float = option(1.0, "fraction of steps of linear lr decay (1.0: from the first step to zero)")
    eval_every: int = option(100, "evaluate the held-out loss every N steps (and at the end)")


@dataclass(kw_only=True)
class FinetuneRun(Run):
    train_conversations: list[Conversation] = dataclasses.field(default_factory=list)
    val_conversations: list[Conversation] = dataclasses.field(default_factory=list)
    engine: Engine | None = None  # made on the first samples() call and kept: its decoder's graphs are reused

    def describe(self) -> str:
        return (f"starting from {self.meta['init_from']}\n{super().describe()}\n"
                f"conversations: {len(self.train_conversations):,} train, {len(self.val_conversations):,} held out")

    def loader(self, conversations: list[Conversation], rank: int = 0, world: int = 1, state: dict | None = None) -> ChatLoader:
        return ChatLoader(conversations, self.tokenizer, self.cfg.device_batch_size, self.model.config.sequence_len,
                          self.device, pack=self.cfg.PACK, seed=self.cfg.seed, rank=rank, world=world, state=state)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss per assistant token over the held-out conversations (one pass). Collective under a
        process group: rank r takes batches r, r+W, ... of the one stream, the sums are reduced."""
        batches = max(1, math.ceil(len(self.val_conversations) / self.cfg.device_batch_size))
        rank, world_size = world()
        # every rank renders the whole stream (cheap next to the forward) so the batches are one process's
        mine = itertools.islice(self.loader(self.val_conversations), rank, batches, world_size)
        total, count = torch.zeros((), device=self.device), 0
        self.model.eval()
        for x, y in mine:
            with self.plan.compute_context():
                total += self.model(x, y, loss_reduction="sum")
            count += int((y != -1).sum())
        self.model.train()
        (count,) = sum_counts([count])
        return {"val_loss": all_reduce_sum(total).item() / max(count, 1)}

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


def setup(cfg: FinetuneConfig, device: torch.device, world_size: int = 1, rank: int = 0) -> FinetuneRun:
    """The previous stage's model with a fresh optimizer, the mixture split, and the step function."""
    cfg = resolve_start(cfg)
    plan, tokenizer = start_process(cfg, device)
    model, start_path = load_start(cfg, device, tokenizer)
    if cfg.max_seq_len not in (-1, model.config.sequence_len):
        model.config.sequence_len = cfg.max_seq_len  # rows may be shorter or longer (rotary tables cover 10x)
    seq_len = model.config.sequence_len
    grad_accum = grad_accum_steps(cfg, seq_len, world_size)
    tokens_per_step = grad_accum * cfg.device_batch_size * seq_len * world_size
    train_convs, val_convs = split_mixture(cfg)
    rows_per_step = grad_accum * cfg.device_batch_size * world_size
    num_iterations = cfg.num_iterations if cfg.num_iterations > 0 else epoch_steps(cfg, tokenizer, train_convs, rows_per_step, seq_len)
    # padded SFT rows change width with every batch and would recompile each time: "auto" keeps them eager
    return build_run(FinetuneRun, cfg, device, plan, tokenizer, model, grad_accum,
                     compile="off" if cfg.compile == "auto" and not cfg.PACK else cfg.compile, lr_frac=cfg.init_lr_frac,
                     weight_decay=cfg.weight_decay, tokens_per_step=tokens_per_step, num_iterations=num_iterations,
                     world_size=world_size, rank=rank, meta={"init_from": str(start_path)},
                     train_conversations=train_convs, val_conversations=val_convs)


def make_batches(run: FinetuneRun, rank: int = 0, world: int = 1, position: dict | None = None) -> ChatLoader:
    """This worker's share of the training conversations, resuming at `position`."""
    return run.loader(run.train_conversations, rank, world, position)
