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
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from nanochat import checkpoint
from nanochat.common import base_dir, default_device, seed_everything
from nanochat.config import CommonConfig, option, parse_config
from nanochat.dataloader import DataLoader
from nanochat.dataset import default_data_dir, list_shards, split_shards
from nanochat.engine import sample_text
from nanochat.eval.bpb import evaluate_bpb
from nanochat.gpt import GPT, GPTConfig
from nanochat.precision import apply_process_settings, resolve
from nanochat.report import MetricsLog
from nanochat.tokenizer import Tokenizer, default_tokenizer_dir
from nanochat.training import TrainStep, lr_multiplier, maybe_compile, muon_momentum, set_schedule

SAMPLE_PROMPTS = ["In the beginning", "The meaning of life is", "He said to them,"]


@dataclass
class BaseTrainConfig(CommonConfig):
    # model: one knob
    depth: int = option(12, "transformer layers; width = depth * aspect_ratio rounded up to head_dim")
    aspect_ratio: int = option(64, "model width per layer of depth")
    head_dim: int = option(128, "attention head dimension")
    max_seq_len: int = option(2048, "context length T")
    # batch
    device_batch_size: int = option(32, "rows of T tokens per forward/backward (lower it if out of memory)")
    total_batch_size: int = option(524288, "tokens per optimizer step; reached by gradient accumulation; -1 = one micro-batch")
    # horizon: the first of these that is set wins
    num_iterations: int = option(-1, "optimizer steps; -1 = derive from --target-param-data-ratio")
    target_param_data_ratio: float = option(20.0, "training tokens per parameter when --num-iterations is -1 (Chinchilla: 20)")
    # optimizer (upstream nanochat's values)
    matrix_lr: float = option(0.02, "Muon learning rate for the transformer's matrices")
    embedding_lr: float = option(0.2, "AdamW learning rate for the token embedding")
    unembedding_lr: float = option(0.004, "AdamW learning rate for the lm_head")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_ratio: float = option(0.0, "fraction of steps of linear lr warmup")
    warmdown_ratio: float = option(0.2, "fraction of steps of linear lr warmdown at the end")
    final_lr_frac: float = option(0.0, "lr at the end as a fraction of the peak")
    # evaluation, checkpoints, output
    eval_every: int = option(250, "evaluate val bpb every N steps (and at the end); -1 = only at the end")
    eval_tokens: int = option(20 * 524288, "validation tokens per evaluation")
    sample_every: int = option(2000, "print samples every N steps (and at the end); -1 = only at the end")
    save_every: int = option(1000, "checkpoint every N steps (and at the end); -1 = only at the end")
    keep_last: int = option(2, "complete checkpoints to keep")
    resume: bool = option(False, "continue from the latest complete checkpoint in --run-dir")
    run_dir: str = option("", "output directory; empty = $NANOCHAT_BASE_DIR/runs/base_d<depth>")
    data_dir: str = option("", "parquet shards; empty = $NANOCHAT_DATA or $NANOCHAT_BASE_DIR/data")
    tokenizer_dir: str = option("", "trained tokenizer; empty = $NANOCHAT_BASE_DIR/tokenizer")
    compile: str = option("auto", "torch.compile: auto (where the precision plan allows), on, off", choices=("auto", "on", "off"))
    max_bad_steps: int = option(20, "abort after this many skipped (non-finite) steps in a row")


def iterations_for(cfg: BaseTrainConfig, num_params: int, tokens_per_step: int) -> int:
    if cfg.num_iterations > 0:
        return cfg.num_iterations
    return max(1, round(cfg.target_param_data_ratio * num_params / tokens_per_step))


def grad_accum_steps(cfg: BaseTrainConfig) -> int:
    tokens_per_micro = cfg.device_batch_size * cfg.max_seq_len
    total = tokens_per_micro if cfg.total_batch_size == -1 else cfg.total_batch_size
    if total % tokens_per_micro:
        raise ValueError(
            f"--total-batch-size {total} is not a multiple of device batch x seq len = {tokens_per_micro}; "
            "change one of --total-batch-size, --device-batch-size, --max-seq-len"
        )
    return total // tokens_per_micro


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(BaseTrainConfig, argv, description=__doc__.splitlines()[0])
    device = torch.device(cfg.device or default_device())
    plan = resolve(cfg.dtype, device)
    apply_process_settings(plan, device)
    run_dir = Path(cfg.run_dir or base_dir() / "runs" / f"base_d{cfg.depth}")
    ckpt_dir = run_dir / "checkpoints"
    print(f"precision plan:\n{plan.summary()}")

    # -- tokenizer, model, optimizer ---------------------------------------------------------
    tokenizer = Tokenizer.load(cfg.tokenizer_dir or default_tokenizer_dir())
    seed_everything(cfg.seed)
    model_config = GPTConfig.from_depth(cfg.depth, tokenizer.vocab_size, cfg.max_seq_len, cfg.aspect_ratio, cfg.head_dim)
    model = GPT(model_config).to(device)
    model.init_weights()
    optimizer = model.setup_optimizer(
        matrix_lr=cfg.matrix_lr, embedding_lr=cfg.embedding_lr, unembedding_lr=cfg.unembedding_lr,
        weight_decay=cfg.weight_decay, ns_dtype=getattr(torch, plan.muon_dtype),
    )
    scaler = plan.make_grad_scaler()
    grad_accum = grad_accum_steps(cfg)
    tokens_per_step = grad_accum * cfg.device_batch_size * cfg.max_seq_len
    num_iterations = iterations_for(cfg, model.num_params(), tokens_per_step)
    flops_per_token = model.estimate_flops()
    meta = {
        "stage": "base",
        "model_config": dataclasses.asdict(model_config),
        "tokenizer": tokenizer.fingerprint(),
        "plan": plan.to_dict(),
        "train_config": dataclasses.asdict(cfg),
    }
    print(
        f"model: depth {cfg.depth}, width {model_config.n_embd}, {model_config.n_head} heads, "
        f"{model.num_params():,} parameters, {flops_per_token:.3e} FLOPs/token\n"
        f"batch: {cfg.device_batch_size} x {cfg.max_seq_len} tokens x {grad_accum} accumulation = {tokens_per_step:,} tokens/step\n"
        f"horizon: {num_iterations} steps = {num_iterations * tokens_per_step:,} tokens "
        f"({num_iterations * tokens_per_step / model.num_params():.1f} tokens per parameter)"
    )

    # -- resume --------------------------------------------------------------------------------
    start_step, loader_state, skipped_before = 0, None, 0
    latest = checkpoint.find_latest(ckpt_dir) if cfg.resume else None
    if latest is not None:
        state = checkpoint.load_checkpoint(
            latest, model=model, optimizer=optimizer, scaler=scaler,
            expect={"model_config": meta["model_config"], "tokenizer": meta["tokenizer"]},
        )
        start_step, loader_state = state["step"], state["loader_state"]
        skipped_before = state["meta"].get("skipped_steps", 0)
        print(f"resumed from {latest} at step {start_step}")
    elif cfg.resume:
        print(f"--resume: no complete checkpoint in {ckpt_dir}, starting from scratch")

    # -- data ----------------------------------------------------------------------------------
    shards = list_shards(cfg.data_dir or default_data_dir())
    train_loader = DataLoader(split_shards(shards, "train"), tokenizer, cfg.device_batch_size, cfg.max_seq_len, device, state=loader_state)
    token_bytes = tokenizer.token_bytes()
    eval_steps = max(1, cfg.eval_tokens // (cfg.device_batch_size * cfg.max_seq_len))

    def val_bpb() -> float:
        val_loader = DataLoader(split_shards(shards, "val"), tokenizer, cfg.device_batch_size, cfg.max_seq_len, device)
        return evaluate_bpb(model, plan, iter(val_loader), eval_steps, token_bytes)

    def is_due(every: int, step: int) -> bool:
        return step == num_iterations or (every > 0 and step % every == 0)

    # -- loop ----------------------------------------------------------------------------------
    compiled = maybe_compile(model, plan, cfg.compile)
    train_step = TrainStep(compiled, optimizer, plan, grad_accum, scaler, cfg.max_bad_steps)
    train_step.skipped_total = skipped_before
    metrics = MetricsLog(run_dir / "metrics.jsonl", resume_step=start_step if latest else None)
    batches = iter(train_loader)
    timed_tokens, timed_seconds, val = 0, 0.0, None
    # in logs (not a terminal) a bar redraw is a new line: redraw every 10 s instead of 10 times a second
    bar = tqdm(range(start_step, num_iterations), initial=start_step, total=num_iterations, desc="base",
               dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 10)
    for step in bar:
        set_schedule(optimizer, lr_multiplier(step, num_iterations, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac), muon_momentum(step))
        t0 = time.perf_counter()
        result = train_step(batches)
        dt = time.perf_counter() - t0
        if step - start_step >= 3:  # leave compile/warm-up steps out of the throughput average
            timed_tokens, timed_seconds = timed_tokens + tokens_per_step, timed_seconds + dt
        tok_per_s = tokens_per_step / dt
        mfu = flops_per_token * tok_per_s / plan.peak_flops if plan.peak_flops else None
        record = {"step": step + 1, "loss": result.loss, "tok_per_s": tok_per_s, "mfu": mfu,
                  "loss_scale": result.scale, "skipped": result.skipped, "lr_mult": optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["initial_lr"]}
        done = step + 1
        if is_due(cfg.eval_every, done):
            val = record["val_bpb"] = val_bpb()
            tqdm.write(f"step {done}: val bpb {val:.4f}")
        metrics.log(record)
        bar.set_postfix_str(
            f"loss {result.loss:.3f} | {tok_per_s:,.0f} tok/s" + (f" | mfu {100 * mfu:.1f}%" if mfu else "")
            + (f" | scale {result.scale:g} skipped {train_step.skipped_total}" if scaler else ""),
            refresh=False,  # the bar redraws at its own pace (mininterval)
        )
        if is_due(cfg.sample_every, done):
            for prompt in SAMPLE_PROMPTS:
                tqdm.write(f"  {prompt!r} -> {sample_text(model, tokenizer, plan, prompt, max_new_tokens=24)!r}")
        if is_due(cfg.save_every, done):
            meta["skipped_steps"] = train_step.skipped_total
            checkpoint.save_checkpoint(
                ckpt_dir, done, model=model, optimizer=optimizer, scaler=scaler,
                loader_state=train_loader.state_dict(), meta=meta, keep_last=cfg.keep_last,
            )
    bar.close()

    summary = {
        "steps": num_iterations,
        "final_loss": result.loss if num_iterations > start_step else None,
        "val_bpb": val,
        "tok_per_s": timed_tokens / timed_seconds if timed_seconds else None,
        "mfu": flops_per_token * timed_tokens / timed_seconds / plan.peak_flops if timed_seconds and plan.peak_flops else None,
        "skipped_steps": train_step.skipped_total,
        "loss_scale": scaler.get_scale() if scaler else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "params": model.num_params(),
        "plan": plan.to_dict(),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print("summary:", json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
