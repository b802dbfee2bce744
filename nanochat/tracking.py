"""MLflow tracking: params, per-step metrics, artifacts. The default store is a sqlite file next to
the run (`sqlite:///<dir>/mlflow.db`), so nothing needs a tracking server; `mlflow ui
--backend-store-uri sqlite:///<dir>/mlflow.db` shows it.

Metrics are buffered and written when `flush()` is called (every few steps, at every checkpoint and at
the end: ray_jobs/train.py). A worker group restarted from a checkpoint replays the steps after it;
`resume()` makes the tracker skip every step the store already holds, so no step is recorded twice.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from nanochat.runlog import plot_curves


def default_uri(directory: str | Path) -> str:
    directory = Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{directory / 'mlflow.db'}"


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


class Tracker:
    """One MLflow run, created once (by the driver) and re-attached by id after restarts."""

    def __init__(self, uri: str, run_id: str):
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id
        self.pending: list[mlflow.entities.Metric] = []
        self.logged_through = -1  # steps up to this one are in the store already: not logged again

    @classmethod
    def create(cls, uri: str, experiment: str, run_name: str, params: dict) -> Tracker:
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment, artifact_location(uri))
        run = client.create_run(experiment_id, run_name=run_name)
        tracker = cls(uri, run.info.run_id)
        flat = _flatten(params)
        client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in flat.items()])
        return tracker

    def resume(self, start_step: int) -> int:
        """Attach to a run that may have logged steps before: those (and only those) are skipped from now
        on, and a restart is marked at `start_step` (metric `restarted_at_step`). Returns the last step logged."""
        self.logged_through = max((m.step for m in self.client.get_metric_history(self.run_id, "loss")), default=-1)
        if self.logged_through > 0:
            self.client.log_metric(self.run_id, "restarted_at_step", start_step, step=start_step)
        return self.logged_through

    def log(self, record: dict) -> None:
        """Queue the numeric values of one per-step record (its key 'step' gives the step)."""
        step, now = int(record["step"]), int(1000 * time.time())
        if step <= self.logged_through:
            return
        for key, value in record.items():
            if key == "step" or not isinstance(value, (int, float)) or value != value:  # None, text, NaN
                continue
            self.pending.append(mlflow.entities.Metric(key, float(value), now, step))

    def flush(self) -> None:
        for start in range(0, len(self.pending), 1000):  # log_batch takes at most 1000 metrics
            self.client.log_batch(self.run_id, metrics=self.pending[start : start + 1000])
        self.pending.clear()

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def log_json(self, name: str, data: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(data, indent=2))
            self.log_artifact(path)

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status)

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
