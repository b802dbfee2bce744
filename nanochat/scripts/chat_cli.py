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
from nanochat.engine import Engine
from nanochat.tokenizer import Tokenizer

QUIT_COMMANDS = ("quit", "exit")
CLEAR_COMMAND = "clear"


@dataclass
class ChatCliConfig(CommonConfig):
    checkpoint: str = option("", "a step_* directory, or a run dir / checkpoint root (its latest complete checkpoint)")
    prompt: str = option("", "answer this one prompt and exit (short: -p)")
    temperature: float = option(0.6, "sampling temperature; 0 = greedy")
    top_k: int = option(50, "sample among the k most likely tokens; 0 = all")
    max_tokens: int = option(512, "most tokens per answer")
    tokenizer_dir: str = option("", "trained tokenizer; empty = $NANOCHAT_BASE_DIR/tokenizer")


class ContextFull(ValueError):
    """The conversation leaves no room in the model's context for an answer."""


# -----------------------------------------------------------------------------
# streaming


class AnswerStream:
    """Turns the engine's tokens, one at a time, into text to print and into the assistant message.

    Each segment (text, a calculator call, its output) is decoded as a whole every time a token
    arrives and only the new suffix is printed; trailing U+FFFD (a character whose UTF-8 bytes
    are split across tokens) is held back until it completes, so multi-byte characters print right.
    """

    _OPEN = {"python": "[calculator: ", "python_output": " [= "}
    _CLOSE = {"text": "", "python": "]", "python_output": "]"}

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self._starts = {special("<|python_start|>"): "python", special("<|output_start|>"): "python_output"}
        self._ends = {special("<|python_end|>"): "python", special("<|output_end|>"): "python_output"}
        self.tokens: list[int] = []  # the whole answer, markers included
        self.parts: list[dict] = []  # finished segments, as an assistant message's content parts
        self._kind, self._segment, self._shown = "text", [], 0

    def _new_text(self, final: bool = False) -> str:
        text = self.tokenizer.decode(self._segment)
        ready = text if final else text.rstrip("\ufffd")
        piece, self._shown = ready[self._shown:], max(self._shown, len(ready))
        return piece

    def _close_segment(self) -> str:
        piece = self._new_text(final=True)
        if self._segment:
            self.parts.append({"type": self._kind, "text": self.tokenizer.decode(self._segment)})
        piece += self._CLOSE[self._kind]
        self._kind, self._segment, self._shown = "text", [], 0
        return piece

    def feed(self, token: int) -> str:
        """Take the next answer token; return the text to print now."""
        self.tokens.append(token)
        if token in self._starts:
            piece = self._close_segment()
            self._kind = self._starts[token]
            return piece + self._OPEN[self._kind]
        if token in self._ends and self._ends[token] == self._kind:
            return self._close_segment()
        self._segment.append(token)
        return self._new_text()

    def finish(self) -> str:
        """Flush what is held back; return the last text to print."""
        return self._close_segment() if self._segment or self._kind != "text" else ""

    @property
    def text(self) -> str:
        """The answer as Engine.complete writes it: tool calls in their special-token text."""
        return self.tokenizer.decode(self.tokens)


def respond(engine: Engine, messages: list[dict], write: Callable[[str], object], max_tokens: int = 512,
            temperature: float = 0.6, top_k: int | None = 50, seed: int = 42) -> tuple[str, list[dict]]:
    """Generate the next assistant turn of `messages`, passing printable pieces to `write` as they come.

    Returns (answer text as Engine.complete writes it, the assistant message's content parts)."""
    prompt = render_for_completion(engine.tokenizer, {"messages": messages})
    limit = engine.model.cos.size(2)
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
    main()
