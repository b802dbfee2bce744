#!/usr/bin/env bash
# The whole nanochat pipeline on one P100 (works on any GPU, or the CPU) inside a time budget:
# shards -> tokenizer -> base (depth 12) -> base eval -> mid -> SFT -> chat eval -> report card.
#
#   NANOCHAT_TIME_BUDGET=10h bash ray_jobs/speedrun_p100.sh
#   ray job submit --working-dir . --entrypoint-num-gpus 1 -- bash ray_jobs/speedrun_p100.sh
#   # pinned to an fp16 node (P100/V100/T4) of a mixed cluster:
#   ray job submit --working-dir . --entrypoint-num-gpus 1 \
#       --entrypoint-label-selector '{"nanochat/precision": "fp16"}' -- bash ray_jobs/speedrun_p100.sh
#
# Rerunning it skips finished stages and resumes an interrupted training stage from its checkpoint.
# Settings are NANOCHAT_* environment variables (NANOCHAT_DEPTH, NANOCHAT_DATA, NANOCHAT_RUN, ...) or the same as flags:
# `python -m ray_jobs.speedrun --help` lists them; the budget split lives there too.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
exec "${PYTHON:-python}" -m ray_jobs.speedrun "$@"
