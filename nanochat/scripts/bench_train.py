"""Time the real training step (model, Muon+AdamW, GradScaler where the plan has one, gradient
accumulation) on random tokens, and find the largest micro-batch that fits in memory.

    python -m nanochat.scripts.bench_train --depth 12                       # bf16 on A100/H100
    NANOCHAT_EMULATE=p100 python -m nanochat.scripts.bench_train --depth 12 --device-batch-size 8
    NANOCHAT_EMULATE=p100 python -m nanochat.scripts.bench_train --depth 12 --find-max-batch
    python -m nanochat.scripts.bench_train --depth 2 --max-seq-len 128 --vocab-size 4096 \
        --device-batch-size 4 --steps 3 --warmup 1                          # CPU smoke run

Prints tokens/s, MFU against the plan's peak (FLOPs/token as upstream nanochat counts them),
the forward+backward / optimizer split, peak memory; `--out FILE.json` writes the same.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

from nanochat.common import default_device, write_json
from nanochat.config import option, parse_config
from nanochat.gpt import GPT
from nanochat.precision import PrecisionPlan, apply_process_settings, resolve
from nanochat.train.memory import ProbeConfig, fits, probe_setup
from nanochat.train.step import TrainStep


@dataclass
class BenchConfig(ProbeConfig):
    steps: int = option(20, "timed optimizer steps")
    warmup: int = option(5, "untimed steps first (compilation, allocator warm-up)")
    find_max_batch: bool = option(False, "instead of timing, report the largest micro-batch (power of two, then +50%) that fits")
    out: str = option("", "write the result as JSON here")


def find_max_batch(cfg: BenchConfig, plan: PrecisionPlan, device: torch.device) -> dict:
    if device.type != "cuda":
        raise SystemExit("--find-max-batch measures GPU memory; run it on a CUDA device")
    best, size = 0, 1
    while fits(cfg, plan, device, size):
        best, size = size, size * 2
    if best and fits(cfg, plan, device, best + best // 2) and best // 2:
        best = best + best // 2
    limit = plan.memory_cap or torch.cuda.get_device_properties(device).total_memory
    result = {"depth": cfg.depth, "seq_len": cfg.max_seq_len, "dtype": plan.dtype, "max_device_batch_size": best,
              "memory_limit_gib": limit / 2**30, "gpu": plan.name, "emulating": plan.emulating}
    print(f"largest micro-batch that fits: {best} x {cfg.max_seq_len} tokens (depth {cfg.depth}, {plan.dtype}, "
          f"{limit / 2**30:.0f} GiB)")
    return result


def timed_split(model: GPT, step: TrainStep, batches, device: torch.device) -> tuple[float, float]:
    """(forward+backward ms, optimizer ms) of one step, from CUDA events (0, 0 on CPU)."""
    if device.type != "cuda":
        return 0.0, 0.0
    start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    step.optimizer.step = _timed(step.optimizer.step, mid)
    start.record()
    step(batches)
    end.record()
    torch.cuda.synchronize()
    del step.optimizer.step  # back to the class method
    return start.elapsed_time(mid), mid.elapsed_time(end)


def _timed(fn, event):
    def wrapper(*args, **kwargs):
        event.record()
        return fn(*args, **kwargs)
    return wrapper


def bench(cfg: BenchConfig, plan: PrecisionPlan, device: torch.device) -> dict:
    model, step, batches, grad_accum = probe_setup(cfg, plan, device, cfg.device_batch_size)
    for _ in range(cfg.warmup):
        step(batches)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(cfg.steps):
        step(batches)
    sync()
    seconds = (time.perf_counter() - t0) / cfg.steps
    fwd_bwd_ms, optim_ms = timed_split(model, step, batches, device)
    tokens = grad_accum * cfg.device_batch_size * cfg.max_seq_len
    flops = model.estimate_flops()
    result = {
        "depth": cfg.depth, "dtype": plan.dtype, "gpu": plan.name, "emulating": plan.emulating, "compile": cfg.compile,
        "device_batch_size": cfg.device_batch_size, "seq_len": cfg.max_seq_len, "grad_accum": grad_accum,
        "ms_per_step": 1000 * seconds, "tok_per_s": tokens / seconds,
        "mfu": flops * tokens / seconds / plan.peak_flops if plan.peak_flops else None,
        "flops_per_token": flops, "fwd_bwd_ms": fwd_bwd_ms, "optimizer_ms": optim_ms,
        "skipped_steps": step.skipped_total,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "torch": torch.__version__,
    }
    mfu = f", MFU {100 * result['mfu']:.1f}%" if result["mfu"] else ""
    print(f"depth {cfg.depth} {plan.dtype} B={cfg.device_batch_size}x{cfg.max_seq_len} accum {grad_accum}: "
          f"{result['tok_per_s']:,.0f} tok/s{mfu}, {result['ms_per_step']:.1f} ms/step "
          f"(fwd+bwd {fwd_bwd_ms:.1f} / optimizer {optim_ms:.1f} ms), peak {result['peak_memory_gib'] or 0:.2f} GiB")
    return result


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(BenchConfig, argv, description=__doc__.splitlines()[0])
    device = torch.device(cfg.device or default_device())
    plan = resolve(cfg.dtype, device)
    apply_process_settings(plan, device)
    print(f"precision plan:\n{plan.summary()}")
    result = find_max_batch(cfg, plan, device) if cfg.find_max_batch else bench(cfg, plan, device)
    write_json(cfg.out, result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
