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

Then use the `openai` client (base_url="http://127.0.0.1:8000/v1") or a browser at
http://127.0.0.1:8000/ (the API: ray_jobs/openai_api.py; the tour: docs/serving.md). Each replica
picks its own precision plan and decodes up to --max-concurrency requests in one continuous batch;
binds 127.0.0.1 unless --host; $NANOCHAT_API_KEY (where the app is built) turns on bearer auth.
"""

# no `from __future__ import annotations` here: FastAPI reads the routes' parameter types at run time,
# through Serve's ingress wrapper, where string annotations are not resolved

import dataclasses
import errno
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import HTMLResponse, StreamingResponse
from ray import serve
from ray.serve import Application

from nanochat import checkpoint
from nanochat.checkpoint import load_for_inference, run_dir_of
from nanochat.common import init_process
from nanochat.config import CommonConfig, option, parse_config
from nanochat.errors import UsageError
from nanochat.infer.decode_thread import DecodeThread
from nanochat.infer.engine import Engine, context_length
from nanochat.infer.stream import AnswerStream
from nanochat.tokenizer import Tokenizer
from ray_jobs.cluster import connect, joins_cluster, planned_nodes, run_driver
from ray_jobs.openai_api import Answer, ApiError, ChatRequest, api, authorize, completion, events, to_answer
from ray_jobs.scheduler import LABEL_PRECISION, check_room, choose_group, groups, nodes_from_ray

PAGE = Path(__file__).parent / "static" / "chat.html"
API_KEY_ENV = "NANOCHAT_API_KEY"
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
# the deployment: one replica's model, decoding thread and routes


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


def check_model(cfg: ServeConfig) -> None:
    """The checkpoint resolves and its tokenizer is found, loads and is the one it was trained with, as a
    replica will find them (without loading any weights)."""
    step_dir = checkpoint.resolve_checkpoint(cfg.checkpoint)
    meta = checkpoint.read_meta(step_dir)
    directory = checkpoint.tokenizer_dir_for(meta, cfg.tokenizer_dir or None, step_dir)
    try:
        tokenizer = Tokenizer.load(directory)
    except (FileNotFoundError, ValueError) as err:  # its message names the file and how to make a new one
        raise UsageError(str(err)) from err
    checkpoint.check_tokenizer(meta, tokenizer.fingerprint(), directory, step_dir)


def check_port(host: str, port: int) -> None:
    """Serve's HTTP proxy can bind host:port here; otherwise the deployment would fail after the model loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy (uvicorn) binds
        try:
            probe.bind((host, port))
        except OSError as err:
            what = "is in use" if err.errno == errno.EADDRINUSE else f"cannot be bound ({err.strerror})"
            raise UsageError(f"{host}:{port} {what}: pass another --port (or --host), or stop what holds it") from err


def check_capacity(cfg: ServeConfig, nodes: list[dict]) -> None:
    """The cluster has room for every replica (in the --precision group if one is named): Serve would
    otherwise wait without end for a node that never comes."""
    found = groups(nodes_from_ray(nodes))
    gpus = _gpus_per_replica(cfg)
    shape = {"use_gpu": gpus > 0, "cpus_per_worker": cfg.num_cpus, "gpus_per_worker": gpus or 1, "role": "replica"}
    if cfg.precision == "any":  # replicas answer on their own: they may spread over groups
        check_room(found, cfg.replicas, **shape)
    else:
        choose_group(found, cfg.precision, cfg.replicas, **shape)


def preflight(cfg: ServeConfig, cpus: float) -> None:
    """Everything checked before Ray, Serve or a GPU start, so that a mistake fails in one line and at once."""
    if not cfg.checkpoint:
        raise UsageError("pass --checkpoint (a step_* directory or a run directory)")
    check_model(cfg)
    if not joins_cluster(cfg.address):  # the proxy binds on this machine (a cluster's runs on its head node)
        check_port(cfg.host, cfg.port)
    check_capacity(cfg, planned_nodes(cfg.address, cfg.dtype, cfg.device, cpus))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(ServeConfig, sys.argv[1:] if argv is None else argv, description=__doc__.splitlines()[0])
    cpus = cfg.replicas * cfg.num_cpus + 2  # + Serve's controller and proxy
    preflight(cfg, cpus)
    connect(cfg.address, cfg.dtype, cfg.device, cpus)
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
    run_driver(main)
