"""Load test of a running chat endpoint: concurrent streaming clients, a fixed number of requests.

    python -m nanochat.scripts.bench_serve --url http://127.0.0.1:8000 --concurrency 32 --requests 128
    # one stream at a time: time to first token and decode tokens/s of a single user
    python -m nanochat.scripts.bench_serve --concurrency 1 --requests 8 --max-tokens 128
    # tiny, against a CPU server of a tiny model (python -m ray_jobs.serve --checkpoint runs/demo --device cpu)
    python -m nanochat.scripts.bench_serve --concurrency 4 --requests 8 --max-tokens 16
    # from a Ray cluster's head (the Serve proxy listens on each node running a replica)
    ray job submit -- python -m nanochat.scripts.bench_serve --url http://127.0.0.1:8000 --requests 256

Each client sends POST /v1/chat/completions with stream=true (and stream_options.include_usage, so
the server reports how many tokens each answer took) and reads the Server-Sent Events to the final
`data: [DONE]`. Reported: latency (request sent -> [DONE]) and time to first token (request sent ->
first content) as p50/p99, decode tokens/s of one stream, aggregate completion tokens/s over the
whole run, and every failed request with its reason: a load test that loses requests must say so.
Plain HTTP from the standard library (no extra dependency), or the official `openai` client
(`--client openai`); $NANOCHAT_API_KEY is sent as the bearer key when set. ray_jobs/bench_endpoint.py
runs both beside the engine on the same checkpoint.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import urlsplit

import numpy as np

from nanochat.config import option, parse_config

PROMPTS = (
    "Why is the sky blue?",
    "Write a short poem about the sea.",
    "What is 12 times 7?",
    "Tell me about the history of Rome.",
    "How do plants make food?",
)


@dataclass
class BenchServeConfig:
    url: str = option("http://127.0.0.1:8000", "the server's base URL (the API is under /v1)")
    concurrency: int = option(32, "clients streaming at the same time")
    requests: int = option(64, "requests in all, shared by the clients")
    max_tokens: int = option(64, "max_tokens of every request")
    temperature: float = option(1.0, "sampling temperature (request i uses seed i)")
    prompt: str = option("", "the user message of every request; empty = a few prompts in turn")
    timeout: float = option(300.0, "seconds one request may take")
    seed: int = option(0, "seed of the first request")
    client: str = option("http", "http: plain HTTP from the standard library; openai: the official openai client",
                         choices=("http", "openai"))


@dataclass
class Outcome:
    ok: bool
    latency: float = 0.0  # request sent -> [DONE]
    ttft: float | None = None  # request sent -> first content (None: the answer was empty)
    tokens: int = 0  # completion tokens, as the server counted them
    error: str = ""
    finish_reason: str | None = None
    text: str = field(default="", repr=False)


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def request_body(cfg: BenchServeConfig, index: int) -> dict:
    """Request `index`'s body: the same for every client."""
    prompt = cfg.prompt or PROMPTS[index % len(PROMPTS)]
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": cfg.max_tokens, "temperature": cfg.temperature,
            "seed": cfg.seed + index, "stream": True, "stream_options": {"include_usage": True}}


def stream_one(cfg: BenchServeConfig, index: int, api_key: str | None) -> Outcome:
    """One streamed chat completion over plain HTTP, timed."""
    parts = urlsplit(cfg.url)
    connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    body = json.dumps(request_body(cfg, index))
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    path = parts.path.rstrip("/") + "/v1/chat/completions"
    connection = connection_class(parts.hostname, parts.port, timeout=cfg.timeout)
    start = time.perf_counter()
    outcome = Outcome(ok=False)
    try:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        if response.status != 200:
            return Outcome(ok=False, error=f"HTTP {response.status}: {response.read()[:300].decode(errors='replace')}")
        done, pending = False, b""
        # whole reads, split into events here: a line-by-line read of a chunked body costs the client
        # several Python calls per line, and 32 client threads share one GIL
        while not done and (data := response.read1(1 << 16)):
            *events, pending = (pending + data).split(b"\n\n")
            for raw in events:
                if not raw.startswith(b"data: "):
                    continue
                payload = raw[len(b"data: "):]
                if payload == b"[DONE]":
                    done = True
                    break
                event = json.loads(payload)
                if "error" in event:
                    return Outcome(ok=False, error=f"error event: {event['error'].get('message')}")
                if event.get("usage"):
                    outcome.tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices", []):
                    content = choice.get("delta", {}).get("content")
                    if content and outcome.ttft is None:
                        outcome.ttft = time.perf_counter() - start
                    outcome.text += content or ""
                    outcome.finish_reason = choice.get("finish_reason") or outcome.finish_reason
        if not done:
            return Outcome(ok=False, error="the stream ended without [DONE]")
        outcome.latency, outcome.ok = time.perf_counter() - start, True
        return outcome
    except (OSError, http.client.HTTPException, ValueError) as e:
        return Outcome(ok=False, error=f"{type(e).__name__}: {e}")
    finally:
        connection.close()


def stream_one_openai(client, cfg: BenchServeConfig, index: int) -> Outcome:
    """One streamed chat completion through the official `openai` client (the code path of a user's
    program: its HTTP pool, its event parsing), timed."""
    import openai

    start = time.perf_counter()
    outcome = Outcome(ok=False)
    try:
        for chunk in client.chat.completions.create(model="nanochat", **request_body(cfg, index)):
            if chunk.usage:
                outcome.tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.delta.content and outcome.ttft is None:
                    outcome.ttft = time.perf_counter() - start
                outcome.text += choice.delta.content or ""
                outcome.finish_reason = choice.finish_reason or outcome.finish_reason
    except openai.OpenAIError as e:
        return Outcome(ok=False, error=f"{type(e).__name__}: {e}")
    outcome.latency, outcome.ok = time.perf_counter() - start, True
    return outcome


@contextlib.contextmanager
def streamer(cfg: BenchServeConfig, api_key: str | None) -> Iterator[Callable[[int], Outcome]]:
    """Request index -> its timed Outcome, with cfg.client. The openai client is one shared by every thread,
    as a program would share it, and closed after the run (its pooled connections would otherwise hold
    the server's port after the server stops)."""
    if cfg.client != "openai":
        yield partial(stream_one, cfg, api_key=api_key)
        return
    import openai  # a dev dependency: only this client needs it

    with openai.OpenAI(base_url=cfg.url.rstrip("/") + "/v1", api_key=api_key or "unused", max_retries=0,
                       timeout=cfg.timeout) as client:
        yield partial(stream_one_openai, client, cfg)


def run(cfg: BenchServeConfig) -> dict:
    """Send cfg.requests requests from cfg.concurrency clients; the summary dict."""
    api_key = os.environ.get("NANOCHAT_API_KEY")
    with streamer(cfg, api_key) as one:
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=cfg.concurrency) as clients:
            outcomes = list(clients.map(one, range(cfg.requests)))
    wall = time.perf_counter() - start
    ok = [o for o in outcomes if o.ok]
    latencies = [o.latency for o in ok]
    ttfts = [o.ttft for o in ok if o.ttft is not None]
    # one stream's decode speed: the tokens after the first, over the time after the first
    decode = [(o.tokens - 1) / (o.latency - o.ttft) for o in ok if o.ttft is not None and o.tokens > 1 and o.latency > o.ttft]
    tokens = sum(o.tokens for o in ok)
    return {
        "url": cfg.url, "client": cfg.client, "concurrency": cfg.concurrency, "requests": cfg.requests, "max_tokens": cfg.max_tokens,
        "completed": len(ok), "failed": len(outcomes) - len(ok),
        "errors": sorted({o.error for o in outcomes if not o.ok}),
        "wall_s": wall,
        "latency_p50_s": _percentile(latencies, 50), "latency_p99_s": _percentile(latencies, 99),
        "ttft_p50_s": _percentile(ttfts, 50), "ttft_p99_s": _percentile(ttfts, 99),
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "stream_decode_tokens_per_s_p50": _percentile(decode, 50),
        "finish_reasons": {reason: sum(o.finish_reason == reason for o in ok) for reason in ("stop", "length")},
    }


def _fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(BenchServeConfig, sys.argv[1:] if argv is None else argv, description=__doc__.splitlines()[0])
    if cfg.concurrency < 1 or cfg.requests < 1:
        raise SystemExit("bench_serve: --concurrency and --requests must be at least 1")
    print(f"{cfg.requests} requests, {cfg.concurrency} concurrent streaming clients ({cfg.client}), max_tokens "
          f"{cfg.max_tokens} -> {cfg.url}")
    result = run(cfg)
    decode = result["stream_decode_tokens_per_s_p50"]
    print(f"completed {result['completed']}/{result['requests']}, failed {result['failed']} in {result['wall_s']:.2f} s\n"
          f"latency        p50 {_fmt(result['latency_p50_s'])}   p99 {_fmt(result['latency_p99_s'])}\n"
          f"first token    p50 {_fmt(result['ttft_p50_s'])}   p99 {_fmt(result['ttft_p99_s'])}\n"
          f"decode, 1 stream    {'-' if decode is None else f'{decode:.1f}'} tokens/s (p50)\n"
          f"aggregate           {result['tokens_per_s']:.1f} tokens/s ({result['completion_tokens']} completion tokens)")
    for error in result["errors"]:
        print(f"error: {error}")
    print("result:", json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
