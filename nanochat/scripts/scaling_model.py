"""Data-parallel scaling on paper: gradient bytes per step, all-reduce time per link, efficiency on 1-64 P100s.

    python -m nanochat.scripts.scaling_model                      # the tables of docs/scaling.md
    python -m nanochat.scripts.scaling_model --mfu 0.35 --total-batch-size 262144

The model (docs/scaling.md says why each number): parameters and FLOPs per token come from the real
model (GPTConfig.from_depth + GPT.estimate_flops, built on the meta device, so nothing is allocated);
gradients are fp32 and all-reduced once per optimizer step as one flat buffer (training.AllReduceGradients),
not overlapped with compute; a ring all-reduce moves 2(N-1)/N x bytes through each GPU's slowest
link; compute per step = FLOPs/token x tokens per GPU per step / (peak x MFU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanochat.config import option, parse_config
from nanochat.gpt import GPT, GPTConfig
from nanochat.precision import peak_flops

P100_PEAK_FP16 = peak_flops("Tesla P100-PCIE-16GB", "float16")  # the PCIe card (the SXM2 is faster)
LINKS_GBPS = {  # usable bytes/s per direction, in GB/s
    "PCIe 3 x16": 12.0,
    "10 GbE": 1.25,
    "25 GbE": 3.125,
    "100 GbE": 12.5,
    "NVLink (P100 SXM2)": 60.0,
}
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)


def model_numbers(depth: int, vocab_size: int = 32768, seq_len: int = 2048) -> tuple[int, int]:
    """(parameters, training FLOPs per token) of the depth-`depth` model."""
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(depth, vocab_size, seq_len))
    return model.num_params(), model.estimate_flops()


def allreduce_seconds(num_bytes: float, gpus: int, gbps: float) -> float:
    """Ring all-reduce: each GPU sends and receives 2(N-1)/N of the buffer over its link."""
    return 0.0 if gpus == 1 else 2 * (gpus - 1) / gpus * num_bytes / (gbps * 1e9)


def efficiency(compute_s: float, comm_s: float) -> float:
    return compute_s / (compute_s + comm_s)


def tables(depths: tuple[int, ...], total_batch: int, mfu: float, peak: float = P100_PEAK_FP16) -> str:
    out = [f"P100 at {mfu:.0%} of {peak / 1e12:.1f} TFLOP/s, {total_batch:,} tokens per optimizer step, fp32 gradients\n",
           "| depth | parameters | gradient MB/step | FLOPs/token | compute s/step on 1 GPU | "
           + " | ".join(f"all-reduce s, {k}, 8 GPUs" for k in LINKS_GBPS) + " |",
           "|" + "---|" * (5 + len(LINKS_GBPS))]
    numbers = {d: model_numbers(d) for d in depths}
    for d, (params, flops) in numbers.items():
        grad = 4 * params
        comp = flops * total_batch / (peak * mfu)
        out.append(f"| {d} | {params:,} | {grad / 1e6:,.0f} | {flops:.3e} | {comp:,.1f} | "
                   + " | ".join(f"{allreduce_seconds(grad, 8, g):.2f}" for g in LINKS_GBPS.values()) + " |")
    for d, (params, flops) in numbers.items():
        out += ["", f"Scaling efficiency, depth {d} (compute / (compute + all-reduce), batch split over the GPUs):", "",
                "| GPUs | compute s/step | " + " | ".join(LINKS_GBPS) + " |", "|" + "---|" * (2 + len(LINKS_GBPS))]
        for n in GPU_COUNTS:
            comp = flops * total_batch / n / (peak * mfu)
            out.append(f"| {n} | {comp:,.2f} | " + " | ".join(
                f"{efficiency(comp, allreduce_seconds(4 * params, n, g)):.0%}" for g in LINKS_GBPS.values()) + " |")
    return "\n".join(out)


@dataclass
class ScalingConfig:
    depths: str = option("12,20,26", "comma-separated depths")
    total_batch_size: int = option(524288, "tokens per optimizer step, all GPUs together")
    mfu: float = option(0.40, "achieved fraction of the P100's fp16 peak")


def main(argv: list[str] | None = None) -> str:
    args = parse_config(ScalingConfig, argv, description=__doc__.splitlines()[0])
    text = tables(tuple(int(d) for d in args.depths.split(",")), args.total_batch_size, args.mfu)
    print(text)
    return text


if __name__ == "__main__":
    main()
