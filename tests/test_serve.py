"""The Ray Serve chat endpoint on CPU, over real HTTP: one Serve instance per module (on the session's
local Ray, conftest.py's `local_ray`, whose replicas listen themselves, as `python -m ray_jobs.serve`'s
one replica does; Serve's proxy in front routes to them too) with two applications of the tiny
checkpoint, "main" at / (default limits, no key) and "tight" at /tight (1 in the batch, 1 waiting, a bearer key, and the test
faults of $NANOCHAT_SERVE_FAULT: a decode step that raises, a decoding process that dies, each when a
request of their seed asks). Answers are checked against the engine run in this process, streamed
against non-streamed, and through the official `openai` client."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from ray import serve

from nanochat.chat import render_for_completion
from nanochat.checkpoint import MODEL_FILE, find_latest, load_model
from nanochat.config import parse_config
from nanochat.errors import UsageError
from nanochat.infer.engine import Engine
from nanochat.infer.stream import AnswerStream
from nanochat.precision import resolve
from nanochat.scripts import bench_serve
from nanochat.tokenizer import Tokenizer
from ray_jobs import serve as serve_app
from tests.conftest import free_port
from tests.test_chat_eval import tiny_run  # noqa: F401  (the shared tiny checkpoint fixture)

KEY = "test-key-123"
CONTEXT = 64  # the tiny checkpoint's --max-seq-len
HELLO = [{"role": "user", "content": "Hello"}]
STEP_RAISES_SEED, DECODER_DIES_SEED = 4242, 4343  # tight's faults
REQUEST_TIMEOUT_S = 12  # Serve's HTTP timeout in these tests (ray_jobs.serve sets it from --request-timeout-s)


@dataclass
class Server:
    url: str  # the "main" app's replica (direct ingress, as `python -m ray_jobs.serve` serves one replica)
    tight: str  # the "tight" app's replica: max_concurrency 1, max_queue 1, bearer key
    proxy: str  # Serve's proxy, which routes to both: "main" at /, "tight" at /tight
    checkpoint: Path
    tokenizer_dir: Path
    ports: range  # those the replicas listen on (conftest.SERVE_PORTS)

    def replica_url(self, prefix: str, timeout: float = 60) -> str:
        """The URL of the replica that serves the app at `prefix` (a replica replacing another may take
        another port)."""
        deadline = time.time() + timeout
        while True:
            for port in self.ports:
                url = f"http://127.0.0.1:{port}{prefix}"
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                        return url
            assert time.time() < deadline, f"no replica answers for {prefix or '/'} on ports {self.ports}"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def server(tiny_run, tokenizer_dir, monkeypatch_module, local_ray, serve_ports) -> Server:  # noqa: F811
    port = free_port()
    common = {"checkpoint": str(tiny_run), "tokenizer_dir": str(tokenizer_dir), "device": "cpu", "num_cpus": "0.5"}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": REQUEST_TIMEOUT_S})
        monkeypatch_module.delenv(serve_app.API_KEY_ENV, raising=False)
        main = serve_app.build_app(common)
        monkeypatch_module.setenv(serve_app.API_KEY_ENV, KEY)  # read when the app is built
        monkeypatch_module.setenv(serve_app.FAULT_ENV, f"step_raises:{STEP_RAISES_SEED},decoder_dies:{DECODER_DIES_SEED}")
        tight = serve_app.build_app({**common, "max_concurrency": "1", "max_queue": "1"})
        monkeypatch_module.delenv(serve_app.API_KEY_ENV)
        monkeypatch_module.delenv(serve_app.FAULT_ENV)
        # both at once: their replicas start (import torch, load the model) side by side
        serve.run_many([serve.RunTarget(main, "main", "/"), serve.RunTarget(tight, "tight", "/tight")])
        found = Server("", "", f"http://127.0.0.1:{port}", tiny_run, tokenizer_dir, serve_ports)
        found.url, found.tight = found.replica_url(""), found.replica_url("/tight")
        yield found
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def engine(tiny_run, tokenizer_dir) -> Engine:  # noqa: F811
    model, _ = load_model(tiny_run, "cpu")
    return Engine(model, Tokenizer.load(tokenizer_dir), resolve("float32", "cpu"))


def local_answer(engine: Engine, messages: list[dict], max_tokens: int) -> tuple[str, int, int, str]:
    """(text as the server renders it, prompt tokens, completion tokens, finish reason) from the engine here."""
    prompt = render_for_completion(engine.tokenizer, {"messages": messages})
    results, _ = engine.generate_batch(prompt, 1, max_tokens=max_tokens, temperature=0.0)
    answer = results[0][len(prompt):]
    stream = AnswerStream(engine.tokenizer)
    stopped = bool(answer) and answer[-1] in engine.stop_ids
    text = "".join(stream.feed(t) for t in (answer[:-1] if stopped else answer)) + stream.finish()
    return text, len(prompt), len(answer), "stop" if stopped else "length"


def sse(response: httpx.Response) -> list:
    """The events of a streamed response: parsed JSON, and the final "[DONE]"."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
        else:
            assert line == "", f"not an SSE line: {line!r}"
    return events


def chat(url: str, messages: list[dict] = HELLO, headers: dict | None = None, **fields) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"messages": messages, **fields}, headers=headers, timeout=60)


def assert_error(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


def wait_idle(url: str, headers: dict | None = None, timeout: float = 20) -> None:
    """Until the replica holds no admitted request (a closed stream's slot is freed asynchronously)."""
    deadline = time.time() + timeout
    while (active := httpx.get(f"{url}/health", headers=headers, timeout=10).json()["active"]) and time.time() < deadline:
        time.sleep(0.1)
    assert active == 0, f"{active} request slot(s) still held {timeout} s after their clients left"


AUTH = {"Authorization": f"Bearer {KEY}"}


# ----------------------------------------------------------------------------- answers


@pytest.mark.parametrize("through", ["replica", "proxy"])
def test_streamed_and_plain_answers_match_the_engine(server, engine, through):
    """From the replica itself (direct ingress) and through Serve's proxy (multi-replica deployments)."""
    url = server.url if through == "replica" else server.proxy
    text, prompt_tokens, completion_tokens, finish = local_answer(engine, HELLO, 16)
    plain = chat(url, max_tokens=16, temperature=0)
    assert plain.status_code == 200, plain.text
    body = plain.json()
    assert body["object"] == "chat.completion" and body["model"] == server.checkpoint.name
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": text} and choice["finish_reason"] == finish
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens}
    assert prompt_tokens == len(render_for_completion(engine.tokenizer, {"messages": HELLO}))

    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60, json={
            "messages": HELLO, "max_tokens": 16, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert len(chunks) > 3, "the answer was not streamed in pieces"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert usage["choices"] == [] and usage["usage"] == body["usage"]


def test_conversation_with_a_system_message_and_history(server, engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
                {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "then?"}]}]
    same = [{"role": "user", "content": "Be brief.\n\nHi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "And then?"}]
    text, prompt_tokens, _, _ = local_answer(engine, same, 8)
    body = chat(server.url, messages, max_completion_tokens=8, temperature=0, top_p=0.9, user="someone").json()
    assert body["choices"][0]["message"]["content"] == text and body["usage"]["prompt_tokens"] == prompt_tokens


def test_the_openai_client_plain_and_streaming(server, engine):
    text, *_ = local_answer(engine, HELLO, 12)
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    models = client.models.list().data
    assert [m.id for m in models] == [server.checkpoint.name]
    reply = client.chat.completions.create(model=models[0].id, messages=HELLO, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == text and reply.usage.completion_tokens <= 12
    stream = client.chat.completions.create(model="anything", messages=HELLO, max_tokens=12, temperature=0, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert "".join(pieces) == text


def test_sampling_is_reproducible_with_a_seed(server):
    answers = {chat(server.url, max_tokens=12, temperature=1.0, top_k=20, seed=7).json()["choices"][0]["message"]["content"]
               for _ in range(2)}
    assert len(answers) == 1


ODD_SAMPLING = [{"temperature": 0}, {"temperature": 1e-30}, {"temperature": 2.0}, {"top_k": 0}, {"top_k": 1},
                {"top_k": 10**12}, {"seed": -5}, {"seed": 2**70}, {"temperature": 2.0, "top_k": 1, "seed": -(2**70)}]


def test_odd_sampling_values_affect_only_their_own_request(server):
    """Beside requests with extreme sampling values, a sampled request streams (in whatever pieces the
    server coalesces) exactly the answer it gets alone, not streamed."""
    normal = {"max_tokens": 24, "temperature": 0.9, "top_k": 30, "seed": 11}
    alone = chat(server.url, **normal).json()["choices"][0]["message"]["content"]
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def streamed() -> str:
        sampling = {k: v for k, v in normal.items() if k != "top_k"}
        stream = client.chat.completions.create(model="m", messages=HELLO, stream=True, extra_body={"top_k": 30}, **sampling)
        return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    with ThreadPoolExecutor(len(ODD_SAMPLING) + 1) as pool:
        odd = [pool.submit(chat, server.url, max_tokens=24, **fields) for fields in ODD_SAMPLING]
        assert streamed() == alone
        responses = [future.result() for future in odd]
    assert [r.status_code for r in responses] == [200] * len(ODD_SAMPLING), [r.text for r in responses]


# ----------------------------------------------------------------------------- limits and bad input


def alternating(n: int, chars: int) -> list[dict]:
    return [{"role": ("user", "assistant")[i % 2], "content": "a" * chars} for i in range(n)]


BAD_REQUESTS = {
    "invalid JSON": (b'{"messages": [', 400, "json_invalid", None),
    "not an object": (b"[1, 2]", 400, None, None),
    "no messages": ({"max_tokens": 4}, 400, "missing", "messages"),
    "empty messages": ({"messages": []}, 400, None, "messages"),
    "unknown role": ({"messages": [{"role": "tool", "content": "x"}]}, 400, None, "messages.0.role"),
    "content of a wrong type": ({"messages": [{"role": "user", "content": 5}]}, 400, None, None),
    "temperature as a string": ({"messages": HELLO, "temperature": "hot"}, 400, None, "temperature"),
    "max_tokens as a string": ({"messages": HELLO, "max_tokens": "4"}, 400, None, "max_tokens"),
    "max_tokens 0": ({"messages": HELLO, "max_tokens": 0}, 400, None, "max_tokens"),
    "stream not a bool": ({"messages": HELLO, "stream": "yes"}, 400, None, "stream"),
    "n = 2": ({"messages": HELLO, "n": 2}, 400, "unsupported_value", "n"),
    "501 messages": ({"messages": alternating(501, 1)}, 400, "too_many_messages", "messages"),
    "a message of 8001 characters": ({"messages": [{"role": "user", "content": "a" * 8001}]}, 400, "message_too_long",
                                     "messages.0.content"),
    "32001 characters in all": ({"messages": alternating(4, 8000) + [{"role": "user", "content": "a"}]}, 400,
                                "conversation_too_long", "messages"),
    "max_tokens past the context": ({"messages": HELLO, "max_tokens": CONTEXT}, 400, "context_length_exceeded", "max_tokens"),
    "a prompt past the context": ({"messages": [{"role": "user", "content": "a b " * CONTEXT}]}, 400,
                                  "context_length_exceeded", "messages"),
    "roles that do not alternate": ({"messages": HELLO + HELLO}, 400, "invalid_conversation", "messages"),
    "ending with the assistant": ({"messages": alternating(2, 3)}, 400, "invalid_conversation", "messages"),
    "a body over 1 MiB": (b'{"messages": "' + b"a" * (1 << 20) + b'"}', 413, "body_too_large", None),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_openai_errors_and_the_replica_answers_after(server, case):
    body, status, code, param = BAD_REQUESTS[case]
    kwargs = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    assert_error(httpx.post(f"{server.url}/v1/chat/completions", timeout=60, **kwargs), status, code, param)
    assert chat(server.url, max_tokens=2, temperature=0).status_code == 200


def test_a_chunked_body_over_the_limit_is_refused_while_it_arrives(server):
    chunks = (b"x" * 65536 for _ in range(20))  # no Content-Length: the size is counted as it comes
    response = httpx.post(f"{server.url}/v1/chat/completions", content=chunks, timeout=60,
                          headers={"Content-Type": "application/json"})
    assert_error(response, 413, "body_too_large")


def test_unknown_routes_and_methods_get_openai_errors(server):
    assert_error(httpx.get(f"{server.url}/v1/nothing", timeout=30), 404)
    assert_error(httpx.get(f"{server.url}/v1/chat/completions", timeout=30), 405)


def test_the_chat_page(server):
    page = httpx.get(server.url + "/", timeout=30)
    if serve_app.PAGE.is_file():
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.text == serve_app.PAGE.read_text(encoding="utf-8")
    else:
        assert "chat page is missing" in assert_error(page, 404, "page_missing")["message"]


def test_bearer_key(server):
    for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        assert_error(httpx.get(f"{server.tight}/v1/models", headers=headers, timeout=30), 401, "invalid_api_key")
        assert_error(chat(server.tight, headers=headers, max_tokens=2), 401, "invalid_api_key")
    assert httpx.get(f"{server.tight}/v1/models", headers=AUTH, timeout=30).status_code == 200
    assert chat(server.tight, headers=AUTH, max_tokens=2).status_code == 200
    assert httpx.get(f"{server.tight}/health", timeout=30).status_code == 200  # /health and / stay open
    assert httpx.get(f"{server.tight}/", timeout=30).status_code in (200, 404)
    assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 200  # no key set: no key needed


def test_a_full_replica_answers_429(server):
    """tight holds 1 answering + 1 waiting: of 6 simultaneous long answers some must be refused."""
    room = CONTEXT - len(render_for_completion(Tokenizer.load(server.tokenizer_dir), {"messages": HELLO}))
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: chat(server.tight, headers=AUTH, max_tokens=room, temperature=0), range(6)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 2 and 429 in statuses, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert assert_error(refused, 429, "queue_full")["type"] == "rate_limit_error"
    assert refused.headers["retry-after"] == "1"
    wait_idle(server.tight, AUTH)
    assert chat(server.tight, headers=AUTH, max_tokens=2).status_code == 200


def test_a_closed_stream_frees_its_slot(server):
    room = CONTEXT - len(render_for_completion(Tokenizer.load(server.tokenizer_dir), {"messages": HELLO}))
    with httpx.stream("POST", f"{server.tight}/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"messages": HELLO, "max_tokens": room, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        seen = [line for _, line in zip(range(4), lines, strict=False)]  # the role chunk and a content chunk
    assert any('"content"' in line for line in seen)
    wait_idle(server.tight, AUTH)
    # both slots (1 answering + 1 waiting) are free again: two at once both get through
    with ThreadPoolExecutor(2) as pool:
        statuses = list(pool.map(lambda _: chat(server.tight, headers=AUTH, max_tokens=room, temperature=0).status_code, range(2)))
    assert statuses == [200, 200]


def test_the_metrics_route_counts_requests_and_tokens(server):
    before = httpx.get(f"{server.url}/metrics", timeout=30).json()
    for _ in range(2):
        assert chat(server.url, max_tokens=6, temperature=0).status_code == 200
    after = httpx.get(f"{server.url}/metrics", timeout=30).json()
    assert after["replica"] == before["replica"]
    assert after["requests_finished"] == before["requests_finished"] + 2
    assert before["completion_tokens"] + 2 <= after["completion_tokens"] <= before["completion_tokens"] + 12
    assert after["tokens_per_s"] > 0 and after["requests_in_flight"] == after["requests_queued"] == 0
    ttft, tpot = after["time_to_first_token_s"], after["time_per_output_token_s"]
    assert ttft["count"] == before["time_to_first_token_s"]["count"] + 2 and 0 < ttft["p50"] <= ttft["p99"] < 30
    assert tpot["count"] >= 1 and 0 < tpot["p50"] < 30


# ----------------------------------------------------------------------------- a replica that stays up


def test_the_serving_metrics_reach_prometheus(server, ray_metrics_port):
    """Through Ray's metrics export (the Prometheus endpoint of the node): the counters and histograms
    of ServingMetrics, tagged by application, after the requests above (Ray exports every few seconds)."""
    assert chat(server.url, max_tokens=4).status_code == 200
    wanted = ("ray_nanochat_completion_tokens_total{", "ray_nanochat_requests_total{",
              "ray_nanochat_time_to_first_token_s_bucket{", "ray_nanochat_requests_in_flight{")
    deadline = time.time() + 60
    while time.time() < deadline:
        exported = httpx.get(f"http://127.0.0.1:{ray_metrics_port}/metrics", timeout=10).text
        lines = [line for line in exported.splitlines() if line.startswith(wanted)]
        if all(any(line.startswith(w) for line in lines) for w in wanted):
            break
        time.sleep(1)
    tokens = [line for line in lines if line.startswith(wanted[0]) and 'application="main"' in line]
    assert tokens and float(tokens[0].rsplit(" ", 1)[1]) > 0, lines or exported[-2000:]
    assert all(any(line.startswith(w) for line in lines) for w in wanted), lines


def test_the_key_is_checked_before_the_body_is_read(server):
    """A client without the key that sends headers and then stalls gets its 401 at once."""
    host, port = server.tight.removeprefix("http://").split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /tight/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n{\"messages\": ")
        assert conn.recv(4096).startswith(b"HTTP/1.1 401")


def test_a_client_that_stalls_its_body_is_cut_off_at_the_request_timeout(server):
    """A client with the key that sends part of its body and stalls holds the connection no longer than
    Serve's request timeout (and the replica answers the next request)."""
    host, port = server.tight.removeprefix("http://").split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=REQUEST_TIMEOUT_S + 30) as conn:
        started = time.monotonic()
        conn.sendall(b"POST /tight/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 100000\r\n\r\n{\"messages\": ")
        reply = conn.recv(4096)
        waited = time.monotonic() - started
    assert reply.split(b" ")[1] in (b"408", b"504"), reply[:200]
    assert REQUEST_TIMEOUT_S - 1 <= waited <= REQUEST_TIMEOUT_S + 15, waited
    assert chat(server.tight, headers=AUTH, max_tokens=2).status_code == 200


def test_a_decode_step_that_raises_fails_its_request_without_its_text(server, engine):
    fault = {"max_tokens": 8, "temperature": 0.5, "seed": STEP_RAISES_SEED}
    error = assert_error(chat(server.tight, headers=AUTH, **fault), 500, "internal_error")
    assert error["type"] == "server_error" and "error " in error["message"]
    assert "RuntimeError" not in error["message"] and serve_app.FAULT_ENV not in error["message"]
    with httpx.stream("POST", f"{server.tight}/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"messages": HELLO, "stream": True, **fault}) as r:
        events = sse(r)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "internal_error"
    assert serve_app.FAULT_ENV not in events[-2]["error"]["message"]
    text, *_ = local_answer(engine, HELLO, 8)  # the batch was rebuilt: the next request is answered
    assert chat(server.tight, headers=AUTH, max_tokens=8, temperature=0).json()["choices"][0]["message"]["content"] == text


def test_a_dead_decoding_process_gets_its_replica_replaced(server, engine):
    health = httpx.get(f"{server.tight}/health", timeout=30)
    assert health.status_code == 200, health.text
    replica = health.json()["replica"]
    assert_error(chat(server.tight, headers=AUTH, max_tokens=8, seed=DECODER_DIES_SEED), 503, "replica_unavailable")
    failed = httpx.get(f"{server.tight}/health", timeout=30)  # Serve needs 3 failed checks, 2 s apart
    assert failed.status_code == 503 and failed.json()["reason"].startswith("the decoding process stopped: ")
    assert_error(chat(server.tight, headers=AUTH, max_tokens=2), 503, "replica_unavailable")
    deadline = time.time() + 120
    while time.time() < deadline:  # the new replica listens on a port of its own, perhaps the same
        server.tight = server.replica_url("/tight", timeout=deadline - time.time())
        health = httpx.get(f"{server.tight}/health", timeout=60)
        if health.json()["replica"] != replica:
            break
        time.sleep(0.5)
    assert health.status_code == 200 and health.json()["replica"] != replica, health.text
    text, *_ = local_answer(engine, HELLO, 8)
    assert chat(server.tight, headers=AUTH, max_tokens=8, temperature=0).json()["choices"][0]["message"]["content"] == text


# ----------------------------------------------------------------------------- load


def test_load_test_of_32_streaming_clients(server, capsys):
    result = bench_serve.main(["--url", server.url, "--concurrency", "32", "--requests", "64", "--max-tokens", "16"])
    assert result["completed"] == 64 and result["failed"] == 0, result["errors"]
    assert 0 < result["ttft_p50_s"] <= result["latency_p50_s"] <= result["latency_p99_s"]
    assert result["tokens_per_s"] > 0 and 64 <= result["completion_tokens"] <= 64 * 16
    out = capsys.readouterr().out
    assert "p50" in out and "p99" in out and "tokens/s" in out


# ----------------------------------------------------------------------------- settings


def test_builder_args_are_the_command_line_flags():
    cfg = serve_app.config_from_args({"checkpoint": "runs/x", "replicas": "2", "max_concurrency": 4, "precision": "fp16"})
    assert (cfg.replicas, cfg.max_concurrency, cfg.precision, cfg.host) == (2, 4, "fp16", "127.0.0.1")
    with pytest.raises(ValueError, match="unknown serve settings"):
        serve_app.config_from_args({"checkpoint": "x", "replica": "2"})
    with pytest.raises(ValueError, match="invalid serve settings"):
        serve_app.config_from_args({"checkpoint": "x", "precision": "fp8"})


def test_an_open_host_without_a_key_is_refused_before_ray_starts(tiny_run, tokenizer_dir, monkeypatch):  # noqa: F811
    monkeypatch.delenv(serve_app.API_KEY_ENV, raising=False)
    args = ["--checkpoint", str(tiny_run), "--tokenizer-dir", str(tokenizer_dir), "--device", "cpu", "--host", "0.0.0.0"]
    with pytest.raises(UsageError, match=r"--host 0.0.0.0 exposes the API .*NANOCHAT_API_KEY.*--insecure"):
        serve_app.main(args)
    for host in ("127.0.0.1", "localhost", "::1"):
        serve_app.check_exposure(parse_config(serve_app.ServeConfig, [*args[:-1], host]))
    serve_app.check_exposure(parse_config(serve_app.ServeConfig, [*args, "--insecure"]))
    monkeypatch.setenv(serve_app.API_KEY_ENV, KEY)
    serve_app.check_exposure(parse_config(serve_app.ServeConfig, args))


def test_the_replica_listens_itself_only_for_one_replica_on_a_ray_of_its_own(tiny_run, tokenizer_dir, monkeypatch):  # noqa: F811
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = ["--checkpoint", str(tiny_run), "--tokenizer-dir", str(tokenizer_dir), "--device", "cpu"]

    def direct(*flags: str) -> bool:
        return serve_app.uses_direct_ingress(parse_config(serve_app.ServeConfig, [*args, *flags]))

    assert direct() and direct("--ingress", "direct")
    assert not direct("--replicas", "2") and not direct("--ingress", "proxy") and not direct("--address", "auto")
    for flags in (["--replicas", "2"], ["--address", "10.0.0.1:6379"]):
        with pytest.raises(UsageError, match="--ingress direct needs --replicas 1 and a Ray this command starts"):
            serve_app.main([*args, "--ingress", "direct", *flags])
    env = serve_app.direct_ingress_env(8000)
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1" and env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "8000"
    assert env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] == "8001"  # exclusive: that port and no other


def test_a_truncated_model_file_is_refused_before_ray_starts(tiny_run, tokenizer_dir, tmp_path):  # noqa: F811
    step = shutil.copytree(find_latest(tiny_run / "checkpoints"), tmp_path / "step_000004")
    model = step / MODEL_FILE
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    with pytest.raises(UsageError, match=f"cannot read the model file {model} .*truncated"):
        serve_app.main(["--checkpoint", str(step), "--tokenizer-dir", str(tokenizer_dir), "--device", "cpu"])


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        serve_app.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--max-concurrency" in out and "--precision" in out and "--dtype" in out


def test_the_chat_page_streams_the_models_answer_in_a_real_browser(server, browser, engine):
    """The page served by the real app, in headless chromium: type a message, watch the answer stream in."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server.url + "/")
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    browser.execute_script(
        "document.getElementById('temperature').value = '0';"
        "document.getElementById('max-tokens').value = '24';"
        "window.seen = new Set(); new MutationObserver(() => { const e = document.querySelector("
        "'#messages .message.assistant .content'); if (e) window.seen.add(e.textContent); })"
        ".observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});")
    browser.find_element(By.ID, "prompt").send_keys("Hello there", Keys.ENTER)
    wait = WebDriverWait(browser, 60, poll_frequency=0.05)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#messages .message.assistant"))
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "idle")
    shown = browser.find_element(By.CSS_SELECTOR, "#messages .message.assistant .content").text
    expected, *_ = local_answer(engine, [{"role": "user", "content": "Hello there"}], 24)
    assert shown.strip() == expected.strip()
    assert len(browser.execute_script("return [...window.seen]")) > 2  # it grew piece by piece
