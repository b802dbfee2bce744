"""GPU time of sampling a batch: the tensor ops of nanochat.infer.sampling vs the one Triton kernel
of nanochat.infer.sample_kernel, side by side.

    python -m nanochat.scripts.bench_sampler --vocab-sizes 16384,65536 --rows 1,32

Each way draws every row at temperature --temperature with top-k --top-k (0: none) from random
logits, captured once in a CUDA graph and replayed (so the figure is the GPU's time, as in a served
step launched ahead, where the host is not what waits). Reported: microseconds per call, the ratio
to the tensor ops, and how many rows drew another token than the tensor ops (near-ties only).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from nanochat.common import init_process, write_json
from nanochat.config import CommonConfig, option, parse_config, row_counts
from nanochat.infer.sampling import sample
from nanochat.scripts.bench_matvec import graph_time


@dataclass
class BenchSamplerConfig(CommonConfig):
    vocab_sizes: str = option("16384,65536", "comma-separated vocabulary sizes")
    rows: str = option("1,32", "comma-separated row counts (decode streams)")
    temperature: float = option(0.8, "temperature of every row")
    top_k: int = option(50, "top-k of every row (0: the whole vocabulary)")
    repeats: int = option(200, "graph replays timed per measurement")
    out: str = option("", "write the results as JSON here")


def measure(rows: int, vocab: int, cfg: BenchSamplerConfig, device: torch.device) -> list[dict]:
    g = torch.Generator(device).manual_seed(0)
    logits = 3 * torch.randn(rows, vocab, device=device, generator=g)
    temperature = torch.full((rows,), cfg.temperature, device=device)
    top_k = torch.full((rows,), cfg.top_k, dtype=torch.long, device=device)
    seed = torch.arange(rows, device=device)
    index = torch.zeros(rows, dtype=torch.long, device=device)
    results, tokens = [], {}
    for way, fused in (("tensor ops", False), ("triton kernel", True)):
        def draw(fused: bool = fused) -> None:
            tokens[fused] = sample(logits, temperature, top_k, seed, index, cfg.top_k, fused=fused)
        us = graph_time(draw, cfg.repeats)
        results.append({"rows": rows, "vocab": vocab, "way": way, "us_per_call": us,
                        "vs_tensor_ops": results[0]["us_per_call"] / us if results else 1.0})
    results[-1]["rows_drawn_otherwise"] = int((tokens[True] != tokens[False]).sum())
    return results


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(BenchSamplerConfig, argv, description=__doc__.splitlines()[0])
    counts = row_counts(cfg.rows, "--rows", "1,32")  # refused before anything runs
    vocabs = row_counts(cfg.vocab_sizes, "--vocab-sizes", "16384,65536", "vocabulary sizes")
    device, _ = init_process(cfg)
    if device.type != "cuda":
        raise SystemExit(f"bench_sampler times CUDA graphs: run it on a GPU (the device here is {device.type})")
    gpu = torch.cuda.get_device_name(device)
    print(f"sampling at temperature {cfg.temperature}, top-k {cfg.top_k or 'none'}, on {gpu}")
    results = [r for vocab in vocabs for rows in counts for r in measure(rows, vocab, cfg, device)]
    for r in results:
        other = f" | {r['rows_drawn_otherwise']} row(s) drawn otherwise" if "rows_drawn_otherwise" in r else ""
        print(f"vocab {r['vocab']:>6}, rows {r['rows']:>3}, {r['way']:>13}: {r['us_per_call']:7.1f} us per call | "
              f"{r['vs_tensor_ops']:.2f}x the tensor ops{other}")
    out = {"gpu": gpu, "torch": torch.__version__, "temperature": cfg.temperature, "top_k": cfg.top_k, "results": results}
    write_json(cfg.out, out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
