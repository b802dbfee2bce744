"""`ray job submit` of a tiny training run to a local head started by the test (real Ray CLI)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_env() -> dict:
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S: a SIGTERMed `ray start --block` first drains its node for
    # up to 30 s (for Serve proxies behind a load balancer); this head has nothing to drain
    env = dict(os.environ, RAY_DISABLE_USAGE_STATS="1", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    env.pop("RAY_ADDRESS", None)
    if (Path.home() / ".ray" / "auth_token").exists():
        # a local ray.init() left a token behind: the new head uses token auth, and so must the client
        env["RAY_AUTH_MODE"] = "token"
    return env


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A head node of our own (`ray start --head --block`); stopping that process stops only it."""
    port, dashboard = free_port(), free_port()
    proc = subprocess.Popen(
        [*RAY, "start", "--head", "--block", f"--port={port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", "--num-cpus=6", "--include-dashboard=true"],
        env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while subprocess.run([*RAY, "job", "list", "--address", address], env=cli_env(), capture_output=True).returncode:
        assert proc.poll() is None and time.time() < deadline, "the Ray head did not come up"
        time.sleep(2)
    yield address
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def test_submitted_training_runs_and_logs_each_workers_plan(head, data_dir, tokenizer_dir, tmp_path):
    runtime_env = json.dumps({"excludes": [".git", ".device", ".anchor", "runs"]})
    cmd = [
        *RAY, "job", "submit", "--address", head, "--working-dir", str(REPO), "--runtime-env-json", runtime_env, "--",
        "python", "-m", "ray_jobs.train", "--device", "cpu", "--num-workers", "2", "--tokenize-workers", "1",
        "--data-dir", str(data_dir), "--tokenizer-dir", str(tokenizer_dir), "--storage-path", str(tmp_path),
        "--depth", "2", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "512",
        "--num-iterations", "6", "--eval-every", "-1", "--eval-tokens", "1024", "--sample-every", "-1", "--save-every", "-1",
    ]
    out = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    logs = out.stdout + out.stderr
    assert out.returncode == 0, logs[-3000:]
    assert "succeeded" in logs
    for rank in (0, 1):
        assert f"[worker {rank} on" in logs and "precision plan: CPU, float32" in logs
    assert (tmp_path / "base_d2" / "step_000006").is_dir()
    assert json.loads((tmp_path / "base_d2" / "summary.json").read_text())["steps"] == 6
