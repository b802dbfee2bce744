"""Reinforcement learning on problems with a checkable answer (GSM8K-style), as upstream nanochat does it.

    python -m nanochat.scripts.chat_rl --depth 12                    # from runs/sft_d12, writes runs/rl_d12
    NANOCHAT_EMULATE=p100 python -m nanochat.scripts.chat_rl --depth 12 --device-batch-size 4
    python -m nanochat.scripts.chat_rl --depth 12 --task gsm8k_jsonl=/data/gsm8k_train.jsonl
    # on a Ray cluster: python -m ray_jobs.train --stage rl --depth 12 --num-workers 8

Plain on-policy policy gradient (the method: nanochat/train/rl.py); fp16 devices get the same
GradScaler step as every stage. Progress: mean reward per step, greedy pass@1 on held-out problems.
"""

from nanochat.errors import run_main
from nanochat.train.stages import run_plain


def main(argv: list[str] | None = None) -> dict:
    return run_plain("rl", argv, __doc__.splitlines()[0])


if __name__ == "__main__":
    run_main(main)
