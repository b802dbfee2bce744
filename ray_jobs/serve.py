"""Serve a chat checkpoint over HTTP with Ray Serve: an OpenAI-compatible API and a web chat page.

    # one command: a local Ray cluster (or $RAY_ADDRESS / --address), one replica per GPU
    python -m ray_jobs.serve --checkpoint ~/.cache/nanochat/runs/sft_d12 --replicas 2
    # tiny, on a CPU laptop
    python -m ray_jobs.serve --checkpoint runs/demo --device cpu --max-concurrency 4
    # pin the replicas to the P100/V100/T4 (fp16) group of a mixed cluster
    python -m ray_jobs.serve --checkpoint /shared/runs/sft_d12 --precision fp16 --replicas 4
    # Serve's own CLI (an application builder: any flag below as key=value)
    serve run ray_jobs.serve:app checkpoint=/shared/runs/sft_d12 replicas=2
    # submitted to a running cluster (see docs/cluster.md); the HTTP port is the cluster's Serve proxy;
    # a host other than loopback needs $NANOCHAT_API_KEY (or --insecure)
    ray job submit --working-dir . -- python -m ray_jobs.serve --checkpoint /shared/runs/sft_d12 --host 0.0.0.0

Then use the `openai` client (base_url="http://127.0.0.1:8000/v1") or a browser at
http://127.0.0.1:8000/ (a replica: ray_jobs/replica.py; the API: ray_jobs/openai_api.py; the tour:
docs/serving.md). Each replica picks its own precision plan and decodes up to --max-concurrency
requests in one continuous batch; binds 127.0.0.1 unless --host; $NANOCHAT_API_KEY (where the app is
built) turns on bearer auth, and a --host other than loopback needs it (or --insecure).
"""

from __future__ import annotations

import dataclasses
import errno
import http.client
import ipaddress
import os
import signal
import socket
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import torch

from nanochat import checkpoint
from nanochat.common import free_port
from nanochat.config import CommonConfig, option, parse_config
from nanochat.errors import UsageError
from nanochat.tokenizer import Tokenizer
from ray_jobs.cluster import connect, joins_cluster, planned_nodes, run_driver
from ray_jobs.scheduler import LABEL_PRECISION, Growth, check_room, choose_or_grow, groups, nodes_from_ray
from ray_jobs.serve_faults import FAULT_ENV, parse_faults

if TYPE_CHECKING:
    from ray.serve import Application

PAGE = Path(__file__).parent / "static" / "chat.html"
API_KEY_ENV = "NANOCHAT_API_KEY"
EXTRA_ONGOING = 16  # room above the replica's own limits for /health, /v1/models and the requests it refuses
# Serve asks each replica's check_health this often; 3 failures in a row and the replica is replaced
HEALTH_CHECK_PERIOD_S = 2.0
HEALTH_CHECK_TIMEOUT_S = 30.0


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
    ingress: str = option("auto", "what listens on --port: the replica itself (direct: Serve's direct ingress, no proxy "
                                  "hop) or Serve's proxy, which routes among replicas; auto = direct for one replica on "
                                  "a Ray this command starts, else proxy", choices=("auto", "direct", "proxy"))
    max_concurrency: int = option(32, "requests a replica decodes together in one batch")
    max_queue: int = option(64, "requests a replica keeps waiting beyond those; more get 429")
    request_timeout_s: float = option(300.0, "seconds a request may take end to end (Serve's HTTP timeout and each "
                                             "answer's deadline); 0 = no limit")
    stream_interval_ms: float = option(20.0, "a stream's tokens go out at most this often (the first at once): "
                                             "fewer, larger events when many streams share a replica; 0 = every step")
    insecure: bool = option(False, "allow a --host other than loopback without $NANOCHAT_API_KEY: anyone who "
                                   "reaches the port can use the model")
    precision: str = option("any", "pin replicas to nodes of this precision group (node label nanochat/precision)",
                            choices=("any", "bf16", "fp16", "fp32"))
    wait_for_nodes_s: float = option(600.0, "on a cluster with an autoscaler, how long to wait for the nodes the "
                                     "replicas need before refusing (0 = refuse at once); a cluster without one never waits")
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
    argv = [item for key, value in args.items() for item in _flag(key, value)]
    try:
        return parse_config(ServeConfig, argv)
    except SystemExit as e:  # argparse has printed why
        raise ValueError(f"invalid serve settings {args}") from e


def _flag(key: str, value: Any) -> list[str]:
    """One key=value setting as command-line flags: a boolean one as --key or --no-key."""
    flag = key.replace("_", "-")
    if isinstance(getattr(ServeConfig, key), bool):
        return [f"--{flag}" if str(value).lower() in ("true", "1", "yes") else f"--no-{flag}"]
    return ["--" + flag, str(value)]


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
    from ray_jobs.replica import ChatServer  # Ray Serve, FastAPI and the decoder load here, after the checks

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
    ongoing = cfg.max_concurrency + cfg.max_queue + EXTRA_ONGOING
    deployment = ChatServer.options(
        num_replicas=cfg.replicas,
        max_ongoing_requests=ongoing,
        # requests the proxy holds while it picks a replica (a burst passes through here): beyond as
        # many as the replicas take, it answers 503 at once rather than queue without end
        max_queued_requests=cfg.replicas * ongoing,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
        ray_actor_options=actor,
    )
    fault = os.environ.get(FAULT_ENV, "")  # tests only (ray_jobs/serve_faults.py)
    parse_faults(fault)  # a bad spec fails here, not in every replica
    return deployment.bind(cfg, os.environ.get(API_KEY_ENV) or None, fault)


app = build_app  # `serve run ray_jobs.serve:app checkpoint=...` calls it with the key=value args


def check_model(cfg: ServeConfig) -> None:
    """The checkpoint resolves and its tokenizer is found, loads and is the one it was trained with, as a
    replica will find them (without loading any weights)."""
    step_dir = checkpoint.resolve_checkpoint(cfg.checkpoint)
    meta = checkpoint.read_meta(step_dir)
    directory = checkpoint.tokenizer_dir_for(meta, cfg.tokenizer_dir or None, step_dir)
    tokenizer = Tokenizer.load(directory)
    checkpoint.check_tokenizer(meta, tokenizer.fingerprint(), directory, step_dir)
    check_weights(step_dir / checkpoint.MODEL_FILE)


def check_weights(path: Path) -> None:
    """The model file reads as a whole torch file (its zip directory, at the end: a truncated copy has
    none), in milliseconds, where a replica would find out after Ray started and the file loaded."""
    try:
        zipfile.ZipFile(path).close()
    except (OSError, zipfile.BadZipFile) as err:
        raise UsageError(f"cannot read the model file {path} ({err}): a truncated or damaged copy? "
                         "Copy the checkpoint again or pass another --checkpoint") from err


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(cfg: ServeConfig) -> None:
    """An API reachable from the network has a key, unless the user says --insecure."""
    if not is_loopback(cfg.host) and not os.environ.get(API_KEY_ENV) and not cfg.insecure:
        raise UsageError(f"--host {cfg.host} exposes the API to the network without a key: set ${API_KEY_ENV} "
                         "(clients then send 'Authorization: Bearer <key>'), or pass --insecure to serve it open")


def check_port(host: str, port: int) -> None:
    """Serve's HTTP proxy can bind host:port here; otherwise the deployment would fail after the model loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy (uvicorn) binds
        try:
            probe.bind((host, port))
        except OSError as err:
            what = ("is in use (a server listens there, or one closed connections there within the last minute, "
                    "which the system holds for about 60 s)" if err.errno == errno.EADDRINUSE
                    else f"cannot be bound ({err.strerror})")
            raise UsageError(f"{host}:{port} {what}: pass another --port (or --host), or stop what holds it") from err


def uses_direct_ingress(cfg: ServeConfig) -> bool:
    """Whether the replica itself listens on --port (see `direct_ingress_env`)."""
    own_ray = not joins_cluster(cfg.address)
    if cfg.ingress == "direct" and not (own_ray and cfg.replicas == 1):
        raise UsageError("--ingress direct needs --replicas 1 and a Ray this command starts (no --address or "
                         "$RAY_ADDRESS): a cluster's Serve processes were started without it. Use --ingress proxy")
    return cfg.ingress == "direct" or (cfg.ingress == "auto" and own_ray and cfg.replicas == 1)


def direct_ingress_env(first_port: int, ports: int = 1) -> dict[str, str]:
    """The environment under which Ray's Serve processes run direct ingress (Ray's throughput-optimized mode):
    each ingress replica serves HTTP itself, on a port of first_port .. first_port + ports - 1, rather than
    behind the proxy, which would relay every streamed event through one more process and a Ray call
    (measured on an H200: docs/serving.md). The proxy still runs, on the head node, and routes to them."""
    return {
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(first_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(first_port + ports),  # exclusive
        "RAY_SERVE_PORT_QUARANTINE_S": "0",  # a replica replacing a dead one may take its port at once
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",  # no load balancer to leave before stopping
    }


def wait_for_http(url: str, timeout_s: float) -> None:
    """Until `url` answers 200, or a UsageError naming it after `timeout_s`. Each probe is closed from
    this side once its answer is read (urllib asks the server to close): the side that closes first
    keeps the connection's port in TIME_WAIT for a minute, and a replica listening on --port itself
    binds without SO_REUSEADDR, so a server-side close would keep the next server off the port."""
    parts = urlsplit(url)
    deadline = time.monotonic() + timeout_s
    while True:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=5)
        try:
            connection.request("GET", parts.path or "/")
            response = connection.getresponse()
            response.read()
            if response.status == 200:
                return
            failure: Exception = http.client.HTTPException(f"HTTP {response.status}")
        except (OSError, http.client.HTTPException) as err:
            failure = err
        finally:
            connection.close()
        if time.monotonic() > deadline:
            raise UsageError(f"{url} did not answer within {timeout_s:g} s ({failure}); the replica's log is in "
                             "Ray's session folder (/tmp/ray/session_latest/logs/serve)") from failure
        time.sleep(0.2)


def wait_until_free(host: str, port: int, timeout_s: float) -> None:
    """Until host:port can be bound again (or timeout_s has passed: then say so)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return check_port(host, port)
        except UsageError:
            if time.monotonic() > deadline:
                print(f"{host}:{port} was still held {timeout_s:g} s after Serve shut down", file=sys.stderr)
                return
            time.sleep(0.2)


def check_capacity(cfg: ServeConfig, nodes: list[dict]) -> None:
    """The cluster has room for every replica (in the --precision group if one is named): Serve would
    otherwise wait without end for a node that never comes."""
    alive = nodes_from_ray(nodes)
    gpus = _gpus_per_replica(cfg)
    shape = {"use_gpu": gpus > 0, "cpus_per_worker": cfg.num_cpus, "gpus_per_worker": gpus or 1, "role": "replica"}
    growth = Growth.of_cluster(cfg.wait_for_nodes_s)
    if cfg.precision == "any":  # replicas answer on their own: they may spread over groups
        # counting what an autoscaler can add: Serve's pending replicas make it add those nodes
        check_room(groups([*alive, *(growth.addable if growth else [])]), cfg.replicas, **shape)
    else:
        choose_or_grow(alive, {"precision": cfg.precision, "num_workers": cfg.replicas, **shape}, growth,
                       cfg.wait_for_nodes_s)


def preflight(cfg: ServeConfig, cpus: float) -> None:
    """Everything checked before Ray, Serve or a GPU start, so that a mistake fails in one line and at once."""
    if not cfg.checkpoint:
        raise UsageError("pass --checkpoint (a step_* directory or a run directory)")
    check_exposure(cfg)
    uses_direct_ingress(cfg)
    check_model(cfg)
    if not joins_cluster(cfg.address):  # the proxy binds on this machine (a cluster's runs on its head node)
        check_port(cfg.host, cfg.port)
    check_capacity(cfg, planned_nodes(cfg.address, cfg.dtype, cfg.device, cpus))


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(ServeConfig, sys.argv[1:] if argv is None else argv, description=__doc__.splitlines()[0])
    cpus = cfg.replicas * cfg.num_cpus + 2  # + Serve's controller and proxy
    preflight(cfg, cpus)
    direct = uses_direct_ingress(cfg)
    proxy_port = cfg.port
    if direct:  # read where Serve is imported, and by Ray's processes, which inherit it when connect() starts them
        os.environ.update(direct_ingress_env(cfg.port))
        proxy_port = free_port(cfg.host)
    from ray import serve  # after the checks: seconds to import

    connect(cfg.address, cfg.dtype, cfg.device, cpus)
    serve.start(http_options={"host": cfg.host, "port": proxy_port, "request_timeout_s": cfg.request_timeout_s or None})
    serve.run(build_app(cfg), name="nanochat", route_prefix="/")
    shown = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    if direct:
        wait_for_http(f"http://{shown}:{cfg.port}/health", 30)
    auth = f" (bearer key from ${API_KEY_ENV})" if os.environ.get(API_KEY_ENV) else ""
    how = f"the replica itself; Serve's proxy on port {proxy_port}" if direct else "Serve's proxy"
    print(f"serving {cfg.checkpoint} on http://{shown}:{cfg.port}/ ({how})  (OpenAI API: http://{shown}:{cfg.port}/v1)"
          f"{auth}; Ctrl-C stops", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `ray job stop`, kill: shut Serve down as Ctrl-C does
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        if direct:  # the replica's process may outlive the shutdown by a moment: exit once its port is free
            wait_until_free(cfg.host, cfg.port, 30)


if __name__ == "__main__":
    run_driver(main)
