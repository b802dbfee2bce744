"""Time-budgeted training: `--time-budget 6h` instead of a number of steps.

No reference project has this, so here is the whole idea in one place. A learning-rate schedule
(warmup, flat, warmdown) only makes sense if it knows the last step in advance, so the budget is
turned into a `num_iterations` early in the run, and only moved while the schedule is still flat:

1. warm-up: the first 3 steps (allocator, cuDNN/compile autotuning) are not timed;
2. right after them, one evaluation, one set of samples and one checkpoint are forced, to time
   what the end of the run (and every periodic eval/sample/save) will cost;
3. the next MEASURE_STEPS steps are timed (seconds per optimizer step, data wait included);
4. `fit_iterations` picks the largest step count whose steps + periodic and final eval/sample/save
   fit in what is left of the budget, all workers agree on the smallest, and a checkpoint is
   written at once whose meta holds the decision, so a resumed run keeps the same horizon.

A budget too small for steps 1-4 and the run's final eval/sample/save is refused (UsageError) at the
first timed step, once their cost is known, rather than overrun.

The budget counts from the moment the stage's model was built (`Run.started`): interpreter start,
imports and the data loader's first file open come before it and are the caller's to leave room
for (ray_jobs/speedrun.py does). Until step 4 the schedule runs with a provisional horizon; the
few steps measured there sit in the flat part of the base schedule (warmup 0 by default).

    python -m nanochat.scripts.base_train --depth 12 --time-budget 6h
    python -m nanochat.scripts.mid_train  --depth 12 --time-budget 45m     # every LoopConfig stage
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from nanochat.errors import UsageError

WARMUP_STEPS = 3  # left out of the timing (same constant as the throughput average in loop.train)
MEASURE_STEPS = 10  # timed steps before the decision: a fixed count, so every worker decides at the same step
SAFETY = 0.02  # aim this fraction under the budget: step times drift a little over a long run

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'6h', '90m', '45s', '1h30m', '2.5h' or plain seconds ('300') -> seconds."""
    spec = text.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", spec):
        seconds = float(spec)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", spec)
        if not parts or "".join(n + u for n, u in parts) != spec:
            raise ValueError(f"cannot read the duration {text!r}: write it like 6h, 90m, 45s, 1h30m or a number of seconds")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"the duration {text!r} must be positive")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds < 1:  # as given ('0.5s'), not rounded to '0s'
        return f"{seconds:g}s"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def due_between(every: int, after: int, upto: int) -> int:
    """How many multiples of `every` lie in (after, upto): periodic events before the final step."""
    if every <= 0 or upto <= after + 1:
        return 0
    return (upto - 1) // every - after // every


@dataclass
class Costs:
    """Seconds per optimizer step and per evaluation / sample set / checkpoint, as measured."""

    step_s: float
    eval_s: float
    sample_s: float
    save_s: float


def fit_iterations(remaining_s: float, done: int, costs: Costs, eval_every: int, sample_every: int, save_every: int) -> int:
    """The largest total step count n >= done whose remaining steps, the periodic evaluations /
    samples / checkpoints between `done` and n and the final ones at n fit in `remaining_s`.

    The total grows with n (steps and events only add up), so a binary search finds it."""

    def seconds(n: int) -> float:
        if n <= done:
            return 0.0
        final = costs.eval_s + costs.sample_s + costs.save_s
        return ((n - done) * costs.step_s + final + due_between(eval_every, done, n) * costs.eval_s
                + due_between(sample_every, done, n) * costs.sample_s + due_between(save_every, done, n) * costs.save_s)

    lo, hi = done, done + max(0, math.floor(remaining_s / costs.step_s))  # seconds(lo) = 0 fits; hi+1 cannot
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if seconds(mid) <= remaining_s:
            lo = mid
        else:
            hi = mid - 1
    return lo


def least_budget_s(decision: dict) -> float:
    """The smallest budget the run that made this decision (TimeBudget.decision) could have kept to: its
    calibration, the checkpoint of its decision, and its final evaluation, samples and checkpoint."""
    return decision["calibration_s"] + decision["eval_s"] + decision["sample_s"] + 2 * decision["save_s"]


def agree(value: int, device: torch.device, largest: bool = False) -> int:
    """The smallest (or largest) `value` over all data-parallel workers (each measured its own speed):
    one decision for all."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX if largest else dist.ReduceOp.MIN)
    return int(t.item())


class TimeBudget:
    """The loop-side bookkeeping of one budgeted run (see the module docstring)."""

    def __init__(self, budget_s: float, started: float, start_step: int, cfg):
        self.budget_s, self.started, self.cfg = budget_s, started, cfg  # cfg: the stage's LoopConfig
        self.probe_step = start_step + WARMUP_STEPS  # forced eval/sample/save after this many steps done
        self.decide_step = self.probe_step + MEASURE_STEPS
        self.step_seconds: list[float] = []
        self.warmup_seconds: list[float] = []  # the warm-up steps but the very first (allocation, compilation)
        self.costs = {"eval_s": 0.0, "sample_s": 0.0, "save_s": 0.0}
        self.decision: dict | None = None

    @property
    def measuring(self) -> bool:
        return self.decision is None

    def provisional_horizon(self, n: int) -> int:
        """A horizon long enough that the loop reaches the decision step."""
        return max(n, self.decide_step + 1)

    def observe(self, done: int, step_s: float) -> None:
        if done > self.probe_step:
            self.step_seconds.append(step_s)
        elif done > self.probe_step - WARMUP_STEPS + 1:
            self.warmup_seconds.append(step_s)

    def note(self, kind: str, seconds: float) -> None:
        """The latest cost of an evaluation / sample set / checkpoint ("eval_s", "sample_s", "save_s")."""
        self.costs[kind] = seconds

    def horizon(self, done: int, n: int, tokens_per_step: int, num_params: int, device: torch.device) -> int:
        """The horizon after step `done`: fixed at the decision step, re-fitted every MEASURE_STEPS
        steps while the schedule is still flat (so that a slower or faster stretch of the run, e.g.
        another job sharing the machine, moves the end of the run, not the length of its warmdown),
        else `n` unchanged. Every worker calls it at the same steps (it may all-reduce)."""
        if done == self.probe_step + 1:
            self._refuse_if_too_small(done, device)
        if done == self.decide_step and self.measuring:
            return self._fit(done, n, tokens_per_step, num_params, device, pending_save=True)
        if self.measuring or done % MEASURE_STEPS or not self._flat(done + MEASURE_STEPS, n):
            return n
        previous = self.decision
        fitted = self._fit(done, n, tokens_per_step, num_params, device, pending_save=False, quiet=True)
        # keep the schedule's past: the new horizon must leave every step done so far (and warmup) where it was
        if abs(fitted - n) <= max(1, n // 100) or not self._flat(done + 1, fitted):
            self.decision = previous
            return n
        print(f"time budget: {self._recent():.3f} s/step lately -> num_iterations {n} -> {fitted} "
              f"(the lr schedule is still flat at step {done})", flush=True)
        return fitted

    def _refuse_if_too_small(self, done: int, device: torch.device) -> None:
        """UsageError when the rest of the calibration (the steps up to the decision and its checkpoint) and
        the run's final eval/sample/save, at the costs measured so far, surely end past the budget: the
        fastest step seen counts (the first timed one shares the machine with the probe's checkpoint
        write), and every worker agrees on the slowest one's estimate."""
        costs = Costs(min(self.warmup_seconds + self.step_seconds), **self.costs)
        final = costs.eval_s + costs.sample_s + costs.save_s
        needed = time.perf_counter() - self.started + (self.decide_step - done) * costs.step_s + costs.save_s + final
        needed = agree(math.ceil(needed), device, largest=True)
        if needed > self.budget_s:
            raise UsageError(
                f"--time-budget {format_duration(self.budget_s)} is too small to calibrate: the horizon is fixed after "
                f"{WARMUP_STEPS} warm-up and {MEASURE_STEPS} timed steps, an evaluation, samples and 2 checkpoints, and "
                f"the run ends with another evaluation, samples and checkpoint: {format_duration(needed)} on this "
                f"machine ({costs.step_s:.2f} s/step, eval {costs.eval_s:.1f} s, samples {costs.sample_s:.1f} s, "
                f"checkpoint {costs.save_s:.1f} s). Give at least --time-budget {needed}s, or --num-iterations instead.")

    def _flat(self, step: int, n: int) -> bool:
        c = self.cfg
        return round(c.warmup_ratio * n) <= self.probe_step and step <= n - round(c.warmdown_ratio * n)

    def _recent(self) -> float:
        # the median of the latest steps ignores one that waited on a file read or a garbage collection
        window = sorted(self.step_seconds[-2 * MEASURE_STEPS:])
        return window[len(window) // 2]

    def _fit(self, done: int, n: int, tokens_per_step: int, num_params: int, device: torch.device,
             pending_save: bool, quiet: bool = False) -> int:
        elapsed = time.perf_counter() - self.started
        costs = Costs(self._recent(), **self.costs)
        remaining = self.budget_s * (1 - SAFETY) - elapsed - (costs.save_s if pending_save else 0.0)
        c = self.cfg
        fitted = agree(fit_iterations(remaining, done, costs, c.eval_every, c.sample_every, c.save_every), device)
        tokens = fitted * tokens_per_step
        self.decision = {
            "budget_s": self.budget_s, "num_iterations": fitted, "decided_at_step": done, "elapsed_s": elapsed,
            # what the calibration took, up to the first decision (a re-fit keeps it)
            "calibration_s": self.decision["calibration_s"] if self.decision else elapsed,
            **asdict(costs), "tokens": tokens, "tokens_per_param": tokens / num_params,
        }
        if not quiet:
            spent = "" if fitted > done else " The budget is already spent: the run ends here, without its warmdown."
            print(f"time budget {format_duration(self.budget_s)}: {costs.step_s:.3f} s/step, eval {costs.eval_s:.1f} s, "
                  f"samples {costs.sample_s:.1f} s, checkpoint {costs.save_s:.1f} s, {elapsed:.0f} s spent by step "
                  f"{done} -> num_iterations {fitted} = {tokens:,} tokens = {tokens / num_params:.2f} tokens per "
                  f"parameter.{spent}", flush=True)
        return fitted
