"""One replica of ray_jobs/serve.py: the model on the replica's device, its batch decoder and the API's routes.

Imported where the application is built (serve.build_app), so that `python -m ray_jobs.serve` checks its
checkpoint, tokenizer, port and cluster before Ray Serve, FastAPI and the decoding code load.
"""

# no `from __future__ import annotations` here: FastAPI reads the routes' parameter types at run time,
# through Serve's ingress wrapper, where string annotations are not resolved

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import HTMLResponse, StreamingResponse
from ray import serve

from nanochat.checkpoint import load_for_inference, run_dir_of
from nanochat.common import init_process
from nanochat.infer.decode_thread import DecodeThread
from nanochat.infer.engine import Engine, context_length
from nanochat.infer.stream import AnswerStream
from ray_jobs.openai_api import Answer, ApiError, ChatRequest, api, authorize, completion, events, to_answer
from ray_jobs.scheduler import LABEL_PRECISION
from ray_jobs.serve import PAGE, ServeConfig


@serve.deployment
@serve.ingress(api)
class ChatServer:
    """One replica: the model on this replica's device, its batch decoder and the API's routes."""

    def __init__(self, cfg: ServeConfig, api_key: str | None = None):
        self.cfg, self.api_key = cfg, api_key or None
        self.device, self.plan = init_process(cfg)
        if cfg.precision != "any" and cfg.dtype == "auto" and self.plan.short != cfg.precision:
            raise RuntimeError(f"this replica was pinned to the {cfg.precision} group but its device "
                               f"({self.plan.name}) plans {self.plan.short}: check the node's {LABEL_PRECISION} label")
        model, tokenizer, step_dir, meta = load_for_inference(cfg.checkpoint, self.device, cfg.tokenizer_dir or None)
        self.engine = Engine(model, tokenizer, self.plan)
        self.context = context_length(model)  # prompt + answer must fit
        # a quarter more cache columns than one request can use, so the shared cache is compacted
        # at most every context/4 steps (see nanochat/infer/batch.py)
        self.decoder = DecodeThread(self.engine, cfg.max_concurrency, self.context + self.context // 4)
        self.model_id = cfg.model_name or run_dir_of(step_dir).name
        self.created = int(time.time())
        self.active = 0  # admitted requests: decoding or waiting for a batch
        self.limit = cfg.max_concurrency + cfg.max_queue
        print(f"[replica] {step_dir} ({meta.get('stage', '?')} model) on {self.plan.name}, {self.plan.dtype}; "
              f"context {self.context}, batches of up to {cfg.max_concurrency}", flush=True)

    async def _pieces(self, answer: Answer) -> AsyncIterator[str]:
        """The answer's text, piece by piece. Admission happens before the first (empty) piece: 429
        when this replica's batch and queue are full. Closing the iterator frees the slot."""
        if self.active >= self.limit:
            raise ApiError(429, f"this replica is busy ({self.cfg.max_concurrency} answering, {self.cfg.max_queue} "
                                "waiting); retry shortly", "queue_full", type="rate_limit_error", headers={"Retry-After": "1"})
        self.active += 1
        try:
            yield ""
            stream = AnswerStream(self.engine.tokenizer)
            queue = self.decoder.submit(answer.request)
            while (token := await queue.get()) is not None:
                if isinstance(token, Exception):
                    raise token
                answer.completion_tokens += 1
                if token in self.engine.stop_ids:
                    answer.finish_reason = "stop"
                    break
                piece = stream.feed(token)
                if piece:
                    yield piece
            tail = stream.finish()
            if tail:
                yield tail
        finally:
            self.decoder.cancel(answer.request)  # a no-op when it finished; frees the slot when the reader left early
            self.active -= 1

    # ---- routes

    @api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "active": self.active, "max_concurrency": self.cfg.max_concurrency,
                "max_queue": self.cfg.max_queue}

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> HTMLResponse:
        if not PAGE.is_file():
            raise ApiError(404, f"the chat page is missing: {PAGE} is not in this install (the API under /v1 works)",
                           "page_missing")
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict:
        authorize(request, self.api_key)
        model = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "nanochat",
                 "context_length": self.context}
        return {"object": "list", "data": [model]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatRequest, request: Request):
        authorize(request, self.api_key)
        answer = to_answer(body, self.engine.tokenizer, self.context)
        pieces = self._pieces(answer)
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
