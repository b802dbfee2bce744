"""Mid-training: teach the base model the chat format, tool use and multiple choice.

    python -m nanochat.scripts.mid_train --depth 12          # from runs/base_d12, writes runs/mid_d12
    NANOCHAT_EMULATE=p100 python -m nanochat.scripts.mid_train --depth 12 --device-batch-size 8
    python -m nanochat.scripts.mid_train --depth 12 --mixture "identity:500,arithmetic:5000,jsonl=/data/chats.jsonl"
    # on a Ray cluster: python -m ray_jobs.train --stage mid --depth 12 --num-workers 8

Conversations (nanochat/tasks: synthetic identity, calculator word problems, spelling, MMLU's
auxiliary splits, your own jsonl) are packed into full rows and trained at the base learning
rates, with the loss on assistant tokens only. fp16 devices use the same GradScaler step as base
training. --num-iterations -1 = --num-epochs passes over the mixture.
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
from nanochat.tasks import MID_MIXTURE


@dataclass
class MidTrainConfig(FinetuneConfig):
    STAGE: ClassVar[str] = "mid"
    PREVIOUS: ClassVar[str] = "base"
    PACK: ClassVar[bool] = True

    mixture: str = option(MID_MIXTURE, "conversation mixture (see nanochat/tasks): name[:count],...,jsonl=PATH")


Config = MidTrainConfig  # the name ray_jobs/train.py looks up in every stage module


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(MidTrainConfig, argv, description=__doc__.splitlines()[0])
    return finetune_main(cfg, torch.device(cfg.device or default_device()))


if __name__ == "__main__":
    main(sys.argv[1:])
