"""`ray job submit` as the docs write it (real Ray CLI, the auth setting included), to a head the module
starts: the CPU speedrun (every stage, the report card) and a tiny training run, submitted together so
that the module costs the longer of the two; the GPU speedrun refusing at once on a machine without a GPU."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import torch
from mlflow.tracking import MlflowClient

from nanochat.common import stop_process_group
from ray_jobs.speedrun import FLOOR_S, STAGES
from tests.conftest import free_port

REPO = Path(__file__).resolve().parent.parent
RAY = [sys.executable, "-m", "ray.scripts.scripts"]
EXCLUDES = [".git", ".device", ".anchor", "runs"]  # what the working dir upload leaves out
# the tiny CPU speedrun: the sizes tests/test_speedrun.py runs, at the smallest budget the speedrun
# accepts with its shards given (every other stage's floor)
SPEEDRUN_BUDGET_S = math.ceil(sum(FLOOR_S[stage] for stage, _ in STAGES if stage != "shards"))
SPEEDRUN = {"NANOCHAT_DEPTH": "1", "NANOCHAT_SEQ_LEN": "64", "NANOCHAT_VOCAB": "512", "NANOCHAT_DEVICE_BATCH": "4",
            "NANOCHAT_TOTAL_BATCH": "256", "NANOCHAT_EVAL_EXAMPLES": "2", "NANOCHAT_TIME_BUDGET": f"{SPEEDRUN_BUDGET_S}s",
            "NANOCHAT_MID_MIXTURE": "identity:40,arithmetic:80,spelling:40",
            "NANOCHAT_SFT_MIXTURE": "identity:40,arithmetic:80,spelling:40"}


def cli_env() -> dict:
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S: a SIGTERMed `ray start --block` first drains its node for
    # up to 30 s (for Serve proxies behind a load balancer); this head has nothing to drain
    env = dict(os.environ, RAY_DISABLE_USAGE_STATS="1", RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    env.pop("RAY_ADDRESS", None)
    if (Path.home() / ".ray" / "auth_token").exists():
        # docs/cluster.md's `[ -f ~/.ray/auth_token ] && export RAY_AUTH_MODE=token`: a local ray.init()
        # left a token behind, so the new head uses token auth, and so must the client
        env["RAY_AUTH_MODE"] = "token"
    return env


def submit(head: str, entrypoint: list[str], env_vars: dict[str, str], job_id: str = "") -> list[str]:
    """`ray job submit` of `entrypoint` with this checkout as the working dir; with `job_id`, without
    waiting for the job (`ray job logs --follow` then waits)."""
    runtime_env = json.dumps({"excludes": EXCLUDES, "env_vars": env_vars})
    detach = ["--no-wait", "--submission-id", job_id] if job_id else []
    return [*RAY, "job", "submit", "--address", head, "--working-dir", str(REPO), "--runtime-env-json", runtime_env,
            *detach, "--", *entrypoint]


def job_status(head: str, job_id: str) -> str:
    """'succeeded', 'failed', 'was stopped', or the status of a job not ended (as `ray job status` says it)."""
    out = subprocess.run([*RAY, "job", "status", "--address", head, job_id], env=cli_env(), capture_output=True, text=True)
    said = re.search(rf"Job '{job_id}' (succeeded|failed|was stopped)|Status for job '{job_id}': (\w+)", out.stdout + out.stderr)
    assert said, out.stdout + out.stderr
    return said[1] or said[2]


def follow(head: str, job_id: str) -> str:
    """The job's output, once it has ended."""
    out = subprocess.run([*RAY, "job", "logs", "--address", head, "--follow", job_id], env=cli_env(),
                         capture_output=True, text=True, timeout=600)
    return out.stdout + out.stderr


def answers(url: str) -> bool:
    try:
        httpx.get(f"{url}/api/version", timeout=5)
    except httpx.TransportError:
        return False
    return True


def start_head() -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` of our own (stopping that process stops only it), and its dashboard's address."""
    port, dashboard = free_port(), free_port()
    # a port of its own for the dashboard agent too: on Ray's default one (52365) another Ray of this
    # host (the tests' shared one) leaves the head without an agent, and no job ever starts
    proc = subprocess.Popen(
        [*RAY, "start", "--head", "--block", f"--port={port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=6",
         "--include-dashboard=true"],
        env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    return proc, f"http://127.0.0.1:{dashboard}"


def node_alive(address: str) -> bool:
    out = subprocess.run([*RAY, "list", "nodes", "--address", address, "--filter", "state=ALIVE", "--format", "json"],
                         env=cli_env(), capture_output=True, text=True)
    # before the node registers the command prints "No resource in the cluster", not JSON
    return out.returncode == 0 and out.stdout.lstrip().startswith("[") and bool(json.loads(out.stdout))


def came_up(proc: subprocess.Popen, address: str, seconds: float = 120) -> bool:
    """The head's node is alive. Its raylet gives the dashboard agent ~15 s to report its ports and else
    aborts, ending the head: a loaded machine's agent can take longer (then False)."""
    deadline = time.time() + seconds
    # first until the dashboard answers at all (401 without the token is an answer): an HTTP request
    # is cheap, each `ray list` an interpreter start, which on 2 cores slows the head's own start
    while not answers(address):
        if proc.poll() is not None or time.time() > deadline:
            return False
        time.sleep(0.5)
    while not node_alive(address):
        if proc.poll() is not None or time.time() > deadline:
            return False
        time.sleep(2)
    return True


@pytest.fixture(scope="module")
def head():
    """The dashboard address of a head node of our own, started again if its raylet gave up on its agent."""
    for _ in range(3):
        proc, address = start_head()
        if came_up(proc, address):
            break
        stop_process_group(proc)  # a second start finds the agent's modules in the page cache
    else:
        pytest.fail("the Ray head did not come up in 3 tries")
    yield address
    stop_process_group(proc)


@pytest.fixture(scope="module")
def cpu_speedrun(head, data_dir, tmp_path_factory) -> tuple[str, Path]:
    """(job id, run dir) of `bash ray_jobs/speedrun_cpu.sh` submitted without waiting: it runs while the
    training job below trains (every test asks for it, so it starts first)."""
    run, job_id = tmp_path_factory.mktemp("speedrun_cpu"), f"speedrun_cpu_{uuid.uuid4().hex[:8]}"
    env = {**SPEEDRUN, "NANOCHAT_RUN": str(run), "NANOCHAT_DATA": str(data_dir), "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(submit(head, ["bash", "ray_jobs/speedrun_cpu.sh"], env, job_id), env=cli_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    return job_id, run


def test_submitted_training_runs_and_logs_each_workers_plan(head, cpu_speedrun, data_dir, tokenizer_dir, tmp_path):
    base = tmp_path / "nanochat"  # the job's $NANOCHAT_BASE_DIR: its checkpoints and its MLflow run go there
    train = ["python", "-m", "ray_jobs.train", "--device", "cpu", "--num-workers", "2", "--tokenize-workers", "1",
             "--data-dir", str(data_dir), "--tokenizer-dir", str(tokenizer_dir),
             "--depth", "2", "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size", "4", "--total-batch-size", "512",
             "--num-iterations", "6", "--eval-every", "-1", "--eval-tokens", "1024", "--sample-every", "-1", "--save-every", "-1"]
    out = subprocess.run(submit(head, train, {"NANOCHAT_BASE_DIR": str(base)}), env=cli_env(), capture_output=True,
                         text=True, timeout=600)
    logs = out.stdout + out.stderr
    assert out.returncode == 0, logs[-3000:]
    assert "succeeded" in logs
    assert "[workers 0, 1 on" in logs and "precision plan: CPU, float32" in logs
    run_dir = base / "ray_results" / "base_d2"
    assert (run_dir / "step_000006").is_dir()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 6
    # the run is in the base dir's one MLflow store, ended FINISHED with every step
    client = MlflowClient(f"sqlite:///{base / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("nanochat").experiment_id])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, 7))


@pytest.mark.timeout(900)
def test_submitted_cpu_speedrun_runs_every_stage(head, cpu_speedrun):
    job_id, run = cpu_speedrun
    logs = follow(head, job_id)
    assert job_status(head, job_id) == "succeeded", logs[-4000:]
    assert "speedrun finished" in logs
    for stage, _ in STAGES:  # NANOCHAT_DATA given: no shards to build
        assert (run / "stages" / f"{stage}.done").exists() == (stage != "shards"), stage
    assert (run / "runs" / "report" / "report.md").stat().st_size > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_gpu_speedrun_submitted_without_a_gpu_fails_at_once(head, cpu_speedrun):
    # the documented GPU command, on a CPU machine: a one-line refusal, not a job left PENDING
    job_id = f"speedrun_p100_{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    submitted = subprocess.run(submit(head, ["bash", "ray_jobs/speedrun_p100.sh"], {}, job_id), env=cli_env(),
                               capture_output=True, text=True, timeout=300)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    logs = follow(head, job_id)
    assert job_status(head, job_id) == "failed"
    assert time.perf_counter() - start < 120
    [error] = {line for line in logs.splitlines() if line.startswith("error: ")}  # Ray may repeat the job's last lines
    assert "found no GPU" in error and "ray_jobs/speedrun_cpu.sh" in error and "--entrypoint-num-gpus 1" in error
