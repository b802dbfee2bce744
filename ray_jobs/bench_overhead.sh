#!/usr/bin/env bash
# Ray's overhead on one GPU: the plain base_train and ray_jobs.train with one worker, same flags, one
# after the other on this machine, then tokens/s, data wait and the ratio of the two. The README's
# "Ray overhead" table comes from it.
#
#   bash ray_jobs/bench_overhead.sh                          # depth 12, bf16 (auto), 40 steps
#   NANOCHAT_EMULATE=p100 bash ray_jobs/bench_overhead.sh --device-batch-size 8 --total-batch-size 131072
#
# Extra arguments go to both runs. Shards and a tokenizer must exist (python -m nanochat.dataset build,
# python -m nanochat.scripts.tok_train); the runs write under $NANOCHAT_BASE_DIR/bench_overhead.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}/bench_overhead/$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
args=(--depth 12 --device-batch-size 32 --num-iterations 40 --eval-every -1 --eval-tokens 524288
      --sample-every -1 --save-every -1 "$@")
python -m nanochat.scripts.base_train "${args[@]}" --run-dir "$out/plain" | tee "$out/plain.log"
python -m ray_jobs.train "${args[@]}" --num-workers 1 --storage-path "$out/ray" | tee "$out/ray.log"
python - "$out/plain.log" "$out/ray.log" <<'PY'
import json, sys

def summary(path: str) -> dict:
    line = [line for line in open(path) if line.startswith("summary:")][-1]
    return json.loads(line.split("summary:", 1)[1])

plain, ray = (summary(path) for path in sys.argv[1:3])
print(f"plain {plain['tok_per_s']:,.0f} tok/s (data wait {plain['data_wait_frac']:.2%}), "
      f"ray 1 worker {ray['tok_per_s']:,.0f} tok/s (data wait {ray['data_wait_frac']:.2%}), "
      f"ratio {ray['tok_per_s'] / plain['tok_per_s']:.4f}")
PY
