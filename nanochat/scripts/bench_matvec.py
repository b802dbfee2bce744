"""Speed of a decode step's few-row matmuls: cuBLAS vs nanochat.infer.matvec_kernel, chained as in a step.

    python -m nanochat.scripts.bench_matvec --depth 20 --rows 1,2,4

The matrices are those of a depth-N model as the decoder holds them (q/k/v fused, attention
output, MLP in and out per layer, then lm_head), in the compute dtype, each layer with its own
weights so that nothing is served from the L2 cache. Each matmul reads the previous one's output,
as in a step; the chain is captured in one CUDA graph and replayed. Reported per way of multiplying:
microseconds per chain, the weight bytes read per second, and the ratio to cuBLAS. The Triton kernel
runs plainly and, where the GPU has it (compute capability 9.0+), with programmatic dependent launch.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanochat.common import init_process, write_json
from nanochat.config import CommonConfig, option, parse_config, row_counts
from nanochat.gpt import GPTConfig


@dataclass
class BenchMatvecConfig(CommonConfig):
    depth: int = option(12, "model depth whose matrices are chained")
    vocab_size: int = option(32768, "vocabulary (the lm_head's rows)")
    rows: str = option("1,2", "comma-separated row counts (decode streams)")
    repeats: int = option(50, "graph replays timed per measurement")
    out: str = option("", "write the results as JSON here")


def step_matrices(cfg: GPTConfig, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """The weight matrices one decode step multiplies by, in order, (out, in) as nn.Linear holds them."""
    c, head = cfg.n_embd, cfg.n_embd // cfg.n_head
    shapes = [((cfg.n_head + 2 * cfg.n_kv_head) * head, c), (c, c), (4 * c, c), (c, 4 * c)] * cfg.n_layer
    return [torch.randn(n, k, device=device, dtype=dtype) / k**0.5 for n, k in [*shapes, (cfg.vocab_size, c)]]


def chain(matrices: list[torch.Tensor], x: torch.Tensor, outs: list[torch.Tensor],
          multiply: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]) -> None:
    """Each product into its buffer, from the previous product's first `in` features."""
    for w, y in zip(matrices, outs, strict=True):
        multiply(x[:, : w.size(1)], w, y)
        x = y


def graph_time(fn: Callable[[], None], repeats: int) -> float:
    """Microseconds per call of fn, captured once in a CUDA graph and replayed `repeats` times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compile / pick kernels outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / repeats


def ways(device: torch.device) -> dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]]:
    from nanochat.infer import matvec_kernel  # imports Triton

    found = {"cublas": lambda x, w, y: torch.mm(x, w.t(), out=y),
             "triton": lambda x, w, y: matvec_kernel.matvec(x, w, pdl=False, out=y)}
    if matvec_kernel.programmatic_launch(device):
        found["triton+pdl"] = lambda x, w, y: matvec_kernel.matvec(x, w, pdl=True, out=y)
    return found


def measure(matrices: list[torch.Tensor], rows: int, repeats: int, device: torch.device) -> list[dict]:
    x = torch.randn(rows, max(w.size(1) for w in matrices), device=device, dtype=matrices[0].dtype)
    outs = [torch.empty(rows, w.size(0), device=device, dtype=x.dtype) for w in matrices]
    weight_bytes = sum(w.numel() * w.element_size() for w in matrices)
    results, reference = [], None
    for name, multiply in ways(device).items():
        us = graph_time(lambda multiply=multiply: chain(matrices, x, outs, multiply), repeats)
        first = outs[0].float()  # the chain's first product, against cuBLAS's
        reference = first.clone() if reference is None else reference
        error = ((first - reference).abs().max() / reference.abs().max()).item()
        results.append({"rows": rows, "way": name, "us_per_chain": us, "tb_per_s": weight_bytes / us / 1e6,
                        "vs_cublas": results[0]["us_per_chain"] / us if results else 1.0, "max_rel_error": error})
    return results


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(BenchMatvecConfig, argv, description=__doc__.splitlines()[0])
    counts = row_counts(cfg.rows, "--rows", "1,2,4")  # refused before anything runs
    device, plan = init_process(cfg)
    if device.type != "cuda":
        raise SystemExit(f"bench_matvec times CUDA graphs: run it on a GPU (the device here is {device.type})")
    dtype = plan.torch_dtype
    if dtype == torch.float32:
        raise SystemExit("the few-row kernel is for 16-bit weights and this plan computes in float32: "
                         "pass --dtype bfloat16 or --dtype float16 to time it anyway")
    model_cfg = GPTConfig.from_depth(cfg.depth, cfg.vocab_size, 2048)
    matrices = step_matrices(model_cfg, dtype, device)
    mb = sum(w.numel() * w.element_size() for w in matrices) / 1e6
    print(f"depth {cfg.depth}: {len(matrices)} matmuls per step, {mb:,.0f} MB of {dtype} weights, "
          f"{torch.cuda.get_device_name(device)}")
    results = [r for rows in counts for r in measure(matrices, rows, cfg.repeats, device)]
    for r in results:
        print(f"rows {r['rows']} {r['way']:>11}: {r['us_per_chain']:7.1f} us per step's matmuls | "
              f"{r['tb_per_s']:.2f} TB/s | {r['vs_cublas']:.2f}x cuBLAS | max rel. error {r['max_rel_error']:.1e}")
    out = {"depth": cfg.depth, "dtype": str(dtype), "gpu": torch.cuda.get_device_name(device), "torch": torch.__version__,
           "weight_mb": mb, "results": results}
    write_json(cfg.out, out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
