"""Inference speed of the Engine: prefill time and decode tokens/s at several batch sizes.

    python -m nanochat.scripts.bench_infer --depth 12                      # random weights, auto dtype
    NANOCHAT_EMULATE=p100 python -m nanochat.scripts.bench_infer --depth 12
    python -m nanochat.scripts.bench_infer --checkpoint $NANOCHAT_BASE_DIR/runs/sft_d12 --profile

Speed does not depend on the weights, so without --checkpoint a freshly initialized model of the
given depth is timed. Every row decodes exactly --new-tokens tokens (stop tokens are not honoured
here) so that runs are comparable. --profile adds the top CUDA/CPU ops of one decode step.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass

import torch

from nanochat import checkpoint
from nanochat.common import init_process
from nanochat.config import CommonConfig, option, parse_config
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS


@dataclass
class BenchInferConfig(CommonConfig):
    depth: int = option(12, "depth of the random-weight model (ignored with --checkpoint)")
    vocab_size: int = option(32768, "vocabulary of the random-weight model")
    checkpoint: str = option("", "time a trained model instead (step dir, checkpoint root or run dir)")
    prompt_len: int = option(256, "prompt tokens (prefilled once, then shared by every row)")
    new_tokens: int = option(128, "tokens decoded per row")
    num_samples: str = option("1,8,32", "comma-separated batch sizes (rows decoded together)")
    profile: bool = option(False, "print the top ops of one batch-1 decode step (torch.profiler)")


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


def time_decode(engine: Engine, prompt: list[int], rows: int, new_tokens: int, device: torch.device) -> dict:
    engine.stop_ids = set()  # decode the full length on every row
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    steps = engine.generate(prompt, rows, max_tokens=new_tokens, temperature=1.0, top_k=50)
    next(steps)  # the first token comes out of the prefill
    sync()
    first = time.perf_counter() - t0
    count = sum(1 for _ in steps)
    sync()
    decode = time.perf_counter() - t0 - first
    return {"rows": rows, "time_to_first_token_ms": 1000 * first, "decode_ms_per_step": 1000 * decode / max(count, 1),
            "decode_tok_per_s": rows * count / decode if decode else None}


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


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(BenchInferConfig, argv, description=__doc__.splitlines()[0])
    device, plan = init_process(cfg)
    model = load(cfg, device)
    engine = Engine(model, _NoStopTokenizer(model.config.vocab_size), plan)
    print(plan.summary())
    prompt = torch.randint(0, engine.tokenizer.bos_token_id, (cfg.prompt_len,)).tolist()
    time_decode(engine, prompt, 1, 8, device)  # warm-up: CUDA context, kernels, allocator
    results = [time_decode(engine, prompt, int(n), cfg.new_tokens, device) for n in cfg.num_samples.split(",")]
    for r in results:
        print(f"rows {r['rows']:>3}: first token {r['time_to_first_token_ms']:7.1f} ms | "
              f"decode {r['decode_ms_per_step']:6.2f} ms/step | {r['decode_tok_per_s']:10,.0f} tok/s")
    if cfg.profile:
        print(profile_step(engine, prompt))
    out = {"plan": plan.to_dict(), "params": model.num_params(), "prompt_len": cfg.prompt_len, "results": results}
    print("summary:", json.dumps(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
