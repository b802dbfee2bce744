"""chat_cli: streamed text and message parts from a token stream, and the script on a tiny checkpoint,
checked against Engine.complete on the same conversation."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from nanochat.chat import render_conversation, render_for_completion
from nanochat.checkpoint import load_model
from nanochat.infer.engine import Engine
from nanochat.infer.stream import AnswerStream
from nanochat.precision import resolve
from nanochat.scripts import chat_cli
from nanochat.tokenizer import Tokenizer
from tests.test_chat_eval import tiny_run  # noqa: F401  (the shared tiny checkpoint fixture)


def stream_all(tokenizer: Tokenizer, tokens: list[int]) -> tuple[list[str], AnswerStream]:
    stream = AnswerStream(tokenizer)
    pieces = [stream.feed(t) for t in tokens] + [stream.finish()]
    return pieces, stream


def test_streaming_prints_multibyte_characters_whole(tokenizer):
    text = "Café ☕ naïve 😀 — 東京 done"
    tokens = tokenizer.encode(text)
    assert len(tokens) > len(text) // 2, "the test needs characters split across tokens"
    pieces, stream = stream_all(tokenizer, tokens)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert stream.text == text and stream.parts == [{"type": "text", "text": text}]


def test_tool_calls_show_readably_and_become_message_parts(tokenizer):
    special = tokenizer.encode_special
    tokens = [*tokenizer.encode("So "), special("<|python_start|>"), *tokenizer.encode("3*4"), special("<|python_end|>"),
              special("<|output_start|>"), *tokenizer.encode("12"), special("<|output_end|>"), *tokenizer.encode(". #### 12")]
    pieces, stream = stream_all(tokenizer, tokens)
    assert "".join(pieces) == "So [calculator: 3*4] [= 12]. #### 12"
    assert stream.text == "So <|python_start|>3*4<|python_end|><|output_start|>12<|output_end|>. #### 12"
    assert stream.parts == [{"type": "text", "text": "So "}, {"type": "python", "text": "3*4"},
                            {"type": "python_output", "text": "12"}, {"type": "text", "text": ". #### 12"}]
    # the parts render back to exactly the tokens the model produced
    user = {"role": "user", "content": "What is 3*4?"}
    ids, _ = render_conversation(tokenizer, {"messages": [user, {"role": "assistant", "content": stream.parts}]})
    prompt = render_for_completion(tokenizer, {"messages": [user]})
    assert ids == prompt + tokens + [special("<|assistant_end|>")]


# ----------------------------------------------------------------------------- the script


@pytest.fixture
def cli_args(tiny_run, tokenizer_dir):  # noqa: F811
    return ["--checkpoint", str(tiny_run), "--device", "cpu", "--tokenizer-dir", str(tokenizer_dir),
            "--max-tokens", "8", "--temperature", "0"]


def engine_answer(tiny_run, tokenizer_dir, messages: list[dict]) -> str:  # noqa: F811
    model, _ = load_model(tiny_run, "cpu")
    engine = Engine(model, Tokenizer.load(tokenizer_dir), resolve("float32", "cpu"))
    prompt = render_for_completion(engine.tokenizer, {"messages": messages})
    return engine.complete(prompt, max_tokens=8, temperature=0.0)


def feed_input(monkeypatch, lines: list[str]) -> None:
    """Answer input() with `lines`, then end of file (Ctrl-D)."""
    it: Iterator[str] = iter(lines)

    def fake_input(prompt: str = "") -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)


def test_one_prompt_answers_as_the_engine_does(cli_args, tiny_run, tokenizer_dir, capsys):  # noqa: F811
    answer = chat_cli.main([*cli_args, "-p", "Hello"])
    assert isinstance(answer, str)
    assert answer == engine_answer(tiny_run, tokenizer_dir, [{"role": "user", "content": "Hello"}])
    if "<|" not in answer:  # plain text streams out unchanged
        assert capsys.readouterr().out == answer + "\n"


def test_conversation_keeps_history_and_clear_resets_it(cli_args, tiny_run, tokenizer_dir, monkeypatch):  # noqa: F811
    first = chat_cli.main([*cli_args, "-p", "Hello"])
    feed_input(monkeypatch, ["Hello", "And then?", "quit"])
    second = chat_cli.main(cli_args)
    history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "And then?"}]
    if "<|" not in first:  # a tool call would be kept as parts, not as this string
        assert second == engine_answer(tiny_run, tokenizer_dir, history)
    feed_input(monkeypatch, ["Hello", "And then?", "clear", "Hello"])
    assert chat_cli.main(cli_args) == first


def test_runs_as_a_module(cli_args, tiny_run, tokenizer_dir):  # noqa: F811
    result = subprocess.run([sys.executable, "-m", "nanochat.scripts.chat_cli", *cli_args, "-p", "Hello"],
                            capture_output=True, text=True, encoding="utf-8", timeout=120,
                            env={**os.environ, "PYTHONUTF8": "1"}, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    answer = engine_answer(tiny_run, tokenizer_dir, [{"role": "user", "content": "Hello"}])
    assert result.stdout.strip(), "no answer printed"
    if "<|" not in answer:
        assert result.stdout == answer + "\n"
