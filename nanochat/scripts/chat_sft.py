"""Supervised fine-tuning: the mid-trained model on whole conversations, one per row.

    python -m nanochat.scripts.chat_sft --depth 12           # from runs/mid_d12, writes runs/sft_d12
    NANOCHAT_EMULATE=p100 python -m nanochat.scripts.chat_sft --depth 12
    python -m nanochat.scripts.chat_sft --depth 12 --mixture "identity:300,jsonl=/data/my_chats.jsonl"
    # on a Ray cluster: python -m ray_jobs.train --stage sft --depth 12 --num-workers 8

Unlike mid-training, each conversation gets its own row (padded, never cut across rows), the
learning rates start at 2% of the base ones and decay linearly to zero (upstream nanochat's SFT
schedule). fp16 devices use the same GradScaler step as base training.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import ClassVar

import torch

from nanochat.common import default_device
from nanochat.config import option, parse_config
from nanochat.finetune import FinetuneConfig, make_batches, setup  # noqa: F401  (ray_jobs.train runs these)
from nanochat.finetune import main as finetune_main
from nanochat.scripts.base_train import train  # noqa: F401  (the loop every training stage shares)
from nanochat.tasks import SFT_MIXTURE


@dataclass
class ChatSFTConfig(FinetuneConfig):
    STAGE: ClassVar[str] = "sft"
    PREVIOUS: ClassVar[str] = "mid"
    PACK: ClassVar[bool] = False

    mixture: str = option(SFT_MIXTURE, "conversation mixture (see nanochat/tasks): name[:count],...,jsonl=PATH")
    device_batch_size: int = option(8, "conversations per forward/backward (one per row, padded)")
    total_batch_size: int = option(-1, "tokens per optimizer step (rows x seq len); -1 = one micro-batch")
    init_lr_frac: float = option(0.02, "learning rates as a fraction of the base ones")
    warmdown_ratio: float = option(1.0, "fraction of steps of linear lr decay (1.0: from the first step to zero)")
    eval_every: int = option(100, "evaluate the held-out loss every N steps (and at the end)")


Config = ChatSFTConfig  # the name ray_jobs/train.py looks up in every stage module


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(ChatSFTConfig, argv, description=__doc__.splitlines()[0])
    return finetune_main(cfg, torch.device(cfg.device or default_device()))


if __name__ == "__main__":
    main(sys.argv[1:])
