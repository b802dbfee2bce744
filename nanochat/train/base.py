"""Base pretraining: the model from scratch on parquet shards, bits per byte on the validation shard;
fed by the plain loader (`shard_batches`) in one process, by Ray Data in ray_jobs/train.py."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from nanochat import shardfs
from nanochat.checkpoint import shard_set
from nanochat.common import seed_everything
from nanochat.config import ModelShapeConfig, option
from nanochat.dataloader import DataLoader
from nanochat.dataset import default_data_dir, split_shards
from nanochat.distributed import world
from nanochat.eval.bpb import eval_steps, evaluate_bpb
from nanochat.infer.engine import sample_text
from nanochat.precision import PrecisionPlan
from nanochat.shardfs import Source
from nanochat.train.loop import LoopConfig, Run, build_run, grad_accum_steps, new_model, start_process
from nanochat.train.memory import ProbeConfig, auto_device_batch_size, fits

SAMPLE_PROMPTS = ["In the beginning", "The meaning of life is", "He said to them,"]


@dataclass
class BaseTrainConfig(ModelShapeConfig, LoopConfig):
    STAGE: ClassVar[str] = "base"

    target_param_data_ratio: float = option(20.0, "training tokens per parameter when --num-iterations is -1 (Chinchilla: 20)")
    eval_tokens: int = option(20 * 524288, "validation tokens per evaluation (at most what the validation split holds)")
    data_dir: str = option("", "parquet shards; empty = $NANOCHAT_DATA or $NANOCHAT_BASE_DIR/data")
    # a number or "auto"; setup() turns it into an int once (resolve_device_batch_size), so Run.cfg
    # and everything after setup reads an int
    device_batch_size: str = option(
        "32", "rows of T tokens per forward/backward, or 'auto': the largest the memory model (nanochat/train/memory.py) "
        "predicts to fit, checked by a probe step, with accumulation reaching --total-batch-size (CPU/MPS: 8)")


def all_shards(cfg: BaseTrainConfig) -> list[Source]:
    """The run's shards: a local directory, object storage or a URL list (nanochat.shardfs)."""
    return shardfs.list_shards(cfg.data_dir or default_data_dir())


def val_shards(cfg: BaseTrainConfig) -> list[Source]:
    return split_shards(all_shards(cfg), "val")


@dataclass(kw_only=True)
class BaseRun(Run):
    eval_steps: int  # validation batches per evaluation: --eval-tokens, capped at what the split holds
    eval_rows: int  # rows per validation batch: the micro-batch, or fewer for a split smaller than one

    def val_loader(self) -> DataLoader:
        """The validation stream; under a process group this rank's batches of it (rank r: r, r+W, ...).
        A new loader each time (every evaluation reads the stream from its start): close it when done."""
        return DataLoader(val_shards(self.cfg), self.tokenizer, self.eval_rows, self.cfg.max_seq_len,
                          self.device, batch_split=world())

    def evaluate(self) -> dict[str, float]:
        """Bits per byte on the first batches of the validation shard, split over the ranks (collective)."""
        rank, world_size = world()
        mine = len(range(rank, self.eval_steps, world_size))  # batches rank, rank + W, ... of those one process takes
        with self.val_loader() as batches:  # closed: its prefetch thread and batches go with it
            return {"val_bpb": evaluate_bpb(self.model, self.plan, batches, mine, self.tokenizer.token_bytes(),
                                            progress="val bpb" if self.is_main else "")}

    def samples(self) -> dict[str, str]:
        """A few greedy continuations to eyeball during training."""
        return {p: sample_text(self.model, self.tokenizer, self.plan, p, max_new_tokens=24) for p in SAMPLE_PROMPTS}


def resolve_device_batch_size(cfg: BaseTrainConfig, plan: PrecisionPlan, device: torch.device, vocab_size: int,
                              world_size: int = 1, shard_optimizer: bool = True) -> int:
    """--device-batch-size as an int: a number as given, or "auto" chosen by the memory model and probed.

    The model predicts one of `world_size` workers, its optimizer state sharded or not (the default is
    ray_jobs.train's --shard-optimizer; one process has nothing to shard). The probe steps one process."""
    value = str(cfg.device_batch_size).strip().lower()
    if value != "auto":
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"--device-batch-size must be a positive integer or 'auto', not {cfg.device_batch_size!r}")
        return int(value)
    budget, probe = None, None
    if device.type == "cuda":
        budget = plan.memory_cap or torch.cuda.get_device_properties(device).total_memory

        def probe(batch: int, grad_accum: int) -> bool:
            # two real optimizer steps on random tokens (the second one holds the optimizer state),
            # with two micro-batches when accumulating (gradients live through the second forward)
            shape = ProbeConfig(depth=cfg.depth, max_seq_len=cfg.max_seq_len, vocab_size=vocab_size,
                                device_batch_size=batch, aspect_ratio=cfg.aspect_ratio, head_dim=cfg.head_dim,
                                total_batch_size=batch * cfg.max_seq_len * min(grad_accum, 2), compile=cfg.compile,
                                seed=cfg.seed)
            ok = fits(shape, plan, device, batch)
            torch.cuda.reset_peak_memory_stats(device)  # the run's peak is the run's, not the probe's
            return ok

    batch, _, why = auto_device_batch_size(
        budget, cfg.depth, cfg.max_seq_len, vocab_size, plan.dtype, plan.compile if cfg.compile == "auto" else cfg.compile == "on",
        cfg.total_batch_size, world_size, cfg.aspect_ratio, cfg.head_dim, probe, shard=shard_optimizer)
    print(f"--device-batch-size auto: {why}")
    seed_everything(cfg.seed)  # the probe drew random numbers: the real model starts from the seed again
    return batch


def setup(cfg: BaseTrainConfig, device: torch.device, world_size: int = 1, rank: int = 0) -> BaseRun:
    """Precision plan, tokenizer, model, optimizer, GradScaler and step function for one process."""
    plan, tokenizer = start_process(cfg, device)
    cfg = dataclasses.replace(cfg, device_batch_size=resolve_device_batch_size(cfg, plan, device, tokenizer.vocab_size, world_size))
    model = new_model(cfg, tokenizer.vocab_size, device)
    grad_accum = grad_accum_steps(cfg, cfg.max_seq_len, world_size)
    tokens_per_step = grad_accum * cfg.device_batch_size * cfg.max_seq_len * world_size
    num_iterations = cfg.num_iterations if cfg.num_iterations > 0 else max(1, round(cfg.target_param_data_ratio * model.num_params() / tokens_per_step))
    # counted once, before the run's clock starts (a --time-budget counts from build_run)
    steps, rows = eval_steps(cfg.eval_tokens, cfg.device_batch_size, cfg.max_seq_len, val_shards(cfg), tokenizer,
                             verbose=rank == 0)
    # the shard set (its last shard is validation, data positions count the others): a resume checks it
    shards = shard_set(all_shards(cfg))
    return build_run(BaseRun, cfg, device, plan, tokenizer, model, grad_accum, compile=cfg.compile,
                     weight_decay=cfg.weight_decay, tokens_per_step=tokens_per_step,
                     num_iterations=num_iterations, world_size=world_size, rank=rank, eval_steps=steps,
                     eval_rows=rows, meta={"shards": shards})


def shard_batches(run: BaseRun, rank: int = 0, world: int = 1, position: dict | None = None) -> DataLoader:
    """The plain loader over the training shards from `position` (one process; Ray uses Ray Data)."""
    shards = split_shards(all_shards(run.cfg), "train")
    return DataLoader(shards, run.tokenizer, run.cfg.device_batch_size, run.cfg.max_seq_len, run.device, state=position)
