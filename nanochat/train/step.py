"""The training step, shared by the plain scripts and the Ray train loop.

One optimizer step = `grad_accum` micro-batches of forward+backward under the plan's autocast,
then (fp16 only) the GradScaler's unscale / inf-check / step / update, then zero_grad. In every dtype
a step whose loss or gradient norm is not finite is skipped whole, as an fp16 overflow is. The loss
and the norm stay on the device until the step's one wait on it, the price of that decision, the
divergence guard and the log line.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from nanochat.optim import grad_norm
from nanochat.precision import PrecisionPlan
from nanochat.train.data_parallel import DataParallel

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs, targets (-1 = no loss)
WeightedBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # + a weight per target token


class TrainingDiverged(RuntimeError):
    """The loss or the gradients stayed non-finite (or fp16 steps kept overflowing) for too many steps in a row."""


def lr_multiplier(step: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float) -> float:
    """Linear warmup, flat, then linear warmdown to `final_lr_frac` over the last `warmdown_ratio` of steps."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress + (1 - progress) * final_lr_frac


def muon_momentum(step: int, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """Muon's momentum ramps from 0.85 to 0.95 over the first 300 steps (as upstream nanochat does)."""
    frac = min(step / warmup_steps, 1.0)
    return (1 - frac) * start + frac * end


def set_schedule(optimizer: torch.optim.Optimizer, lrm: float, momentum: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group.get("kind") == "muon":
            group["momentum"] = momentum


@dataclass
class StepResult:
    loss: float  # mean training loss over the micro-batches (nan if non-finite)
    skipped: bool  # the optimizer did not step (fp16 overflow, non-finite loss or gradient)
    scale: float | None  # GradScaler scale after the step, None without a scaler
    data_s: float = 0.0  # seconds the host waited for the step's batches
    grad_norm: float = math.nan  # L2 norm of the whole averaged (unscaled) gradient, inf/nan when non-finite


PHASES = ("data", "compute", "exposed_comm", "optimizer")


@dataclass
class StepClock:
    """Splits step time into PHASES without ever waiting on the device.

    A step marks five moments: start, last backward done, gradients synchronised, optimizer stepped,
    parameters gathered. On CUDA a mark is an event on the compute stream, so a step's marks are read
    only once the next step has synchronised (they are complete by then: stream order); on CPU a mark
    is the host clock. `take()` returns the mean seconds per phase of the steps read since the last call."""

    cuda: bool
    totals: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    steps: int = 0
    _unread: tuple | None = None  # (marks, data seconds) of a step whose events may still be running

    def mark(self) -> torch.cuda.Event | float:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def read_previous(self) -> None:
        """Account the step before the current one: call after the current step synchronised."""
        if self._unread is not None:
            self._account(*self._unread)
            self._unread = None

    def finish_step(self, marks: list, data_s: float) -> None:
        if self.cuda:
            self._unread = (marks, data_s)
        else:
            self._account(marks, data_s)

    def _account(self, marks: list, data_s: float) -> None:
        if self.cuda:
            spans = [a.elapsed_time(b) / 1000 for a, b in itertools.pairwise(marks)]
        else:
            spans = [b - a for a, b in itertools.pairwise(marks)]
        forward_backward, sync, optimizer, gather = spans
        for name, seconds in (("data", data_s), ("compute", max(forward_backward - data_s, 0.0)),
                              ("exposed_comm", sync + gather), ("optimizer", optimizer)):
            self.totals[name] += seconds
        self.steps += 1

    def take(self) -> dict[str, float]:
        """Mean seconds per phase (keys `<phase>_s`) since the last call; empty when no step was read."""
        if not self.steps:
            return {}
        out = {f"{name}_s": total / self.steps for name, total in self.totals.items()}
        self.totals, self.steps = dict.fromkeys(PHASES, 0.0), 0
        return out


class TrainStep:
    """Callable that performs one optimizer step; holds the GradScaler and the divergence counter."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        plan: PrecisionPlan,
        grad_accum: int,
        scaler: torch.amp.GradScaler | None = None,
        max_bad_steps: int = 20,
    ):
        self.model, self.optimizer, self.plan = model, optimizer, plan
        self.grad_accum = grad_accum
        self.scaler = scaler
        self.max_bad_steps = max_bad_steps
        self.parallel: DataParallel | None = None  # one worker of several: see distribute()
        self.bad_in_a_row = 0
        self.skipped_total = 0
        self.clock = StepClock(cuda=next(model.parameters()).device.type == "cuda")

    def __call__(self, batches: Iterator[Batch | WeightedBatch]) -> StepResult:
        total, data_s = None, 0.0
        marks = [self.clock.mark()]
        for micro in range(self.grad_accum):
            if self.parallel is not None and micro == self.grad_accum - 1:
                self.parallel.arm()  # the last backward sends each gradient bucket as soon as it fills
            t0 = time.perf_counter()
            batch = next(batches)
            data_s += time.perf_counter() - t0
            with self.plan.compute_context():
                loss = self._loss(batch)
            total = loss.detach() if total is None else total + loss.detach()
            loss = loss / self.grad_accum
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        marks.append(self.clock.mark())
        mean = total / self.grad_accum
        if self.parallel is not None:
            # every worker then holds the same mean loss and gradient norm and its averaged gradients (all of
            # them, or the ones it owns), and all of them take, or skip, the same optimizer step
            mean, norm = self.parallel.finish(mean)
            marks.append(self.clock.mark())
        else:
            marks.append(self.clock.mark())
            norm = grad_norm([p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None])
        mean_loss, norm_value = torch.stack([mean.float(), norm]).tolist()  # the step's one wait on the device
        self.clock.read_previous()
        if self.scaler is not None:
            norm_value /= self.scaler.get_scale()  # the gradients are still scaled
        skipped = self._optimizer_step(math.isfinite(mean_loss) and math.isfinite(norm_value))
        marks.append(self.clock.mark())
        if self.parallel is not None and not skipped:
            self.parallel.gather_params()
        marks.append(self.clock.mark())
        self.clock.finish_step(marks, data_s)
        self.optimizer.zero_grad(set_to_none=True)
        self._guard(skipped, mean_loss, norm_value)
        return StepResult(mean_loss, skipped, self.scaler.get_scale() if self.scaler else None, data_s, norm_value)

    def distribute(self, model: nn.Module, shard: bool = True, comm_dtype: torch.dtype | None = None) -> DataParallel:
        """Make this step (over `model`) one worker of the default process group: gradients sync through
        DataParallel, and the optimizer this rank steps becomes its shard (or stays whole)."""
        self.parallel = DataParallel(model, self.optimizer, shard, comm_dtype)
        self.optimizer = self.parallel.optimizer  # the schedule sets the groups this rank steps
        if shard and self.scaler is not None:
            # a rank sees inf only in the gradients it owns: this scaler all-reduces the finding, so every
            # rank skips (or takes) the step and moves the scale alike (imported here: FSDP costs every
            # entry point a second at import)
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(device=next(model.parameters()).device.type)
        return self.parallel

    def _loss(self, batch: Batch | WeightedBatch) -> torch.Tensor:
        """Mean cross-entropy of (x, y); for (x, y, w) the w-weighted sum of per-token losses
        (policy gradient: w = -advantage / tokens, so minimizing it raises the reward)."""
        if len(batch) == 2:
            return self.model(*batch)
        x, y, w = batch
        return (self.model(x, y, loss_reduction="none") * w).sum()

    def _optimizer_step(self, finite: bool) -> bool:
        """Step every optimizer group, or none. Returns True when the step was skipped. `finite`: the loss and
        the gradient norm both are; with a GradScaler its own inf-check over the same gradients decides."""
        if self.scaler is None:
            if finite:
                self.optimizer.step()
            return not finite
        # unscale first so Muon orthogonalizes true gradients; scaler.step skips the whole
        # optimizer (Muon and AdamW groups alike) if any gradient holds inf/NaN
        scale_before = self.scaler.get_scale()
        self.scaler.unscale_(self.optimizer)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return self.scaler.get_scale() < scale_before

    def _guard(self, skipped: bool, loss: float, norm: float) -> None:
        self.skipped_total += skipped
        self.bad_in_a_row = self.bad_in_a_row + 1 if skipped else 0
        if self.bad_in_a_row < self.max_bad_steps:
            return
        scale = f", loss scale {self.scaler.get_scale():g}" if self.scaler else ""
        raise TrainingDiverged(
            f"{self.bad_in_a_row} optimizer steps in a row were skipped (last loss {loss}, gradient norm {norm}{scale}): "
            f"training has diverged in {self.plan.dtype}. Lower the learning rates, resume from an earlier checkpoint, "
            "or try --dtype float32 to rule out a precision problem."
        )


def maybe_compile(model: nn.Module, plan: PrecisionPlan, setting: str = "auto") -> nn.Module:
    """torch.compile the model where the plan allows it ("auto"), always ("on") or never ("off")."""
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"compile must be auto, on or off, not {setting!r}")
    if setting == "on" and plan.device == "cuda" and not plan.compile:
        raise ValueError(
            f"--compile on: {plan.name} (sm {plan.capability}) cannot run Triton kernels (needs sm 7.0+); use --compile auto"
        )
    if setting == "on" or (setting == "auto" and plan.compile):
        return torch.compile(model, dynamic=False)
    return model
