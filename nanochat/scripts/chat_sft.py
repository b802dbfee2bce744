"""Supervised fine-tuning: the mid-trained model on whole conversations, one per row.

    python -m nanochat.scripts.chat_sft --depth 12           # from runs/mid_d12, writes runs/sft_d12
    NANOCHAT_EMULATE=p100 python -m nanochat.scripts.chat_sft --depth 12
    python -m nanochat.scripts.chat_sft --depth 12 --mixture "identity:300,jsonl=/data/my_chats.jsonl"
    # on a Ray cluster: python -m ray_jobs.train --stage sft --depth 12 --num-workers 8

Unlike mid-training, each conversation gets its own row (padded, never cut across rows), the
learning rates start at 2% of the base ones and decay linearly to zero (upstream nanochat's SFT
schedule). fp16 devices use the same GradScaler step as base training.
"""

from nanochat.errors import run_main
from nanochat.train.stages import run_plain


def main(argv: list[str] | None = None) -> dict:
    return run_plain("sft", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    run_main(main)
