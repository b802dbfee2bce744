"""The serving side of nanochat/infer without a server: the incremental text stream (stream.py) against
decoding each segment whole, and the decoding thread (decode_thread.py) on a random tiny model: a reader
that lags takes its tokens in one piece, a step that raises fails only the requests it decoded, a dead
thread fails every reader, and a reader past its deadline stops waiting."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

from nanochat.infer.batch import Request
from nanochat.infer.decode_thread import DecodeError, DecodeThread, Reader
from nanochat.infer.engine import Engine
from nanochat.infer.stream import AnswerStream
from nanochat.tokenizer import Tokenizer
from tests.test_batching import alone
from tests.test_engine import PLAN, random_model

# ----------------------------------------------------------------------------- the text stream


class WholeDecodeStream:
    """The reference: each segment decoded whole at every token, the new suffix handed out, trailing
    U+FFFD held back (what AnswerStream did before it decoded a window)."""

    OPEN, CLOSE = AnswerStream._OPEN, AnswerStream._CLOSE

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self.starts = {special("<|python_start|>"): "python", special("<|output_start|>"): "python_output"}
        self.ends = {special("<|python_end|>"): "python", special("<|output_end|>"): "python_output"}
        self.parts: list[dict] = []
        self.kind, self.segment, self.shown = "text", [], 0

    def new_text(self, final: bool = False) -> str:
        text = self.tokenizer.decode(self.segment)
        ready = text if final else text.rstrip("\ufffd")
        piece, self.shown = ready[self.shown:], max(self.shown, len(ready))
        return piece

    def close(self) -> str:
        piece = self.new_text(final=True)
        if self.segment:
            self.parts.append({"type": self.kind, "text": self.tokenizer.decode(self.segment)})
        piece += self.CLOSE[self.kind]
        self.kind, self.segment, self.shown = "text", [], 0
        return piece

    def feed(self, token: int) -> str:
        if token in self.starts:
            piece = self.close()
            self.kind = self.starts[token]
            return piece + self.OPEN[self.kind]
        if token in self.ends and self.ends[token] == self.kind:
            return self.close()
        self.segment.append(token)
        return self.new_text()

    def finish(self) -> str:
        return self.close() if self.segment or self.kind != "text" else ""


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
        got = [stream.feed(t) for t in tokens] + [stream.finish()]
        expected = [reference.feed(t) for t in tokens] + [reference.finish()]
        assert got == expected
        assert stream.parts == reference.parts and stream.text == tokenizer.decode(tokens)


def test_the_stream_decodes_a_short_window_per_token(tokenizer, monkeypatch):
    """However long the answer, each token decodes only the tokens since the last complete character."""
    windows: list[int] = []
    decode = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda ids: (windows.append(len(ids)), decode(ids))[1])
    stream = AnswerStream(tokenizer)
    text = "In the beginning God created the heaven and the earth, Café ☕ 😀. " * 20
    tokens = tokenizer.encode(text)
    assert "".join(stream.feed(t) for t in tokens) + stream.finish() == text
    assert len(windows) == len(tokens) + 1 and max(windows) <= 4, max(windows)  # 4: an emoji split into its bytes


# ----------------------------------------------------------------------------- the decoding thread


@pytest.fixture(scope="module")
def engine(tokenizer):
    return Engine(random_model(tokenizer.vocab_size), tokenizer, PLAN)


def request(tokenizer: Tokenizer, text: str, max_tokens: int = 12, seed: int = 1) -> Request:
    return Request(tokenizer.encode(text, prepend=tokenizer.bos_token_id), max_tokens, temperature=1.0, top_k=20, seed=seed)


async def read_all(reader, deadline: float | None = None) -> tuple[list[int], int]:
    """(every token, how many takes it took)."""
    tokens, takes = [], 0
    while (got := await reader.take(deadline)) is not None:
        tokens, takes = tokens + got, takes + 1
    return tokens, takes


def test_a_reader_that_lags_takes_every_waiting_token_at_once(engine, tokenizer):
    started = threading.Event()
    thread = DecodeThread(engine, slots=2, capacity=64, before_step=lambda requests: started.set())
    req = request(tokenizer, "In the beginning", max_tokens=10)

    async def lagging():
        reader = thread.submit(req)
        # the event loop is blocked (as a busy one is) until the whole answer is decoded
        started.wait(30)
        while thread.batch.busy or thread._decoding:
            time.sleep(0.01)
        time.sleep(0.1)  # the thread hands the last step's tokens over just after the batch empties
        return await read_all(reader)

    tokens, takes = asyncio.run(lagging())
    assert tokens == alone(engine, req) and takes == 1


def test_a_step_that_raises_fails_only_its_requests_and_the_next_ones_are_answered(engine, tokenizer):
    doomed, waiting, later = (request(tokenizer, text, seed=i) for i, text in enumerate(["And God", "said", "Let there"]))
    release = threading.Event()

    def before_step(requests: list[Request]) -> None:
        release.wait(30)  # `waiting` is queued behind `doomed` (one slot) before this step runs
        if doomed in requests:
            raise RuntimeError("a step that fails")

    thread = DecodeThread(engine, slots=1, capacity=64, before_step=before_step)

    async def scenario():
        doomed_reader, waiting_reader = thread.submit(doomed), thread.submit(waiting)
        await asyncio.sleep(0.2)
        release.set()
        with pytest.raises(DecodeError, match=r"internal error while decoding \(error \w+\)") as failed:
            await read_all(doomed_reader)
        assert "a step that fails" not in str(failed.value)
        return (await read_all(waiting_reader))[0], (await read_all(thread.submit(later)))[0]

    assert asyncio.run(scenario()) == (alone(engine, waiting), alone(engine, later))
    assert thread.failure is None


def test_a_dead_thread_fails_every_reader_and_every_later_one(engine, tokenizer):
    class Killed(BaseException):
        pass

    def before_step(requests: list[Request]) -> None:
        raise Killed

    thread = DecodeThread(engine, slots=1, capacity=64, before_step=before_step)

    async def scenario():
        readers = [thread.submit(request(tokenizer, "In", seed=i)) for i in range(3)]
        for reader in readers:
            with pytest.raises(DecodeError, match="replaced") as stopped:
                await read_all(reader, time.monotonic() + 30)
            assert stopped.value.retry
        with pytest.raises(DecodeError, match="replaced"):
            await read_all(thread.submit(request(tokenizer, "In")), time.monotonic() + 30)

    asyncio.run(scenario())
    assert thread.failure.startswith("the decoding thread stopped: Killed (error ")


def test_a_reader_past_its_deadline_stops_waiting(engine, tokenizer):
    stuck = threading.Event()
    thread = DecodeThread(engine, slots=1, capacity=64, before_step=lambda requests: stuck.wait(30))

    async def scenario():
        reader = thread.submit(request(tokenizer, "In"))
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            await reader.take(start + 0.3)
        return time.monotonic() - start

    try:
        assert asyncio.run(scenario()) < 10
    finally:
        stuck.set()
        while thread.batch.busy:  # the thread finishes its request before the tests go on (or Python exits)
            time.sleep(0.01)


def test_takes_after_the_first_are_an_interval_apart_and_group_the_tokens_between():
    async def scenario() -> tuple[list, list, float]:
        queue: asyncio.Queue = asyncio.Queue()
        reader = Reader(queue)
        queue.put_nowait(1)
        first = await reader.take(interval=0.2)  # the first token goes out at once
        queue.put_nowait(2)
        asyncio.get_running_loop().call_later(0.05, queue.put_nowait, 3)
        started = time.monotonic()
        second = await reader.take(interval=0.2)  # waits out the interval, then takes all that came
        return first, second, time.monotonic() - started

    first, second, waited = asyncio.run(scenario())
    assert first == [1] and second == [2, 3] and waited >= 0.15
