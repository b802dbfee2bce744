"""The serving side of nanochat/infer without a server: the incremental text stream (stream.py) against
decoding each segment whole, and the decoding process (decode_process.py) on a random tiny model: its
answers are those of decoding alone, a reader that lags takes its tokens in one piece, a step that raises
fails only the requests it decoded, a loop that dies or a killed process fails every reader, present and
later, a reader past its deadline stops waiting, and a process that cannot start says why."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Callable
from functools import partial

import pytest

from nanochat.infer.batch import Request
from nanochat.infer.decode_process import END, DecodeError, DecodeProcess, DecoderSpec, Reader
from nanochat.infer.engine import Engine
from nanochat.infer.stream import AnswerStream
from nanochat.tokenizer import Tokenizer
from tests.test_batching import alone
from tests.test_engine import PLAN, random_model

# ----------------------------------------------------------------------------- the text stream


class WholeDecodeStream:
    """The reference: each segment decoded whole; the parts and the whole text an answer must give."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self.starts = {special("<|python_start|>"): "python", special("<|output_start|>"): "python_output"}
        self.ends = {special("<|python_end|>"): "python", special("<|output_end|>"): "python_output"}
        self.parts: list[dict] = []
        self.kind, self.segment, self.shown = "text", [], ""

    def close(self) -> None:
        if self.segment:
            text = self.tokenizer.decode(self.segment)
            self.parts.append({"type": self.kind, "text": text})
            self.shown += text
        self.shown += AnswerStream._CLOSE[self.kind]
        self.kind, self.segment = "text", []

    def feed(self, token: int) -> None:
        if token in self.starts:
            self.close()
            self.kind = self.starts[token]
            self.shown += AnswerStream._OPEN[self.kind]
        elif token in self.ends and self.ends[token] == self.kind:
            self.close()
        else:
            self.segment.append(token)

    def text_so_far(self) -> str:
        """Decoded whole up to here, a character still split across tokens left out."""
        pending = self.tokenizer.decode_bytes(self.segment)
        for cut in range(min(3, len(pending)) + 1):  # a UTF-8 character is 4 bytes at most
            try:
                return self.shown + pending[: len(pending) - cut].decode("utf-8", errors="strict" if cut else "replace")
            except UnicodeDecodeError:
                continue
        return self.shown + pending.decode("utf-8", errors="replace")

    def finish(self) -> str:
        if self.segment or self.kind != "text":
            self.close()
        return self.shown


def random_answer(tokenizer: Tokenizer, rng: random.Random) -> list[int]:
    """Tokens of multi-byte text (characters split across tokens), any token of the vocabulary (bytes
    that never complete a character, special tokens) and tool-call markers, mixed."""
    special = tokenizer.encode_special
    markers = [special(name) for name in ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")]
    texts = ["Café ☕ naïve", "😀 — 東京", " done.", "ünïcödé 🎉🎉", "3*4", " plain words "]
    tokens: list[int] = []
    while len(tokens) < 120:
        roll = rng.random()
        if roll < 0.5:
            tokens += tokenizer.encode(rng.choice(texts))
        elif roll < 0.8:
            tokens += [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 4))]
        else:
            tokens.append(rng.choice(markers))
    return tokens


def test_the_incremental_stream_gives_what_decoding_each_segment_whole_gives(tokenizer):
    rng = random.Random(0)
    for _ in range(200):
        tokens = random_answer(tokenizer, rng)
        stream, reference = AnswerStream(tokenizer), WholeDecodeStream(tokenizer)
        out = ""
        for token in tokens:
            out += stream.feed(token)
            reference.feed(token)
            so_far = reference.text_so_far()
            # out at once: all that decodes whole, invalid bytes as U+FFFD, only a split character held back
            assert out == so_far or (out == so_far[:-1] and so_far.endswith("\ufffd")), (out, so_far)
        assert out + stream.finish() == reference.finish()
        assert stream.parts == reference.parts and stream.text == tokenizer.decode(tokens)


def test_the_stream_decodes_each_token_once(tokenizer, monkeypatch):
    """However long the answer, and whatever bytes it holds, a token costs one look-up of its bytes
    (the tokenizer's table: no encoder call, no window decoded again)."""
    looked_up: list[int] = []

    class CountingTable(list):
        def __getitem__(self, token):
            looked_up.append(token)
            return super().__getitem__(token)

    table = CountingTable(tokenizer.bytes_table())
    assert all(table[t] == tokenizer.decode_bytes([t]) for t in range(tokenizer.vocab_size))
    looked_up.clear()
    monkeypatch.setattr(tokenizer, "bytes_table", lambda: table)
    decode_bytes = tokenizer.decode_bytes
    monkeypatch.setattr(tokenizer, "decode_bytes", lambda ids: pytest.fail("the encoder was called"))
    monkeypatch.setattr(tokenizer, "decode", lambda ids: pytest.fail("a whole window was decoded"))
    stream = AnswerStream(tokenizer)
    text = "In the beginning God created the heaven and the earth, Café ☕ 😀. " * 20
    tokens = tokenizer.encode(text)
    assert "".join(stream.feed(t) for t in tokens) + stream.finish() == text
    garbage = [random.Random(1).randrange(256) for _ in range(500)]  # the byte tokens: mostly invalid UTF-8
    stream = AnswerStream(tokenizer)
    assert "".join(stream.feed(t) for t in garbage) + stream.finish() == decode_bytes(garbage).decode(errors="replace")
    assert looked_up == tokens + garbage


# ----------------------------------------------------------------------------- the decoding process

DOOMED_SEED, SLOW_SEED, DEADLY_SEED = 666, 777, 999  # scripted_hook's faults


class Killed(BaseException):
    """Escapes the decoding loop's handling of a failed step, as a bug in the loop would."""


def tiny_engine(tokenizer_dir: str) -> tuple[Engine, dict]:
    """The decoding process's engine: the same random model as the tests' own `engine`."""
    tokenizer = Tokenizer.load(tokenizer_dir)
    return Engine(random_model(tokenizer.vocab_size), tokenizer, PLAN), {"vocab": tokenizer.vocab_size}


def scripted_hook() -> Callable[[list[Request]], None]:
    """A step holding a request of DOOMED_SEED raises, of SLOW_SEED takes a second, of DEADLY_SEED ends the loop."""

    def before_step(requests: list[Request]) -> None:
        seeds = {request.seed for request in requests}
        if DEADLY_SEED in seeds:
            raise Killed
        if DOOMED_SEED in seeds:
            raise RuntimeError("a step that fails")
        if SLOW_SEED in seeds:
            time.sleep(1.0)

    return before_step


def start(tokenizer_dir, slots: int) -> DecodeProcess:
    spec = DecoderSpec(partial(tiny_engine, str(tokenizer_dir)), slots, capacity=64, make_before_step=scripted_hook)
    return DecodeProcess(spec, start_timeout_s=120)


@pytest.fixture(scope="module")
def engine(tokenizer):
    return Engine(random_model(tokenizer.vocab_size), tokenizer, PLAN)


@pytest.fixture(scope="module")
def decoder(tokenizer_dir):
    """One slot: a second request waits outside the batch."""
    process = start(tokenizer_dir, slots=1)
    yield process
    process.close()


def request(tokenizer: Tokenizer, text: str, max_tokens: int = 12, seed: int = 1) -> Request:
    return Request(tokenizer.encode(text, prepend=tokenizer.bos_token_id), max_tokens, temperature=1.0, top_k=20, seed=seed)


async def read_all(reader, deadline: float | None = None) -> tuple[list[int], int]:
    """(every token, how many takes it took)."""
    tokens, takes = [], 0
    while (got := await reader.take(deadline)) is not None:
        tokens, takes = tokens + got, takes + 1
    return tokens, takes


def test_the_process_reports_its_engine_and_answers_as_decoding_alone_does(decoder, engine, tokenizer):
    requests = [request(tokenizer, text, seed=i) for i, text in enumerate(["In the beginning", "And God", "said"])]

    async def scenario():
        return [(await read_all(reader))[0] for reader in [decoder.submit(r) for r in requests]]

    assert decoder.facts == {"vocab": tokenizer.vocab_size}
    assert asyncio.run(scenario()) == [alone(engine, r) for r in requests]


def test_a_reader_that_lags_takes_every_waiting_token_at_once(decoder, engine, tokenizer):
    req = request(tokenizer, "In the beginning", max_tokens=10)

    async def lagging():
        reader = decoder.submit(req)
        # the event loop is blocked (as a busy one is) until the whole answer is decoded
        while reader.key in decoder._readers:  # the relay thread drops a reader at its answer's end
            time.sleep(0.01)
        return await read_all(reader)

    tokens, takes = asyncio.run(lagging())
    assert tokens == alone(engine, req) and takes == 1


def test_a_step_that_raises_fails_only_its_requests_and_the_next_ones_are_answered(decoder, engine, tokenizer):
    doomed = request(tokenizer, "And God", seed=DOOMED_SEED)
    waiting, later = request(tokenizer, "said", seed=2), request(tokenizer, "Let there", seed=3)

    async def scenario():
        doomed_reader, waiting_reader = decoder.submit(doomed), decoder.submit(waiting)  # one slot: `waiting` waits
        with pytest.raises(DecodeError, match=r"internal error while decoding \(error \w+\)") as failed:
            await read_all(doomed_reader, time.monotonic() + 60)
        assert "a step that fails" not in str(failed.value) and failed.value.error_id and not failed.value.retry
        return (await read_all(waiting_reader))[0], (await read_all(decoder.submit(later)))[0]

    assert asyncio.run(scenario()) == (alone(engine, waiting), alone(engine, later))
    assert decoder.failure is None


def test_a_reader_past_its_deadline_stops_waiting_and_its_request_is_cancelled(decoder, engine, tokenizer):
    slow, after = request(tokenizer, "In", max_tokens=30, seed=SLOW_SEED), request(tokenizer, "In", seed=4)

    async def scenario():
        reader = decoder.submit(slow)
        begun = time.monotonic()
        with pytest.raises(TimeoutError):
            await reader.take(begun + 0.3)
        waited = time.monotonic() - begun
        decoder.cancel(reader)  # as the server does: without it the slot would be held for 30 s
        return waited, (await read_all(decoder.submit(after), time.monotonic() + 30))[0]

    waited, tokens = asyncio.run(scenario())
    assert waited < 5 and tokens == alone(engine, after)


def test_a_loop_that_dies_fails_every_reader_and_every_later_one(tokenizer_dir, tokenizer):
    process = start(tokenizer_dir, slots=1)

    async def scenario():
        readers = [process.submit(request(tokenizer, "In", seed=seed)) for seed in (DEADLY_SEED, 1, 2)]
        for reader in readers:
            with pytest.raises(DecodeError, match="replaced") as stopped:
                await read_all(reader, time.monotonic() + 60)
            assert stopped.value.retry
        with pytest.raises(DecodeError, match="replaced"):
            await read_all(process.submit(request(tokenizer, "In")), time.monotonic() + 30)

    try:
        asyncio.run(scenario())
        assert process.failure.startswith("the decoding process stopped: Killed (error ")
    finally:
        process.close()


def test_a_killed_process_fails_every_reader(tokenizer_dir, tokenizer):
    process = start(tokenizer_dir, slots=1)

    async def scenario():
        reader = process.submit(request(tokenizer, "In", max_tokens=30, seed=SLOW_SEED))
        await asyncio.sleep(0.5)
        os.kill(process.process.pid, signal.SIGKILL)
        with pytest.raises(DecodeError, match="replaced"):
            await read_all(reader, time.monotonic() + 30)

    try:
        asyncio.run(scenario())
        assert process.failure == f"the decoding process exited (code {-signal.SIGKILL})"
    finally:
        process.close()


def test_a_process_that_cannot_start_says_why(tmp_path):
    spec = DecoderSpec(partial(tiny_engine, str(tmp_path / "missing")), slots=1, capacity=64)
    with pytest.raises(RuntimeError, match="could not start(.|\n)*no tokenizer at"):
        DecodeProcess(spec, start_timeout_s=120)


def test_takes_after_the_first_are_an_interval_apart_and_group_the_tokens_between():
    async def scenario() -> tuple[list, list, float]:
        reader = Reader()
        reader.put(1)
        first = await reader.take(interval=0.2)  # the first token goes out at once
        reader.put(2)
        asyncio.get_running_loop().call_later(0.05, reader.put, 3)
        started = time.monotonic()
        second = await reader.take(interval=0.2)  # waits out the interval, then takes all that came
        return first, second, time.monotonic() - started

    first, second, waited = asyncio.run(scenario())
    assert first == [1] and second == [2, 3] and waited >= 0.15


def test_the_last_tokens_go_out_as_soon_as_the_answer_ends():
    async def scenario() -> tuple[list, list | None, float]:
        reader = Reader()
        reader.put(1)
        await reader.take(interval=5.0)
        reader.put(2)
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, reader.put, 3)
        loop.call_later(0.1, reader.put, END)
        started = time.monotonic()
        last = await reader.take(interval=5.0)  # no 5 s wait: nothing can come after the end
        return last, await reader.take(interval=5.0), time.monotonic() - started

    last, after, waited = asyncio.run(scenario())
    assert last == [2, 3] and after is None and waited < 1.0
