#!/usr/bin/env bash
# Start a Ray node that advertises its precision group as node labels.
#
#   cluster/start_node.sh head   [--mlflow-server] [extra ray start args] # e.g. on the A100 box
#   cluster/start_node.sh worker HEAD_ADDRESS [extra ray start args]     # e.g. on the P100 box
#   NANOCHAT_DRY_RUN=1 cluster/start_node.sh worker 10.0.0.1:6379        # print the command only
#
# The labels come from this machine's own precision probe over all its GPUs (`python -m nanochat.precision
# --labels`; GPUs that need different dtypes get nanochat/precision=mixed, which no group takes),
# e.g. nanochat/precision=fp16,nanochat/gpu=Tesla-P100-PCIE-16GB, so ray_jobs/scheduler.py can keep
# the workers of one model inside one dtype. NANOCHAT_DTYPE and NANOCHAT_EMULATE are honoured like
# everywhere else; PYTHON picks the interpreter (default python3). A node whose Ray or torch is not
# the version the locks pin (requirements.lock, requirements-torch.txt) is refused: install from them
# (docs/cluster.md, section 1), or set NANOCHAT_UNLOCKED=1 to start it anyway. `--mlflow-server` starts
# the cluster's MLflow tracking server beside the head, in the background (cluster/mlflow_server.sh: the
# head's private address, port 5000; its output in $NANOCHAT_MLFLOW_DIR/server.log, default ~/mlflow).
set -euo pipefail

usage() {
    echo "usage:" >&2
    sed -n '4,6p' "$0" | sed 's/^#//' >&2
    echo "(see docs/cluster.md)" >&2
}

role="${1:-}"
[[ $# -gt 0 ]] && shift
case "$role" in
    head)
        start=(ray start --head)
        if [[ "${1:-}" == --mlflow-server ]]; then
            mlflow_server=1
            shift
        fi
        ;;
    worker)
        if [[ $# -lt 1 || "$1" == -* ]]; then
            echo "error: 'worker' needs the head's address (HOST:PORT, as printed by the head's ray start)" >&2
            usage
            exit 2
        fi
        start=(ray start --address "$1")
        shift
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        echo "error: the first argument must be 'head' or 'worker', not '${role}'" >&2
        usage
        exit 2
        ;;
esac

# the probe must import this checkout even when the package is not installed
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
probe() { PYTHONPATH="${repo}${PYTHONPATH:+:${PYTHONPATH}}" "$python" -m nanochat.precision "$@"; }

# A machine set up later than the others may hold another Ray or torch: it would join, and jobs would
# fail on it (or compute differently from the rest of its group) long after it started.
locked="$(sed -n 's/^\(ray\|torch\)==\([^ ;]*\).*/\1 \2/p' "${repo}/requirements.lock" "${repo}/requirements-torch.txt")"
installed="$("$python" -c 'from importlib.metadata import version as v; print("ray", v("ray")); print("torch", v("torch").split("+")[0])')" \
    || installed="no installed ray and torch"
if [[ "$installed" != "$locked" && -z "${NANOCHAT_UNLOCKED:-}" ]]; then
    echo "error: this node has ${installed//$'\n'/, } but the locks pin ${locked//$'\n'/, } (requirements.lock," \
        "requirements-torch.txt): install from them (docs/cluster.md, section 1), or set NANOCHAT_UNLOCKED=1" \
        "to start it anyway" >&2
    exit 1
fi

if ! labels="$(probe --labels)"; then
    echo "error: the precision probe failed (see above); fix NANOCHAT_DTYPE/NANOCHAT_EMULATE or the CUDA setup" >&2
    exit 1
fi
probe
echo "node labels : ${labels}"

start+=(--labels "$labels" "$@")
echo "+ ${start[*]}"
if [[ -n "${mlflow_server:-}" ]]; then
    # the server's command and address first (it refuses a machine without a private address), then the server
    NANOCHAT_DRY_RUN=1 PYTHON="$python" "${repo}/cluster/mlflow_server.sh"
    if [[ -z "${NANOCHAT_DRY_RUN:-}" ]]; then
        mlflow_dir="${NANOCHAT_MLFLOW_DIR:-$HOME/mlflow}"
        mkdir -p "$mlflow_dir"
        PYTHON="$python" nohup "${repo}/cluster/mlflow_server.sh" >>"${mlflow_dir}/server.log" 2>&1 &
        echo "MLflow tracking server starting in the background (log: ${mlflow_dir}/server.log)"
    fi
fi
if [[ -n "${NANOCHAT_DRY_RUN:-}" ]]; then
    exit 0
fi
exec "${start[@]}"
