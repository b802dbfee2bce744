"""The OpenAI chat-completions API of ray_jobs/serve.py: schema, limits, errors and the FastAPI app.

`ChatRequest` is what a request may ask (docs/serving.md has the table and the defaults); `top_p`
and other OpenAI fields are accepted and ignored. Rule: every refusal is an `ApiError`, rendered as
{"error": {"message", "type", "param", "code"}}; an unexpected exception is logged with an id and
answered with that id only, never with its text.
"""

# no `from __future__ import annotations` here: FastAPI and pydantic read these types at run time

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from nanochat.chat import ConversationError, render_for_completion
from nanochat.infer.batch import Request as DecodeRequest
from nanochat.infer.engine import SAMPLING
from nanochat.infer.sampling import request_seed
from nanochat.tokenizer import Tokenizer

MAX_MESSAGES = 500
MAX_MESSAGE_CHARS = 8000
MAX_TOTAL_CHARS = 32000
MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_TOKENS = 512
# below this a temperature is greedy: its draw is the argmax but for ties, and greedy decoding skips the noise
MIN_TEMPERATURE = 1e-5
OPEN_PATHS = ("/", "/health", "/metrics")  # answered without the API key

log = logging.getLogger(__name__)


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


def internal_error(exc: BaseException) -> ApiError:
    """The 500 for an unexpected exception: logged here with an id, the client gets the id only."""
    error_id = secrets.token_hex(4)
    log.error("internal error [error %s]", error_id, exc_info=exc)
    return ApiError(500, f"internal error (error {error_id}; the server's log has the details)", "internal_error",
                    type="server_error")


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


@dataclass
class Answer:
    """One request's decoding (what to sample) and what came of it."""

    request: DecodeRequest
    completion_tokens: int = 0
    finish_reason: str = "length"

    def usage(self) -> dict:
        prompt = len(self.request.prompt)
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}


def to_answer(body: ChatRequest, tokenizer: Tokenizer, context: int) -> Answer:
    """Check the limits and turn the request into a decoding job for a model of `context` tokens."""
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
        prompt = render_for_completion(tokenizer, {"messages": [m.as_chat() for m in messages]})
    except ConversationError as e:
        raise ApiError(400, str(e), "invalid_conversation", "messages") from None
    room = context - len(prompt)
    if room < 1:
        raise ApiError(400, f"the conversation is {len(prompt)} tokens; the model's context is {context}",
                       "context_length_exceeded", "messages")
    asked = body.max_completion_tokens or body.max_tokens
    if asked is not None and asked > room:
        raise ApiError(400, f"{len(prompt)} prompt tokens + max_tokens {asked} is over the model's context of "
                            f"{context}; ask for at most {room}", "context_length_exceeded", "max_tokens")
    return Answer(DecodeRequest(prompt, asked or min(DEFAULT_MAX_TOKENS, room), *sampling(body, tokenizer.vocab_size)))


def sampling(body: ChatRequest, vocab_size: int) -> tuple[float, int | None, int]:
    """(temperature, top_k, seed) in the ranges the sampler takes, whatever the request asked: a
    temperature too small to divide by is greedy, a top-k of 0 or past the vocabulary keeps every
    token, any integer seed maps to one of 2**63."""
    temperature = SAMPLING.temperature if body.temperature is None else body.temperature
    top_k = SAMPLING.top_k if body.top_k is None else body.top_k
    seed = secrets.randbits(63) if body.seed is None else request_seed(body.seed)
    return (temperature if temperature >= MIN_TEMPERATURE else 0.0), (top_k if 0 < top_k < vocab_size else None), seed


def authorized(headers: dict[bytes, bytes], api_key: str | None) -> bool:
    """Whether the request carries `Authorization: Bearer <api_key>` (always, when no key is set)."""
    if api_key is None:
        return True
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode())


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def completion(model_id: str, answer: Answer, text: str) -> dict:
    """The body of a non-streamed answer (OpenAI's chat.completion)."""
    return {
        "id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion", "created": int(time.time()),
        "model": model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": answer.finish_reason}],
        "usage": answer.usage(),
    }


async def events(model_id: str, answer: Answer, pieces: AsyncIterator[str], include_usage: bool) -> AsyncIterator[str]:
    """Server-Sent Events of one streamed answer (the OpenAI chat.completion.chunk format)."""
    head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model_id}

    def chunk(delta: dict, finish_reason: str | None = None) -> str:
        return sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]})

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for piece in pieces:
            yield chunk({"content": piece})
        yield chunk({}, answer.finish_reason)
        if include_usage:
            yield sse({**head, "choices": [], "usage": answer.usage()})
    except Exception as e:  # headers are sent: the error can only travel as an event
        error = e if isinstance(e, ApiError) else internal_error(e)
        yield sse({"error": {"message": error.message, "type": error.type, "param": error.param, "code": error.code}})
    finally:
        await pieces.aclose()
    yield sse("[DONE]")


# -----------------------------------------------------------------------------
# the app: key check, body limit and error handlers (the routes are the Serve deployment's, in replica.py)


class BearerKey:
    """401 before the body is read unless the request carries the key (`app.state.api_key`, which each
    replica sets; None = no key needed); OPEN_PATHS need none."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):  # under a route prefix (e.g. serve.run(..., route_prefix="/x"))
            path = path[len(root):] or "/"
        api_key = getattr(scope["app"].state, "api_key", None)
        if path in OPEN_PATHS or authorized(dict(scope.get("headers") or []), api_key):
            return await self.app(scope, receive, send)
        response = error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "invalid_api_key",
                                  headers={"WWW-Authenticate": "Bearer"})
        return await response(scope, receive, send)


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
api.add_middleware(BearerKey)  # added last: runs first, before the body limit reads anything


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
    error = internal_error(exc)
    return error_response(error.status, error.message, error.code, type=error.type)
