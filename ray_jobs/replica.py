"""One replica of ray_jobs/serve.py: its decoding process (the model on the replica's device) and the API's routes.

Imported where the application is built (serve.build_app), so that `python -m ray_jobs.serve` checks its
checkpoint, tokenizer, port and cluster before Ray Serve, FastAPI and the decoding code load. Rule: a
replica whose decoding process stopped fails Serve's health check (and answers 503) until Serve replaces it.
"""

# no `from __future__ import annotations` here: FastAPI reads the routes' parameter types at run time,
# through Serve's ingress wrapper, where string annotations are not resolved

import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.serve.metrics import Counter, Gauge, Histogram

from nanochat.checkpoint import run_dir_of
from nanochat.config import CommonConfig
from nanochat.infer.decode_process import DecodeError, DecodeProcess, DecoderSpec, Reader, serving_engine
from nanochat.infer.engine import stop_ids
from nanochat.infer.stream import AnswerStream
from nanochat.tokenizer import Tokenizer
from ray_jobs.openai_api import (
    Answer,
    ApiError,
    ChatRequest,
    api,
    completion,
    events,
    to_answer,
)
from ray_jobs.scheduler import LABEL_PRECISION
from ray_jobs.serve import PAGE, ServeConfig
from ray_jobs.serve_faults import fault_hook

SWITCH_INTERVAL_S = 0.0005  # how long a thread may hold the GIL while another waits for it (Python: 5 ms)


# -----------------------------------------------------------------------------
# metrics


@dataclass
class Timing:
    """One request's clock (time.monotonic())."""

    arrived: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0


class ServingMetrics:
    """Requests in flight and waiting for their first token, time to first token, time per output token
    and tokens/s: exported through Serve's metrics (Prometheus, `nanochat_*`, tagged by replica) and
    summed up by `summary()` for GET /metrics."""

    WINDOW_S = 10.0  # tokens/s over this much recent time
    KEPT = 1000  # latencies of the last requests that the summary's percentiles cover
    EXPORT_EVERY_S = 1.0

    def __init__(self):
        self.in_flight_gauge = Gauge("nanochat_requests_in_flight", "requests this replica admitted and has not finished")
        self.queued_gauge = Gauge("nanochat_requests_queued", "admitted requests that have no token yet")
        self.ttft_histogram = Histogram("nanochat_time_to_first_token_s", "arrival to first token, seconds",
                                        boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30])
        self.tpot_histogram = Histogram("nanochat_time_per_output_token_s", "first to last token / (tokens - 1), seconds",
                                        boundaries=[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1])
        self.tokens_counter = Counter("nanochat_completion_tokens_total", "completion tokens decoded (rate() = tokens/s)")
        self.requests_counter = Counter("nanochat_requests_total", "requests finished (answered, failed or abandoned)")
        self.tokens_per_s_gauge = Gauge("nanochat_tokens_per_s", f"completion tokens per second over the last {self.WINDOW_S:g} s")
        self.in_flight = self.queued = self.requests = self.tokens = 0
        self.ttft: deque[float] = deque(maxlen=self.KEPT)
        self.tpot: deque[float] = deque(maxlen=self.KEPT)
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) within WINDOW_S
        self.recent_tokens = 0  # their sum
        # tokens not yet added to tokens_counter: one Ray metric call per second, not one per stream event
        self.unexported, self.exported_at = 0, time.monotonic()

    def admitted(self, arrived: float) -> Timing:
        self.in_flight, self.queued = self.in_flight + 1, self.queued + 1
        self._set_load()
        return Timing(arrived)

    def decoded(self, timing: Timing, tokens: int) -> None:
        now = time.monotonic()
        if timing.first is None:
            timing.first = now
            self.queued -= 1
            self._set_load()
            self.ttft.append(now - timing.arrived)
            self.ttft_histogram.observe(now - timing.arrived)
        timing.last, timing.tokens = now, timing.tokens + tokens
        self.tokens += tokens
        self.unexported += tokens
        if now - self.exported_at >= self.EXPORT_EVERY_S:
            self._export_tokens(now)
        self.recent.append((now, tokens))
        self.recent_tokens += tokens

    def finished(self, timing: Timing) -> None:
        self.in_flight -= 1
        self.queued -= timing.first is None
        self.requests += 1
        self.requests_counter.inc()
        self._set_load()
        if timing.tokens > 1:
            self.tpot.append((timing.last - timing.first) / (timing.tokens - 1))
            self.tpot_histogram.observe(self.tpot[-1])
        self._export_tokens(time.monotonic())
        self.tokens_per_s_gauge.set(self.tokens_per_s())

    def _export_tokens(self, now: float) -> None:
        if self.unexported:
            self.tokens_counter.inc(self.unexported)
        self.unexported, self.exported_at = 0, now

    def tokens_per_s(self) -> float:
        since = time.monotonic() - self.WINDOW_S
        while self.recent and self.recent[0][0] < since:
            self.recent_tokens -= self.recent.popleft()[1]
        return self.recent_tokens / self.WINDOW_S

    def _set_load(self) -> None:
        self.in_flight_gauge.set(self.in_flight)
        self.queued_gauge.set(self.queued)

    def summary(self) -> dict:
        def spread(values: deque[float]) -> dict:
            ordered = sorted(values)
            at = (lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]) if ordered else (lambda q: None)
            return {"count": len(ordered), "p50": at(0.5), "p90": at(0.9), "p99": at(0.99)}

        tokens_per_s = self.tokens_per_s()
        self.tokens_per_s_gauge.set(tokens_per_s)
        return {"requests_in_flight": self.in_flight, "requests_queued": self.queued, "requests_finished": self.requests,
                "completion_tokens": self.tokens, "tokens_per_s": tokens_per_s, "time_to_first_token_s": spread(self.ttft),
                "time_per_output_token_s": spread(self.tpot)}


# -----------------------------------------------------------------------------
# the deployment


@serve.deployment
@serve.ingress(api)
class ChatServer:
    """One replica: the model on this replica's device, its batch decoder and the API's routes."""

    def __init__(self, cfg: ServeConfig, api_key: str | None = None, fault: str = ""):
        self.cfg = cfg
        # the relay thread and the event loop share the GIL: at Python's default 5 ms switch interval a
        # step's tokens (one per 1 ms or less) could wait 5 ms for the GIL after every hand-over
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        api.state.api_key = api_key or None  # checked by openai_api.BearerKey before a body is read
        # the model lives in the decoding process (nanochat/infer/decode_process.py); this one serves HTTP
        settings = CommonConfig(dtype=cfg.dtype, device=cfg.device, seed=cfg.seed)
        self.decoder = DecodeProcess(DecoderSpec(partial(serving_engine, cfg.checkpoint, cfg.tokenizer_dir, settings),
                                                 cfg.max_concurrency, make_before_step=partial(fault_hook, fault) if fault else None))
        facts = self.decoder.facts
        if cfg.precision != "any" and cfg.dtype == "auto" and facts["precision"] != cfg.precision:
            self.decoder.close()
            raise RuntimeError(f"this replica was pinned to the {cfg.precision} group but its device "
                               f"({facts['plan']}) plans {facts['precision']}: check the node's {LABEL_PRECISION} label")
        self.tokenizer = Tokenizer.load(facts["tokenizer_dir"])  # the one the decoding process checked
        self.stop_ids = stop_ids(self.tokenizer)
        self.context = facts["context"]  # prompt + answer must fit
        self.metrics = ServingMetrics()
        self.model_id = cfg.model_name or run_dir_of(facts["step_dir"]).name
        self.created = int(time.time())
        self.active = 0  # admitted requests: decoding or waiting for a batch
        self.limit = cfg.max_concurrency + cfg.max_queue
        print(f"[replica] {facts['step_dir']} ({facts['stage']} model) on {facts['plan']}, {facts['dtype']}; "
              f"context {self.context}, batches of up to {cfg.max_concurrency}", flush=True)

    async def _pieces(self, answer: Answer, arrived: float) -> AsyncIterator[str]:
        """The answer's text, piece by piece: each piece the text of every token waiting, so a reader
        that lags sends one event for all of them. Admission happens before the first (empty) piece:
        429 when this replica's batch and queue are full. Closing the iterator frees the slot."""
        if self.active >= self.limit:
            raise ApiError(429, f"this replica is busy ({self.cfg.max_concurrency} answering, {self.cfg.max_queue} "
                                "waiting); retry shortly", "queue_full", type="rate_limit_error", headers={"Retry-After": "1"})
        self.active += 1
        timing = self.metrics.admitted(arrived)
        try:
            yield ""
            deadline = arrived + self.cfg.request_timeout_s if self.cfg.request_timeout_s > 0 else None
            stream = AnswerStream(self.tokenizer)
            reader = self.decoder.submit(answer.request)
            while (tokens := await self._take(reader, deadline)) is not None:
                self.metrics.decoded(timing, len(tokens))
                piece = ""
                for token in tokens:
                    answer.completion_tokens += 1
                    if token in self.stop_ids:
                        answer.finish_reason = "stop"
                        break
                    piece += stream.feed(token)
                if piece:
                    yield piece
            tail = stream.finish()
            if tail:
                yield tail
        finally:
            self.decoder.cancel(reader)  # a no-op when it finished; frees the slot when the reader left early
            self.active -= 1
            self.metrics.finished(timing)

    async def _take(self, reader: Reader, deadline: float | None) -> list[int] | None:
        """The reader's waiting tokens; the decoder's failures and the deadline as API errors."""
        try:
            return await reader.take(deadline, self.cfg.stream_interval_ms / 1000)
        except TimeoutError:
            raise ApiError(504, f"no answer within the request timeout of {self.cfg.request_timeout_s:g} s", "timeout",
                           type="server_error") from None
        except DecodeError as e:  # its message names no internals: the cause is in this replica's log
            if e.retry:
                raise ApiError(503, str(e), "replica_unavailable", type="server_error", headers={"Retry-After": "1"}) from None
            raise ApiError(500, str(e), "internal_error", type="server_error") from None

    def check_health(self) -> None:
        """Serve's health check: raising makes Serve replace this replica."""
        if self.decoder.failure is not None:
            raise RuntimeError(self.decoder.failure)

    # ---- routes

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """200 with this replica's load, or 503 with the reason once its decoding process has stopped."""
        body = {"status": "ok", "active": self.active, "max_concurrency": self.cfg.max_concurrency,
                "max_queue": self.cfg.max_queue, "replica": serve.get_replica_context().replica_id.unique_id}
        if self.decoder.failure is not None:
            return JSONResponse({**body, "status": "failed", "reason": self.decoder.failure}, status_code=503)
        return JSONResponse(body)

    @api.get("/metrics")
    async def serving_metrics(self) -> dict:
        """This replica's metrics (Prometheus gets them through Ray's metrics export)."""
        return {"replica": serve.get_replica_context().replica_id.unique_id, **self.metrics.summary()}

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        if not PAGE.is_file():
            raise ApiError(404, f"the chat page is missing: {PAGE} is not in this install (the API under /v1 works)",
                           "page_missing")
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @api.get("/v1/models")
    async def models(self) -> dict:
        model = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "nanochat",
                 "context_length": self.context}
        return {"object": "list", "data": [model]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatRequest):
        arrived = time.monotonic()
        answer = to_answer(body, self.tokenizer, self.context)
        pieces = self._pieces(answer, arrived)
        await pieces.__anext__()  # admitted (or 429 before any byte is sent)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(events(self.model_id, answer, pieces, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            text = "".join([piece async for piece in pieces])
        finally:
            await pieces.aclose()
        return completion(self.model_id, answer, text)
