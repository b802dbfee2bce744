"""The Run one training process holds, how every stage builds it, and the loop the LoopConfig stages
(base, mid, SFT) share in a plain script and on Ray. The rule: the loop adds no per-step work beyond
the step, the schedule and one log record (the single-process path must stay exactly as fast)."""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

import torch
from tqdm import tqdm

from nanochat import checkpoint, shardfs
from nanochat.common import init_process
from nanochat.config import CommonConfig, ModelShapeConfig, option
from nanochat.dataset import default_data_dir
from nanochat.gpt import GPT, GPTConfig
from nanochat.precision import PrecisionPlan
from nanochat.runlog import progress_bar
from nanochat.tokenizer import Tokenizer, default_tokenizer_dir
from nanochat.train.budget import TimeBudget, parse_duration
from nanochat.train.step import TrainStep, lr_multiplier, maybe_compile, muon_momentum, set_schedule


@dataclass
class StageConfig(CommonConfig):
    """What every training stage reads, RL included."""

    STAGE: ClassVar[str] = ""  # names the run dir and the checkpoint's stage
    PREVIOUS: ClassVar[str] = ""  # the stage whose checkpoint it starts from ("" = none)

    device_batch_size: int = option(32, "rows of T tokens per forward/backward (lower it if out of memory)")
    num_iterations: int = option(-1, "optimizer steps; -1 = derive them (see the stage's help)")
    # optimizer (upstream nanochat's values)
    matrix_lr: float = option(0.02, "Muon learning rate for the transformer's matrices")
    embedding_lr: float = option(0.2, "AdamW learning rate for the token embedding")
    unembedding_lr: float = option(0.004, "AdamW learning rate for the lm_head")
    # evaluation, checkpoints, output
    eval_every: int = option(250, "evaluate every N steps (and at the end); -1 = only at the end")
    save_every: int = option(1000, "checkpoint every N steps (and at the end); -1 = only at the end")
    keep_last: int = option(2, "complete checkpoints to keep")
    resume: bool = option(False, "continue the run in --run-dir from its latest complete checkpoint (without it, a "
                          "run dir that holds a run is refused)")
    allow_new_shards: bool = option(False, "with --resume: continue although the shards differ from those the "
                                    "checkpoint was trained on (another validation shard, shifted data positions)")
    run_dir: str = option("", "output directory; empty = $NANOCHAT_BASE_DIR/runs/<stage>_d<depth>")
    tokenizer_dir: str = option("", "trained tokenizer; empty = $NANOCHAT_BASE_DIR/tokenizer")
    max_bad_steps: int = option(20, "abort after this many skipped (non-finite) steps in a row")
    report_every: int = option(10, "every N steps: the step-time split (data, compute, exposed communication, optimizer) "
                               "in the metrics, and on Ray the metrics sent to Ray Train (MLflow gets them once a checkpoint "
                               "covers them); -1 = never")


@dataclass
class LoopConfig(StageConfig):
    """What the shared loop (`train` below) reads on top: base, mid-training and SFT."""

    total_batch_size: int = option(524288, "tokens per optimizer step; reached by gradient accumulation; -1 = one micro-batch")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_ratio: float = option(0.0, "fraction of steps of linear lr warmup")
    warmdown_ratio: float = option(0.2, "fraction of steps of linear lr warmdown at the end")
    final_lr_frac: float = option(0.0, "lr at the end as a fraction of the peak")
    sample_every: int = option(2000, "print samples every N steps (and at the end); -1 = only at the end")
    compile: str = option("auto", "torch.compile: auto (where the precision plan allows), on, off", choices=("auto", "on", "off"))
    time_budget: str = option("", "wall-clock budget (6h, 90m, 45s): times the first steps, then fixes --num-iterations so the whole lr schedule ends inside it (nanochat/train/budget.py)")


def grad_accum_steps(cfg: LoopConfig, seq_len: int, world_size: int = 1) -> int:
    tokens_per_micro = cfg.device_batch_size * seq_len * world_size
    total = tokens_per_micro if cfg.total_batch_size == -1 else cfg.total_batch_size
    if total % tokens_per_micro:
        raise ValueError(
            f"--total-batch-size {total} is not a multiple of device batch x seq len x workers = {tokens_per_micro}; "
            "change one of --total-batch-size, --device-batch-size, --max-seq-len, --num-workers"
        )
    return total // tokens_per_micro


@dataclass(kw_only=True)
class Run:
    """Everything one training process holds; built the same way by the plain script and Ray workers.
    Each stage's subclass adds evaluate() (validation metrics) and samples() (generations to eyeball)."""

    cfg: StageConfig
    device: torch.device
    plan: PrecisionPlan
    tokenizer: Tokenizer
    model: GPT
    step_fn: TrainStep  # holds the optimizer this process steps and the GradScaler
    grad_accum: int
    tokens_per_step: int  # global, over all workers
    num_iterations: int
    meta: dict
    world_size: int = 1
    is_main: bool = True
    started: float = dataclasses.field(default_factory=time.perf_counter)  # a --time-budget counts from here

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.step_fn.optimizer

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        return self.step_fn.scaler

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


R = TypeVar("R", bound=Run)


def restore_run(run: Run, path: Path) -> tuple[int, dict | None]:
    """Load a checkpoint into `run`; returns (step, data position)."""
    state = checkpoint.load_checkpoint(
        path, model=run.model, optimizer=run.step_fn.parallel or run.optimizer, scaler=run.scaler,  # a sharded run takes its pieces
        expect={"model_config": run.meta["model_config"], "tokenizer": run.meta["tokenizer"]},
    )
    if "shards" in run.meta:  # a stage that trains on shards
        checkpoint.check_shard_set(path, state["meta"].get("shards"), run.meta["shards"], run.cfg.allow_new_shards)
    run.meta["run_id"] = state["meta"].get("run_id", run.meta["run_id"])  # the run goes on under its own id
    run.step_fn.skipped_total = state["meta"].get("skipped_steps", 0)
    if state["meta"].get("time_budget"):  # a budgeted run already fixed its horizon: keep it
        run.meta["time_budget"] = state["meta"]["time_budget"]
        run.num_iterations = run.meta["time_budget"]["num_iterations"]
    return state["step"], state["loader_state"]


def snapshot_run(run: Run, step: int, data_position: dict | None, optimizer_state: dict | None = None) -> checkpoint.Snapshot:
    """`run`'s checkpoint of `step` in host memory; a sharded run passes the whole optimizer state its ranks
    gathered (DataParallel.state_dict)."""
    run.meta["skipped_steps"] = run.step_fn.skipped_total
    return checkpoint.snapshot(
        step, model=run.model, optimizer=run.optimizer if optimizer_state is None else optimizer_state, scaler=run.scaler,
        loader_state=data_position, meta=run.meta,
    )


# -----------------------------------------------------------------------------
# building a process's Run: every stage's setup() and the memory probe go through these


def start_process(cfg: StageConfig, device: torch.device) -> tuple[PrecisionPlan, Tokenizer]:
    """The precision plan applied to this process (seeded) and the stage's tokenizer."""
    _, plan = init_process(cfg, device)
    return plan, Tokenizer.load(cfg.tokenizer_dir or default_tokenizer_dir())


def new_model(shape: ModelShapeConfig, vocab_size: int, device: torch.device) -> GPT:
    """A freshly initialised GPT of this shape (the seed decides its weights)."""
    model = GPT(GPTConfig.from_depth(shape.depth, vocab_size, shape.max_seq_len, shape.aspect_ratio, shape.head_dim)).to(device)
    model.init_weights()
    return model


def make_step(model: GPT, plan: PrecisionPlan, grad_accum: int, lrs: StageConfig, compile: str = "off", lr_frac: float = 1.0,
              weight_decay: float = 0.0) -> TrainStep:
    """Muon+AdamW at `lrs`' rates x lr_frac, the plan's GradScaler and the step that holds them both."""
    optimizer = model.setup_optimizer(matrix_lr=lrs.matrix_lr * lr_frac, embedding_lr=lrs.embedding_lr * lr_frac,
                                      unembedding_lr=lrs.unembedding_lr * lr_frac, weight_decay=weight_decay,
                                      ns_dtype=getattr(torch, plan.muon_dtype))
    return TrainStep(maybe_compile(model, plan, compile), optimizer, plan, grad_accum, plan.make_grad_scaler(),
                     lrs.max_bad_steps)


def build_run(run_class: type[R], cfg: StageConfig, device: torch.device, plan: PrecisionPlan, tokenizer: Tokenizer,
              model: GPT, grad_accum: int, *, compile: str = "off", lr_frac: float = 1.0, weight_decay: float = 0.0,
              tokens_per_step: int, num_iterations: int, world_size: int, rank: int,
              meta: dict | None = None, **fields: object) -> R:
    """The stage's Run: `model`, its step, and a meta (stage, a new run id, model, tokenizer, plan, settings,
    + `meta`). An entry point that owns a run dir replaces the id with the dir's (checkpoint.open_run_dir)."""
    step_fn = make_step(model, plan, grad_accum, cfg, compile, lr_frac, weight_decay)
    # where the tokenizer and the shards are, so later entry points need no flags for them (checkpoint.tokenizer_dir_for)
    sources = {"tokenizer_dir": str(tokenizer.directory) if tokenizer.directory else None}
    if hasattr(cfg, "data_dir"):  # a stage that reads shards
        sources["data_dir"] = shardfs.absolute(cfg.data_dir or default_data_dir())
    meta = {"stage": cfg.STAGE, "run_id": checkpoint.new_run_id(), "model_config": dataclasses.asdict(model.config), "tokenizer": tokenizer.fingerprint(),
            **sources, "plan": plan.to_dict(), "train_config": dataclasses.asdict(cfg), **(meta or {})}
    return run_class(cfg=cfg, device=device, plan=plan, tokenizer=tokenizer, model=model, step_fn=step_fn, grad_accum=step_fn.grad_accum, tokens_per_step=tokens_per_step,
                     num_iterations=num_iterations, meta=meta, world_size=world_size, is_main=rank == 0, **fields)


# -----------------------------------------------------------------------------
# the loop


def train(run: Run, batches: Iterator, start_step: int, log: Callable[[dict], None],
          save: Callable[[int], None]) -> dict:
    """The loop: schedule, step, and at their intervals evaluation, samples and checkpoints.

    `batches` yields (x, y); `log` receives one record per step; `save(step)` checkpoints. Every process
    evaluates (its share, reduced over the workers); only the main one samples and shows progress."""
    cfg, plan, n = run.cfg, run.plan, run.num_iterations
    timed_tokens, timed_seconds, timed_wait, evaluated, result = 0, 0.0, 0.0, {}, None
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

    bar = progress_bar(initial=start_step, total=n, desc=run.stage, dynamic_ncols=True, disable=not run.is_main)
    try:  # the bar's last line before an error's, not after it
        for step in itertools.count(start_step):  # not range(): a time budget may still change n
            if step >= n:
                break
            lrm = lr_multiplier(step, n, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)
            set_schedule(run.optimizer, lrm, muon_momentum(step))
            t0 = time.perf_counter()
            result = run.step_fn(batches)
            dt = time.perf_counter() - t0
            if step - start_step >= 3:  # leave compile/warm-up steps out of the throughput average
                timed_tokens, timed_seconds = timed_tokens + run.tokens_per_step, timed_seconds + dt
                timed_wait += result.data_s
            done = step + 1
            probing = budget is not None and done == budget.probe_step  # time what the run's end will cost
            if budget is not None:
                budget.observe(done, dt)
                n = run.num_iterations = budget.horizon(done, n, run.tokens_per_step, run.model.num_params(), run.device)
                run.meta["time_budget"] = budget.decision  # in every checkpoint from the decision on: a resume keeps it
                bar.total = n
            record = {"step": done, "loss": result.loss, "tok_per_s": run.tokens_per_step / dt, "lr_mult": lrm,
                      "mfu": run.flops_per_token * run.tokens_per_step / dt / plan.peak_flops if plan.peak_flops else None,
                      "loss_scale": result.scale, "skipped": result.skipped, "grad_norm": result.grad_norm}
            if is_due(cfg.eval_every, done) or probing:  # every rank evaluates its share (collective)
                evaluated, seconds = timed(run.evaluate)
                if budget is not None:
                    budget.note("eval_s", seconds)
                record.update(evaluated)
                if run.is_main:
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
    finally:
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
