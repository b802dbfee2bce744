"""nanochat/tracking.py on a real sqlite store: a run never stays RUNNING (an error, Ctrl-C and SIGTERM
end it FAILED or KILLED), a judged run logs nothing past a stop, a failing store never stops training and
gets every step once when it recovers, and the `mlflow ui` lines of the docs open the store every entry
point writes to."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from nanochat import tracking
from nanochat.checkpoint import find_latest
from nanochat.errors import UsageError
from nanochat.tracking import TERMINATED, Tracker, default_uri, ensure_experiment
from ray_jobs import train as ray_train
from tests.conftest import REPO, free_port

VERDICT_DELAY_S = 0.5  # how long the "driver" below takes to judge a report


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One store for the module's runs: creating one (its schema) takes seconds."""
    return default_uri(tmp_path_factory.mktemp("mlflow"))


def new_run(store: str, verdict_steps: tuple[int, ...] = (), last_step: int | None = None) -> tuple[Tracker, Tracker]:
    """(the driver's tracker, a worker's tracker) of one new run."""
    driver = Tracker.create(store, "test", "run", {"depth": 2})
    return driver, Tracker(store, driver.run_id, verdict_steps, last_step)


def status(tracker: Tracker) -> str:
    return tracker.client.get_run(tracker.run_id).info.status


@pytest.mark.parametrize(("error", "expected"), [
    (None, "FINISHED"), (ValueError("a bad shard"), "FAILED"), (KeyboardInterrupt(), "KILLED"),
    (SystemExit(TERMINATED), "KILLED"), (SystemExit("error: no shards"), "FAILED"),
])
def test_a_run_ends_with_its_block_never_running(store, error, expected):
    tracker, _ = new_run(store)
    with pytest.raises(type(error)) if error else nullcontext():
        with tracker.ending():
            assert status(tracker) == "RUNNING"
            if error:
                raise error
    assert status(tracker) == expected
    tracker.finish("FAILED")  # a run ended once keeps that end
    assert status(tracker) == expected


SIGTERMED = """
import sys, time
from nanochat.tracking import Tracker
with Tracker.create(sys.argv[1], "test", "sigterm", {}).ending() as tracker:
    print(tracker.run_id, flush=True)
    time.sleep(120)
"""


def test_sigterm_ends_the_run_killed_and_the_process_with_143(store):
    # `ray job stop`, `kill`, a batch scheduler's limit: Python's default would end the process mid-run
    proc = subprocess.Popen([sys.executable, "-c", SIGTERMED, store], cwd=REPO, stdout=subprocess.PIPE, text=True)
    run_id = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == TERMINATED
    assert Tracker(store, run_id).client.get_run(run_id).info.status == "KILLED"


def judge_later(action) -> threading.Timer:
    timer = threading.Timer(VERDICT_DELAY_S, action)
    timer.start()
    return timer


def log_steps(tracker: Tracker, steps: range) -> None:
    for step in steps:
        tracker.log({"step": step, "loss": 1.0 / step})
    tracker.flush()


def logged_steps(tracker: Tracker) -> list[int]:
    return [step for step, _ in tracker.history("loss")]


def test_a_judged_run_holds_back_what_follows_a_verdict_step_and_logs_nothing_after_a_stop(store):
    # steps 1-2 go out and step 2 is reported; training goes on, and steps 3-4 wait for the verdict
    driver, worker = new_run(store, verdict_steps=(2,), last_step=6)
    log_steps(worker, range(1, 3))
    log_steps(worker, range(3, 5))
    assert logged_steps(worker) == [1, 2]
    driver.finish("KILLED")  # ASHA stopped it at step 2
    log_steps(worker, range(5, 7))
    assert logged_steps(worker) == [1, 2] and status(driver) == "KILLED"

    # a run that goes on logs everything; its last flush waits for the verdicts still missing
    driver, worker = new_run(store, verdict_steps=(2, 4), last_step=6)
    log_steps(worker, range(1, 3))
    log_steps(worker, range(3, 5))
    driver.judged(2)
    log_steps(worker, range(5, 6))
    assert logged_steps(worker) == [1, 2, 3, 4]
    start = time.monotonic()
    timer = judge_later(lambda: driver.judged(4))
    log_steps(worker, range(6, 7))
    timer.join()
    assert time.monotonic() - start >= VERDICT_DELAY_S
    assert logged_steps(worker) == [1, 2, 3, 4, 5, 6] and status(driver) == "RUNNING"


def test_a_restarted_worker_waits_only_for_verdicts_on_its_own_reports(store):
    driver, worker = new_run(store, verdict_steps=(2, 4), last_step=6)
    driver.judged(2)
    log_steps(worker, range(1, 5))  # steps 1-4 logged, step 4's report never judged: the worker died
    restarted = Tracker(store, driver.run_id, verdict_steps=(2, 4), last_step=6)
    restarted.resume(start_step=4)
    start = time.monotonic()
    log_steps(restarted, range(5, 7))
    assert time.monotonic() - start < VERDICT_DELAY_S
    assert logged_steps(restarted) == [1, 2, 3, 4, 5, 6]


def test_every_mlflow_ui_line_of_the_docs_opens_the_default_store(tmp_path, monkeypatch):
    """Each documented `mlflow ui --backend-store-uri ...`, expanded by bash as a user's shell would, is
    the store default_uri() gives (where the demo, Ray runs, sweeps and the speedrun write), for a set
    and for an unset NANOCHAT_BASE_DIR."""
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    lines = [(doc.name, m) for doc in docs for m in re.findall(r"mlflow ui --backend-store-uri (\S+)", doc.read_text())]
    assert lines
    for base in (str(tmp_path / "somewhere" / "nanochat"), None):
        env = {k: v for k, v in os.environ.items() if k != "NANOCHAT_BASE_DIR"} | {"HOME": str(tmp_path / "home")}
        if base:
            env["NANOCHAT_BASE_DIR"] = base
            monkeypatch.setenv("NANOCHAT_BASE_DIR", base)
        else:
            monkeypatch.delenv("NANOCHAT_BASE_DIR", raising=False)
            monkeypatch.setenv("HOME", env["HOME"])
        expected = default_uri()
        for name, uri in lines:
            expanded = subprocess.run(["bash", "-c", f"echo {uri}"], env=env, capture_output=True, text=True).stdout.strip()
            assert expanded == expected, f"{name}: mlflow ui --backend-store-uri {uri}"
    assert Path(expected.removeprefix("sqlite:///")) == tmp_path / "home" / ".cache" / "nanochat" / "mlflow.db"


def database(uri: str) -> Path:
    return Path(uri.removeprefix("sqlite:///"))


@contextmanager
def failing_disk(uri: str) -> Iterator[None]:
    """The store's disk fails (a shared disk in trouble): sqlite cannot create its rollback journal, so
    every read and write of the real store raises "disk I/O error" until the block ends."""
    journal = database(uri).with_name(database(uri).name + "-journal")
    journal.mkdir()
    try:
        yield
    finally:
        journal.rmdir()


def store_warnings(text: str, what: str) -> list[str]:
    """The tracker's warnings about `what` (a Ray worker's lines come with its name and colours in front)."""
    return [line for line in text.splitlines() if "warning: MLflow: could not " + what in line]


def test_a_failing_store_keeps_the_metrics_warns_once_and_gets_each_step_once_when_it_recovers(store, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(tracking, "RETRY_WAITS_S", (0.01, 0.02))
    driver, worker = new_run(store)
    notes = tmp_path / "notes.txt"
    notes.write_text("notes")
    with failing_disk(store):
        log_steps(worker, range(1, 5))  # nothing raises: the metrics stay queued
        log_steps(worker, range(5, 9))
        worker.log_artifact(notes)
    err = capsys.readouterr().err
    assert len(store_warnings(err, "write metrics")) == 1, err  # once for the outage, not once per flush
    assert "disk I/O error" in err and "3 tries" in err and len(store_warnings(err, "store artifact")) == 1
    assert {m.step for m in worker.pending} == set(range(1, 9))

    # the store is back: a flush up to a checkpoint's step writes what is due, the rest waits for the next
    for step in range(9, 11):
        worker.log({"step": step, "loss": 1.0 / step})
    worker.flush(through=8)
    assert logged_steps(worker) == list(range(1, 9)) and "the store works again" in capsys.readouterr().err
    worker.flush()
    assert logged_steps(worker) == list(range(1, 11)) and not worker.pending

    # ending the run while the disk fails warns and leaves it for the store, never raises
    with failing_disk(store):
        worker.log({"step": 11, "loss": 0.1})
        with worker.ending():
            pass
    err = capsys.readouterr().err
    assert "1 metrics of steps 11-11 never reached the store" in err and len(store_warnings(err, "read the run's status")) == 1
    assert status(driver) == "RUNNING"


def test_the_metrics_held_for_a_failing_store_are_bounded(store, monkeypatch, capsys):
    monkeypatch.setattr(tracking, "MAX_PENDING", 4)
    _, worker = new_run(store)
    for step in range(1, 7):
        worker.log({"step": step, "loss": 1.0 / step})
    assert [m.step for m in worker.pending] == [3, 4, 5, 6]
    assert capsys.readouterr().err.count("the oldest are dropped") == 1


def test_ray_training_goes_on_through_a_store_outage_and_mlflow_gets_each_step_once(local_ray, data_dir, tokenizer_dir, tmp_path, capfd):
    """A real run on Ray whose store fails from the moment its MLflow run exists until the step-8 checkpoint
    is in storage: the first flush (after the step-4 checkpoint) fails on every try while rank 0 trains on,
    the checkpoints are written, and the metrics kept reach MLflow at a later checkpoint, each step once."""
    uri, name, steps = default_uri(tmp_path), "outage", 12
    experiment = ensure_experiment(uri, "store-outage")
    broken, recovered = threading.Event(), threading.Event()

    def outage() -> None:
        client = MlflowClient(uri)
        while not client.search_runs([experiment], f"attributes.run_name = '{name}'"):
            time.sleep(0.05)
        with failing_disk(uri):
            broken.set()
            while not (tmp_path / name / "step_000008").exists():
                time.sleep(0.05)
        recovered.set()

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    summary = ray_train.main([
        "--device", "cpu", "--data-dir", str(data_dir), "--tokenizer-dir", str(tokenizer_dir), "--depth", "2",
        "--head-dim", "32", "--max-seq-len", "64", "--device-batch-size", "8", "--total-batch-size", "512",
        "--num-iterations", str(steps), "--eval-every", "-1", "--sample-every", "-1", "--num-workers", "1",
        "--save-every", "4", "--keep-last", "3", "--report-every", "2", "--storage-path", str(tmp_path), "--name", name,
        "--mlflow-experiment", "store-outage",
    ])
    thread.join(timeout=60)
    assert broken.is_set() and recovered.is_set()
    assert summary["steps"] == steps and find_latest(tmp_path / name).name == f"step_{steps:06d}"
    assert sorted(p.name for p in (tmp_path / name).glob("step_*")) == [f"step_{s:06d}" for s in (4, 8, 12)]
    assert logged_steps(Tracker(uri, summary["mlflow_run_id"])) == list(range(1, steps + 1))
    printed = capfd.readouterr()
    assert len(store_warnings(printed.out + printed.err, "write metrics")) == 1
    assert "MLflow: the store works again" in printed.out + printed.err


@contextmanager
def silent_port() -> Iterator[int]:
    """A port that takes connections and never answers (a hung server, a firewall that drops)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


@pytest.mark.parametrize("server", ["refused", "silent"])
def test_an_unreachable_tracking_server_fails_the_driver_at_once_saying_what_to_start(server):
    """The driver's first MLflow call on a server that is not there is one line naming the URI and what to
    start, within seconds: MLflow's client alone would retry for about 4 minutes."""
    with silent_port() if server == "silent" else nullcontext(free_port()) as port:
        uri = f"http://127.0.0.1:{port}"
        start = time.monotonic()
        with pytest.raises(UsageError) as failed:
            Tracker.create(uri, "test", "run", {"depth": 2})
        assert time.monotonic() - start < 15
    message = str(failed.value)
    assert "\n" not in message and f"no MLflow tracking server answers at {uri}" in message
    assert "cluster/mlflow_server.sh" in message and "--mlflow-uri" in message
