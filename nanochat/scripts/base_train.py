"""Pretrain the base GPT on parquet shards (single process: one GPU or the CPU).

    # a GPU node (dtype picked per device: bf16 on A100/H100, fp16+GradScaler on P100/V100/T4)
    python -m nanochat.scripts.base_train --depth 12
    # the P100 path on any modern GPU (fp16, no compile, 16 GB cap)
    NANOCHAT_EMULATE=p100 python -m nanochat.scripts.base_train --depth 12 --device-batch-size 16
    # a tiny CPU run
    python -m nanochat.scripts.base_train --depth 2 --max-seq-len 128 --device-batch-size 8 \
        --total-batch-size 1024 --num-iterations 300 --eval-every 100
    # on a Ray cluster (any number of GPUs of one precision group): see ray_jobs/train.py

Needs shards (python -m nanochat.dataset build) and a tokenizer (python -m nanochat.scripts.tok_train).
Writes checkpoints, metrics.jsonl and summary.json under --run-dir.

`setup()` and `train()` below are the whole stage; `main()` feeds them the plain loader and local
checkpoints, and ray_jobs/train.py feeds the same two functions Ray Data and Ray Train checkpoints.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from nanochat import checkpoint
from nanochat.budget import TimeBudget, parse_duration
from nanochat.common import base_dir, default_device, init_process, seed_everything
from nanochat.config import CommonConfig, ModelShapeConfig, option, parse_config
from nanochat.dataloader import DataLoader
from nanochat.dataset import default_data_dir, list_shards, split_shards
from nanochat.engine import sample_text
from nanochat.eval.bpb import evaluate_bpb
from nanochat.gpt import GPT, GPTConfig
from nanochat.memory import auto_device_batch_size
from nanochat.precision import PrecisionPlan
from nanochat.report import MetricsLog
from nanochat.scripts.bench_train import BenchConfig
from nanochat.scripts.bench_train import fits as bench_fits
from nanochat.tokenizer import Tokenizer, default_tokenizer_dir
from nanochat.training import (
    TimedIterator,
    TrainStep,
    lr_multiplier,
    maybe_compile,
    muon_momentum,
    set_schedule,
)

SAMPLE_PROMPTS = ["In the beginning", "The meaning of life is", "He said to them,"]


@dataclass
class LoopConfig(CommonConfig):
    """What the training loop (`train` below) reads: shared by base, mid-training and SFT."""

    # batch
    device_batch_size: int = option(32, "rows of T tokens per forward/backward (lower it if out of memory)")
    total_batch_size: int = option(524288, "tokens per optimizer step; reached by gradient accumulation; -1 = one micro-batch")
    num_iterations: int = option(-1, "optimizer steps; -1 = derive them (see the stage's help)")
    # optimizer (upstream nanochat's values)
    matrix_lr: float = option(0.02, "Muon learning rate for the transformer's matrices")
    embedding_lr: float = option(0.2, "AdamW learning rate for the token embedding")
    unembedding_lr: float = option(0.004, "AdamW learning rate for the lm_head")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_ratio: float = option(0.0, "fraction of steps of linear lr warmup")
    warmdown_ratio: float = option(0.2, "fraction of steps of linear lr warmdown at the end")
    final_lr_frac: float = option(0.0, "lr at the end as a fraction of the peak")
    # evaluation, checkpoints, output
    eval_every: int = option(250, "evaluate every N steps (and at the end); -1 = only at the end")
    sample_every: int = option(2000, "print samples every N steps (and at the end); -1 = only at the end")
    save_every: int = option(1000, "checkpoint every N steps (and at the end); -1 = only at the end")
    keep_last: int = option(2, "complete checkpoints to keep")
    resume: bool = option(False, "continue from the latest complete checkpoint in --run-dir")
    run_dir: str = option("", "output directory; empty = $NANOCHAT_BASE_DIR/runs/<stage>_d<depth>")
    tokenizer_dir: str = option("", "trained tokenizer; empty = $NANOCHAT_BASE_DIR/tokenizer")
    compile: str = option("auto", "torch.compile: auto (where the precision plan allows), on, off", choices=("auto", "on", "off"))
    max_bad_steps: int = option(20, "abort after this many skipped (non-finite) steps in a row")
    time_budget: str = option("", "wall-clock budget (6h, 90m, 45s): times the first steps, then fixes --num-iterations so the whole lr schedule ends inside it (nanochat/budget.py)")


@dataclass
class BaseTrainConfig(ModelShapeConfig, LoopConfig):
    target_param_data_ratio: float = option(20.0, "training tokens per parameter when --num-iterations is -1 (Chinchilla: 20)")
    eval_tokens: int = option(20 * 524288, "validation tokens per evaluation")
    data_dir: str = option("", "parquet shards; empty = $NANOCHAT_DATA or $NANOCHAT_BASE_DIR/data")
    # a number or "auto"; setup() turns it into an int once (resolve_device_batch_size), so Run.cfg
    # and everything after setup reads an int
    device_batch_size: str = option(
        "32", "rows of T tokens per forward/backward, or 'auto': the largest the memory model (nanochat/memory.py) "
        "predicts to fit, checked by a probe step, with accumulation reaching --total-batch-size (CPU/MPS: 8)")


Config = BaseTrainConfig  # the name ray_jobs/train.py looks up in every stage module


def iterations_for(cfg: BaseTrainConfig, num_params: int, tokens_per_step: int) -> int:
    if cfg.num_iterations > 0:
        return cfg.num_iterations
    return max(1, round(cfg.target_param_data_ratio * num_params / tokens_per_step))


def grad_accum_steps(cfg: LoopConfig, seq_len: int, world_size: int = 1) -> int:
    tokens_per_micro = cfg.device_batch_size * seq_len * world_size
    total = tokens_per_micro if cfg.total_batch_size == -1 else cfg.total_batch_size
    if total % tokens_per_micro:
        raise ValueError(
            f"--total-batch-size {total} is not a multiple of device batch x seq len x workers = {tokens_per_micro}; "
            "change one of --total-batch-size, --device-batch-size, --max-seq-len, --num-workers"
        )
    return total // tokens_per_micro


@dataclass
class Run:
    """Everything one training process holds; built the same way by the plain script and Ray workers."""

    cfg: LoopConfig
    device: torch.device
    plan: PrecisionPlan
    tokenizer: Tokenizer
    model: GPT
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    step_fn: TrainStep
    grad_accum: int
    tokens_per_step: int  # global, over all workers
    num_iterations: int
    meta: dict
    world_size: int = 1
    is_main: bool = True
    started: float = dataclasses.field(default_factory=time.perf_counter)  # a --time-budget counts from here

    @property
    def flops_per_token(self) -> int:
        return self.model.estimate_flops()

    @property
    def stage(self) -> str:
        return self.meta["stage"]

    def describe(self) -> str:
        c, m = self.cfg, self.model.config
        tokens = self.num_iterations * self.tokens_per_step
        return (
            f"model: depth {m.n_layer}, width {m.n_embd}, {m.n_head} heads, {self.model.num_params():,} parameters, "
            f"{self.flops_per_token:.3e} FLOPs/token\n"
            f"batch: {c.device_batch_size} x {m.sequence_len} tokens x {self.grad_accum} accumulation "
            f"x {self.world_size} workers = {self.tokens_per_step:,} tokens/step\n"
            f"horizon: {self.num_iterations} steps = {tokens:,} tokens ({tokens / self.model.num_params():.1f} tokens per parameter)"
        )

    def restore(self, path: Path) -> tuple[int, dict | None]:
        """Load a checkpoint into this run; returns (step, data position)."""
        state = checkpoint.load_checkpoint(
            path, model=self.model, optimizer=self.optimizer, scaler=self.scaler,
            expect={"model_config": self.meta["model_config"], "tokenizer": self.meta["tokenizer"]},
        )
        self.step_fn.skipped_total = state["meta"].get("skipped_steps", 0)
        if state["meta"].get("time_budget"):  # a budgeted run already fixed its horizon: keep it
            self.meta["time_budget"] = state["meta"]["time_budget"]
            self.num_iterations = self.meta["time_budget"]["num_iterations"]
        return state["step"], state["loader_state"]

    def save(self, root: Path, step: int, data_position: dict | None) -> Path:
        self.meta["skipped_steps"] = self.step_fn.skipped_total
        return checkpoint.save_checkpoint(
            root, step, model=self.model, optimizer=self.optimizer, scaler=self.scaler,
            loader_state=data_position, meta=self.meta, keep_last=self.cfg.keep_last,
        )

    def val_loader(self) -> DataLoader:
        shards = split_shards(list_shards(self.cfg.data_dir or default_data_dir()), "val")
        return DataLoader(shards, self.tokenizer, self.cfg.device_batch_size, self.cfg.max_seq_len, self.device)

    def evaluate(self) -> dict[str, float]:
        """Validation metrics, logged at eval steps and in the summary: bits per byte for the base model."""
        steps = max(1, self.cfg.eval_tokens // (self.cfg.device_batch_size * self.cfg.max_seq_len))
        return {"val_bpb": evaluate_bpb(self.model, self.plan, iter(self.val_loader()), steps, self.tokenizer.token_bytes())}

    def samples(self) -> dict[str, str]:
        """A few greedy continuations to eyeball during training."""
        return {p: sample_text(self.model, self.tokenizer, self.plan, p, max_new_tokens=24) for p in SAMPLE_PROMPTS}


def resolve_device_batch_size(cfg: BaseTrainConfig, plan: PrecisionPlan, device: torch.device, vocab_size: int,
                              world_size: int = 1) -> int:
    """--device-batch-size as an int: a number as given, or "auto" chosen by nanochat.memory and probed."""
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
            bench = BenchConfig(depth=cfg.depth, max_seq_len=cfg.max_seq_len, vocab_size=vocab_size,
                                device_batch_size=batch, aspect_ratio=cfg.aspect_ratio, head_dim=cfg.head_dim,
                                total_batch_size=batch * cfg.max_seq_len * min(grad_accum, 2), compile=cfg.compile,
                                seed=cfg.seed)
            ok = bench_fits(bench, plan, device, batch)
            torch.cuda.reset_peak_memory_stats(device)  # the run's peak is the run's, not the probe's
            return ok

    batch, _, why = auto_device_batch_size(
        budget, cfg.depth, cfg.max_seq_len, vocab_size, plan.dtype, plan.compile if cfg.compile == "auto" else cfg.compile == "on",
        cfg.total_batch_size, world_size, cfg.aspect_ratio, cfg.head_dim, probe)
    print(f"--device-batch-size auto: {why}")
    seed_everything(cfg.seed)  # the probe drew random numbers: the real model starts from the seed again
    return batch


def setup(cfg: BaseTrainConfig, device: torch.device, world_size: int = 1, rank: int = 0,
          sync: Callable | None = None) -> Run:
    """Precision plan, tokenizer, model, optimizer, GradScaler and step function for one process."""
    _, plan = init_process(cfg, device)  # same seed on every worker: identical initial weights, no broadcast needed
    tokenizer = Tokenizer.load(cfg.tokenizer_dir or default_tokenizer_dir())
    cfg = dataclasses.replace(cfg, device_batch_size=resolve_device_batch_size(cfg, plan, device, tokenizer.vocab_size, world_size))
    model_config = GPTConfig.from_depth(cfg.depth, tokenizer.vocab_size, cfg.max_seq_len, cfg.aspect_ratio, cfg.head_dim)
    model = GPT(model_config).to(device)
    model.init_weights()
    optimizer = model.setup_optimizer(
        matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr, unembedding_lr=cfg.unembedding_lr,
        weight_decay=cfg.weight_decay, ns_dtype=getattr(torch, plan.muon_dtype),
    )
    scaler = plan.make_grad_scaler()
    grad_accum = grad_accum_steps(cfg, cfg.max_seq_len, world_size)
    tokens_per_step = grad_accum * cfg.device_batch_size * cfg.max_seq_len * world_size
    step_fn = TrainStep(maybe_compile(model, plan, cfg.compile), optimizer, plan, grad_accum, scaler,
                        cfg.max_bad_steps, sync)
    meta = {"stage": "base", "model_config": dataclasses.asdict(model_config), "tokenizer": tokenizer.fingerprint(),
            "plan": plan.to_dict(), "train_config": dataclasses.asdict(cfg)}
    num_iterations = iterations_for(cfg, model.num_params(), tokens_per_step)
    return Run(cfg, device, plan, tokenizer, model, optimizer, scaler, step_fn, grad_accum, tokens_per_step,
               num_iterations, meta, world_size, is_main=rank == 0)


def train(run: Run, batches: Iterator, start_step: int, log: Callable[[dict], None],
          save: Callable[[int], None]) -> dict:
    """The loop: schedule, step, and at their intervals evaluation, samples and checkpoints.

    `batches` yields (x, y); `log` receives one record per step; `save(step)` checkpoints. Only the
    main process evaluates, samples and shows progress."""
    cfg, plan, n = run.cfg, run.plan, run.num_iterations
    timed_tokens, timed_seconds, timed_wait, evaluated, result = 0, 0.0, 0.0, {}, None
    batches = TimedIterator(batches)
    started = time.perf_counter()
    # --time-budget: n is provisional until the budget fixes it (unless a resumed checkpoint already did)
    budget = None
    if cfg.time_budget and not run.meta.get("time_budget"):
        budget = TimeBudget(parse_duration(cfg.time_budget), run.started, start_step, cfg)
        n = budget.provisional_horizon(n)

    def is_due(every: int, done: int) -> bool:
        return done == n or (every > 0 and done % every == 0)

    def timed(fn: Callable, *args: object) -> tuple[object, float]:
        t = time.perf_counter()
        return fn(*args), time.perf_counter() - t

    # in logs (not a terminal) a bar redraw is a new line: redraw every 10 s instead of 10 times a second
    bar = tqdm(initial=start_step, total=n, desc=run.stage, dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 10, disable=not run.is_main)
    for step in itertools.count(start_step):  # not range(): a time budget may still change n
        if step >= n:
            break
        lrm = lr_multiplier(step, n, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)
        set_schedule(run.optimizer, lrm, muon_momentum(step))
        t0, waited = time.perf_counter(), batches.waited
        result = run.step_fn(batches)
        dt = time.perf_counter() - t0
        if step - start_step >= 3:  # leave compile/warm-up steps out of the throughput average
            timed_tokens, timed_seconds = timed_tokens + run.tokens_per_step, timed_seconds + dt
            timed_wait += batches.waited - waited
        done = step + 1
        probing = budget is not None and done == budget.probe_step  # time what the run's end will cost
        if budget is not None:
            budget.observe(done, dt)
            n = run.num_iterations = budget.horizon(done, n, run.tokens_per_step, run.model.num_params(), run.device)
            run.meta["time_budget"] = budget.decision  # in every checkpoint from the decision on: a resume keeps it
            bar.total = n
        record = {"step": done, "loss": result.loss, "tok_per_s": run.tokens_per_step / dt, "lr_mult": lrm,
                  "mfu": run.flops_per_token * run.tokens_per_step / dt / plan.peak_flops if plan.peak_flops else None,
                  "loss_scale": result.scale, "skipped": result.skipped}
        if run.is_main and (is_due(cfg.eval_every, done) or probing):
            evaluated, seconds = timed(run.evaluate)
            if budget is not None:
                budget.note("eval_s", seconds)
            record.update(evaluated)
            tqdm.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in evaluated.items()))
        log(record)
        bar.set_postfix_str(
            f"loss {result.loss:.3f} | {record['tok_per_s']:,.0f} tok/s"
            + (f" | mfu {100 * record['mfu']:.1f}%" if record["mfu"] else "")
            + (f" | scale {result.scale:g} skipped {run.step_fn.skipped_total}" if run.scaler else ""),
            refresh=False,  # the bar redraws at its own pace (mininterval)
        )
        if run.is_main and (is_due(cfg.sample_every, done) or probing):
            samples, seconds = timed(run.samples)
            for prompt, text in samples.items():
                tqdm.write(f"  {prompt!r} -> {text!r}")
            if budget is not None:
                budget.note("sample_s", seconds)
        if is_due(cfg.save_every, done) or probing or (budget is not None and done == budget.decide_step):
            _, seconds = timed(save, done)
            if budget is not None:
                budget.note("save_s", seconds)
        bar.update(1)
    bar.close()
    tok_per_s = timed_tokens / timed_seconds if timed_seconds else None
    return {
        "stage": run.stage,
        "steps": n,
        "final_loss": result.loss if result else None,
        **evaluated,
        "wall_time_s": time.perf_counter() - started,
        "tok_per_s": tok_per_s,
        "mfu": run.flops_per_token * tok_per_s / plan.peak_flops if tok_per_s and plan.peak_flops else None,
        "data_wait_frac": timed_wait / timed_seconds if timed_seconds else None,
        "skipped_steps": run.step_fn.skipped_total,
        "loss_scale": run.scaler.get_scale() if run.scaler else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(run.device) / 2**30 if run.device.type == "cuda" else None,
        "params": run.model.num_params(),
        "world_size": run.world_size,
        "plan": plan.to_dict(),
        "time_budget": run.meta.get("time_budget"),
        "elapsed_since_setup_s": time.perf_counter() - run.started,
    }


def run_single_process(run: Run, run_dir: Path, resume: bool, batches_from: Callable[[dict | None], Iterator],
                       loop: Callable = train) -> dict:
    """What every stage's plain main() does around its loop: resume from the run's latest checkpoint
    (with --resume), open the metrics log, run `loop`, write summary.json.

    `batches_from(position)` builds the stage's data iterator at a saved position (None = start);
    it must have state_dict(), which every checkpoint records."""
    ckpt_dir = run_dir / "checkpoints"
    start_step, position = 0, None
    latest = checkpoint.find_latest(ckpt_dir) if resume else None
    if latest is not None:
        start_step, position = run.restore(latest)
        print(f"resumed from {latest} at step {start_step}")
    elif resume:
        print(f"--resume: no complete checkpoint in {ckpt_dir}, starting from scratch")
    batches = batches_from(position)
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=start_step if latest else None)
    summary = loop(run, batches, start_step, metrics.log, lambda step: run.save(ckpt_dir, step, batches.state_dict()))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print("summary:", json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(BaseTrainConfig, argv, description=__doc__.splitlines()[0])
    run = setup(cfg, torch.device(cfg.device or default_device()))
    print(f"precision plan:\n{run.plan.summary()}\n{run.describe()}")
    shards = split_shards(list_shards(cfg.data_dir or default_data_dir()), "train")

    def loader(position: dict | None) -> DataLoader:
        return DataLoader(shards, run.tokenizer, run.cfg.device_batch_size, cfg.max_seq_len, run.device, state=position)

    return run_single_process(run, Path(cfg.run_dir or base_dir() / "runs" / f"base_d{cfg.depth}"), cfg.resume, loader)


if __name__ == "__main__":
    main(sys.argv[1:])
