"""Start-up of a Ray Data pass: the tokenizing pipeline against token files (tokenize once), side by side.

    python -m ray_jobs.bench_data --data-dir D --tokenizer-dir T                  # a GPU node's CPUs
    python -m ray_jobs.bench_data --data-dir D --tokenizer-dir T --num-cpus 2 --seq-len 256   # a laptop
    ray job submit --working-dir . -- python -m ray_jobs.bench_data --data-dir D --tokenizer-dir T

For each route, `--repeats` passes one after the other on one Ray instance whose worker processes are
up, as a run's later passes and a sweep's later trials meet it: the seconds from building the dataset
to its first batch, and to the end of one epoch. The first pass of a route pays for the processes it
starts (and their imports); the tokenizing route starts its actors again in every pass. The token files are written to a temporary directory first (timed too), so the
data directory is left as it was.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

import ray

from nanochat.config import option, parse_config
from nanochat.dataset import default_data_dir
from nanochat.tokenized import tokenize_shards
from nanochat.tokenizer import Tokenizer, default_tokenizer_dir
from ray_jobs.data import build_dataset, check_shards


@dataclass
class BenchDataConfig:
    data_dir: str = option("", "shards (a dir, URI or URL list); empty = $NANOCHAT_DATA or $NANOCHAT_BASE_DIR/data")
    tokenizer_dir: str = option("", "empty = $NANOCHAT_BASE_DIR/tokenizer")
    seq_len: int = option(2048, "tokens per row")
    batch_size: int = option(8, "rows per batch")
    workers: int = option(2, "tokenizer actors, or token-file tasks at a time")
    repeats: int = option(2, "passes per route on one Ray instance")
    num_cpus: int = option(0, "CPUs of the local Ray instance; 0 = all")


def one_pass(ds, batch_size: int) -> tuple[float, float, int]:
    """(seconds to the first batch, seconds for the pass, batches) of one pass of `ds`."""
    start = time.perf_counter()
    first, batches = 0.0, 0
    for _ in ds.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True):
        if batches == 0:
            first = time.perf_counter() - start
        batches += 1
    return first, time.perf_counter() - start, batches


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(BenchDataConfig, argv, __doc__.split("\n")[0])
    tokenizer_dir = cfg.tokenizer_dir or str(default_tokenizer_dir())
    shards = check_shards(cfg.data_dir or default_data_dir())
    ray.init(address="local", num_cpus=cfg.num_cpus or None, include_dashboard=False)
    # the worker processes ray.init starts are booted before timing, as on a cluster a run or trial joins
    ray.get([ray.remote(num_cpus=1)(lambda: None).remote() for _ in range(int(ray.cluster_resources()["CPU"]))])
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        files = tokenize_shards(shards, Tokenizer.load(tokenizer_dir), tmp)
        print(f"tokenize once: {time.perf_counter() - start:.1f}s for {sum(map(sum, files.counts.values())):,} tokens")
        print(f"{'route':<14}{'pass':>5}{'first batch s':>15}{'pass s':>9}{'batches':>9}")
        for route, token_files in (("token files", files), ("tokenizing", None)):
            for repeat in range(cfg.repeats):
                ds = build_dataset(shards, tokenizer_dir, cfg.seq_len, tokenize_concurrency=cfg.workers,
                                   token_files=token_files)
                ds.context.enable_progress_bars = False
                first, total, batches = one_pass(ds, cfg.batch_size)
                print(f"{route:<14}{repeat + 1:>5}{first:>15.2f}{total:>9.2f}{batches:>9}")
    ray.shutdown()


if __name__ == "__main__":
    main()
