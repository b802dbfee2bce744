"""What a training process wraps around a stage's loop, so the loops (loop.train, rl.train) stay
unaware of it: the step-time split added to a record every N steps, and a graceful stop (SIGTERM:
save at the next step boundary, then leave with a message saying how to continue)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from nanochat.train.loop import Run

Log = Callable[[dict], None]


def with_step_split(run: Run, log: Log, every: int) -> Log:
    """`log` that adds, every `every` steps, the mean seconds per phase (data, compute, exposed_comm,
    optimizer) of the steps since the last time: the per-step record stays as cheap as before."""

    def report(record: dict) -> None:
        if every > 0 and record["step"] % every == 0:
            record.update(run.step_fn.clock.take())
        log(record)

    return report


class StopRequested(Exception):
    """The run saved at a step boundary because it was asked to stop; `checkpoint` holds that step."""

    def __init__(self, step: int, reason: str, checkpoint: Path | None):
        super().__init__(f"stopped by {reason} after step {step}")
        self.step, self.reason, self.checkpoint = step, reason, checkpoint


class GracefulStop:
    """Turns SIGTERM (a spot preemption, `kill`, a batch scheduler's time limit) into a request read at the
    next step boundary: the step in flight finishes, the run saves, and `StopRequested` leaves the loop.
    A second SIGTERM while saving is ignored; SIGKILL cannot be caught (what is saved is what remains).

    Python delivers signals to the main thread only, so elsewhere (a Ray Train worker runs the loop in
    a thread) it installs nothing; Ray's own preemption notice covers that case (ray_jobs/train.py)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.reason: str | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._receive) for s in self.signals}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _receive(self, signum: int, frame: FrameType | None) -> None:
        if self.reason is None:
            self.reason = signal.Signals(signum).name
            print(f"\n{self.reason} received: finishing this step, then saving a checkpoint and stopping", flush=True)

    def wrap(self, log: Log, save: Callable[[int], Path | None]) -> Log:
        """`log` that, once a stop was requested, saves the step just logged and raises StopRequested."""

        def log_or_stop(record: dict) -> None:
            log(record)
            if self.reason is not None:
                raise StopRequested(record["step"], self.reason, save(record["step"]))

        return log_or_stop
