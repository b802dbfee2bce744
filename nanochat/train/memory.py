"""Training memory model: predicted peak GPU memory of a training step, from the model's shapes.

Used before anything touches a GPU: `ray_jobs.tune` drops search points that cannot fit the target
GPU, and `base_train --device-batch-size auto` starts its probe from the largest batch predicted to
fit, checked by the probe at the end (two real steps; bench_train and calibrate_memory use it too).
Formula, coefficients and calibration table: docs/memory.md.

The peak of a step is the largest of these moments (bytes; N params, T tokens per micro-batch):

  forward/backward  = held + half-precision weight copies + lm_head grad
                      + ACT * T * n_layer * n_embd + LOGITS * T * vocab + CONST
  optimizer step    = held + grads (4 N) + Newton-Schulz temporaries + CONST

where held = fp32 params (4 N) + optimizer state (AdamW moments, 8 per param of wte and lm_head;
Muon momentum, 4 per block matrix param) + the gradient buckets of data parallelism. With W > 1
workers the state and the Newton-Schulz stack are what the busiest rank owns (ZeRO-1, the
layout of data_parallel.plan_layout) and the gradients live in the bucket buffers.
Everything but ACT, LOGITS and CONST is counted from the shapes; those three were fitted to
measured peaks (see CALIBRATION below). `python -m nanochat.train.memory` prints what fits.
"""

from __future__ import annotations

import functools
import gc
import math
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from nanochat.common import seed_everything
from nanochat.config import DTYPE_CHOICES, ModelShapeConfig, int_list, option, parse_config
from nanochat.gpt import GPT, GPTConfig
from nanochat.precision import PrecisionPlan
from nanochat.train.data_parallel import BUCKET_BYTES, plan_layout
from nanochat.train.loop import LoopConfig, make_step, new_model
from nanochat.train.step import TrainStep

GiB = 2**30

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Candidate micro-batch sizes: powers of two, as the total batch (a power of two in tokens) must
# be a multiple of device_batch_size * seq_len * world_size.
CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128)

# Fraction of the budget the prediction may use. The model predicts torch.cuda.max_memory_allocated;
# the process needs more than that: the caching allocator's reserve on top of what is allocated
# (the P100 calibration ran 14.37 GiB allocated under the 16 GiB cap, but ran out at a predicted
# 14.5 GiB), the CUDA context on a real card (~0.3-0.5 GiB, outside the allocator) and the model's
# own error (within 2% on the calibration points). 0.9 keeps 10% of the budget for all of that.
HEADROOM = 0.90

# --- fitted coefficients ------------------------------------------------------------------------
# CALIBRATION: least squares over the 20 `ok` points (of 26) of docs/memory/calibration_p100_fp16.json
# (fp16 eager, NANOCHAT_EMULATE=p100 on an H100; depths 4-20, T 1024/2048, V 16384-65536), fitting
# ACT, LOGITS and CONST on the points whose peak is the forward/backward one (all but depth 20 B=1),
# the shape-counted terms fixed. Reproduce with `python -m nanochat.scripts.calibrate_memory --fit
# docs/memory/calibration_p100_fp16.json`. Worst error after the fit: 1.5%.
#
# Activations kept for backward, bytes per token per layer per channel of width, eager fp16:
# ~15 tensors of the compute dtype (q, k, v, rotary and norm outputs, the 4x-wide MLP hidden
# state counted 3 times: fc output, relu, square) plus the fp32 residual stream and its norms.
ACT_EAGER_HALF = 60.46
# Of those bytes, the part that stays float32 whatever the autocast dtype: the residual stream and
# the two RMSNorm outputs per block (4 fp32 tensors of width C = 16 bytes). An estimate, not fitted
# (no float32 calibration yet): the rest scales with the compute dtype's size.
ACT_FP32_PART = 16.0
# torch.compile fuses the elementwise chains (rotary, norms, relu^2, and the logits' softcap and
# cross-entropy) and saves far fewer tensors: the transient memory (activations + logits) of a
# compiled step is this fraction of the eager one. Fitted on the one compiled point measured
# (docs/memory/calibration_h100_bf16_compiled.json: depth 12, B=8, bf16 on an H100, 8.54 GiB
# against 18.07 GiB predicted for eager); one point, so treat other shapes as an estimate.
COMPILED_TRANSIENT = 0.424
# Logits, bytes per token per vocabulary entry: fp16 lm_head output, its fp32 copy, tanh softcap
# (input, output, scaled), log-softmax, and their gradients at the start of backward. Logits are
# float32 in every plan (gpt.py), so one value for every dtype.
LOGITS = 16.10
# Allocator and framework constant (cuBLAS workspace, rotary tables, RNG and scaler state).
CONST = 21_947_667
# Newton-Schulz temporaries, in copies of the largest stack of same-shape Muon matrices (the 4L
# square attention matrices): the Nesterov update and its stack in fp32, then ~6 live tensors of
# the iteration (normalized X, A, B, B @ X, a * X, new X) in Muon's dtype. Counted, not fitted.
NS_FP32_COPIES = 2
NS_ITER_COPIES = 6


def _check_dtype(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, not {dtype!r}")
    return DTYPE_BYTES[dtype]


# --- what one rank holds under data parallelism ----------------------------------------------------
@functools.lru_cache(maxsize=64)
def model_params(depth: int, vocab_size: int, aspect_ratio: int = 64,
                 head_dim: int = 128) -> tuple[tuple[torch.Tensor, ...], tuple[bool, ...]]:
    """The model's trainable parameters on the meta device (nothing allocated), in the order
    DataParallel lays them out, and which of them Muon steps (matrices owned whole)."""
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(depth, vocab_size, 2048, aspect_ratio, head_dim))
    muon = {id(p) for g in model.setup_optimizer().param_groups if g["kind"] == "muon" for p in g["params"]}
    params = tuple(p for p in model.parameters() if p.requires_grad)
    return params, tuple(id(p) in muon for p in params)


@dataclass(frozen=True)
class RankShare:
    """What each rank of `world_size` workers holds for the optimizer, and the gradient buckets."""

    world_size: int
    shard: bool
    optimizer_state: tuple[int, ...]  # bytes of optimizer state, per owning rank (one entry if unsharded)
    largest_stack: tuple[int, ...]  # elements of the largest same-shape Muon stack each rank orthogonalizes
    segments: tuple[int, ...]  # per gradient bucket, the elements of one rank's segment (none in one process)

    @property
    def bucket_elements(self) -> int:
        """Elements of every bucket's flat buffer (world x segment sharded, the whole bucket replicated),
        plus, sharded, the segment each reduce-scatter receives."""
        if not self.shard:
            return sum(self.segments)
        return (self.world_size + 1) * sum(self.segments)


@functools.lru_cache(maxsize=256)
def rank_share(depth: int, vocab_size: int, aspect_ratio: int = 64, head_dim: int = 128, *, world_size: int = 1,
               shard: bool = True, bucket_bytes: int = BUCKET_BYTES) -> RankShare:
    """What each rank holds under data_parallel.plan_layout over the meta-device model (the layout the
    workers use). One process (world_size 1) has no buckets."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, not {world_size}")
    params, whole = model_params(depth, vocab_size, aspect_ratio, head_dim)
    ranks = world_size if shard else 1  # replicated: every rank holds what one owner would
    layout = plan_layout([p.shape for p in params], list(whole), ranks, bucket_bytes)
    state, stacks = [], []
    for rank in range(ranks):
        held = [own.held(rank, p.shape[0]) for p, own in zip(params, layout.ownership, strict=True)]
        held = [(last - first) * (p.numel() // p.shape[0]) for p, (first, last) in zip(params, held, strict=True)]
        state.append(sum((4 if w else 8) * n for n, w in zip(held, whole, strict=True)))  # momentum / 2 moments
        by_shape: dict[torch.Size, int] = {}
        for p, n, w in zip(params, held, whole, strict=True):
            if w and n:
                by_shape[p.shape] = by_shape.get(p.shape, 0) + n
        stacks.append(max(by_shape.values(), default=0))
    segments = tuple(layout.chunks) if world_size > 1 else ()
    return RankShare(world_size, shard, tuple(state), tuple(stacks), segments)


# --- the prediction --------------------------------------------------------------------------------
def peak_parts(depth: int, seq_len: int, device_batch_size: int, vocab_size: int, dtype: str, compile: bool,
               aspect_ratio: int = 64, head_dim: int = 128, *, grad_accum: int = 1, world_size: int = 1,
               shard: bool = True) -> dict[str, float]:
    """The terms of the prediction for the busiest rank, in bytes: where the memory goes."""
    size = _check_dtype(dtype)
    width = math.ceil(depth * aspect_ratio / head_dim) * head_dim  # as GPTConfig.from_depth
    tokens = device_batch_size * seq_len
    embed = vocab_size * width  # wte and lm_head each
    blocks = 12 * width * width * depth  # attention 4 C^2 + MLP 8 C^2 per layer
    params = 2 * embed + blocks
    share = rank_share(depth, vocab_size, aspect_ratio, head_dim, world_size=world_size, shard=shard)
    # autocast caches one compute-dtype copy of every nn.Linear weight (blocks and lm_head), which
    # backward keeps until each layer's gradient is done; none in float32
    weight_copies = 0 if dtype == "float32" else size * (blocks + embed)
    # the lm_head gradient is allocated as backward starts, when activations are all still alive;
    # with accumulation every gradient already exists during the later micro-batches
    grads_in_fwd = 4 * params if grad_accum > 1 else 4 * embed
    act = ACT_FP32_PART + (ACT_EAGER_HALF - ACT_FP32_PART) * size / 2
    transient = COMPILED_TRANSIENT if compile else 1.0
    ns_bytes = 2 if dtype == "bfloat16" else 4  # plan.muon_dtype: bf16 where the GPU has it natively
    return {
        "params": 4 * params,
        "optimizer_state": max(share.optimizer_state),
        "buckets": 4 * share.bucket_elements,  # fp32 gradient buckets (16-bit with --grad-dtype: half)
        "weight_copies": weight_copies,
        "grads_in_fwd": grads_in_fwd,
        "activations": transient * act * tokens * depth * width,
        "logits": transient * LOGITS * tokens * vocab_size,
        # one process: the .grad tensors; several: the averaged gradients are views into the buckets
        "grads": 4 * params if world_size == 1 else 0,
        "newton_schulz": max(share.largest_stack) * (4 * NS_FP32_COPIES + ns_bytes * NS_ITER_COPIES),
        "const": CONST,
    }


def moments(parts: dict[str, float]) -> dict[str, float]:
    """Bytes allocated at each candidate peak of a step (CONST aside): the prediction is the largest."""
    held = parts["params"] + parts["optimizer_state"] + parts["buckets"]
    return {
        "forward_backward": held + parts["weight_copies"] + parts["grads_in_fwd"] + parts["activations"] + parts["logits"],
        "optimizer": held + parts["grads"] + parts["newton_schulz"],
    }


def predict_peak_bytes(depth: int, seq_len: int, device_batch_size: int, vocab_size: int, dtype: str, compile: bool,
                       aspect_ratio: int = 64, head_dim: int = 128, *, grad_accum: int = 1, world_size: int = 1,
                       shard: bool = True) -> int:
    """Predicted torch.cuda.max_memory_allocated of a training step (2nd optimizer step, optimizer state included).

    dtype is the plan's compute dtype ("float32" | "bfloat16" | "float16"); compile is True for plans
    that torch.compile. grad_accum > 1 adds the gradients held during the later micro-batches (the
    calibration ran one micro-batch per step). world_size > 1 is one rank of that many data-parallel
    workers, its optimizer state sharded (shard=True, ZeRO-1) or replicated.
    """
    parts = peak_parts(depth, seq_len, device_batch_size, vocab_size, dtype, compile, aspect_ratio, head_dim,
                       grad_accum=grad_accum, world_size=world_size, shard=shard)
    return round(max(moments(parts).values()) + parts["const"])


_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_memory(text: str) -> int:
    """Bytes in a memory size: "16GB", "16GiB", "16G", "80 GB", "12000MB", "1.5T", "1073741824".

    Units are binary whatever their spelling: GB = GiB = G = 2**30 bytes, because GPU memory is
    quoted loosely ("16GB P100" has 16 GiB, torch reports 15.9 GiB of it), and taking "16GB" as
    16e9 bytes would make a 16 GB card look 7% smaller than it is.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read {text!r} as a memory size; write e.g. 16GB, 16GiB, 80 GB or 12000MB")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit.upper()])


def check_fit(budget_bytes: int, depth: int, seq_len: int, device_batch_size: int, vocab_size: int, dtype: str,
              compile: bool, aspect_ratio: int = 64, head_dim: int = 128, *, grad_accum: int = 1, world_size: int = 1,
              shard: bool = True) -> str | None:
    """None when the predicted peak fits HEADROOM (90%) of the budget, else a one-line reason."""
    peak = predict_peak_bytes(depth, seq_len, device_batch_size, vocab_size, dtype, compile, aspect_ratio, head_dim,
                              grad_accum=grad_accum, world_size=world_size, shard=shard)
    usable = HEADROOM * budget_bytes
    if peak <= usable:
        return None
    workers = "" if world_size == 1 else f" on each of {world_size} workers ({'sharded' if shard else 'replicated'} optimizer)"
    return (f"depth {depth} B={device_batch_size} T={seq_len} V={vocab_size} {dtype}{' compiled' if compile else ''}{workers}: "
            f"predicted peak {peak / GiB:.2f} GiB > {usable / GiB:.2f} GiB ({HEADROOM:.0%} of the {budget_bytes / GiB:.1f} GiB budget)")


def largest_fitting_batch(budget_bytes: int, depth: int, seq_len: int, vocab_size: int, dtype: str, compile: bool,
                          aspect_ratio: int = 64, head_dim: int = 128,
                          candidates: tuple[int, ...] = CANDIDATES, *, grad_accum: int = 1, world_size: int = 1,
                          shard: bool = True) -> int:
    """The largest candidate device batch size that check_fit accepts, 0 when none fits."""
    fitting = [b for b in candidates if check_fit(budget_bytes, depth, seq_len, b, vocab_size, dtype, compile, aspect_ratio,
                                                  head_dim, grad_accum=grad_accum, world_size=world_size, shard=shard) is None]
    return max(fitting, default=0)


def rows_per_step(total_batch_size: int, seq_len: int, world_size: int = 1) -> int | None:
    """Rows each worker runs per optimizer step; None for -1 (one micro-batch per step, any size)."""
    if total_batch_size == -1:
        return None
    if total_batch_size % (seq_len * world_size):
        raise ValueError(f"--total-batch-size {total_batch_size} is not a multiple of seq len x workers = "
                         f"{seq_len * world_size}; change --total-batch-size or --max-seq-len")
    return total_batch_size // (seq_len * world_size)


def fitting_batches(budget_bytes: int, depth: int, seq_len: int, vocab_size: int, dtype: str, compile: bool,
                    total_batch_size: int, world_size: int = 1, aspect_ratio: int = 64, head_dim: int = 128, *,
                    shard: bool = True) -> dict[int, int]:
    """{device batch: gradient accumulation} for the candidates that divide the rows per step and are
    predicted to fit, each predicted with the accumulation it runs with (gradients then live through
    the later micro-batches)."""
    rows = rows_per_step(total_batch_size, seq_len, world_size)
    choices = {b: 1 if rows is None else rows // b for b in CANDIDATES if rows is None or rows % b == 0}
    return {b: a for b, a in choices.items()
            if check_fit(budget_bytes, depth, seq_len, b, vocab_size, dtype, compile, aspect_ratio, head_dim,
                         grad_accum=a, world_size=world_size, shard=shard) is None}


# --- --device-batch-size auto -----------------------------------------------------------------------
CPU_AUTO_BATCH = 8  # CPU/MPS: no memory to model; 8 rows keeps a step short and the batch useful


def auto_device_batch_size(
    budget_bytes: int | None, depth: int, seq_len: int, vocab_size: int, dtype: str, compile: bool,
    total_batch_size: int, world_size: int = 1, aspect_ratio: int = 64, head_dim: int = 128,
    probe: Callable[[int, int], bool] | None = None, *, shard: bool = True,
) -> tuple[int, int, str]:
    """Choose (device_batch_size, grad_accum, explanation) for `--device-batch-size auto`.

    budget_bytes None means no GPU (CPU/MPS): CPU_AUTO_BATCH rows. Otherwise the largest candidate
    predicted to fit one of `world_size` workers (optimizer state sharded or not), among those that
    divide the rows per step (total_batch_size / (seq_len * world_size)) so accumulation reaches the
    total exactly. `probe(batch, grad_accum)` runs one real training step and returns False when it
    ran out of memory; the size is halved until one passes.
    """
    rows = rows_per_step(total_batch_size, seq_len, world_size)

    def accum(batch: int) -> int:
        return 1 if rows is None else rows // batch

    if budget_bytes is None:
        batch = max(b for b in CANDIDATES if b <= CPU_AUTO_BATCH and (rows is None or rows % b == 0))
        return batch, accum(batch), f"device batch {batch}: no GPU, the fixed CPU/MPS size (divides the {rows or batch} rows per step)"
    fit = dict(world_size=world_size, shard=shard)
    fitting = fitting_batches(budget_bytes, depth, seq_len, vocab_size, dtype, compile, total_batch_size,
                              aspect_ratio=aspect_ratio, head_dim=head_dim, **fit)
    if not fitting:
        raise ValueError(
            "--device-batch-size auto: " + str(check_fit(budget_bytes, depth, seq_len, 1, vocab_size, dtype, compile,
                                                          aspect_ratio, head_dim, grad_accum=accum(1), **fit))
            + "; even one row does not fit: lower --depth or --max-seq-len, or use a GPU with more memory")
    batch = max(fitting)
    peak = predict_peak_bytes(depth, seq_len, batch, vocab_size, dtype, compile, aspect_ratio, head_dim,
                              grad_accum=accum(batch), **fit)
    why = (f"device batch {batch}: largest power of two dividing {rows or batch} rows per step predicted to fit "
           f"{HEADROOM:.0%} of {budget_bytes / GiB:.1f} GiB (peak {peak / GiB:.2f} GiB)")
    if probe is not None:
        while not probe(batch, accum(batch)):
            if batch == 1:
                raise RuntimeError("--device-batch-size auto: one row per micro-batch ran out of memory in the probe step; "
                                   "lower --depth or --max-seq-len, or use a GPU with more memory")
            why += f"; B={batch} ran out of memory in the probe step"
            batch //= 2
        why += f"; probe step at B={batch} passed"
    return batch, accum(batch), why + f"; {accum(batch)} accumulation steps"


# --- calibration ---------------------------------------------------------------------------------
def load_calibration(path: str) -> list[dict]:
    """The measured points of a calibration JSON: {"source": ..., "points": [...]} or a bare list
    (what calibrate_memory writes while it runs)."""
    import json
    from pathlib import Path

    data = json.loads(Path(path).read_text())
    points = data["points"] if isinstance(data, dict) else data
    if not isinstance(points, list) or not all(isinstance(p, dict) and "ok" in p for p in points):
        raise ValueError(f"{path}: expected a list of calibration points with an 'ok' field (calibrate_memory's output)")
    return points


def _shape_args(p: dict) -> tuple:
    return (p["depth"], p["seq_len"], p["device_batch_size"], p["vocab_size"], p["dtype"], bool(p["compile"]),
            p.get("aspect_ratio", 64), p.get("head_dim", 128))


def compare(points: list[dict]) -> list[dict]:
    """Each point with its prediction: predicted bytes and, where it ran, the relative error."""
    rows = []
    for p in points:
        predicted = predict_peak_bytes(*_shape_args(p))
        error = predicted / p["peak_allocated"] - 1 if p["ok"] else None
        rows.append({**p, "predicted": predicted, "error": error})
    return rows


def fit(points: list[dict]) -> dict[str, float]:
    """Least-squares ACT (of the points' compile setting, half-precision value), LOGITS and CONST on
    the `ok` points whose peak is the forward/backward one; the shape-counted terms stay fixed.

    Which moment holds the peak depends on the coefficients, so the selection and the fit alternate
    until they agree (a few rounds)."""
    import torch

    ok = [p for p in points if p["ok"] and not p["compile"]]
    if len(ok) < 3:
        raise ValueError(f"fitting 3 coefficients needs at least 3 measured eager points, got {len(ok)} "
                         "(compiled points fit COMPILED_TRANSIENT: see fit_compiled_transient)")
    coef = (ACT_EAGER_HALF, LOGITS, float(CONST))
    for _ in range(5):
        rows, target = [], []
        for p in ok:
            parts = peak_parts(*_shape_args(p))
            size = DTYPE_BYTES[p["dtype"]]
            act_x = parts["activations"] / (ACT_EAGER_HALF * (size / 2) + ACT_FP32_PART * (1 - size / 2))  # tokens * layers * width
            logit_x = parts["logits"] / LOGITS  # tokens * vocab
            moment = moments(parts)
            known = (moment.pop("forward_backward") - parts["activations"] - parts["logits"]
                     + ACT_FP32_PART * (1 - size / 2) * act_x)
            if known + coef[0] * size / 2 * act_x + coef[1] * logit_x < max(moment.values()):
                continue  # the optimizer step holds this point's peak: it says nothing about ACT or LOGITS
            rows.append([act_x * size / 2, logit_x, 1.0])
            target.append(p["peak_allocated"] - known)
        solution = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64),
                                      torch.tensor(target, dtype=torch.float64)[:, None]).solution
        coef = tuple(solution[:, 0].tolist())
    return {"act_half": coef[0], "logits": coef[1], "const": coef[2]}


def fit_compiled_transient(points: list[dict]) -> float:
    """COMPILED_TRANSIENT from measured compiled points: the mean fraction of the eager model's
    activations + logits that a compiled step actually held (the counted terms taken as exact)."""
    ok = [p for p in points if p["ok"] and p["compile"]]
    if not ok:
        raise ValueError("no measured compiled point to fit COMPILED_TRANSIENT on")
    fractions = []
    for p in ok:
        depth, seq_len, batch, vocab, dtype, _, aspect, head = _shape_args(p)
        parts = peak_parts(depth, seq_len, batch, vocab, dtype, False, aspect, head)
        fixed = moments(parts)["forward_backward"] - parts["activations"] - parts["logits"] + parts["const"]
        fractions.append((p["peak_allocated"] - fixed) / (parts["activations"] + parts["logits"]))
    return sum(fractions) / len(fractions)


# --- the probe: real training steps on random tokens ------------------------------------------------


@dataclass
class ProbeConfig(ModelShapeConfig):
    """A model shape and batch to step on random tokens (bench_train's flags extend it)."""

    vocab_size: int = option(32768, "vocabulary size")
    device_batch_size: int = option(32, "rows per micro-batch")
    total_batch_size: int = option(-1, "tokens per optimizer step (gradient accumulation); -1 = one micro-batch")
    compile: str = option("auto", "torch.compile: auto, on, off", choices=("auto", "on", "off"))


def probe_setup(cfg: ProbeConfig, plan: PrecisionPlan, device: torch.device,
                batch_size: int) -> tuple[GPT, TrainStep, Iterator, int]:
    """(model, step at the default learning rates, endless batches of random tokens, grad_accum)."""
    seed_everything(cfg.seed)
    model = new_model(cfg, cfg.vocab_size, device)
    tokens_per_micro = batch_size * cfg.max_seq_len
    grad_accum = 1 if cfg.total_batch_size == -1 else max(1, cfg.total_batch_size // tokens_per_micro)
    step = make_step(model, plan, grad_accum, LoopConfig(), cfg.compile)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    data = [torch.randint(0, cfg.vocab_size, (batch_size, cfg.max_seq_len + 1), device=device, generator=g) for _ in range(4)]
    batches = ((row[:, :-1], row[:, 1:]) for i in range(10**9) for row in [data[i % 4]])
    return model, step, batches, grad_accum


def two_steps(cfg: ProbeConfig, plan: PrecisionPlan, device: torch.device, batch_size: int) -> int | None:
    """Two full optimizer steps at this micro-batch (the second one holds the optimizer state): the
    model's parameter count if they ran, None if they ran out of GPU memory. Everything they
    allocated is freed afterwards (the allocator's peak statistics keep what they used)."""
    model = step = batches = None
    try:
        model, step, batches, _ = probe_setup(cfg, plan, device, batch_size)
        step(batches)
        step(batches)
        return model.num_params()
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        model = step = batches = None
        torch._dynamo.reset()  # compiled graphs hold on to their buffers
        gc.collect()
        torch.cuda.empty_cache()


def fits(cfg: ProbeConfig, plan: PrecisionPlan, device: torch.device, batch_size: int) -> bool:
    return two_steps(cfg, plan, device, batch_size) is not None


# --- what fits W workers: `python -m nanochat.train.memory` -----------------------------------------
@dataclass
class FitQuestion:
    """What depth and micro-batch fit W workers of a given memory, sharded and replicated (no GPU needed)."""

    memory: str = option("16GB", "memory of each GPU (binary units: 16GB = 16 GiB)")
    workers: int = option(1, "data-parallel workers, one GPU each")
    dtype: str = option("float16", "compute dtype of the plan", choices=DTYPE_CHOICES[1:])
    compile: bool = option(False, "the plan compiles (sm 7.0+; P100s run eager)")
    depths: str = option("4,8,12,16,20,24,26,32", "comma-separated depths")
    max_seq_len: int = option(2048, "context length T")
    vocab_size: int = option(32768, "vocabulary size")
    aspect_ratio: int = option(64, "model width per layer of depth")
    head_dim: int = option(128, "attention head dimension")
    total_batch_size: int = option(524288, "tokens per optimizer step over all workers; -1 = one micro-batch")


def fit_table(q: FitQuestion) -> list[dict]:
    """For each depth: per-rank optimizer state and bucket bytes, and the largest micro-batch (with its
    accumulation and predicted peak) that fits sharded and replicated; batch 0 = nothing fits."""
    budget, rows = parse_memory(q.memory), []
    shape = dict(aspect_ratio=q.aspect_ratio, head_dim=q.head_dim)
    for depth in int_list(q.depths):
        row: dict = {"depth": depth, "params": sum(p.numel() for p in model_params(depth, q.vocab_size, **shape)[0])}
        for shard in (True, False):
            key = "sharded" if shard else "replicated"
            share = rank_share(depth, q.vocab_size, **shape, world_size=q.workers, shard=shard)
            fitting = fitting_batches(budget, depth, q.max_seq_len, q.vocab_size, q.dtype, q.compile, q.total_batch_size,
                                      q.workers, **shape, shard=shard)
            batch = max(fitting, default=0)
            peak = predict_peak_bytes(depth, q.max_seq_len, batch, q.vocab_size, q.dtype, q.compile, **shape,
                                      grad_accum=fitting[batch], world_size=q.workers, shard=shard) if batch else None
            row[key] = {"optimizer_state": max(share.optimizer_state), "buckets": 4 * share.bucket_elements,
                        "device_batch_size": batch, "grad_accum": fitting.get(batch), "peak": peak}
        rows.append(row)
    return rows


def format_fit_table(q: FitQuestion, rows: list[dict]) -> str:
    def batch(r: dict) -> str:
        return f"{r['device_batch_size']} x {r['grad_accum']} ({r['peak'] / GiB:.1f})" if r["device_batch_size"] else "-"

    compiled = "compiled" if q.compile else "eager"
    lines = [f"{q.workers} worker(s) x {parse_memory(q.memory) / GiB:.1f} GiB, {q.dtype} {compiled}, T={q.max_seq_len}, "
             f"V={q.vocab_size}, {q.total_batch_size:,} tokens per step; fits = predicted peak <= {HEADROOM:.0%} of the "
             "memory. Per rank, GiB; micro-batch = rows x accumulation steps (predicted peak GiB); - = not even one row.",
             "",
             "| depth | parameters | optimizer state, sharded | optimizer state, replicated | gradient buckets, sharded "
             "| gradient buckets, replicated | micro-batch, sharded | micro-batch, replicated |",
             "|" + "---|" * 8]
    for r in rows:
        s, p = r["sharded"], r["replicated"]
        lines.append(f"| {r['depth']} | {r['params'] / 1e6:,.0f} M | {s['optimizer_state'] / GiB:.2f} | {p['optimizer_state'] / GiB:.2f} "
                     f"| {s['buckets'] / GiB:.2f} | {p['buckets'] / GiB:.2f} | {batch(s)} | {batch(p)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    q = parse_config(FitQuestion, argv, description=FitQuestion.__doc__)
    if q.workers < 1:
        raise SystemExit(f"--workers {q.workers}: give a positive number of workers")
    rows = fit_table(q)
    print(format_fit_table(q, rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
