"""A server's decoder in a process of its own: one continuous batch (nanochat/infer/batch.py) stepped
by a child process and fed from the server's asyncio event loop through two pipes.

Why a process: in the server's process the decoding loop shares one GIL with the event loop, the HTTP
stack and Ray's threads. Measured on an H200 (docs/serving.md), at 32 streams the loop stepped at a
sixth of its speed alone; in a process of its own it steps as fast as alone, and the server's process
only relays each step's tokens (one message per step).

Rules: only the child touches the model and the batch; the server posts requests and cancellations.
Every reader ends (with its tokens, a DecodeError or at its deadline), whatever happens to the child:
a step that raises fails only the requests it decoded and the batch is rebuilt; if the child stops,
`failure` says why and every reader, present or future, gets a DecodeError. The child exits when the
server's end of its inbox closes (the server stopped or died).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import multiprocessing
import secrets
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from nanochat.checkpoint import load_for_inference
from nanochat.common import init_process
from nanochat.config import CommonConfig
from nanochat.infer.batch import DecodeBatch, Request
from nanochat.infer.engine import Engine, context_length

log = logging.getLogger(__name__)

# what the child sends per request: a token (int), END, or an error as (message, error id, retry)
END = None
START_TIMEOUT_S = 900.0  # loading the model and capturing (or compiling) every batch size's graph


class DecodeError(RuntimeError):
    """A request ended by the decoder rather than by its answer. The message is safe to show a client;
    the cause is in the server's log under `error_id`."""

    def __init__(self, message: str, error_id: str = "", retry: bool = False):
        super().__init__(message)
        self.error_id, self.retry = error_id, retry  # retry: the request itself was not at fault


class Reader:
    """One request's tokens, on the event loop. `take` hands over every token waiting at once, so a
    reader that lags catches up in one go rather than one token per wake-up."""

    def __init__(self, key: int = -1):
        self.key = key  # the request's key in the decoder (-1: never submitted)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._last_in = asyncio.Event()  # the answer's end (or error) is queued: nothing more to wait for
        self._ended = False
        self._last: float | None = None  # when the previous take returned

    def put(self, item: int | DecodeError | None) -> None:
        """Queue a token, the answer's END or an error (on the event loop)."""
        self._queue.put_nowait(item)
        if not isinstance(item, int):
            self._last_in.set()

    async def take(self, deadline: float | None = None, interval: float = 0.0) -> list[int] | None:
        """The tokens waiting (at least one; waits for one), or None once the answer has ended. Raises
        DecodeError when the decoder failed the request, TimeoutError past `deadline` (time.monotonic()).
        After the first take, takes are at least `interval` seconds apart: the tokens of that time go
        out together (each hand-over costs the event loop and Serve's stream per item, not per token),
        unless the answer has ended meanwhile: its last tokens go out at once."""
        if self._ended:
            return None
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        items = [await asyncio.wait_for(self._queue.get(), timeout)]
        if self._last is not None and (wait := self._last + interval - time.monotonic()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._last_in.wait(), wait)
        self._last = time.monotonic()
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        tokens = []
        for item in items:
            if isinstance(item, DecodeError):
                self._ended = True
                raise item
            if item is END:
                self._ended = True
                break
            tokens.append(item)
        return tokens or None


# ----------------------------------------------------------------------------- the child's side


@dataclass(frozen=True)
class DecoderSpec:
    """What the child builds (picklable: module-level functions and partials of them).
    `make_engine()` -> (engine, facts for the server); `make_before_step()` -> a hook that sees each
    step's requests before it runs (test faults), or None."""

    make_engine: Callable[[], tuple[Engine, dict[str, Any]]]
    slots: int
    capacity: int | None = None  # cache columns; None: cache_columns(the model's context)
    make_before_step: Callable[[], Callable[[list[Request]], None] | None] | None = None


def cache_columns(context: int) -> int:
    """A quarter more cache columns than one request can use, so that the shared cache is compacted
    at most every context/4 steps (see nanochat/infer/batch.py)."""
    return context + context // 4


def serving_engine(checkpoint: str, tokenizer_dir: str, settings: CommonConfig) -> tuple[Engine, dict[str, Any]]:
    """A DecoderSpec's make_engine for a server: the checkpoint's engine on the device and precision plan of
    `settings`, and what the server needs to know without loading the model itself."""
    device, plan = init_process(settings)
    model, tokenizer, step_dir, meta = load_for_inference(checkpoint, device, tokenizer_dir or None)
    facts = {"plan": plan.name, "dtype": plan.dtype, "precision": plan.short, "context": context_length(model),
             "tokenizer_dir": str(tokenizer.directory), "step_dir": str(step_dir), "stage": meta.get("stage", "?")}
    return Engine(model, tokenizer, plan), facts


class DecodeLoop:
    """The child's batch: requests beyond `slots` wait here, outside the batch, so that a step that
    raises fails only the requests it was decoding. `send` takes a step's [(key, token | END | error)]."""

    def __init__(self, engine: Engine, slots: int, capacity: int, send: Callable[[list], None],
                 before_step: Callable[[list[Request]], None] | None = None):
        self.engine, self.slots, self.capacity, self.send, self.before_step = engine, slots, capacity, send, before_step
        self.device = next(engine.model.parameters()).device
        self.batch = self._new_batch()
        self._waiting: deque[tuple[int, Request]] = deque()  # (key, request) not in the batch yet
        self._decoding: dict[int, tuple[int, Request]] = {}  # the batch's request id -> (key, request)

    def _new_batch(self) -> DecodeBatch:
        batch = DecodeBatch(self.engine, self.slots, self.capacity)
        batch.warm_up()
        return batch

    @property
    def busy(self) -> bool:
        return self.batch.busy or bool(self._waiting)

    def handle(self, message: tuple) -> None:
        """("add", key, request) or ("cancel", key) from the server."""
        if message[0] == "add":
            self._waiting.append(message[1:])
            return
        key = message[1]
        self._waiting = deque(item for item in self._waiting if item[0] != key)
        for rid, (decoding, _) in list(self._decoding.items()):
            if decoding == key:
                self.batch.cancel(rid)
                del self._decoding[rid]

    def step(self) -> None:
        self._fill_batch()
        if not self.batch.busy:
            return
        try:
            if self.before_step is not None:
                self.before_step([request for _, request in self._decoding.values()])
            tokens = self.batch.step()
        except Exception:  # e.g. out of memory: fail this step's requests, keep the server serving
            self._fail_decoding()
        else:
            active = self.batch.active()
            ended = [rid for rid in tokens if rid not in active]
            self.send([(self._decoding[rid][0], token) for rid, token in tokens.items() if rid in self._decoding]
                      + [(self._decoding.pop(rid)[0], END) for rid in ended if rid in self._decoding])
            return
        # outside the except block: its traceback, which holds the failed batch, is gone by now
        self.batch = None  # the failed batch's cache is freed before the next one is allocated
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.batch = self._new_batch()

    def _fill_batch(self) -> None:
        while self._waiting and len(self._decoding) < self.slots:
            key, request = self._waiting.popleft()
            try:
                rid = self.batch.add(request)
            except ValueError as e:  # a request this batch cannot hold: its reader learns why
                self.send([(key, (str(e), "", False))])
                continue
            self._decoding[rid] = (key, request)

    def _fail_decoding(self) -> None:
        error_id = secrets.token_hex(4)
        log.error("a decoding step failed [error %s]: its %d request(s) fail, the batch is rebuilt", error_id,
                  len(self._decoding), exc_info=True)
        self.send([(key, (f"internal error while decoding (error {error_id})", error_id, False))
                   for key, _ in self._decoding.values()])
        self._decoding = {}


def _child_main(spec: DecoderSpec, inbox: Connection, outbox: Connection) -> None:
    """The decoding process: build the engine, say "ready", then take messages between steps."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which closes our inbox
    logging.basicConfig(format="[decoder] %(levelname)s %(message)s")
    try:
        engine, facts = spec.make_engine()
        before_step = spec.make_before_step() if spec.make_before_step is not None else None
        capacity = spec.capacity or cache_columns(context_length(engine.model))
        loop = DecodeLoop(engine, spec.slots, capacity, lambda items: outbox.send(("tokens", items)), before_step)
    except BaseException:
        outbox.send(("failed", traceback.format_exc()))
        return
    outbox.send(("ready", facts))
    try:
        while True:
            if not loop.busy:
                loop.handle(inbox.recv())  # idle: wait for work
            while inbox.poll():
                loop.handle(inbox.recv())
            loop.step()
    except EOFError:  # the server closed our inbox: it stopped
        return
    except BaseException as e:  # whatever ends the loop, the server must learn it: no reader may wait on it
        error_id = secrets.token_hex(4)
        log.critical("the decoding process stopped [error %s]", error_id, exc_info=True)
        outbox.send(("stopped", f"the decoding process stopped: {type(e).__name__} (error {error_id} in the replica's log)"))
        raise SystemExit(1) from None


# ----------------------------------------------------------------------------- the server's side


class DecodeProcess:
    """Starts the decoding process and waits until it is ready (its facts in `facts`); then `submit`
    and `cancel` on the event loop. A thread relays each step's tokens to their readers."""

    def __init__(self, spec: DecoderSpec, start_timeout_s: float = START_TIMEOUT_S):
        context = multiprocessing.get_context("spawn")  # never fork a process that holds threads (Ray's, ours)
        child_inbox, self._inbox = context.Pipe(duplex=False)
        self._outbox, child_outbox = context.Pipe(duplex=False)
        # not daemonic: a daemonic process may not start processes, and the compiler's workers are some
        self.process = context.Process(target=_child_main, args=(spec, child_inbox, child_outbox), name="nanochat-decoder")
        self.process.start()
        child_inbox.close(), child_outbox.close()  # the child's now: ours read EOF once it exits
        self._closing = False
        atexit.register(self.close)
        self.facts = self._wait_ready(start_timeout_s)
        self.failure: str | None = None  # why the process stopped; None while it decodes
        self._readers: dict[int, Reader] = {}
        self._next_key = 0
        self._lock = threading.Lock()  # _readers and failure: the event loop and the relay thread
        self._loop: asyncio.AbstractEventLoop | None = None
        threading.Thread(target=self._relay, name="decode-relay", daemon=True).start()

    def _wait_ready(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while not self._outbox.poll(1.0):
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the decoding process was not ready within {timeout_s:.0f} s")
        try:
            kind, payload = self._outbox.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"the decoding process exited (code {self.process.exitcode}) before it was ready; "
                               "its log is above") from None
        if kind == "failed":
            self.close()
            raise RuntimeError(f"the decoding process could not start:\n{payload}")
        return payload

    def close(self) -> None:
        """Stop the child: it exits at the end of its inbox (killed if it does not within 10 s)."""
        self._closing = True
        self._inbox.close()
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    # ---- called on the event loop

    def submit(self, request: Request) -> Reader:
        self._loop = asyncio.get_running_loop()
        with self._lock:  # the relay thread sets `failure` and takes the readers under the same lock
            if self.failure is not None:
                reader = Reader()
                reader.put(_stopped())
                return reader
            key, self._next_key = self._next_key, self._next_key + 1
            reader = self._readers[key] = Reader(key)
        self._post(("add", key, request))
        return reader

    def cancel(self, reader: Reader) -> None:
        """Stop decoding the reader's request (a no-op once it has ended)."""
        with self._lock:
            decoding = self._readers.pop(reader.key, None) is not None
        if decoding:
            self._post(("cancel", reader.key))

    def _post(self, message: tuple) -> None:
        try:
            self._inbox.send(message)
        except OSError:  # the child is gone: the relay thread fails every reader
            pass

    # ---- the relay thread

    def _relay(self) -> None:
        reason = None
        try:
            while True:
                kind, payload = self._outbox.recv()
                if kind == "stopped":
                    reason = payload
                    break
                self._deliver(payload)
        except (EOFError, OSError):
            self.process.join(5)
            reason = f"the decoding process exited (code {self.process.exitcode})"
        with self._lock:
            self.failure = reason
            readers, self._readers = self._readers, {}
        if not self._closing:
            log.critical("%s: its %d request(s) fail", reason, len(readers))
        self._send([(reader, _stopped()) for reader in readers.values()])

    def _deliver(self, items: list[tuple[int, Any]]) -> None:
        out = []
        with self._lock:
            for key, item in items:
                reader = self._readers.get(key)
                if reader is None:  # cancelled: its reader is gone
                    continue
                if isinstance(item, tuple):
                    item = DecodeError(*item)
                if item is END or isinstance(item, DecodeError):
                    del self._readers[key]
                out.append((reader, item))
        self._send(out)

    def _send(self, items: list[tuple[Reader, Any]]) -> None:
        """Hand tokens, ends and errors to their readers: one call into the event loop per step."""
        if items and self._loop is not None and not self._loop.is_closed():  # closed: the server has stopped
            self._loop.call_soon_threadsafe(_put_all, items)


def _stopped() -> DecodeError:
    return DecodeError("this replica's decoder has stopped and the replica is being replaced; retry shortly", retry=True)


def _put_all(items: list[tuple[Reader, Any]]) -> None:
    for reader, item in items:
        reader.put(item)
