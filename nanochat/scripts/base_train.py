"""Pretrain the base GPT on parquet shards (single process: one GPU or the CPU).

    # a GPU node (dtype picked per device: bf16 on A100/H100, fp16+GradScaler on P100/V100/T4)
    python -m nanochat.scripts.base_train --depth 12
    # the P100 path on any modern GPU (fp16, no compile, 16 GB cap)
    NANOCHAT_EMULATE=p100 python -m nanochat.scripts.base_train --depth 12 --device-batch-size 16
    # a tiny CPU run
    python -m nanochat.scripts.base_train --depth 2 --max-seq-len 128 --device-batch-size 8 \
        --total-batch-size 1024 --num-iterations 300 --eval-every 100
    # on a Ray cluster (any number of GPUs of one precision group): see ray_jobs/train.py

Needs shards (python -m nanochat.dataset build) and a tokenizer (python -m nanochat.scripts.tok_train).
Writes checkpoints, metrics.jsonl and summary.json under --run-dir.

The stage lives in nanochat/train/base.py (setup, evaluation) and nanochat/train/loop.py (the loop);
this script feeds them the plain loader and local checkpoints, ray_jobs/train.py Ray Data and Ray Train.
"""

from nanochat.errors import run_main
from nanochat.train.stages import run_plain


def main(argv: list[str] | None = None) -> dict:
    return run_plain("base", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    run_main(main)
