"""A tiny end-to-end run on CPU: shards from the embedded corpus -> tokenizer -> base training ->
evaluation and samples -> a short SFT -> one chat answer. Minutes on a laptop; every stage is the real
script with small settings.

    python -m nanochat.scripts.demo                 # writes under $NANOCHAT_BASE_DIR/demo
    python -m nanochat.scripts.demo --steps 600     # a little longer, better samples

Each stage prints the command line that runs it on its own.
"""

from __future__ import annotations

import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nanochat import dataset
from nanochat.common import base_dir
from nanochat.config import option, parse_config
from nanochat.scripts import base_loss, base_train, chat_cli, chat_sft, tok_train


def stage(name: str, module: str, entry: Callable, argv: list[str]):
    print(f"\n=== {name}: python -m {module} {shlex.join(argv)}", flush=True)
    t0 = time.time()
    result = entry(argv)
    print(f"=== {name} done in {time.time() - t0:.0f}s", flush=True)
    return result


@dataclass
class DemoConfig:
    out: str = option("", "demo directory (empty = $NANOCHAT_BASE_DIR/demo); wiped first")
    steps: int = option(300, "base training steps")
    depth: int = option(4, "model depth")
    vocab_size: int = option(2048, "tokenizer vocabulary size")


def prepare(args: DemoConfig) -> tuple[Path, Path, Path]:
    """Fresh demo directory, shards of the embedded corpus and a tokenizer: (out, data, tokenizer)."""
    out = Path(args.out) if args.out else base_dir() / "demo"
    shutil.rmtree(out, ignore_errors=True)
    data, tok = out / "data", out / "tokenizer"
    stage("shards", "nanochat.dataset", dataset.main, ["build", "--source", "embedded", "--out", str(data)])
    stage("tokenizer", "nanochat.scripts.tok_train", tok_train.main,
          ["--vocab-size", str(args.vocab_size), "--data-dir", str(data), "--out", str(tok)])
    return out, data, tok


def train_args(args: DemoConfig, data: Path, tok: Path) -> list[str]:
    """The base-training flags of the demo: a small model that learns visibly in a few minutes on CPU."""
    return [
        "--device", "cpu", "--data-dir", str(data), "--tokenizer-dir", str(tok),
        "--depth", str(args.depth), "--head-dim", "64", "--max-seq-len", "128",
        "--device-batch-size", "8", "--total-batch-size", "1024", "--num-iterations", str(args.steps),
        "--eval-every", "100", "--eval-tokens", "16384", "--sample-every", "-1", "--save-every", "-1",
    ]


def evaluate(data: Path, tok: Path, checkpoints: Path) -> dict:
    return stage("evaluation", "nanochat.scripts.base_loss", base_loss.main, [
        "--device", "cpu", "--data-dir", str(data), "--tokenizer-dir", str(tok), "--checkpoint", str(checkpoints),
        "--device-batch-size", "16", "--eval-tokens", "16384",
    ])


DEMO_MIXTURE = "identity:300,arithmetic:300,spelling:200"
DEMO_QUESTION = "Who are you?"


def sft_args(args: DemoConfig, tok: Path, start: Path, depth_dir: Path) -> list[str]:
    """SFT flags of the demo: a short run on synthetic conversations, from the demo's base model."""
    return [
        "--device", "cpu", "--tokenizer-dir", str(tok), "--depth", str(args.depth), "--init-from", str(start),
        "--run-dir", str(depth_dir), "--mixture", DEMO_MIXTURE, "--val-conversations", "40",
        "--device-batch-size", "8", "--num-iterations", str(max(args.steps // 10, 10)), "--init-lr-frac", "0.2",
        "--eval-every", "-1", "--sample-every", "-1", "--save-every", "-1",
    ]


def chat(tok: Path, checkpoint: Path) -> str:
    """One question to the fine-tuned model, through the chat CLI."""
    return stage("chat", "nanochat.scripts.chat_cli", chat_cli.main, [
        "--device", "cpu", "--tokenizer-dir", str(tok), "--checkpoint", str(checkpoint),
        "--temperature", "0", "--max-tokens", "48", "-p", DEMO_QUESTION,
    ])


def main(argv: list[str] | None = None) -> dict:
    args = parse_config(DemoConfig, argv, description=__doc__.splitlines()[0])
    out, data, tok = prepare(args)
    run = out / "run"
    summary = stage("base training", "nanochat.scripts.base_train", base_train.main,
                    [*train_args(args, data, tok), "--run-dir", str(run)])
    evaluation = evaluate(data, tok, run / "checkpoints")
    sft = stage("chat fine-tuning (SFT)", "nanochat.scripts.chat_sft", chat_sft.main, sft_args(args, tok, run, out / "sft"))
    answer = chat(tok, out / "sft")
    print(f"\ndemo finished: val bpb {evaluation['val_bpb']:.3f}, final train loss {summary['final_loss']:.3f}, "
          f"SFT val loss {sft['val_loss']:.3f}\n{DEMO_QUESTION!r} -> {answer!r}\nfiles in {out}")
    return {"train": summary, "eval": evaluation, "sft": sft, "answer": answer}


if __name__ == "__main__":
    main()
