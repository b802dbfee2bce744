"""A tiny end-to-end run on CPU: shards from the embedded corpus -> tokenizer -> base training ->
evaluation and samples -> a short SFT -> one chat answer. Minutes on a laptop; every stage is the real
script with small settings.

    python -m nanochat.scripts.demo                 # writes under $NANOCHAT_BASE_DIR/demo
    python -m nanochat.scripts.demo --steps 600     # a little longer, better samples

Each stage prints the command line that runs it on its own; the end prints what to run next on the
demo's files (chat, serve, tune, speedrun), each ready to paste.
"""

from __future__ import annotations

import json
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nanochat import dataset
from nanochat.checkpoint import resolve_checkpoint, run_dir_of
from nanochat.common import base_dir
from nanochat.config import option, parse_config
from nanochat.scripts import base_loss, base_train, chat_cli, chat_sft, tok_train

# the demo model's shape and batch, also in the "what next" commands (tune, speedrun) that train afresh
HEAD_DIM, SEQ_LEN, DEVICE_BATCH, TOTAL_BATCH = 64, 128, 8, 1024
DEMO_MIXTURE = "identity:300,arithmetic:300,spelling:200"
DEMO_QUESTION = "Who are you?"


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


@dataclass(frozen=True)
class DemoFiles:
    """What a demo leaves, all under `out` (absolute, so the printed commands work from any directory)."""

    out: Path
    base: Path  # the base model's run (its latest checkpoint is used)
    chat: Path  # the fine-tuned model's run

    @property
    def data(self) -> Path:
        return self.out / "data"

    @property
    def tokenizer(self) -> Path:
        return self.out / "tokenizer"


def demo_dir(args: DemoConfig) -> Path:
    return (Path(args.out) if args.out else base_dir() / "demo").resolve()


def prepare(args: DemoConfig, files: DemoFiles) -> None:
    """A fresh demo directory with shards of the embedded corpus and a tokenizer."""
    shutil.rmtree(files.out, ignore_errors=True)
    stage("shards", "nanochat.dataset", dataset.main, ["build", "--source", "embedded", "--out", str(files.data)])
    stage("tokenizer", "nanochat.scripts.tok_train", tok_train.main,
          ["--vocab-size", str(args.vocab_size), "--data-dir", str(files.data), "--out", str(files.tokenizer)])


def train_args(args: DemoConfig, files: DemoFiles, workers: int = 1) -> list[str]:
    """The base-training flags of the demo: a small model that learns visibly in a few minutes on CPU
    (the same tokens per step for any number of data-parallel `workers`)."""
    return [
        "--device", "cpu", "--data-dir", str(files.data), "--tokenizer-dir", str(files.tokenizer),
        "--depth", str(args.depth), "--head-dim", str(HEAD_DIM), "--max-seq-len", str(SEQ_LEN),
        "--device-batch-size", str(DEVICE_BATCH), "--total-batch-size", str(TOTAL_BATCH * workers),
        "--num-iterations", str(args.steps), "--eval-every", "100", "--eval-tokens", "16384", "--sample-every", "-1",
        "--save-every", "-1",
    ]


def evaluate(files: DemoFiles) -> dict:
    """Bits per byte of the base model, on the shards and with the tokenizer its checkpoint names."""
    return stage("evaluation", "nanochat.scripts.base_loss", base_loss.main, [
        "--device", "cpu", "--checkpoint", str(files.base), "--device-batch-size", "16", "--eval-tokens", "16384",
    ])


def sft_args(args: DemoConfig, files: DemoFiles) -> list[str]:
    """SFT flags of the demo: a short run on synthetic conversations, from the demo's base model (and with
    the tokenizer its checkpoint names). Where it writes is the caller's: --run-dir for the plain script,
    --storage-path/--name on Ray."""
    return [
        "--device", "cpu", "--depth", str(args.depth), "--init-from", str(files.base),
        "--mixture", DEMO_MIXTURE, "--val-conversations", "40",
        "--device-batch-size", "8", "--num-iterations", str(max(args.steps // 10, 10)), "--init-lr-frac", "0.2",
        "--eval-every", "-1", "--sample-every", "-1", "--save-every", "-1",
    ]


def chat(files: DemoFiles) -> str:
    """One question to the fine-tuned model, through the chat CLI (the tokenizer: the checkpoint's)."""
    return stage("chat", "nanochat.scripts.chat_cli", chat_cli.main, [
        "--device", "cpu", "--checkpoint", str(files.chat), "--temperature", "0", "--max-tokens", "48", "-p", DEMO_QUESTION,
    ])


def speedrun_command(args: DemoConfig, files: DemoFiles) -> list[str]:
    """The speedrun on the demo's shards at the demo's size (and its SFT mixture for mid-training too), every
    stage inside a budget a 2-core CPU keeps to: what next_steps prints and tests/test_speedrun.py runs."""
    return ["python", "-m", "ray_jobs.speedrun", "--data", str(files.data), "--depth", str(args.depth),
            "--seq-len", str(SEQ_LEN), "--vocab", str(args.vocab_size), "--device-batch", str(DEVICE_BATCH),
            "--total-batch", str(TOTAL_BATCH), "--mid-mixture", DEMO_MIXTURE, "--sft-mixture", DEMO_MIXTURE,
            "--time-budget", "2m30s"]


def next_steps(args: DemoConfig, files: DemoFiles) -> str:
    """What to run next on the demo's files, as lines to paste into a shell (comments say what each does).
    The checkpoints name their tokenizer, so the chat model needs no other flag; tune and the speedrun
    train afresh, on the demo's shards at the demo's size."""
    model_id = run_dir_of(resolve_checkpoint(files.chat)).name  # the id the server reports (ray_jobs/serve.py)
    tune = ["python", "-m", "ray_jobs.tune", "--data-dir", str(files.data), "--tokenizer-dir", str(files.tokenizer),
            "--depth", str(args.depth), "--head-dim", str(HEAD_DIM), "--max-seq-len", str(SEQ_LEN),
            "--device-batch-sizes", f"{DEVICE_BATCH // 2},{DEVICE_BATCH}", "--total-batch-sizes", f"{TOTAL_BATCH},{2 * TOTAL_BATCH}",
            # the smallest sweep that shows ASHA at work: the default settings against one sampled trial, 16 steps
            # at most, judged at 4 evaluations (each trial's start, not its training, is most of its time on a CPU)
            "--token-budget", str(16 * TOTAL_BATCH), "--evals-per-trial", "4", "--eval-tokens", str(4 * TOTAL_BATCH),
            "--num-samples", "2", "--max-concurrent", "1"]
    messages = json.dumps([{"role": "user", "content": DEMO_QUESTION}])
    return "\n".join([
        "# chat with the fine-tuned model in the terminal ('quit' leaves)",
        shlex.join(["python", "-m", "nanochat.scripts.chat_cli", "--checkpoint", str(files.chat)]),
        "# serve it: an OpenAI-compatible API and a chat page at http://127.0.0.1:8000/ (Ctrl-C stops it) ...",
        shlex.join(["python", "-m", "ray_jobs.serve", "--checkpoint", str(files.chat)]),
        "# ... and ask it from a second terminal with the openai client (pip install openai)",
        "python - <<'EOF'",
        "from openai import OpenAI",
        'client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")  # $NANOCHAT_API_KEY if the server has one',
        f"reply = client.chat.completions.create(model={json.dumps(model_id)}, messages={messages})",
        "print(reply.choices[0].message.content)",
        "EOF",
        "# tune base training's batch size and learning rates with Ray Tune, on the demo's shards (docs/tuning.md)",
        shlex.join(tune),
        "# the whole pipeline, tokenizer to report card, inside a time budget (ray_jobs/speedrun.py)",
        shlex.join(speedrun_command(args, files)),
    ])


def finish(args: DemoConfig, files: DemoFiles, results: dict) -> None:
    """The demo's last words: its scores, the answer, where its files are and what to run next."""
    where = {"shards": files.data, "tokenizer": files.tokenizer, "base model": files.base, "chat model": files.chat}
    print(f"\ndemo finished: val bpb {results['eval']['val_bpb']:.3f}, final train loss {results['train']['final_loss']:.3f}, "
          f"SFT val loss {results['sft']['val_loss']:.3f}\n{DEMO_QUESTION!r} -> {results['answer']!r}\n"
          f"files in {files.out}: " + ", ".join(f"{what} {path.relative_to(files.out)}/" for what, path in where.items())
          + f"\n\nwhat next, on the demo's files (paste any of these):\n{next_steps(args, files)}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_config(DemoConfig, argv, description=__doc__.splitlines()[0])
    out = demo_dir(args)
    files = DemoFiles(out, base=out / "run", chat=out / "sft")
    prepare(args, files)
    train = stage("base training", "nanochat.scripts.base_train", base_train.main,
                  [*train_args(args, files), "--run-dir", str(files.base)])
    evaluation = evaluate(files)
    sft = stage("chat fine-tuning (SFT)", "nanochat.scripts.chat_sft", chat_sft.main,
                [*sft_args(args, files), "--run-dir", str(files.chat)])
    results = {"train": train, "eval": evaluation, "sft": sft, "answer": chat(files)}
    finish(args, files, results)
    return results


if __name__ == "__main__":
    main()
