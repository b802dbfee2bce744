"""Data-parallel scaling on paper: seconds per optimizer step per worker on 1-64 P100s, by cause.

    python -m nanochat.scripts.scaling_model                      # the tables of docs/scaling.md
    python -m nanochat.scripts.scaling_model --mfu 0.35 --total-batch-size 262144 --link "10 GbE"

A model, not a measurement: docs/scaling.md lists which inputs were measured (and where) and which are
assumed. Shapes, FLOPs, ownership and bucket layout come from the real code on the meta device (nothing
is allocated): GPT.estimate_flops, data_parallel.plan_layout through the memory model's rank_share,
and the memory model's largest micro-batch. A step per worker = compute + exposed communication +
Newton-Schulz (the busiest rank's share when sharded) + evaluation / eval_every + checkpoint / save_every.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from nanochat.config import int_list, option, parse_config
from nanochat.gpt import GPT, GPTConfig
from nanochat.precision import peak_flops
from nanochat.train import memory
from nanochat.train.data_parallel import plan_layout

VOCAB, SEQ = 32768, 2048
P100_PEAK_FP16 = peak_flops("Tesla P100-PCIE-16GB", "float16")  # the PCIe card (the SXM2 is faster)
LINKS_GBPS = {  # usable bytes/s per direction, in GB/s
    "PCIe 3 x16": 12.0,
    "10 GbE": 1.25,
    "25 GbE": 3.125,
    "100 GbE": 12.5,
    "NVLink (P100 SXM2)": 60.0,
}
HOST_COPY_GBPS = LINKS_GBPS["PCIe 3 x16"]  # a checkpoint's snapshot: device to host memory
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)
# Newton-Schulz (Muon's whole step) on one rank holding every matrix, seconds per optimizer step, at
# the depths it was timed (issue 19): measured on an H200; estimated for a P100 in fp32 (its Muon dtype)
NEWTON_SCHULZ_S = {
    "H200 (measured)": {12: 0.0085, 20: 0.039},
    "P100 fp32 (estimated)": {12: 0.25, 20: 2.0},
}
P100_NS = "P100 fp32 (estimated)"
# bench_scaling on one H200, depth 12, device batch 32, one rank (docs/scaling.md)
H200_TOKENS_PER_S = 478_405


@dataclass
class ScalingConfig:
    depths: str = option("12,20,26", "comma-separated depths")
    total_batch_size: int = option(524288, "tokens per optimizer step, all GPUs together")
    mfu: float = option(0.40, "achieved fraction of the P100's fp16 peak (training and evaluation)")
    link: str = option("25 GbE", "the link of the per-depth step-time tables", choices=tuple(LINKS_GBPS))
    memory: str = option("16GB", "GPU memory: the micro-batch is the memory model's largest that fits it")
    eval_tokens: int = option(20 * 524288, "validation tokens per evaluation (base_train's default)")
    eval_every: int = option(250, "optimizer steps between evaluations (base_train's default)")
    save_every: int = option(1000, "optimizer steps between checkpoints (base_train's default)")
    disk_gbps: float = option(1.0, "checkpoint write bandwidth, GB/s (a local SSD; network volumes are slower)")


@functools.lru_cache(maxsize=32)
def model_numbers(depth: int, vocab_size: int = VOCAB, seq_len: int = SEQ) -> tuple[int, int]:
    """(parameters, training FLOPs per token) of the depth-`depth` model."""
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(depth, vocab_size, seq_len))
    return model.num_params(), model.estimate_flops()


def allreduce_seconds(num_bytes: float, gpus: int, gbps: float) -> float:
    """Ring all-reduce: each GPU sends and receives 2(N-1)/N of the buffer over its link."""
    return 0.0 if gpus == 1 else 2 * (gpus - 1) / gpus * num_bytes / (gbps * 1e9)


def sharded_comm_seconds(depth: int, gpus: int, gbps: float) -> float:
    """Ring reduce-scatter of the fp32 gradient buckets + all-gather of the fp32 parameters: each moves
    (N-1)/N of the bucket buffers (N x the padded per-rank segment) through each GPU's link."""
    if gpus == 1:
        return 0.0
    segments = sum(memory.rank_share(depth, VOCAB, world_size=gpus, shard=True).segments)
    return 2 * (gpus - 1) * segments * 4 / (gbps * 1e9)


def newton_schulz_flops(shape: torch.Size) -> int:
    """FLOPs of one Newton-Schulz iteration on a matrix (per step: X X^T, A A, B X on the wide side)."""
    m, n = sorted(shape)
    return 4 * m * m * n + 2 * m**3


def newton_schulz_share(depth: int, gpus: int, shard: bool) -> float:
    """Fraction of the whole model's Newton-Schulz FLOPs on the busiest rank: 1 replicated; sharded,
    the matrices data_parallel.plan_layout gives it (whole matrices, balanced bucket by bucket)."""
    params, muon = memory.model_params(depth, VOCAB)
    ranks = gpus if shard else 1
    per_rank = [0] * ranks
    for p, m, own in zip(params, muon, plan_layout([p.shape for p in params], list(muon), ranks).ownership, strict=True):
        if m:
            per_rank[own.owner] += newton_schulz_flops(p.shape)
    return max(per_rank) / sum(per_rank)


def newton_schulz_seconds(depth: int, gpu: str = P100_NS) -> float:
    """One rank's Newton-Schulz time for every matrix: the figure at the nearest timed depth, scaled by
    FLOPs (an estimate between and beyond the timed depths)."""
    timed = NEWTON_SCHULZ_S[gpu]
    nearest = min(timed, key=lambda d: abs(d - depth))

    def flops(d: int) -> int:
        params, muon = memory.model_params(d, VOCAB)
        return sum(newton_schulz_flops(p.shape) for p, m in zip(params, muon, strict=True) if m)

    return timed[nearest] * flops(depth) / flops(nearest)


def checkpoint_bytes(depth: int) -> int:
    """What a checkpoint writes: fp32 parameters + the whole optimizer state (every rank's pieces)."""
    params, _ = model_numbers(depth)
    return 4 * params + memory.rank_share(depth, VOCAB).optimizer_state[0]


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step on one worker, by cause."""

    device_batch: int  # rows per micro-batch (the memory model's largest fitting one; 1 when none fits)
    grad_accum: int
    fits: bool
    compute: float
    communication: float  # exposed: not hidden behind backward
    optimizer: float  # Newton-Schulz
    evaluation: float  # one evaluation / eval_every
    checkpoint: float  # one checkpoint's time on the step path / save_every

    @property
    def total(self) -> float:
        return self.compute + self.communication + self.optimizer + self.evaluation + self.checkpoint


def step_time(cfg: ScalingConfig, depth: int, gpus: int, gbps: float, shard: bool = True) -> StepTime:
    """The model of docs/scaling.md for one worker of `gpus` (sharded or replicated optimizer)."""
    params, flops = model_numbers(depth)
    rate = P100_PEAK_FP16 * cfg.mfu
    fitting = memory.fitting_batches(memory.parse_memory(cfg.memory), depth, SEQ, VOCAB, "float16", False,
                                     cfg.total_batch_size, gpus, shard=shard)
    batch = max(fitting, default=1)
    accum = fitting.get(batch, memory.rows_per_step(cfg.total_batch_size, SEQ, gpus) or 1)
    compute = flops * cfg.total_batch_size / gpus / rate
    # the gradient collective starts from backward's hooks on the last micro-batch: at best it hides
    # behind that micro-batch's backward (2/3 of its compute); the all-gather follows the optimizer step
    comm = sharded_comm_seconds(depth, gpus, gbps) if shard else allreduce_seconds(4 * params, gpus, gbps)
    gradient_half = comm / 2 if shard else comm
    exposed = max(0.0, gradient_half - 2 / 3 * compute / accum) + (comm - gradient_half)
    optimizer = newton_schulz_seconds(depth) * newton_schulz_share(depth, gpus, shard)
    evaluation = cfg.eval_tokens * flops / 3 / gpus / rate / cfg.eval_every  # forward only: 1/3 of training FLOPs
    saved = checkpoint_bytes(depth)
    state = saved - 4 * params
    gather = (gpus - 1) / gpus * state / (gbps * 1e9) if shard else 0.0  # ranks assemble the whole state
    between = cfg.save_every * (compute + exposed + optimizer + evaluation)
    write = max(0.0, saved / (cfg.disk_gbps * 1e9) - between)  # background: exposed only if slower than the steps between
    checkpoint = (saved / (HOST_COPY_GBPS * 1e9) + gather + write) / cfg.save_every
    return StepTime(batch, accum, bool(fitting), compute, exposed, optimizer, evaluation, checkpoint)


def efficiency(one: StepTime, many: StepTime, gpus: int) -> float:
    """Weak-scaling efficiency of the step: one GPU's step over N GPUs' step x N (the batch is split)."""
    return one.total / (gpus * many.total)


def overview(cfg: ScalingConfig, depths: list[int]) -> list[str]:
    out = [f"P100 at {cfg.mfu:.0%} of {P100_PEAK_FP16 / 1e12:.1f} TFLOP/s, {cfg.total_batch_size:,} tokens per optimizer "
           f"step, fp32 gradients, {cfg.eval_tokens:,} validation tokens every {cfg.eval_every} steps, a checkpoint every "
           f"{cfg.save_every} steps\n",
           "| depth | parameters | gradient MB/step | FLOPs/token | compute s/step on 1 GPU | Newton-Schulz s/step on 1 GPU "
           "| evaluation s on 1 GPU | checkpoint GB | " + " | ".join(f"all-reduce s, {k}, 8 GPUs" for k in LINKS_GBPS) + " |",
           "|" + "---|" * (8 + len(LINKS_GBPS))]
    for d in depths:
        params, flops = model_numbers(d)
        compute = flops * cfg.total_batch_size / (P100_PEAK_FP16 * cfg.mfu)
        evaluation = cfg.eval_tokens * flops / 3 / (P100_PEAK_FP16 * cfg.mfu)
        out.append(f"| {d} | {params:,} | {4 * params / 1e6:,.0f} | {flops:.3e} | {compute:,.1f} | {newton_schulz_seconds(d):.2f} "
                   f"| {evaluation:,.0f} | {checkpoint_bytes(d) / 1e9:.1f} | "
                   + " | ".join(f"{allreduce_seconds(4 * params, 8, g):.2f}" for g in LINKS_GBPS.values()) + " |")
    return out


def optimizer_table(depths: list[int]) -> list[str]:
    out = ["", "Newton-Schulz per worker: the busiest rank's share of the FLOPs (sharded; replicated = 100%), and its "
           "time from the timed figures (H200 measured, P100 estimated; other depths scaled by FLOPs):", "",
           "| GPUs | " + " | ".join(f"share, depth {d}" for d in depths) + " | "
           + " | ".join(f"{gpu.split()[0]} depth {d}" for gpu in NEWTON_SCHULZ_S for d in depths) + " |",
           "|" + "---|" * (1 + len(depths) * (1 + len(NEWTON_SCHULZ_S)))]
    for n in GPU_COUNTS:
        shares = [newton_schulz_share(d, n, True) for d in depths]
        times = [f"{newton_schulz_seconds(d, gpu) * s * 1e3:,.1f} ms" for gpu in NEWTON_SCHULZ_S for d, s in zip(depths, shares, strict=True)]
        out.append(f"| {n} | " + " | ".join(f"{s:.1%}" for s in shares) + " | " + " | ".join(times) + " |")
    return out


def depth_tables(cfg: ScalingConfig, depth: int) -> list[str]:
    gbps = LINKS_GBPS[cfg.link]
    out = ["", f"Depth {depth}: seconds per optimizer step per worker, sharded optimizer, {cfg.link} (the batch split over "
           "the GPUs; the last columns compare the replicated optimizer; * = does not fit the memory per the memory "
           "model, timed as 1 row):", "",
           "| GPUs | micro-batch x accumulation, sharded | compute | exposed communication | Newton-Schulz | evaluation "
           "| checkpoint | step, sharded | step, replicated | efficiency, sharded | efficiency, replicated |",
           "|" + "---|" * 11]
    one = step_time(cfg, depth, 1, gbps)
    for n in GPU_COUNTS:
        s, r = step_time(cfg, depth, n, gbps), step_time(cfg, depth, n, gbps, shard=False)
        out.append(f"| {n} | {s.device_batch} x {s.grad_accum}{'' if s.fits else '*'} | {s.compute:,.2f} | {s.communication:.3f} "
                   f"| {s.optimizer:.3f} | {s.evaluation:.3f} | {s.checkpoint:.4f} | {s.total:,.2f} | {r.total:,.2f} "
                   f"| {efficiency(one, s, n):.0%} | {efficiency(one, r, n):.0%} |")
    out += ["", f"Depth {depth}: efficiency with the sharded optimizer on each link (every term above included):", "",
            "| GPUs | " + " | ".join(LINKS_GBPS) + " |", "|" + "---|" * (1 + len(LINKS_GBPS))]
    for n in GPU_COUNTS:
        out.append(f"| {n} | " + " | ".join(f"{efficiency(step_time(cfg, depth, 1, g), step_time(cfg, depth, n, g), n):.0%}"
                                           for g in LINKS_GBPS.values()) + " |")
    return out


def h200_check(cfg: ScalingConfig) -> list[str]:
    """The one step the measured figures pin down: depth 12 on one H200."""
    compute = cfg.total_batch_size / H200_TOKENS_PER_S
    ns = NEWTON_SCHULZ_S["H200 (measured)"][12]
    return ["", f"H200, depth 12, one rank (measured inputs): {cfg.total_batch_size:,} tokens at {H200_TOKENS_PER_S:,} tok/s = "
            f"{compute:.2f} s per step; Newton-Schulz {ns * 1e3:.1f} ms = {ns / compute:.1%} of it."]


def tables(cfg: ScalingConfig) -> str:
    depths = int_list(cfg.depths)
    out = overview(cfg, depths) + optimizer_table(depths)
    for d in depths:
        out += depth_tables(cfg, d)
    return "\n".join(out + h200_check(cfg))


def main(argv: list[str] | None = None) -> str:
    cfg = parse_config(ScalingConfig, argv, description=__doc__.splitlines()[0])
    text = tables(cfg)
    print(text)
    return text


if __name__ == "__main__":
    main()
