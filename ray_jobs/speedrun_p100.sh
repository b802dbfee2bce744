#!/usr/bin/env bash
# The whole nanochat pipeline on one P100 (works on any GPU, or the CPU) inside a time budget:
# shards -> tokenizer -> base (depth 12) -> base eval -> mid -> SFT -> chat eval -> report card.
#
#   NANOCHAT_TIME_BUDGET=10h bash ray_jobs/speedrun_p100.sh
#   # submitted to the Ray head on this GPU machine (RAY_AUTH_MODE=token: see docs/cluster.md)
#   RAY_AUTH_MODE=token ray job submit --working-dir . -- bash ray_jobs/speedrun_p100.sh
#   # a cluster whose GPUs are on worker nodes; pinned to an fp16 node (P100/V100/T4) of a mixed one:
#   ray job submit --working-dir . --entrypoint-num-gpus 1 -- bash ray_jobs/speedrun_p100.sh
#   ray job submit --working-dir . --entrypoint-num-gpus 1 \
#       --entrypoint-label-selector '{"nanochat/precision": "fp16"}' -- bash ray_jobs/speedrun_p100.sh
#   # no GPU: ray_jobs/speedrun_cpu.sh, the same pipeline at a tiny size
#
# Rerunning it skips finished stages and resumes an interrupted training stage from its checkpoint.
# Settings are NANOCHAT_* environment variables (NANOCHAT_DEPTH, NANOCHAT_DATA, NANOCHAT_RUN, ...) or the same as flags:
# `python -m ray_jobs.speedrun --help` lists them; the budget split lives there too.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python}"

# Without NANOCHAT_DEVICE / --device this is a GPU run. On a node without a GPU (a CPU machine, or the
# head node that `ray job submit` without --entrypoint-num-gpus runs this on) refuse at once, rather
# than train depth 12 on its CPU for the whole budget. (Asking Ray for a GPU instead would leave the
# job PENDING on a cluster that has none.)
gpu_run() {
    [[ -z "${NANOCHAT_DEVICE:-}" ]] || return 1
    local arg
    for arg in "$@"; do
        [[ "$arg" == --device* || "$arg" == -h || "$arg" == --help ]] && return 1
    done
    return 0
}
if gpu_run "$@"; then
    "$python" - <<'EOF'
import socket
import sys

from nanochat.common import default_device

if default_device().type == "cpu":
    print(f"error: ray_jobs/speedrun_p100.sh found no GPU on {socket.gethostname()}. On a CPU machine run "
          "ray_jobs/speedrun_cpu.sh (the same pipeline, tiny); with `ray job submit` to a cluster whose GPUs are "
          "on other nodes add --entrypoint-num-gpus 1; NANOCHAT_DEVICE=cpu runs this recipe on the CPU anyway",
          file=sys.stderr)
    sys.exit(2)
EOF
fi
exec "$python" -m ray_jobs.speedrun "$@"
