"""Talk to a chat model in the terminal, its answer streamed token by token.

    python -m nanochat.scripts.chat_cli --checkpoint ~/.cache/nanochat/runs/sft_d12
    python -m nanochat.scripts.chat_cli --checkpoint ~/.cache/nanochat/runs/sft_d12 -p "Why is the sky blue?"
    # tiny, on a CPU laptop
    python -m nanochat.scripts.chat_cli --checkpoint runs/demo --device cpu --max-tokens 64
    # one prompt on a Ray cluster's GPU node (the interactive loop needs a terminal: run it on the node)
    ray job submit --working-dir . --entrypoint-num-gpus 1 -- python -m nanochat.scripts.chat_cli --checkpoint /shared/runs/sft_d12 -p "Hello"

Interactive commands: 'clear' starts a new conversation, 'quit' or 'exit' (or Ctrl-D) leaves;
Ctrl-C stops the answer being written.
`-p` (short for --prompt) answers one prompt, prints only the answer and exits.
Calculator calls the model makes show inline as "[calculator: 3*4] [= 12]".
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from nanochat.chat import render_for_completion
from nanochat.checkpoint import CheckpointError, load_for_inference
from nanochat.common import init_process
from nanochat.config import CommonConfig, option, parse_config
from nanochat.errors import run_main
from nanochat.infer.engine import SAMPLING, Engine, context_length
from nanochat.infer.stream import AnswerStream

QUIT_COMMANDS = ("quit", "exit")
CLEAR_COMMAND = "clear"


@dataclass
class ChatCliConfig(CommonConfig):
    checkpoint: str = option("", "a step_* directory, or a run dir / checkpoint root (its latest complete checkpoint)")
    prompt: str = option("", "answer this one prompt and exit (short: -p)")
    temperature: float = option(SAMPLING.temperature, "sampling temperature; 0 = greedy")
    top_k: int = option(SAMPLING.top_k, "sample among the k most likely tokens; 0 = all")
    max_tokens: int = option(512, "most tokens per answer")
    tokenizer_dir: str = option("", "trained tokenizer; empty = the one the checkpoint recorded, else $NANOCHAT_BASE_DIR/tokenizer")


class ContextFull(ValueError):
    """The conversation leaves no room in the model's context for an answer."""


def respond(engine: Engine, messages: list[dict], write: Callable[[str], object], max_tokens: int = 512,
            temperature: float = SAMPLING.temperature, top_k: int | None = SAMPLING.top_k,
            seed: int = SAMPLING.seed) -> tuple[str, list[dict]]:
    """Generate the next assistant turn of `messages`, passing printable pieces to `write` as they come.

    Returns (answer text as Engine.complete writes it, the assistant message's content parts)."""
    prompt = render_for_completion(engine.tokenizer, {"messages": messages})
    limit = context_length(engine.model)
    if len(prompt) >= limit:
        raise ContextFull(f"the conversation is {len(prompt)} tokens, the model's context ends at {limit}")
    stream = AnswerStream(engine.tokenizer)
    for tokens, _ in engine.generate(prompt, 1, max_tokens=max_tokens, temperature=temperature, top_k=top_k, seed=seed):
        if tokens[0] in engine.stop_ids:
            break
        write(stream.feed(tokens[0]))
    write(stream.finish())
    return stream.text, stream.parts


# -----------------------------------------------------------------------------
# main


def _write(text: str) -> None:
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> str:
    """Chat (or answer --prompt once); returns the last answer's text."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = ["--prompt" if arg == "-p" else arg for arg in argv]
    cfg = parse_config(ChatCliConfig, argv, description=__doc__.splitlines()[0])
    if not cfg.checkpoint:
        raise SystemExit("chat_cli: pass --checkpoint (a step_* directory or a run directory)")

    # ---- init
    device, plan = init_process(cfg)
    try:
        model, tokenizer, step_dir, meta = load_for_inference(cfg.checkpoint, device, cfg.tokenizer_dir)
    except CheckpointError as e:
        raise SystemExit(f"chat_cli: {e}") from None
    engine = Engine(model, tokenizer, plan)
    sampling = dict(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None)
    print(f"{step_dir} ({meta.get('stage', '?')} model) on {plan.device}, {plan.dtype}", file=sys.stderr)

    # ---- one prompt
    if cfg.prompt:
        try:
            answer, _ = respond(engine, [{"role": "user", "content": cfg.prompt}], _write, seed=cfg.seed, **sampling)
        except ContextFull as e:
            raise SystemExit(f"chat_cli: {e}") from e
        _write("\n")
        return answer

    # ---- the conversation loop
    print(f"Chatting with {step_dir}. '{CLEAR_COMMAND}' starts over, '{QUIT_COMMANDS[0]}' leaves.")
    messages: list[dict] = []
    answer, turn = "", 0
    while True:
        try:
            line = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if line.lower() in QUIT_COMMANDS:
            break
        if line.lower() == CLEAR_COMMAND:
            messages = []
            print("(new conversation)")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        _write("\nAssistant: ")
        try:
            answer, parts = respond(engine, messages, _write, seed=cfg.seed + turn, **sampling)
        except ContextFull as e:
            messages.pop()
            print(f"({e}; type '{CLEAR_COMMAND}' to start over)")
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            messages.pop()
            print("\n(interrupted)")
            continue
        _write("\n")
        messages.append({"role": "assistant", "content": parts})
        turn += 1
    return answer


if __name__ == "__main__":
    run_main(main)
