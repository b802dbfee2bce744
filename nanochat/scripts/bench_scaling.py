"""Time the real data-parallel training step at 1..N workers (one process per GPU over NCCL, or gloo
processes on the CPU): tokens/s per worker, weak-scaling efficiency, exposed communication,
optimizer time and peak memory, with the overlapped + sharded path or replicated all-reduce.

    python -m nanochat.scripts.bench_scaling --depth 12 --workers 1,2,4,8
    python -m nanochat.scripts.bench_scaling --depth 12 --workers 1,8 --no-shard-optimizer   # replicated
    NANOCHAT_EMULATE=p100 python -m nanochat.scripts.bench_scaling --depth 12 --device-batch-size 8 --workers 1,2
    python -m nanochat.scripts.bench_scaling --depth 2 --max-seq-len 128 --vocab-size 4096 \
        --device-batch-size 4 --workers 1,2 --steps 3 --warmup 1                          # CPU smoke run

Tokens per worker per step are fixed (weak scaling), so a perfect run keeps its step time at every N:
efficiency = tokens/s per worker at N / at 1, and exposed communication = step time at N - at 1.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nanochat.common import write_json
from nanochat.config import option, parse_config, row_counts
from nanochat.precision import apply_process_settings, resolve
from nanochat.train.memory import ProbeConfig, probe_setup


@dataclass
class BenchScalingConfig(ProbeConfig):
    workers: str = option("1,2", "worker counts to run, comma-separated (GPUs: at most the visible ones)")
    shard_optimizer: bool = option(True, "sharded optimizer state (reduce-scatter / all-gather); off = replicated all-reduce")
    grad_dtype: str = option("", "send gradients as bfloat16 or float16; empty = their own dtype", choices=("", "bfloat16", "float16"))
    steps: int = option(10, "timed optimizer steps")
    warmup: int = option(3, "untimed steps first (compilation, NCCL and allocator warm-up)")
    out: str = option("", "write the results as JSON here")


def _worker(rank: int, world: int, port: int, cfg: BenchScalingConfig, out: str) -> None:
    device = torch.device(f"cuda:{rank}") if cfg.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    try:
        plan = resolve(cfg.dtype, device)
        apply_process_settings(plan, device)
        model, step, batches, grad_accum = probe_setup(cfg, plan, device, cfg.device_batch_size)
        if world > 1:
            step.distribute(model, shard=cfg.shard_optimizer, comm_dtype=getattr(torch, cfg.grad_dtype) if cfg.grad_dtype else None)
        optimizer_s = _time_optimizer(step)
        for _ in range(cfg.warmup):
            step(batches)
        optimizer_s.clear()  # the timed steps only (the first ones build the optimizer state)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(cfg.steps):
            step(batches)
        _sync(device)
        seconds = torch.tensor([(time.perf_counter() - t0) / cfg.steps], device=device)  # NCCL reduces device tensors
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        if rank == 0:
            torch.save({"world": world, "s_per_step": seconds.item(), "optimizer_s": sum(optimizer_s) / max(len(optimizer_s), 1),
                        "tokens_per_worker": grad_accum * cfg.device_batch_size * cfg.max_seq_len, "params": model.num_params(),
                        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                        "dtype": plan.dtype, "gpu": plan.name}, out)
        # every rank out of its last collective before any tears its connections down (on the CPU a gloo
        # rank aborted once in its teardown while the other was still writing the result)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_optimizer(step) -> list[float]:
    """Wraps the step's optimizer.step to record its seconds (device-synchronised) in the returned list."""
    seconds: list[float] = []
    inner = step.optimizer.step
    device = next(p for g in step.optimizer.param_groups for p in g["params"]).device

    def timed(*args, **kwargs):
        _sync(device)
        t0 = time.perf_counter()
        result = inner(*args, **kwargs)
        _sync(device)
        seconds.append(time.perf_counter() - t0)
        return result

    step.optimizer.step = timed
    return seconds


def run_world(cfg: BenchScalingConfig, world: int) -> dict:
    with socket.socket() as s, tempfile.TemporaryDirectory() as tmp:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        out = os.path.join(tmp, "rank0.pt")
        mp.spawn(_worker, args=(world, port, cfg, out), nprocs=world)
        return torch.load(out)


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse_config(BenchScalingConfig, argv, description=__doc__.splitlines()[0])
    cfg.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    counts = row_counts(cfg.workers, "--workers", "1,2,4,8")
    if cfg.device == "cuda" and max(counts) > torch.cuda.device_count():
        raise SystemExit(f"--workers {cfg.workers}: only {torch.cuda.device_count()} GPU(s) visible; one worker needs one GPU")
    results: list[dict] = []
    for world in counts:
        r = run_world(cfg, world)
        base = results[0] if results else r
        r.update(shard_optimizer=cfg.shard_optimizer, grad_dtype=cfg.grad_dtype or None,
                 tok_per_s_per_worker=r["tokens_per_worker"] / r["s_per_step"],
                 efficiency=base["s_per_step"] / r["s_per_step"] if base["world"] == 1 else None,
                 exposed_comm_s=r["s_per_step"] - base["s_per_step"] if base["world"] == 1 else None)
        results.append(r)
        print(f"{world} worker(s), {r['dtype']}: {r['tok_per_s_per_worker']:,.0f} tok/s per worker, "
              f"{1000 * r['s_per_step']:.1f} ms/step, optimizer {1000 * r['optimizer_s']:.1f} ms"
              + (f", efficiency {100 * r['efficiency']:.1f}%, exposed communication {1000 * r['exposed_comm_s']:.1f} ms"
                 f" ({100 * r['exposed_comm_s'] / r['s_per_step']:.1f}% of the step)" if r["efficiency"] else "")
              + (f", peak {r['peak_memory_gib']:.2f} GiB" if r["peak_memory_gib"] else ""), flush=True)
    write_json(cfg.out, results)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
