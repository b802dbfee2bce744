"""Decode speed of the Engine: time to first token, tokens/s per stream and in aggregate, and the
share of the GPU's memory-bandwidth bound; then the same for the decode path the server runs
(nanochat.infer.batch.DecodeBatch), greedy and sampled side by side, and with requests joining and leaving.

    python -m nanochat.scripts.bench_infer --depth 12                      # random weights, auto dtype
    NANOCHAT_EMULATE=p100 python -m nanochat.scripts.bench_infer --depth 12
    python -m nanochat.scripts.bench_infer --depth 12 --decode eager       # without CUDA graphs
    python -m nanochat.scripts.bench_infer --checkpoint $NANOCHAT_BASE_DIR/runs/sft_d12 --profile

The defaults are the shapes of upstream nanochat's own benchmark: a 512-token prompt prefilled once
and shared by every row, 256 new tokens per row, greedy, 1 and 32 rows. Speed does not depend on
the weights, so without --checkpoint a freshly initialized model of the given depth is timed.
Every row decodes exactly --new-tokens tokens (stop tokens are not honoured here). The bound is
the memory bandwidth's (see `bound`), at the mid-decode context (prompt + new/2).

The served path's table (`serve_path`) runs one DecodeBatch of max(--num-samples) slots, warmed up as a
replica warms it: each row count greedy and sampled at --sampled-temperature / --sampled-top-k, with
the ratio of their speeds; then "join and leave": 2 x that many requests arriving --stagger steps
apart, with max_tokens from a quarter of --new-tokens to all of it, so rows join and leave while
others decode (TTFT there counts from a request's arrival).
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass

import torch

from nanochat import checkpoint
from nanochat.common import init_process, write_json
from nanochat.config import CommonConfig, option, parse_config, row_counts
from nanochat.gpt import GPT, GPTConfig
from nanochat.infer.batch import DecodeBatch, Request
from nanochat.infer.engine import Engine
from nanochat.infer.graphs import MODES
from nanochat.precision import peak_bandwidth
from nanochat.tokenizer import SPECIAL_TOKENS


@dataclass
class BenchInferConfig(CommonConfig):
    depth: int = option(12, "depth of the random-weight model (ignored with --checkpoint)")
    vocab_size: int = option(32768, "vocabulary of the random-weight model")
    checkpoint: str = option("", "time a trained model instead (step dir, checkpoint root or run dir)")
    prompt_len: int = option(512, "prompt tokens (prefilled once, then shared by every row)")
    new_tokens: int = option(256, "tokens decoded per row")
    num_samples: str = option("1,32", "comma-separated batch sizes (rows decoded together)")
    temperature: float = option(0.0, "sampling temperature of the engine's table; 0 = greedy")
    top_k: int = option(0, "top-k sampling of the engine's table; 0 = off")
    sampled_temperature: float = option(0.8, "temperature of the served path's sampled runs")
    sampled_top_k: int = option(50, "top-k of the served path's sampled runs; 0 = off")
    stagger: int = option(2, "steps between arrivals in the served path's join-and-leave run")
    repeats: int = option(3, "timed runs per batch size (the median is reported)")
    decode: str = option("auto", "decode steps: auto (CUDA graphs on a GPU), eager, static, graph", choices=MODES)
    profile: bool = option(False, "print the top ops of one batch-1 decode step (torch.profiler)")
    out: str = option("", "write the results as JSON here")


class _NoStopTokenizer:
    """The engine needs special-token ids and decode(); a random-weight model needs no real vocabulary."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.bos_token_id = vocab_size - len(SPECIAL_TOKENS)

    def encode_special(self, name: str) -> int:
        return self.bos_token_id + SPECIAL_TOKENS.index(name)

    def decode(self, ids: list[int]) -> str:
        return ""

    def encode(self, text: str) -> list[int]:
        return []


def load(cfg: BenchInferConfig, device: torch.device) -> torch.nn.Module:
    if cfg.checkpoint:
        model, _ = checkpoint.load_model(cfg.checkpoint, device)
        return model
    model = GPT(GPTConfig.from_depth(cfg.depth, cfg.vocab_size, 2048)).to(device)
    model.init_weights()
    return model.eval()


def time_decode(engine: Engine, prompt: list[int], rows: int, cfg: BenchInferConfig, device: torch.device) -> dict:
    engine.stop_ids = set()  # decode the full length on every row
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    steps = engine.generate(prompt, rows, max_tokens=cfg.new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None)
    next(steps)  # the first token comes out of the prefill
    sync()
    first = time.perf_counter() - t0
    count = sum(1 for _ in steps)
    sync()
    decode = time.perf_counter() - t0 - first
    return {"ttft_ms": 1000 * first, "ms_per_step": 1000 * decode / max(count, 1), "tok_per_s_per_stream": count / decode}


def bound(model: GPT, rows: int, context: int, dtype_bytes: int, bandwidth: float | None) -> dict:
    """Bytes one decode step must read (matrix weights once in the compute dtype, the KV cache of
    every row) and the tokens/s that the GPU's vendor bandwidth (nanochat.precision) allows at most."""
    cfg = model.config
    weights = model.num_matrix_params() * dtype_bytes
    kv_per_row = cfg.n_layer * 2 * cfg.n_kv_head * (cfg.n_embd // cfg.n_head) * context * dtype_bytes
    step_bytes = weights + rows * kv_per_row
    return {"bytes_per_step": step_bytes, "bound_tok_per_s": rows * bandwidth / step_bytes if bandwidth else None}


def measure(engine: Engine, prompt: list[int], rows: int, cfg: BenchInferConfig, device: torch.device) -> dict:
    time_decode(engine, prompt, rows, cfg, device)  # warm-up: graph capture (and compilation) for this shape
    runs = [time_decode(engine, prompt, rows, cfg, device) for _ in range(cfg.repeats)]
    per_stream = statistics.median(r["tok_per_s_per_stream"] for r in runs)
    dtype_bytes = torch.finfo(engine.plan.torch_dtype).bits // 8
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    result = {"rows": rows, "ttft_ms": statistics.median(r["ttft_ms"] for r in runs),
              "ms_per_step": statistics.median(r["ms_per_step"] for r in runs),
              "tok_per_s_per_stream": per_stream, "tok_per_s": rows * per_stream,
              "tok_per_s_range": [rows * min(r["tok_per_s_per_stream"] for r in runs),
                                  rows * max(r["tok_per_s_per_stream"] for r in runs)],
              **bound(engine.model, rows, cfg.prompt_len + cfg.new_tokens // 2, dtype_bytes, peak_bandwidth(gpu))}
    result["share_of_bound"] = result["tok_per_s"] / result["bound_tok_per_s"] if result["bound_tok_per_s"] else None
    return result


def time_schedule(batch: DecodeBatch, schedule: dict[int, list[Request]], device: torch.device) -> dict:
    """Run the batch with schedule[step] added before that step, until it is idle: time to first token
    (median, from a request's arrival), and ms per step and tokens/s over the steps after the first."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    arrival: dict[int, float] = {}
    first: dict[int, float] = {}
    tokens, step, first_step_end = 0, 0, 0.0
    sync()
    while batch.busy or step <= max(schedule):
        for request in schedule.get(step, []):
            arrival[batch.add(request)] = time.perf_counter()
        out = batch.step()  # reads the step's tokens on the host: the step is over when it returns
        now = time.perf_counter()
        for rid in out:
            first.setdefault(rid, now)
        if step == 0:
            first_step_end = now
        else:
            tokens += len(out)
        step += 1
    sync()
    decode = time.perf_counter() - first_step_end
    return {"ttft_ms": 1000 * statistics.median(first[rid] - arrival[rid] for rid in arrival),
            "ms_per_step": 1000 * decode / max(step - 1, 1), "tok_per_s": tokens / decode, "steps": step}


def median_run(batch: DecodeBatch, schedule: dict[int, list[Request]], cfg: BenchInferConfig, device: torch.device) -> dict:
    """The run with the median tokens/s of --repeats, after one untimed run."""
    time_schedule(batch, schedule, device)
    runs = sorted((time_schedule(batch, schedule, device) for _ in range(cfg.repeats)), key=lambda r: r["tok_per_s"])
    return runs[len(runs) // 2]


def serve_path(engine: Engine, prompt: list[int], sizes: list[int], cfg: BenchInferConfig, device: torch.device) -> dict:
    """The served decode path alone: one DecodeBatch as a replica runs it, greedy and sampled side
    by side at each row count, then requests joining and leaving."""
    engine.stop_ids = set()  # decode the full length on every row
    new = cfg.new_tokens
    # room for a request that joins while one that started up to `new` steps earlier still decodes
    batch = DecodeBatch(engine, slots=max(sizes), capacity=len(prompt) + 2 * new)
    batch.warm_up()
    greedy = dict(temperature=0.0, top_k=None)
    sampled = dict(temperature=cfg.sampled_temperature, top_k=cfg.sampled_top_k or None)
    results = []
    for rows in sizes:
        runs = {name: median_run(batch, {0: [Request(prompt, new, seed=r, **settings) for r in range(rows)]}, cfg, device)
                for name, settings in (("greedy", greedy), ("sampled", sampled))}
        results.append({"rows": rows, **runs, "sampled_over_greedy": runs["sampled"]["tok_per_s"] / runs["greedy"]["tok_per_s"]})
    arrivals = 2 * max(sizes)
    schedule = {i * cfg.stagger: [Request(prompt, max(1, new * (1 + i % 4) // 4), seed=i, **sampled)] for i in range(arrivals)}
    return {"slots": max(sizes), "sampled": sampled, "results": results,
            "join_and_leave": {"requests": arrivals, "stagger": cfg.stagger, **median_run(batch, schedule, cfg, device)}}


def print_serve_path(served: dict) -> None:
    s = served["sampled"]
    print(f"served decode path (DecodeBatch, {served['slots']} slots), greedy | sampled at temperature "
          f"{s['temperature']}, top-k {s['top_k']}:")

    def figures(r: dict) -> str:
        return f"{r['ms_per_step']:6.2f} ms/step {r['tok_per_s']:10,.0f} tok/s first token {r['ttft_ms']:7.1f} ms"

    for r in served["results"]:
        print(f"rows {r['rows']:>3}: {figures(r['greedy'])} | {figures(r['sampled'])} | "
              f"sampled/greedy {r['sampled_over_greedy']:.2f}")
    j = served["join_and_leave"]
    print(f"join and leave ({j['requests']} sampled requests, one every {j['stagger']} steps): {figures(j)}")


def profile_step(engine: Engine, prompt: list[int]) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    steps = engine.generate(prompt, 1, max_tokens=8, temperature=0.0)
    next(steps)
    next(steps)
    with profile(activities=activities) as prof:
        next(steps)
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15)


def batch_sizes(cfg: BenchInferConfig) -> list[int]:
    """--num-samples as numbers; a bad list or --repeats is refused before any model is built."""
    sizes = row_counts(cfg.num_samples, "--num-samples", "1,32")
    if cfg.repeats < 1:
        raise SystemExit(f"--repeats {cfg.repeats}: at least one timed run is needed")
    return sizes


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(BenchInferConfig, argv, description=__doc__.splitlines()[0])
    sizes = batch_sizes(cfg)
    device, plan = init_process(cfg)
    model = load(cfg, device)
    engine = Engine(model, _NoStopTokenizer(model.config.vocab_size), plan, decode=cfg.decode)
    print(plan.summary())
    print(f"decode: {engine.decoder.mode}{' + torch.compile' if engine.decoder.compile else ''}")
    g = torch.Generator().manual_seed(cfg.seed)
    prompt = torch.randint(0, engine.tokenizer.bos_token_id, (cfg.prompt_len,), generator=g).tolist()
    results = [measure(engine, prompt, rows, cfg, device) for rows in sizes]
    for r in results:
        share = f" | {100 * r['share_of_bound']:.1f}% of the bandwidth bound" if r["share_of_bound"] else ""
        print(f"rows {r['rows']:>3}: first token {r['ttft_ms']:7.1f} ms | {r['ms_per_step']:6.2f} ms/step | "
              f"{r['tok_per_s_per_stream']:8,.0f} tok/s per stream | {r['tok_per_s']:10,.0f} tok/s in all{share}")
    served = serve_path(engine, prompt, sizes, cfg, device)
    print_serve_path(served)
    if cfg.profile:
        print(profile_step(engine, prompt))
    out = {"plan": plan.to_dict(), "depth": model.config.n_layer, "params": model.num_params(), "decode": engine.decoder.mode,
           "compile": engine.decoder.compile, "prompt_len": cfg.prompt_len, "new_tokens": cfg.new_tokens,
           "temperature": cfg.temperature, "torch": torch.__version__, "results": results, "serve_path": served}
    write_json(cfg.out, out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
