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

from nanochat.errors import run_main
from nanochat.train.stages import run_plain


def main(argv: list[str] | None = None) -> dict:
    return run_plain("mid", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    run_main(main)
