"""The chat endpoint beside the engine, in one run on one checkpoint: `Engine.generate` and the served
decode path alone (nanochat.scripts.bench_infer), then `python -m ray_jobs.serve` under streaming clients
(nanochat.scripts.bench_serve, plain HTTP and the official openai client) at 1 and N streams.

    python -m ray_jobs.bench_endpoint --checkpoint $NANOCHAT_BASE_DIR/runs/sft_d12 --out endpoint.json
    NANOCHAT_EMULATE=p100 python -m ray_jobs.bench_endpoint --checkpoint $NANOCHAT_BASE_DIR/runs/sft_d12
    python -m ray_jobs.bench_endpoint --checkpoint runs/sft_d12 --ingress proxy   # through Serve's proxy

Reported as shares of the engine: the aggregate tokens/s of N streams over the engine's N-row tokens/s,
and one stream's decode tokens/s (after its first token) over the engine's 1-row tokens/s; time to first
token beside them. Each stream count sends --requests-per-stream requests per stream after one untimed
request, so that a run of 32 streams outlasts its arrival burst.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nanochat.common import free_port, stop_process_group, write_json
from nanochat.config import CommonConfig, option, parse_config, row_counts
from nanochat.errors import UsageError, run_main
from nanochat.scripts import bench_serve

SERVE_START_S = 600  # loading the model and capturing every batch size's graphs, on a slow machine


@dataclass
class BenchEndpointConfig(CommonConfig):
    checkpoint: str = option("", "the chat checkpoint to serve (a step_* directory, run directory or checkpoint root)")
    streams: str = option("1,32", "comma-separated stream counts; the largest is also the engine's and the replica's batch")
    requests_per_stream: int = option(8, "timed requests per stream at each stream count")
    max_tokens: int = option(256, "tokens per answer (and the engine's new tokens per row)")
    temperature: float = option(0.8, "the clients' sampling temperature (top-k: the server's default, 50)")
    prompt_len: int = option(13, "the engine's prompt tokens (about what the clients' short questions render to)")
    clients: str = option("http,openai", "which clients stream: http (bench_serve's own) and/or openai")
    ingress: str = option("auto", "ray_jobs.serve --ingress: auto (the replica itself), direct or proxy",
                          choices=("auto", "direct", "proxy"))
    repeats: int = option(3, "the engine's timed runs per row count (the median is reported)")
    out: str = option("", "write the results as JSON here")


def run_engine(cfg: BenchEndpointConfig, streams: list[int], work: Path) -> dict:
    """bench_infer on the checkpoint, in a process of its own (the GPU is free again before the server starts)."""
    out = work / "engine.json"
    python("nanochat.scripts.bench_infer", "--checkpoint", cfg.checkpoint, "--num-samples", ",".join(map(str, streams)),
           "--prompt-len", cfg.prompt_len, "--new-tokens", cfg.max_tokens, "--repeats", cfg.repeats,
           "--sampled-temperature", cfg.temperature, *common_flags(cfg), "--out", out)
    return json.loads(out.read_text())


def python(module: str, *args) -> None:
    command = [sys.executable, "-m", module, *map(str, args)]
    if subprocess.run(command).returncode != 0:
        raise UsageError(f"{' '.join(command)} failed (its output is above)")


def common_flags(cfg: BenchEndpointConfig) -> list[str]:
    return ["--dtype", cfg.dtype, *(["--device", cfg.device] if cfg.device else []), "--seed", str(cfg.seed)]


def start_server(cfg: BenchEndpointConfig, port: int, slots: int, log: Path) -> tuple[subprocess.Popen, str]:
    """`python -m ray_jobs.serve` on the checkpoint; returns once it prints that it serves (its line)."""
    command = [sys.executable, "-m", "ray_jobs.serve", "--checkpoint", cfg.checkpoint, "--port", str(port),
               "--ingress", cfg.ingress, "--max-concurrency", str(slots), *common_flags(cfg)]
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + SERVE_START_S
    while time.monotonic() < deadline:
        serving = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("serving ")]
        if serving:
            return server, serving[0]
        if server.poll() is not None:
            break
        time.sleep(1)
    stop_process_group(server)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    raise UsageError(f"the server did not start serving within {SERVE_START_S} s (exit status {server.returncode}):\n{tail}")


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM to the server's own process, as `kill` sends it: it shuts Serve down and exits once its port is
    free. The rest of its process group (the Ray it started) only if it has not exited within a minute."""
    server.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(60)
    stop_process_group(server, grace_s=10)


def run_clients(cfg: BenchEndpointConfig, url: str, streams: list[int], clients: list[str]) -> list[dict]:
    """bench_serve at each stream count with each client; each client's first request is untimed."""
    results = []
    for client in clients:
        flags = ["--url", url, "--client", client, "--max-tokens", str(cfg.max_tokens), "--temperature", str(cfg.temperature)]
        load(flags, 1, 1)
        results += [load(flags, n, n * cfg.requests_per_stream) for n in streams]
    return results


def load(flags: list[str], concurrency: int, requests: int) -> dict:
    argv = [*flags, "--concurrency", str(concurrency), "--requests", str(requests)]
    result = bench_serve.main(argv)
    if result["failed"]:
        raise UsageError(f"bench_serve {' '.join(argv)}: {result['failed']} requests failed: {result['errors']}")
    return result


def summary(engine: dict, endpoint: list[dict], streams: list[int]) -> list[dict]:
    """One row per (client, stream count): the endpoint's figures and their shares of the engine's."""
    engine_rows = {r["rows"]: r for r in engine["results"]}
    one_row = engine_rows[1]["tok_per_s"] if 1 in engine_rows else None
    rows = []
    for r in endpoint:
        n = r["concurrency"]
        decode = r["stream_decode_tokens_per_s_p50"]
        rows.append({
            "client": r["client"], "streams": n, "tokens_per_s": r["tokens_per_s"], "ttft_p50_ms": 1000 * r["ttft_p50_s"],
            "stream_decode_tokens_per_s": decode, "engine_tokens_per_s": engine_rows[n]["tok_per_s"],
            "share_of_engine": r["tokens_per_s"] / engine_rows[n]["tok_per_s"],
            "stream_share_of_one_row": decode / one_row if n == 1 and decode and one_row else None,
        })
    return rows


def print_summary(rows: list[dict], engine: dict) -> None:
    print(f"\nendpoint beside the engine ({engine['plan']['name']}, {engine['plan']['dtype']}, depth {engine['depth']}):")
    for r in engine["serve_path"]["results"]:
        print(f"served decode path, {r['rows']:>3} rows: greedy {r['greedy']['tok_per_s']:10,.0f} tok/s | sampled "
              f"{r['sampled']['tok_per_s']:10,.0f} tok/s | sampled/greedy {r['sampled_over_greedy']:.2f}")
    for r in rows:
        stream = r["stream_share_of_one_row"]
        print(f"{r['client']:>6}, {r['streams']:>3} streams: {r['tokens_per_s']:10,.0f} tok/s = {100 * r['share_of_engine']:5.1f}% "
              f"of the engine's {r['engine_tokens_per_s']:,.0f} | TTFT p50 {r['ttft_p50_ms']:6.1f} ms | one stream "
              f"{r['stream_decode_tokens_per_s'] or 0:8,.0f} tok/s" + (f" = {100 * stream:.0f}% of the engine's 1 row" if stream else ""))


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(BenchEndpointConfig, sys.argv[1:] if argv is None else argv, description=__doc__.splitlines()[0])
    if not cfg.checkpoint:
        raise UsageError("pass --checkpoint (a chat checkpoint: step_* directory, run directory or checkpoint root)")
    streams = sorted(set(row_counts(cfg.streams, "--streams", "1,32")))
    clients = [c for c in cfg.clients.split(",") if c]
    if not clients or set(clients) - {"http", "openai"}:
        raise UsageError(f"--clients {cfg.clients!r}: give http, openai or both (comma-separated)")
    if "openai" in clients and importlib.util.find_spec("openai") is None:
        raise UsageError("the openai client is not installed (it is a dev dependency): pip install openai, "
                         "or pass --clients http")
    with tempfile.TemporaryDirectory(prefix="bench_endpoint_") as tmp:
        work = Path(tmp)
        engine = run_engine(cfg, streams, work)
        port = free_port()
        server, serving = start_server(cfg, port, max(streams), work / "serve.log")
        try:
            endpoint = run_clients(cfg, f"http://127.0.0.1:{port}", streams, clients)
        finally:
            stop_server(server)
    rows = summary(engine, endpoint, streams)
    print_summary(rows, engine)
    result = {"checkpoint": cfg.checkpoint, "server": serving, "server_exit_status": server.returncode, "engine": engine,
              "endpoint": endpoint, "summary": rows}
    write_json(cfg.out, result)
    return result


if __name__ == "__main__":
    run_main(main)
