"""The run log: the metrics file a training run appends to, the progress bar it shows, and the plots
drawn from run records.

Training writes `metrics.jsonl` through `MetricsLog`; the report card (nanochat/report.py) and MLflow
(nanochat/tracking.py) read it back. The one rule: a record's `step` counts optimizer steps done.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

LOG_REDRAW_S = 10.0  # a bar that is not on a terminal prints a line at most this often


class MetricsLog:
    """Appends one JSON object per line; `step` counts optimizer steps done. Opening it with
    `resume_step` drops records after that step, so a resumed run's log stays continuous with no
    step recorded twice."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", -1) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


class WholeLines:
    """A progress bar's output as whole lines, for a log file, a pipe or a Ray worker (whose output Ray
    forwards line by line). tqdm redraws by writing '\\r' and the bar with no newline: in a log each redraw
    piles onto one line, and through Ray each becomes a line of its own and the newline that follows
    an empty one. Here each redraw is one line, and a redraw that only clears the bar writes nothing."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> int:
        for piece in text.replace("\n", "\r").split("\r"):
            if piece.strip():
                self.stream.write(piece.rstrip() + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Iterable | None = None, **options) -> tqdm:
    """tqdm(iterable, **options) on stderr: redrawn in place on a terminal; anywhere else one whole line
    (WholeLines) at most every LOG_REDRAW_S seconds."""
    if sys.stderr.isatty():
        return tqdm(iterable, file=sys.stderr, **options)
    return tqdm(iterable, file=WholeLines(sys.stderr), **{"mininterval": LOG_REDRAW_S, **options})


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(runs: dict[str, list[dict]], out: str | Path, keys: Sequence[str] = ("loss", "val_bpb")) -> Path:
    """One panel per metric in `keys`, one line per run ({label: per-step records}); saved as a PNG."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for label, records in runs.items():
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if ax.lines:  # a metric no run recorded (e.g. no evaluation) gets an empty panel
            ax.legend()
    return _save(plt, fig, out)


def plot_bars(groups: dict[str, dict[str, float]], out: str | Path, ylabel: str = "score") -> Path:
    """Grouped bars: one group per metric ({metric: {series: value}}), one colour per series."""
    plt = _pyplot()
    series = list(dict.fromkeys(s for values in groups.values() for s in values))
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) + 2), 4))
    for i, name in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g, values in enumerate(groups.values()) if name in values]
        ys = [values[name] for values in groups.values() if name in values]
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks(range(len(groups)), list(groups), rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _save(plt, fig, out)


def _pyplot():
    """matplotlib without a display (Agg): reports are built on headless nodes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out: str | Path) -> Path:
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
