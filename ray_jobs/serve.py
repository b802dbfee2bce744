"""Serve a chat checkpoint over HTTP with Ray Serve: an OpenAI-compatible API and a web chat page.

    # one command: a local Ray cluster (or $RAY_ADDRESS / --address), one replica per GPU
    python -m ray_jobs.serve --checkpoint ~/.cache/nanochat/runs/sft_d12 --replicas 2
    # tiny, on a CPU laptop
    python -m ray_jobs.serve --checkpoint runs/demo --device cpu --max-concurrency 4
    # pin the replicas to the P100/V100/T4 (fp16) group of a mixed cluster
    python -m ray_jobs.serve --checkpoint /shared/runs/sft_d12 --precision fp16 --replicas 4
    # Serve's own CLI (an application builder: any flag below as key=value)
    serve run ray_jobs.serve:app checkpoint=/shared/runs/sft_d12 replicas=2
    # submitted to a running cluster (see docs/cluster.md); the HTTP port is the cluster's Serve proxy
    ray job submit --working-dir . -- python -m ray_jobs.serve --checkpoint /shared/runs/sft_d12 --host 0.0.0.0

Then talk to it with the `openai` client (base_url="http://127.0.0.1:8000/v1"), with curl

    curl -N http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"messages": [{"role": "user", "content": "Hello"}], "stream": true}'

or in a browser at http://127.0.0.1:8000/. Endpoints: POST /v1/chat/completions (OpenAI schema;
`stream: true` sends Server-Sent Events ending with `data: [DONE]`), GET /v1/models, GET /health,
GET / (the chat page, ray_jobs/static/chat.html).

What a request may ask: `messages` (roles system, developer, user, assistant; content a string or
a list of {"type": "text", "text": ...} parts), `max_tokens` / `max_completion_tokens` (default: up
to 512, and prompt + answer must fit the model's context), `temperature` (default 0.6), `top_k`
(default 50; 0 = all tokens), `seed`, `stream`, `stream_options.include_usage`, `n` (1 only).
`top_p` is accepted and ignored (the engine samples with temperature and top-k only); other OpenAI
fields (`user`, `tools`, ...) are ignored. Any `model` name is accepted: a deployment serves one.
Calculator calls the model makes appear in the answer text as "[calculator: 3*4] [= 12]", streamed
or not. Limits: 500 messages, 8000 characters per message, 32000 in all, a 1 MiB body.

Each replica picks its own device and precision plan (--dtype auto: bf16 on an H100, fp16 on a
P100), so replicas on different GPU generations serve together. Concurrent requests of a replica
are decoded together with continuous batching (nanochat/batching.py: a request joins the running
batch at the next decoding step and leaves when it ends), up to --max-concurrency of them; up to
--max-queue more wait, and further requests get 429. Binds 127.0.0.1 unless --host says otherwise.
With $NANOCHAT_API_KEY set (in the process that builds the app), every endpoint but / and /health
needs `Authorization: Bearer <key>`.
"""

# no `from __future__ import annotations` here: FastAPI reads the routes' parameter types at run time,
# through Serve's ingress wrapper, where string annotations are not resolved

import asyncio
import dataclasses
import hmac
import json
import math
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException

from nanochat import batching
from nanochat.chat import ConversationError, render_for_completion
from nanochat.checkpoint import load_for_inference, run_dir_of
from nanochat.common import init_process
from nanochat.config import CommonConfig, option, parse_config
from nanochat.engine import Engine
from nanochat.precision import node_labels, resolve
from nanochat.scripts.chat_cli import AnswerStream
from ray_jobs.scheduler import LABEL_PRECISION

PAGE = Path(__file__).parent / "static" / "chat.html"
API_KEY_ENV = "NANOCHAT_API_KEY"
MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_TOKENS = 512
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_K = 50
EXTRA_ONGOING = 16  # room above the replica's own limits for /health, /v1/models and the requests it refuses


# -----------------------------------------------------------------------------
# settings: one dataclass for the command line and for `serve run ... key=value`


@dataclass
class ServeConfig(CommonConfig):
    checkpoint: str = option("", "a step_* directory, or a run dir / checkpoint root (its latest complete checkpoint)")
    tokenizer_dir: str = option("", "trained tokenizer; empty = $NANOCHAT_BASE_DIR/tokenizer on each replica's node")
    model_name: str = option("", "the model id the API reports; empty = the checkpoint's run directory name")
    replicas: int = option(1, "replicas (one GPU each, or a share of a CPU)")
    host: str = option("127.0.0.1", "address the HTTP proxy binds (0.0.0.0 exposes it to the network)")
    port: int = option(8000, "HTTP port")
    max_concurrency: int = option(32, "requests a replica decodes together in one batch")
    max_queue: int = option(64, "requests a replica keeps waiting beyond those; more get 429")
    precision: str = option("any", "pin replicas to nodes of this precision group (node label nanochat/precision)",
                            choices=("any", "bf16", "fp16", "fp32"))
    num_gpus: float = option(-1.0, "GPUs per replica; -1 = 1 when this machine has CUDA, --device is cuda or "
                                   "--precision is bf16/fp16, else 0")
    num_cpus: float = option(0.5, "CPUs reserved per replica")
    address: str = option("", "Ray cluster address; empty = $RAY_ADDRESS or a new local cluster")


def config_from_args(args: dict[str, Any] | ServeConfig) -> ServeConfig:
    """`serve run ray_jobs.serve:app key=value ...` args (strings, or typed values from Python) -> ServeConfig,
    through the same parser as the command line. (Under `serve run`, host and port are Serve's own:
    127.0.0.1:8000 unless a Serve config file says otherwise.)"""
    if isinstance(args, ServeConfig):
        return args
    known = {f.name for f in dataclasses.fields(ServeConfig)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown serve settings {unknown}; known: {sorted(known)}")
    argv = [item for key, value in args.items() for item in ("--" + key.replace("_", "-"), str(value))]
    try:
        return parse_config(ServeConfig, argv)
    except SystemExit as e:  # argparse has printed why
        raise ValueError(f"invalid serve settings {args}") from e


# -----------------------------------------------------------------------------
# the OpenAI schema


class ApiError(Exception):
    """A request the API refuses; rendered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type
        self.headers = headers


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   type: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class Part(BaseModel):
    """A content part: OpenAI's {"type": "text"}; assistant turns may also carry nanochat's tool parts."""

    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text", "python", "python_output"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part]

    def text_length(self) -> int:
        return len(self.content) if isinstance(self.content, str) else sum(len(p.text) for p in self.content)

    def as_chat(self) -> dict:
        """The message in nanochat.chat's format (developer = system; user parts joined)."""
        role = "system" if self.role == "developer" else self.role
        content = self.content
        if isinstance(content, list):
            if role != "assistant" and any(p.type != "text" for p in content):
                raise ApiError(400, f"{role} messages take text parts only", "invalid_content", "messages")
            content = "".join(p.text for p in content) if role != "assistant" else [p.model_dump() for p in content]
        return {"role": role, "content": content}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)  # accepted, ignored
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1


# -----------------------------------------------------------------------------
# decoding


@dataclass
class Job:
    """One request's decoding: what to sample, and what came of it."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    top_k: int | None
    seed: int
    completion_tokens: int = 0
    finish_reason: str = "length"


class DecodeLoop:
    """The replica's decoding thread: one continuous batch (nanochat.batching.DecodeBatch) of
    `slots` rows. Requests join at the next decoding step and leave as soon as they finish or
    their reader goes away, so a late request never waits for a whole batch to end. Tokens travel
    back to each request's asyncio queue, ending with None (or the exception that stopped it)."""

    def __init__(self, engine: Engine, slots: int, capacity: int):
        self.engine, self.slots, self.capacity = engine, slots, capacity
        self.batch = batching.DecodeBatch(engine, slots, capacity)
        self.batch.warm_up()
        self._inbox: list[tuple[str, Job, asyncio.Queue | None]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queues: dict[int, asyncio.Queue] = {}  # request id in the batch -> its reader
        self._ids: dict[int, int] = {}  # id(job) -> request id
        self._loop: asyncio.AbstractEventLoop | None = None
        threading.Thread(target=self._run, name="decode", daemon=True).start()

    # ---- called on the event loop

    def submit(self, job: Job) -> asyncio.Queue:
        self._loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._post("add", job, queue)
        return queue

    def cancel(self, job: Job) -> None:
        self._post("cancel", job, None)

    def _post(self, what: str, job: Job, queue: asyncio.Queue | None) -> None:
        with self._lock:
            self._inbox.append((what, job, queue))
        self._wake.set()

    # ---- the decoding thread

    def _run(self) -> None:
        while True:
            if not self.batch.busy:
                self._wake.wait()
            self._wake.clear()
            with self._lock:
                inbox, self._inbox = self._inbox, []
            for what, job, queue in inbox:
                if what == "add":
                    rid = self.batch.add(batching.Request(job.prompt, job.max_tokens, job.temperature, job.top_k, job.seed))
                    self._ids[id(job)], self._queues[rid] = rid, queue
                elif (rid := self._ids.pop(id(job), None)) is not None:
                    self.batch.cancel(rid)
                    self._queues.pop(rid, None)
            if self.batch.busy:
                self._step()

    def _step(self) -> None:
        try:
            tokens = self.batch.step()
        except Exception as e:  # e.g. out of memory: fail the requests in flight, keep the replica serving
            self._deliver({rid: e for rid in self._queues}, set(self._queues))
            self.batch = batching.DecodeBatch(self.engine, self.slots, self.capacity)
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


# -----------------------------------------------------------------------------
# the HTTP app


class BodyLimit:
    """Refuse request bodies over `max_bytes` (413) before anything parses them."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            response = error_response(413, f"request body of {int(length)} bytes is over the {self.max_bytes} byte limit",
                                      "body_too_large")
            return await response(scope, receive, send)
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413, f"request body is over the {self.max_bytes} byte limit")
            return message

        return await self.app(scope, counted_receive, send)


api = FastAPI(title="nanochat", description="OpenAI-compatible chat completions from a nanochat checkpoint")
api.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.code, exc.param, exc.type, exc.headers)


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": "invalid"}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        message = f"the body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}"
    else:
        message = f"{param or 'body'}: {first['msg']}" + (f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else "")
    return error_response(400, message, first.get("type"), param)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = {401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status_code)
    return error_response(exc.status_code, str(exc.detail), code, headers=getattr(exc, "headers", None))


@api.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error", type="server_error")


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


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
        self.context = model.config.sequence_len  # the context it was trained on: prompt + answer must fit
        # a quarter more cache columns than one request can use, so the shared cache is compacted
        # at most every context/4 steps (see nanochat/batching.py)
        self.decoder = DecodeLoop(self.engine, cfg.max_concurrency, self.context + self.context // 4)
        self.model_id = cfg.model_name or run_dir_of(step_dir).name
        self.created = int(time.time())
        self.active = 0  # admitted requests: decoding or waiting for a batch
        self.limit = cfg.max_concurrency + cfg.max_queue
        print(f"[replica] {step_dir} ({meta.get('stage', '?')} model) on {self.plan.name}, {self.plan.dtype}; "
              f"context {self.context}, batches of up to {cfg.max_concurrency}", flush=True)

    # ---- helpers

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    def _job(self, body: ChatRequest) -> Job:
        """Check the limits and turn the request into a decoding job."""
        messages = body.messages
        if len(messages) > MAX_MESSAGES:
            raise ApiError(400, f"{len(messages)} messages; at most {MAX_MESSAGES} are allowed", "too_many_messages", "messages")
        total = 0
        for i, message in enumerate(messages):
            length = message.text_length()
            if length > MAX_MESSAGE_CHARS:
                raise ApiError(400, f"message {i} has {length} characters; at most {MAX_MESSAGE_CHARS} are allowed",
                               "message_too_long", f"messages.{i}.content")
            total += length
        if total > MAX_TOTAL_CHARS:
            raise ApiError(400, f"the messages have {total} characters in all; at most {MAX_TOTAL_CHARS} are allowed",
                           "conversation_too_long", "messages")
        if body.n != 1:
            raise ApiError(400, "only n=1 is supported", "unsupported_value", "n")
        if messages[-1].role != "user":
            raise ApiError(400, "the last message must be the user's", "invalid_conversation", "messages")
        try:
            prompt = render_for_completion(self.engine.tokenizer, {"messages": [m.as_chat() for m in messages]})
        except ConversationError as e:
            raise ApiError(400, str(e), "invalid_conversation", "messages") from None
        room = self.context - len(prompt)
        if room < 1:
            raise ApiError(400, f"the conversation is {len(prompt)} tokens; the model's context is {self.context}",
                           "context_length_exceeded", "messages")
        asked = body.max_completion_tokens or body.max_tokens
        if asked is not None and asked > room:
            raise ApiError(400, f"{len(prompt)} prompt tokens + max_tokens {asked} is over the model's context of "
                                f"{self.context}; ask for at most {room}", "context_length_exceeded", "max_tokens")
        top_k = DEFAULT_TOP_K if body.top_k is None else body.top_k
        seed = secrets.randbits(63) if body.seed is None else body.seed % 2**63
        temperature = DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
        return Job(prompt, asked or min(DEFAULT_MAX_TOKENS, room), temperature, top_k or None, seed)

    async def _pieces(self, job: Job) -> AsyncIterator[str]:
        """The answer's text, piece by piece. Admission happens before the first (empty) piece: 429
        when this replica's batch and queue are full. Closing the iterator frees the slot."""
        if self.active >= self.limit:
            raise ApiError(429, f"this replica is busy ({self.cfg.max_concurrency} answering, {self.cfg.max_queue} "
                                "waiting); retry shortly", "queue_full", type="rate_limit_error", headers={"Retry-After": "1"})
        self.active += 1
        try:
            yield ""
            stream = AnswerStream(self.engine.tokenizer)
            queue = self.decoder.submit(job)
            while (token := await queue.get()) is not None:
                if isinstance(token, Exception):
                    raise token
                job.completion_tokens += 1
                if token in self.engine.stop_ids:
                    job.finish_reason = "stop"
                    break
                piece = stream.feed(token)
                if piece:
                    yield piece
            tail = stream.finish()
            if tail:
                yield tail
        finally:
            self.decoder.cancel(job)  # a no-op when it finished; frees the slot when the reader left early
            self.active -= 1

    def _usage(self, job: Job) -> dict:
        prompt = len(job.prompt)
        return {"prompt_tokens": prompt, "completion_tokens": job.completion_tokens, "total_tokens": prompt + job.completion_tokens}

    async def _events(self, job: Job, pieces: AsyncIterator[str], include_usage: bool) -> AsyncIterator[str]:
        """Server-Sent Events of one streamed answer (the OpenAI chat.completion.chunk format)."""
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": self.model_id}

        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            return _sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

        try:
            yield chunk({"role": "assistant", "content": ""})
            async for piece in pieces:
                yield chunk({"content": piece})
            yield chunk({}, job.finish_reason)
            if include_usage:
                yield _sse({**head, "choices": [], "usage": self._usage(job)})
        except Exception as e:  # headers are sent: the error can only travel as an event
            yield _sse({"error": {"message": f"internal error: {type(e).__name__}: {e}", "type": "server_error",
                                  "param": None, "code": "internal_error"}})
        finally:
            await pieces.aclose()
        yield _sse("[DONE]")

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
        self._authorize(request)
        model = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "nanochat",
                 "context_length": self.context}
        return {"object": "list", "data": [model]}

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatRequest, request: Request):
        self._authorize(request)
        job = self._job(body)
        pieces = self._pieces(job)
        await pieces.__anext__()  # admitted (or 429 before any byte is sent)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._events(job, pieces, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            text = "".join([piece async for piece in pieces])
        finally:
            await pieces.aclose()
        return {
            "id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": job.finish_reason}],
            "usage": self._usage(job),
        }


# -----------------------------------------------------------------------------
# building and running


def _gpus_per_replica(cfg: ServeConfig) -> float:
    if cfg.num_gpus >= 0:
        return cfg.num_gpus
    if cfg.device:
        return 1.0 if cfg.device.startswith("cuda") else 0.0
    return 1.0 if torch.cuda.is_available() or cfg.precision in ("bf16", "fp16") else 0.0


def build_app(args: dict[str, Any] | ServeConfig) -> Application:
    """The Serve application for `args` (ServeConfig's fields, e.g. {"checkpoint": ..., "replicas": "2"}).

    The API key is read here, from $NANOCHAT_API_KEY of the process that builds the app."""
    cfg = config_from_args(args)
    if not cfg.checkpoint:
        raise ValueError("pass checkpoint=<a step_* directory or a run directory>")
    # absolute paths: replicas run in other processes, maybe on other nodes of a shared filesystem
    cfg.checkpoint = str(Path(cfg.checkpoint).expanduser().resolve())
    if cfg.tokenizer_dir:
        cfg.tokenizer_dir = str(Path(cfg.tokenizer_dir).expanduser().resolve())
    actor = {"num_cpus": cfg.num_cpus, "num_gpus": _gpus_per_replica(cfg)}
    if cfg.precision != "any":
        actor["label_selector"] = {LABEL_PRECISION: cfg.precision}
    deployment = ChatServer.options(
        num_replicas=cfg.replicas,
        max_ongoing_requests=cfg.max_concurrency + cfg.max_queue + EXTRA_ONGOING,
        ray_actor_options=actor,
    )
    return deployment.bind(cfg, os.environ.get(API_KEY_ENV) or None)


app = build_app  # `serve run ray_jobs.serve:app checkpoint=...` calls it with the key=value args


def connect(cfg: ServeConfig) -> None:
    """Join the cluster at --address / $RAY_ADDRESS, or start a local one labelled with this machine's
    precision group (as ray_jobs/train.py does)."""
    if cfg.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.address or None, ignore_reinit_error=True)
        return
    labels = node_labels(resolve(cfg.dtype, cfg.device or None))
    needed = cfg.replicas * cfg.num_cpus + 2  # + Serve's controller and proxy
    # address="local": never join some other cluster that happens to run on this host
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(needed)), labels=labels, ignore_reinit_error=True)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(ServeConfig, sys.argv[1:] if argv is None else argv, description=__doc__.splitlines()[0])
    if not cfg.checkpoint:
        raise SystemExit("serve: pass --checkpoint (a step_* directory or a run directory)")
    connect(cfg)
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg), name="nanochat", route_prefix="/")
    shown = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    auth = f" (bearer key from ${API_KEY_ENV})" if os.environ.get(API_KEY_ENV) else ""
    print(f"serving {cfg.checkpoint} on http://{shown}:{cfg.port}/  (OpenAI API: http://{shown}:{cfg.port}/v1){auth}; "
          "Ctrl-C stops", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `ray job stop`, kill: shut Serve down as Ctrl-C does
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()


if __name__ == "__main__":
    main()
