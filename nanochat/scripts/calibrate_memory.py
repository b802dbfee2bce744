"""Measure the peak GPU memory of real training steps over a grid of shapes, for the memory model.

    python -m nanochat.scripts.calibrate_memory --depths 4,8,12,16,20 --batch-sizes 1,2,4,8,16 \
        --out nanochat/memory_calibration/h100_bf16.json
    NANOCHAT_EMULATE=p100 python -m nanochat.scripts.calibrate_memory --out .../p100_fp16.json

Every point builds the model and optimizer of the current precision plan (compiled where the plan
compiles), runs two optimizer steps (the second one holds the optimizer state) and records
torch.cuda.max_memory_allocated and max_memory_reserved, or that it ran out of memory. A batch
size that runs out of memory ends the sweep for that shape (larger ones cannot fit either).
The points are appended to --out as they finish, so a sweep cut short keeps what it measured.

No GPU needed to compare or refit the memory model (nanochat/train/memory.py) on a measured file:

    python -m nanochat.scripts.calibrate_memory --check docs/memory/calibration_p100_fp16.json
    python -m nanochat.scripts.calibrate_memory --fit docs/memory/calibration_p100_fp16.json

What the model predicts fits W workers of a given memory: `python -m nanochat.train.memory --workers 4`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from nanochat.common import default_device
from nanochat.config import ModelShapeConfig, int_list, option, parse_config
from nanochat.precision import apply_process_settings, resolve
from nanochat.train import memory
from nanochat.train.memory import GiB, ProbeConfig, two_steps


@dataclass
class CalibrateConfig(ModelShapeConfig):
    depths: str = option("4,8,12,16,20", "comma-separated depths")
    batch_sizes: str = option("1,2,4,8,16,32", "comma-separated micro-batch sizes (rows)")
    seq_lens: str = option("2048", "comma-separated sequence lengths")
    vocab_sizes: str = option("32768", "comma-separated vocabulary sizes")
    compile: str = option("auto", "torch.compile: auto (the plan's choice), on, off", choices=("auto", "on", "off"))
    out: str = option("memory_calibration.json", "JSON file the measured points are written to")
    check: str = option("", "instead of measuring: print predicted vs measured peak for this calibration JSON")
    fit: str = option("", "instead of measuring: least-squares fit of the memory model's coefficients to this JSON")


def measure(cfg: CalibrateConfig, plan, device: torch.device, depth: int, seq_len: int, vocab: int, batch: int) -> dict:
    shape = ProbeConfig(depth=depth, max_seq_len=seq_len, vocab_size=vocab, device_batch_size=batch,
                        aspect_ratio=cfg.aspect_ratio, head_dim=cfg.head_dim, compile=cfg.compile, seed=cfg.seed)
    point = {"depth": depth, "seq_len": seq_len, "vocab_size": vocab, "device_batch_size": batch,
             "aspect_ratio": cfg.aspect_ratio, "head_dim": cfg.head_dim, "dtype": plan.dtype,
             "compile": plan.compile if cfg.compile == "auto" else cfg.compile == "on",
             "gpu": plan.name, "emulating": plan.emulating}
    torch.cuda.reset_peak_memory_stats(device)
    num_params = two_steps(shape, plan, device, batch)
    point.update(ok=num_params is not None)
    if num_params is not None:
        point.update(num_params=num_params, peak_allocated=torch.cuda.max_memory_allocated(device),
                     peak_reserved=torch.cuda.max_memory_reserved(device))
    return point


def check(path: str) -> list[dict]:
    """Print each point's predicted and measured peak, and the worst error over the points that ran."""
    rows = memory.compare(memory.load_calibration(path))
    print(f"{'depth':>5} {'T':>5} {'V':>6} {'B':>3} {'dtype':>8} {'compile':>7} {'measured':>9} {'predicted':>9} {'error':>7}")
    for r in rows:
        measured = f"{r['peak_allocated'] / GiB:.2f}" if r["ok"] else "OOM"
        error = f"{100 * r['error']:+.1f}%" if r["ok"] else ""
        print(f"{r['depth']:>5} {r['seq_len']:>5} {r['vocab_size']:>6} {r['device_batch_size']:>3} {r['dtype']:>8} "
              f"{r['compile']!s:>7} {measured:>9} {r['predicted'] / GiB:>9.2f} {error:>7}")
    errors = [abs(r["error"]) for r in rows if r["ok"]]
    print(f"worst error {100 * max(errors, default=0):.1f}% over {len(errors)} measured points (peaks in GiB)")
    return rows


def print_fit(path: str) -> list[dict]:
    """Print the fitted coefficients; copy them into nanochat/train/memory.py (with the data's name) to adopt them."""
    points = memory.load_calibration(path)
    if all(p["compile"] for p in points):
        print(f"COMPILED_TRANSIENT = {memory.fit_compiled_transient(points):.3f}")
        return points
    coef = memory.fit(points)
    print(f"ACT_EAGER_HALF = {coef['act_half']:.2f}\nLOGITS = {coef['logits']:.2f}\nCONST = {round(coef['const']):_}")
    return points


def main(argv: list[str] | None = None) -> list[dict]:
    cfg = parse_config(CalibrateConfig, argv, description=__doc__.splitlines()[0])
    if cfg.check or cfg.fit:
        return check(cfg.check) if cfg.check else print_fit(cfg.fit)
    device = torch.device(cfg.device or default_device())
    if device.type != "cuda":
        raise SystemExit("calibrate_memory measures GPU memory; run it on a CUDA device")
    plan = resolve(cfg.dtype, device)
    apply_process_settings(plan, device)
    print(f"precision plan:\n{plan.summary()}")
    points: list[dict] = []
    out = Path(cfg.out)
    for depth in int_list(cfg.depths):
        for seq_len in int_list(cfg.seq_lens):
            for vocab in int_list(cfg.vocab_sizes):
                for batch in int_list(cfg.batch_sizes):
                    point = measure(cfg, plan, device, depth, seq_len, vocab, batch)
                    points.append(point)
                    out.write_text(json.dumps(points, indent=1))
                    peak = f"{point['peak_allocated'] / 2**30:.2f} GiB" if point["ok"] else "out of memory"
                    print(f"depth {depth} T={seq_len} V={vocab} B={batch}: {peak}", flush=True)
                    if not point["ok"]:
                        break
    return points


if __name__ == "__main__":
    main(sys.argv[1:])
