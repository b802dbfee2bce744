"""The decoding thread of a server: one continuous batch fed from an asyncio event loop. Rule: only
the thread touches the batch; the event loop posts requests and cancellations to it, and every reader
ends (with its tokens, a DecodeError or at its deadline), whatever happens to the thread."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from nanochat.infer.batch import DecodeBatch, Request
from nanochat.infer.engine import Engine

log = logging.getLogger(__name__)


class DecodeError(RuntimeError):
    """A request ended by the decoder rather than by its answer. The message is safe to show a client;
    the cause is in the server's log under `error_id`."""

    def __init__(self, message: str, error_id: str = "", retry: bool = False):
        super().__init__(message)
        self.error_id, self.retry = error_id, retry  # retry: the request itself was not at fault


class Reader:
    """One request's tokens, on the event loop. `take` hands over every token waiting at once, so a
    reader that lags catches up in one go rather than one token per wake-up."""

    def __init__(self, queue: asyncio.Queue):
        self._queue, self._ended = queue, False
        self._last: float | None = None  # when the previous take returned

    async def take(self, deadline: float | None = None, interval: float = 0.0) -> list[int] | None:
        """The tokens waiting (at least one; waits for one), or None once the answer has ended. Raises
        DecodeError when the decoder failed the request, TimeoutError past `deadline` (time.monotonic()).
        After the first take, takes are at least `interval` seconds apart: the tokens of that time go
        out together (each hand-over costs the event loop and Serve's stream per item, not per token)."""
        if self._ended:
            return None
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        items = [await asyncio.wait_for(self._queue.get(), timeout)]
        if self._last is not None and (wait := self._last + interval - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        self._last = time.monotonic()
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        tokens = []
        for item in items:
            if isinstance(item, DecodeError):
                self._ended = True
                raise item
            if item is None:
                self._ended = True
                break
            tokens.append(item)
        return tokens or None


class DecodeThread:
    """A DecodeBatch of `slots` rows decoded by a thread: requests join at the next step and leave as
    soon as they finish or their reader goes away. Requests beyond `slots` wait here, outside the
    batch, so that a step that raises fails only the requests it was decoding; the batch is then
    rebuilt. If the thread itself stops, `failure` says why and every reader, present or future, gets
    a DecodeError. `before_step` sees each step's requests before it runs (ray_jobs/replica.py injects
    test faults through it)."""

    def __init__(self, engine: Engine, slots: int, capacity: int,
                 before_step: Callable[[list[Request]], None] | None = None):
        self.engine, self.slots, self.capacity, self.before_step = engine, slots, capacity, before_step
        self.device = next(engine.model.parameters()).device
        self.batch = self._new_batch()
        self.failure: str | None = None  # why the thread stopped; None while it decodes
        self._inbox: list[tuple[str, Request, asyncio.Queue | None]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._waiting: deque[tuple[Request, asyncio.Queue]] = deque()  # not in the batch yet
        self._decoding: dict[int, tuple[Request, asyncio.Queue]] = {}  # request id in the batch -> (request, its reader)
        self._loop: asyncio.AbstractEventLoop | None = None
        threading.Thread(target=self._run, name="decode", daemon=True).start()

    def _new_batch(self) -> DecodeBatch:
        batch = DecodeBatch(self.engine, self.slots, self.capacity)
        batch.warm_up()
        return batch

    # ---- called on the event loop

    def submit(self, request: Request) -> Reader:
        self._loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:  # the thread sets `failure` and empties the inbox under the same lock
            stopped = self.failure is not None
            if not stopped:
                self._inbox.append(("add", request, queue))
        if stopped:
            queue.put_nowait(_stopped())
        self._wake.set()
        return Reader(queue)

    def cancel(self, request: Request) -> None:
        """Stop decoding `request` (a no-op once it has ended)."""
        with self._lock:
            self._inbox.append(("cancel", request, None))
        self._wake.set()

    # ---- the decoding thread

    def _run(self) -> None:
        try:
            while True:
                if not self.batch.busy and not self._waiting:
                    self._wake.wait()
                self._wake.clear()
                self._take_inbox()
                self._fill_batch()
                if self.batch.busy:
                    self._step()
        except BaseException as e:  # whatever ends the thread, no reader may wait on it
            error_id = secrets.token_hex(4)
            log.critical("the decoding thread stopped [error %s]", error_id, exc_info=True)
            with self._lock:
                self.failure = f"the decoding thread stopped: {type(e).__name__} (error {error_id} in the replica's log)"
                inbox, self._inbox = self._inbox, []
            readers = [queue for _, _, queue in inbox if queue is not None]
            readers += [queue for _, queue in self._waiting] + [queue for _, queue in self._decoding.values()]
            self._send([(queue, _stopped()) for queue in readers])

    def _take_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for what, request, queue in inbox:
            if what == "add":
                self._waiting.append((request, queue))
            else:
                self._drop(request)

    def _drop(self, request: Request) -> None:
        self._waiting = deque(item for item in self._waiting if item[0] is not request)
        for rid, (decoding, _) in list(self._decoding.items()):
            if decoding is request:
                self.batch.cancel(rid)
                del self._decoding[rid]

    def _fill_batch(self) -> None:
        while self._waiting and len(self._decoding) < self.slots:
            request, queue = self._waiting.popleft()
            try:
                rid = self.batch.add(request)
            except ValueError as e:  # a request this batch cannot hold: its reader learns why
                self._send([(queue, DecodeError(str(e)))])
                continue
            self._decoding[rid] = (request, queue)

    def _step(self) -> None:
        try:
            if self.before_step is not None:
                self.before_step([request for request, _ in self._decoding.values()])
            tokens = self.batch.step()
        except Exception:  # e.g. out of memory: fail this step's requests, keep the replica serving
            self._fail_decoding()
        else:
            active = self.batch.active()
            ended = [rid for rid in tokens if rid not in active]
            self._send([(self._decoding[rid][1], token) for rid, token in tokens.items() if rid in self._decoding]
                       + [(self._decoding.pop(rid)[1], None) for rid in ended if rid in self._decoding])
            return
        # outside the except block: its traceback, which holds the failed batch, is gone by now
        self.batch = None  # the failed batch's cache is freed before the next one is allocated
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.batch = self._new_batch()

    def _fail_decoding(self) -> None:
        error_id = secrets.token_hex(4)
        log.error("a decoding step failed [error %s]: its %d request(s) fail, the batch is rebuilt", error_id,
                  len(self._decoding), exc_info=True)
        self._send([(queue, DecodeError(f"internal error while decoding (error {error_id})", error_id))
                    for _, queue in self._decoding.values()])
        self._decoding = {}

    def _send(self, items: list[tuple[asyncio.Queue, object]]) -> None:
        """Hand tokens, ends (None) and errors to their readers: one call into the event loop per step."""
        if items and self._loop is not None and not self._loop.is_closed():  # closed: the server has stopped
            self._loop.call_soon_threadsafe(_put_all, items)


def _stopped() -> DecodeError:
    return DecodeError("this replica's decoder has stopped and the replica is being replaced; retry shortly", retry=True)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
