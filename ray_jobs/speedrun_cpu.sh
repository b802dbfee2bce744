#!/usr/bin/env bash
# The whole pipeline of speedrun_p100.sh, tiny, on the CPU: the demo's model size (depth 4, 128-token
# context, 2048-token vocabulary) in 5 minutes, so every stage and the report card can be seen on a
# laptop or a CPU-only Ray cluster before a GPU runs the real thing.
#
#   bash ray_jobs/speedrun_cpu.sh
#   RAY_AUTH_MODE=token ray job submit --working-dir . -- bash ray_jobs/speedrun_cpu.sh
#   NANOCHAT_TIME_BUDGET=15m NANOCHAT_DEPTH=6 bash ray_jobs/speedrun_cpu.sh     # bigger
#
# (RAY_AUTH_MODE=token: when ~/.ray/auth_token exists, see docs/cluster.md.) Every NANOCHAT_* setting
# of speedrun_p100.sh still applies and wins over these defaults, and so do flags
# (`python -m ray_jobs.speedrun --help`).
set -euo pipefail
export NANOCHAT_DEVICE="${NANOCHAT_DEVICE:-cpu}" NANOCHAT_DEPTH="${NANOCHAT_DEPTH:-4}"
export NANOCHAT_SEQ_LEN="${NANOCHAT_SEQ_LEN:-128}" NANOCHAT_VOCAB="${NANOCHAT_VOCAB:-2048}"
export NANOCHAT_DEVICE_BATCH="${NANOCHAT_DEVICE_BATCH:-8}" NANOCHAT_TOTAL_BATCH="${NANOCHAT_TOTAL_BATCH:-1024}"
export NANOCHAT_TIME_BUDGET="${NANOCHAT_TIME_BUDGET:-5m}"
# a folder of its own: a later GPU speedrun must not take these stages for its own finished ones
export NANOCHAT_RUN="${NANOCHAT_RUN:-${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}/speedrun_cpu}"
exec bash "$(dirname "${BASH_SOURCE[0]}")/speedrun_p100.sh" "$@"
