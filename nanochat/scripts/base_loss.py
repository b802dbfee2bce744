"""Evaluate a base checkpoint: bits per byte on the train and validation shards, plus samples.

    python -m nanochat.scripts.base_loss --run-dir ~/.cache/nanochat/runs/base_d12
    python -m nanochat.scripts.base_loss --run-dir runs/demo --device-batch-size 4 --eval-tokens 16384   # CPU

Bits per byte does not depend on the vocabulary, so runs with different tokenizers compare. The
checkpoint names its tokenizer and shards: --tokenizer-dir / --data-dir are needed only when they moved.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nanochat.checkpoint import (
    CheckpointError,
    data_dir_for,
    load_for_inference,
    read_meta,
    resolve_checkpoint,
    stage_run_dir,
)
from nanochat.common import init_process
from nanochat.config import CommonConfig, option, parse_config
from nanochat.dataloader import DataLoader
from nanochat.dataset import list_shards, split_shards
from nanochat.errors import run_main
from nanochat.eval.bpb import eval_steps, evaluate_bpb
from nanochat.infer.engine import sample_text

PROMPTS = ["In the beginning", "The meaning of life is", "He said to them,", "The king of"]


@dataclass
class BaseLossConfig(CommonConfig):
    run_dir: str = option("", "run directory (its checkpoints/ holds the model); empty = runs/base_d12")
    checkpoint: str = option("", "a specific step_* checkpoint directory instead of the run's latest")
    device_batch_size: int = option(32, "rows per forward pass")
    eval_tokens: int = option(20 * 524288, "tokens per split (at most what the split holds)")
    data_dir: str = option("", "parquet shards; empty = those the checkpoint was trained on, else $NANOCHAT_DATA or $NANOCHAT_BASE_DIR/data")
    tokenizer_dir: str = option("", "trained tokenizer; empty = the one the checkpoint recorded, else $NANOCHAT_BASE_DIR/tokenizer")
    max_new_tokens: int = option(32, "tokens per sample")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(BaseLossConfig, argv, description=__doc__.splitlines()[0])
    device, plan = init_process(cfg)
    try:
        source = resolve_checkpoint(cfg.checkpoint or Path(cfg.run_dir or stage_run_dir("base", 12)) / "checkpoints")
        shards = list_shards(data_dir_for(read_meta(source), cfg.data_dir, source))  # before the model loads
        model, tokenizer, source, _ = load_for_inference(source, device, cfg.tokenizer_dir)
    except CheckpointError as e:
        raise SystemExit(f"base_loss: {e}") from None
    seq_len = model.config.sequence_len
    result: dict = {"checkpoint": str(source), "dtype": plan.dtype}
    for split, name in (("train", "train"), ("val", "validation")):
        split_files = split_shards(shards, split)
        steps, rows = eval_steps(cfg.eval_tokens, cfg.device_batch_size, seq_len, split_files, tokenizer, name)
        loader = DataLoader(split_files, tokenizer, rows, seq_len, device)
        result[f"{split}_bpb"] = evaluate_bpb(model, plan, iter(loader), steps, tokenizer.token_bytes(), f"{split} bpb")
        print(f"{split} bpb: {result[f'{split}_bpb']:.4f}")
    result["samples"] = {p: sample_text(model, tokenizer, plan, p, cfg.max_new_tokens) for p in PROMPTS}
    for prompt, text in result["samples"].items():
        print(f"{prompt!r} -> {text!r}")
    print("result:", json.dumps(result))
    return result


if __name__ == "__main__":
    run_main(main)
