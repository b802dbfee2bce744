"""MLflow tracking: params, per-step metrics, artifacts. One sqlite store per `$NANOCHAT_BASE_DIR`
(`<base>/mlflow.db`, artifacts beside it), so nothing needs a tracking server: the demo, Ray runs and
Tune sweeps are experiments in it, and `mlflow ui --backend-store-uri
"sqlite:///${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}/mlflow.db"` shows them all.

Metrics are buffered and written when `flush()` is called (every few steps, at every checkpoint and at
the end: ray_jobs/train.py). A worker group restarted from a checkpoint replays the steps after it;
`resume()` makes the tracker skip every step the store already holds, so no step is recorded twice.
A run ends FINISHED, FAILED or KILLED, never left RUNNING (`Tracker.ending`); a run that a driver
judges (a Tune trial under ASHA) logs nothing past the step it was stopped at (`verdict_steps`).
"""

from __future__ import annotations

import json
import shlex
import signal
import tempfile
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from nanochat.common import base_dir
from nanochat.runlog import plot_curves

TERMINATED = 128 + signal.SIGTERM  # the exit status of a process that SIGTERM ended
JUDGED_TAG = "judged_through_step"  # the last reported step its driver let the run go on from
VERDICT_WAIT_S = 120.0  # how long a judged run's last flush waits for its driver's verdicts before logging on regardless


def default_uri(directory: str | Path = "") -> str:
    """The sqlite store in `directory`; by default the one of $NANOCHAT_BASE_DIR, shared by every entry point.
    (A Ray run given a --storage-path keeps its store there: on a cluster that is the file system every
    node sees.)"""
    directory = Path(directory or base_dir()).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{directory / 'mlflow.db'}"


def ui_command(uri: str) -> str:
    """The command that browses the store at `uri`."""
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"


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
    whatever directory the process runs in); other stores keep their server's own setting."""
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
    """The id of MLflow experiment `experiment` in the store at `uri`, created (store included) if missing."""
    from mlflow.tracking import MlflowClient  # here: mlflow costs the fast checks seconds at import

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    return found.experiment_id if found else client.create_experiment(experiment, artifact_location(uri))


class Tracker:
    """One MLflow run, created once (by the driver) and re-attached by id after restarts."""

    def __init__(self, uri: str, run_id: str, verdict_steps: Collection[int] = (), last_step: int | None = None):
        """`verdict_steps`: steps whose report a driver judges (a Tune trial's evaluations, each reported
        right after a flush): metrics past such a step are held back, training goes on, until the driver
        lets the run go on from it (`judged`); a run it ended instead gets nothing more. The flush of
        `last_step` (the run's end) waits for the verdicts still missing."""
        # mlflow imported in the methods that need it: seconds at import, which every entry point's fast
        # checks (nanochat.errors) would pay before the first check runs
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id
        self.pending: list = []  # mlflow.entities.Metric
        self.logged_through = -1  # steps up to this one are in the store already: not logged again
        self.verdict_steps = set(verdict_steps)
        self.last_step = last_step
        self.ended = False  # its driver ended the run: nothing more is logged

    @classmethod
    def create(cls, uri: str, experiment: str, run_name: str, params: dict) -> Tracker:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        run = client.create_run(ensure_experiment(uri, experiment), run_name=run_name)
        tracker = cls(uri, run.info.run_id)
        flat = _flatten(params)
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in flat.items()])
        return tracker

    def resume(self, start_step: int) -> int:
        """Attach to a run that may have logged steps before: those (and only those) are skipped from now
        on, and a restart is marked at `start_step` (metric `restarted_at_step`). Returns the last step logged."""
        self.logged_through = max((m.step for m in self.client.get_metric_history(self.run_id, "loss")), default=-1)
        # the steps before the restart were judged by the run that reported them; the verdicts to wait
        # for are on the steps this one reports
        self.verdict_steps = {s for s in self.verdict_steps if s > start_step}
        if self.logged_through > 0:
            self.client.log_metric(self.run_id, "restarted_at_step", start_step, step=start_step)
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

    def flush(self) -> None:
        """Write the queued metrics, but for those a missing verdict holds back (see __init__)."""
        if not self.pending:
            return
        newest = max(m.step for m in self.pending)
        released = self._released_through(newest, wait=self.last_step is not None and newest >= self.last_step)
        if self.ended:
            self.pending.clear()
            return
        out = [m for m in self.pending if m.step <= released]
        for start in range(0, len(out), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=out[start : start + 1000])
        self.pending = [m for m in self.pending if m.step > released]

    def _released_through(self, newest: int, wait: bool) -> int:
        """The last step whose metrics may go out: up to the first verdict step before `newest` (its report
        went out after an earlier flush) that the driver has not judged yet; with `wait`, after its verdict."""
        deadline = time.monotonic() + VERDICT_WAIT_S
        while gates := sorted(s for s in self.verdict_steps if s < newest):
            run = self.client.get_run(self.run_id)
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
        self.client.set_tag(self.run_id, JUDGED_TAG, str(step))

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        if not self.ended:
            self.client.log_artifact(self.run_id, str(path), folder)

    def log_json(self, name: str, data: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(data, indent=2))
            self.log_artifact(path)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with `status`, unless it has ended already: the first end stands (a Tune trial that
        outlives its driver's stop does not overwrite that verdict)."""
        self.flush()
        if self.client.get_run(self.run_id).info.status == "RUNNING":
            self.client.set_terminated(self.run_id, status)

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
        for key in keys:
            for step, value in self.history(key):
                records.setdefault(step, {"step": step})[key] = value
        with tempfile.TemporaryDirectory() as tmp:
            ordered = [records[s] for s in sorted(records)]
            self.log_artifact(plot_curves({"run": ordered}, Path(tmp) / "loss_curves.png", keys))
