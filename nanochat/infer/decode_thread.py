"""The decoding thread of a server: one continuous batch fed from an asyncio event loop. Rule: only
the thread touches the batch; the event loop posts requests and cancellations to it."""

from __future__ import annotations

import asyncio
import threading

from nanochat.infer.batch import DecodeBatch, Request
from nanochat.infer.engine import Engine


class DecodeThread:
    """A DecodeBatch of `slots` rows decoded by a thread: requests join at the next step and leave as
    soon as they finish or their reader goes away. Tokens travel back to each request's asyncio
    queue, ending with None (or the exception that stopped it)."""

    def __init__(self, engine: Engine, slots: int, capacity: int):
        self.engine, self.slots, self.capacity = engine, slots, capacity
        self.batch = DecodeBatch(engine, slots, capacity)
        self.batch.warm_up()
        self._inbox: list[tuple[str, Request, asyncio.Queue | None]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queues: dict[int, asyncio.Queue] = {}  # request id in the batch -> its reader
        self._ids: dict[int, int] = {}  # id(request) -> request id in the batch
        self._loop: asyncio.AbstractEventLoop | None = None
        threading.Thread(target=self._run, name="decode", daemon=True).start()

    # ---- called on the event loop

    def submit(self, request: Request) -> asyncio.Queue:
        self._loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._post("add", request, queue)
        return queue

    def cancel(self, request: Request) -> None:
        self._post("cancel", request, None)

    def _post(self, what: str, request: Request, queue: asyncio.Queue | None) -> None:
        with self._lock:
            self._inbox.append((what, request, queue))
        self._wake.set()

    # ---- the decoding thread

    def _run(self) -> None:
        while True:
            if not self.batch.busy:
                self._wake.wait()
            self._wake.clear()
            with self._lock:
                inbox, self._inbox = self._inbox, []
            for what, request, queue in inbox:
                if what == "add":
                    rid = self.batch.add(request)
                    self._ids[id(request)], self._queues[rid] = rid, queue
                elif (rid := self._ids.pop(id(request), None)) is not None:
                    self.batch.cancel(rid)
                    self._queues.pop(rid, None)
            if self.batch.busy:
                self._step()

    def _step(self) -> None:
        try:
            tokens = self.batch.step()
        except Exception as e:  # e.g. out of memory: fail the requests in flight, keep the replica serving
            self._deliver({rid: e for rid in self._queues}, set(self._queues))
            self.batch = DecodeBatch(self.engine, self.slots, self.capacity)
            self._queues, self._ids = {}, {}
            return
        active = self.batch.active()
        ended = {rid for rid in tokens if rid not in active}
        self._deliver(tokens, ended)
        for rid in ended:
            self._queues.pop(rid, None)
        if ended:
            self._ids = {key: rid for key, rid in self._ids.items() if rid not in ended}

    def _deliver(self, tokens: dict, ended: set[int]) -> None:
        """Hand this step's tokens to their readers: one call into the event loop per step."""
        items = [(self._queues[rid], token, rid in ended) for rid, token in tokens.items() if rid in self._queues]
        if items and self._loop is not None:
            self._loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue, object, bool]]) -> None:
    for queue, token, ended in items:
        queue.put_nowait(token)
        if ended and not isinstance(token, Exception):
            queue.put_nowait(None)
