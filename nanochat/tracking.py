"""MLflow tracking: params, per-step metrics, artifacts. On one machine, one sqlite store per
`$NANOCHAT_BASE_DIR` (`<base>/mlflow.db`, artifacts beside it), so nothing needs a tracking server: the
demo, Ray runs and Tune sweeps are experiments in it, and `mlflow ui --backend-store-uri
"sqlite:///${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}/mlflow.db"` shows them all. On a cluster, a
tracking server on the head node (`--mlflow-uri http://HEAD:5000`, cluster/mlflow_server.sh): every node
writes through it, artifacts included, and none touches a sqlite file on a shared disk (whose locks
network file systems do not honour).

Metrics are buffered and written by `flush(through=step)` once the checkpoint of `step` is persisted
(ray_jobs/train.py; a run its driver judges, before each report instead): a worker group restarted from
that checkpoint replays the steps after it, which the store does not hold yet, so no step is lost or
recorded twice (`resume()` skips any it does hold). The store never fails training: an operation is tried
a few times, then warned about once and its metrics are kept for the next flush (a locked sqlite file on
a shared disk, a tracking server that is down).
A run ends FINISHED, FAILED or KILLED, never left RUNNING (`Tracker.ending`); a run that a driver
judges (a Tune trial under ASHA) logs nothing past the step it was stopped at (`verdict_steps`).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager, suppress
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from nanochat.common import base_dir
from nanochat.errors import UsageError
from nanochat.runlog import plot_curves

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

TERMINATED = 128 + signal.SIGTERM  # the exit status of a process that SIGTERM ended
JUDGED_TAG = "judged_through_step"  # the last reported step its driver let the run go on from
VERDICT_WAIT_S = 120.0  # how long a judged run's last flush waits for its driver's verdicts before logging on regardless
# a store operation is tried again after each of these waits; no new try starts RETRY_FOR_S after the first
# (a locked sqlite file already makes one try wait MLflow's 20 s busy timeout)
RETRY_WAITS_S = (0.5, 1.0, 2.0)
RETRY_FOR_S = 10.0
MAX_PENDING = 1_000_000  # metrics held for the next flush (~240 bytes each); past it the oldest are dropped
# MLflow error codes that no retry mends: the run is gone or ended, or a value is invalid
PERMANENT = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE", "BAD_REQUEST"})
SERVER_CHECK_S = 5.0  # how long the driver waits for a tracking server's /health before saying none answers
# a tracking server's HTTP requests, unless the environment says otherwise: MLflow's own default retries a
# refused connection for about 4 minutes, which would stall the step that flushes; the tracker retries itself
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
T = TypeVar("T")


def default_uri(directory: str | Path = "") -> str:
    """The sqlite store in `directory`; by default the one of $NANOCHAT_BASE_DIR, shared by every entry point.
    (A Ray run given a --storage-path keeps its store there, unless that is object storage (s3://...), which
    holds no sqlite file; a cluster's runs belong on a tracking server instead, see is_server.)"""
    if "://" in str(directory):
        directory = ""
    directory = Path(directory or base_dir()).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{directory / 'mlflow.db'}"


def is_server(uri: str) -> bool:
    """Whether `uri` names a tracking server (http://HOST:PORT), which stores runs and artifacts for every node."""
    return uri.startswith(("http://", "https://"))


def ui_command(uri: str) -> str:
    """The command that browses the store at `uri` (a tracking server serves its own UI)."""
    if is_server(uri):
        return f"the server's UI: {uri}"
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"


def check_server(uri: str, timeout: float = SERVER_CHECK_S) -> None:
    """Fails at once, saying what to start, when no tracking server answers at `uri` (MLflow's client would
    retry for minutes before it says so)."""
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # something answers (a proxy, a server that wants a login): its own errors say the rest
    except (OSError, ValueError) as error:  # refused, unresolved, timed out, not a URL
        reason = getattr(error, "reason", error)
        raise UsageError(f"no MLflow tracking server answers at {uri} ({reason}): start it on the head node with "
                         "cluster/mlflow_server.sh (or `cluster/start_node.sh head --mlflow-server`; docs/cluster.md, "
                         "MLflow) and pass the address it prints, or leave --mlflow-uri empty for this machine's "
                         "sqlite store") from None


def connect(uri: str) -> MlflowClient:
    """The client of the store at `uri`; a tracking server's requests are retried briefly (HTTP_DEFAULTS)."""
    # mlflow imported here: seconds at import, which every entry point's fast checks
    # (nanochat.errors) would pay before the first check runs
    from mlflow.tracking import MlflowClient

    if is_server(uri):
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
    return MlflowClient(tracking_uri=uri)


def end_status(error: BaseException | None) -> str:
    """The status of a run whose work ended with `error` (None: it returned)."""
    stop = error.code if isinstance(error, SystemExit) else None
    if error is None or (isinstance(error, SystemExit) and stop in (0, None)):
        return "FINISHED"
    if isinstance(error, KeyboardInterrupt) or stop == TERMINATED:
        return "KILLED"
    return "FAILED"


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(TERMINATED)


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """Inside the block SIGTERM (`ray job stop`, `kill`, a batch scheduler's limit) raises
    SystemExit(143), so the block's cleanup runs; Python's default ends the process on the spot. Only
    the main thread receives signals: elsewhere (a Tune trial's thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def artifact_location(uri: str) -> str | None:
    """Artifacts of a sqlite store go next to its database file (MLflow's default is ./mlruns of
    whatever directory the process runs in); other stores keep their server's own setting, which for a
    server started with --serve-artifacts is its mlflow-artifacts:/ root, uploaded through the server."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()


def _flatten(params: dict, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:500]  # mlflow caps param values
    return flat


def ensure_experiment(uri: str, experiment: str) -> str:
    """The id of MLflow experiment `experiment` in the store at `uri`, created (store included) if missing.
    On a tracking server: one that answers, and whose artifacts do not land on each writer's own disk."""
    if server := is_server(uri):
        check_server(uri)
    client = connect(uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment, artifact_location(uri))
    location = (found or client.get_experiment(experiment_id)).artifact_location if server else ""
    if server and urllib.parse.urlparse(location).scheme in ("", "file"):
        raise UsageError(f"the tracking server at {uri} puts experiment {experiment}'s artifacts at {location}, a "
                         "path each node would write on its own disk: start it with --serve-artifacts "
                         "(cluster/mlflow_server.sh does), or use another experiment (--mlflow-experiment)")
    return experiment_id


class StoreUnavailable(Exception):
    """A store operation failed on every try (the warning is printed already). `permanent`: no retry would
    mend it (see PERMANENT)."""

    def __init__(self, permanent: bool):
        super().__init__()
        self.permanent = permanent


def _summary(error: Exception) -> str:
    """The error's type and first line: sqlalchemy's go on with the whole SQL statement."""
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:200]}"


@contextmanager
def _quiet_store_log() -> Iterator[None]:
    """MLflow's sqlite store logs every failed session with its traceback; the tracker says it once instead."""
    logger = logging.getLogger("mlflow.store.db.utils")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


class Tracker:
    """One MLflow run, created once (by the driver) and re-attached by id after restarts."""

    def __init__(self, uri: str, run_id: str, verdict_steps: Collection[int] = (), last_step: int | None = None):
        """`verdict_steps`: steps whose report a driver judges (a Tune trial's evaluations, each reported
        right after a flush): metrics past such a step are held back, training goes on, until the driver
        lets the run go on from it (`judged`); a run it ended instead gets nothing more. The flush of
        `last_step` (the run's end) waits for the verdicts still missing."""
        self.uri, self.run_id = uri, run_id
        self._client = None  # connected on first use (`client`)
        self.pending: list = []  # mlflow.entities.Metric, in step order
        self.logged_through = -1  # steps up to this one are in the store already: not logged again
        self.verdict_steps = set(verdict_steps)
        self.last_step = last_step
        # a driver judges its reports and may end the run on one: what a report covers goes out before it
        self.judged_by_driver = bool(self.verdict_steps) or last_step is not None
        self.ended = False  # its driver ended the run: nothing more is logged
        self.warned: set[tuple[str, str]] = set()  # kinds of failure warned about since the store last worked

    @classmethod
    def create(cls, uri: str, experiment: str, run_name: str, params: dict) -> Tracker:
        """A new run, by the driver: a tracking server that does not answer fails it at once, saying what to
        start (ensure_experiment)."""
        from mlflow.entities import Param

        experiment_id = ensure_experiment(uri, experiment)
        client = connect(uri)
        run = client.create_run(experiment_id, run_name=run_name)
        tracker = cls(uri, run.info.run_id)
        tracker._client = client
        flat = _flatten(params)
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in flat.items()])
        return tracker

    @property
    def client(self) -> MlflowClient:
        """The store's client. Connecting reads the store, which may be failing when a worker (re)starts:
        hence on first use, inside the tries of `_call`."""
        if self._client is None:
            self._client = connect(self.uri)
        return self._client

    def _warn(self, kind: tuple[str, str], message: str) -> None:
        if kind not in self.warned:
            self.warned.add(kind)
            print(f"warning: MLflow: {message}", file=sys.stderr, flush=True)

    def _call(self, what: str, call: Callable[[], T], otherwise: str) -> T:
        """`call()` on the store, tried again after each of RETRY_WAITS_S (no try starts past RETRY_FOR_S).
        When every try fails: one warning per kind of failure (`what` and the error's type) until the store
        works again, saying what happens `otherwise`, and StoreUnavailable; training goes on."""
        started, tries, waits = time.monotonic(), 0, iter(RETRY_WAITS_S)
        while True:
            tries += 1
            try:
                with _quiet_store_log():
                    result = call()
            except Exception as error:
                permanent, wait = getattr(error, "error_code", None) in PERMANENT, next(waits, None)
                if permanent or wait is None or time.monotonic() - started + wait > RETRY_FOR_S:
                    consequence = "the store refuses it for good, so it is given up" if permanent else otherwise
                    self._warn((what, type(error).__name__), f"could not {what} ({_summary(error)}; {tries} "
                               f"tries over {time.monotonic() - started:.1f} s); training goes on and {consequence}")
                    raise StoreUnavailable(permanent) from error
                time.sleep(wait)
                continue
            if self.warned:
                print(f"MLflow: the store works again ({what})", file=sys.stderr, flush=True)
                self.warned.clear()
            return result

    def resume(self, start_step: int) -> int:
        """Attach to a run that may have logged steps before: those (and only those) are skipped from now
        on, and a restart is marked at `start_step` (metric `restarted_at_step`). Returns the last step logged."""
        from mlflow.entities import Metric

        try:
            history = self._call("read the logged steps", lambda: self.client.get_metric_history(self.run_id, "loss"),
                                 f"the steps up to the checkpoint's ({start_step}) count as logged")
            self.logged_through = max((m.step for m in history), default=-1)
        except StoreUnavailable:
            self.logged_through = start_step  # what the flush after that checkpoint wrote
        # the steps before the restart were judged by the run that reported them; the verdicts to wait
        # for are on the steps this one reports
        self.verdict_steps = {s for s in self.verdict_steps if s > start_step}
        if self.logged_through > 0:  # written with the metrics that follow it
            self.pending.append(Metric("restarted_at_step", float(start_step), int(1000 * time.time()), start_step))
        return self.logged_through

    def log(self, record: dict) -> None:
        """Queue the numeric values of one per-step record (its key 'step' gives the step)."""
        from mlflow.entities import Metric

        step, now = int(record["step"]), int(1000 * time.time())
        if step <= self.logged_through:
            return
        for key, value in record.items():
            if key == "step" or not isinstance(value, (int, float)) or value != value:  # None, text, NaN
                continue
            self.pending.append(Metric(key, float(value), now, step))
        if len(self.pending) > MAX_PENDING:  # a store down for very long: memory is bounded, the oldest go
            self._warn(("hold", "full"), f"{MAX_PENDING:,} metrics wait for the store; the oldest are dropped "
                                         f"(from step {self.pending[0].step} on)")
            del self.pending[: len(self.pending) - MAX_PENDING]

    def flush(self, through: int | None = None) -> None:
        """Write the queued metrics of the steps up to `through` (all of them by default), but for those a
        missing verdict holds back (see __init__). What the store fails to take stays queued for the next
        flush; the store never fails training."""
        due = [m for m in self.pending if through is None or m.step <= through]  # a prefix: pending is in step order
        if not due:
            return
        try:
            released = self._released_through(due[-1].step, wait=self.last_step is not None and due[-1].step >= self.last_step)
        except StoreUnavailable:
            return
        if self.ended:
            self.pending.clear()
            return
        out = [m for m in due if m.step <= released]
        done = 0
        for start in range(0, len(out), 1000):  # log_batch takes at most 1000 metrics
            chunk = out[start : start + 1000]
            try:  # a batch retried after all that did reach the store is not stored twice (same key, step, time, value)
                self._call("write metrics", lambda chunk=chunk: self.client.log_batch(self.run_id, metrics=chunk),
                           "they are kept for the next flush")
            except StoreUnavailable as failed:
                if not failed.permanent:
                    break
            done += len(chunk)
        del self.pending[:done]  # `out` is a prefix of pending too

    def _released_through(self, newest: int, wait: bool) -> int:
        """The last step whose metrics may go out: up to the first verdict step before `newest` (its report
        went out after an earlier flush) that the driver has not judged yet; with `wait`, after its verdict."""
        deadline = time.monotonic() + VERDICT_WAIT_S
        while gates := sorted(s for s in self.verdict_steps if s < newest):
            run = self._call("read the run's verdicts", lambda: self.client.get_run(self.run_id),
                             "its metrics are kept for the next flush")
            if run.info.status != "RUNNING":
                self.ended = True
                break
            judged = int(run.data.tags.get(JUDGED_TAG, -1))
            self.verdict_steps -= {s for s in gates if s <= judged}
            if gates[0] <= judged:
                continue
            if not wait:
                return gates[0]
            if time.monotonic() > deadline:
                break  # no verdict in all that time: its driver is gone, so log on regardless
            time.sleep(0.2)
        return newest

    def judged(self, step: int) -> None:
        """The driver's verdict on the report of `step`: the run goes on (`finish` ends it instead)."""
        with suppress(StoreUnavailable):
            self._call("record a verdict", lambda: self.client.set_tag(self.run_id, JUDGED_TAG, str(step)),
                       f"the run logs on past step {step} once its wait for the verdict ends")

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if not self.ended:
            with suppress(StoreUnavailable):
                self._call(f"store artifact {Path(path).name}", lambda: self.client.log_artifact(self.run_id, str(path), folder),
                           "the run goes without it")

    def log_json(self, name: str, data: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(data, indent=2))
            self.log_artifact(path)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with `status`, unless it has ended already: the first end stands (a Tune trial that
        outlives its driver's stop does not overwrite that verdict). A store that fails is warned about."""
        self.flush()
        if self.pending:
            self._warn(("finish", "pending"), f"{len(self.pending)} metrics of steps {self.pending[0].step}-"
                                              f"{self.pending[-1].step} never reached the store")
        with suppress(StoreUnavailable):
            run = self._call("read the run's status", lambda: self.client.get_run(self.run_id), f"the run is not ended {status}")
            if run.info.status == "RUNNING":
                self._call(f"end the run {status}", lambda: self.client.set_terminated(self.run_id, status),
                           "it stays RUNNING in the store")

    @contextmanager
    def ending(self) -> Iterator[Tracker]:
        """The run ends with the block: FINISHED, FAILED on an error, KILLED on Ctrl-C or SIGTERM; never
        left RUNNING."""
        with sigterm_as_exit():
            try:
                yield self
            except BaseException as error:
                self.finish(end_status(error))
                raise
        self.finish()

    def history(self, key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))

    def log_loss_plot(self, keys: tuple[str, ...] = ("loss", "val_bpb")) -> None:
        """The run's curves, read back from the store, as a PNG artifact."""
        records: dict[int, dict] = {}
        try:
            for key in keys:
                for step, value in self._call(f"read the {key} history", partial(self.history, key), "the run goes without its plot"):
                    records.setdefault(step, {"step": step})[key] = value
        except StoreUnavailable:
            return
        with tempfile.TemporaryDirectory() as tmp:
            ordered = [records[s] for s in sorted(records)]
            self.log_artifact(plot_curves({"run": ordered}, Path(tmp) / "loss_curves.png", keys))
