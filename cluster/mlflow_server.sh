#!/usr/bin/env bash
# Start the MLflow tracking server that a cluster's runs log to, on the head node.
#
#   cluster/mlflow_server.sh [--host ADDRESS] [--port 5000] [mlflow server args]
#   NANOCHAT_DRY_RUN=1 cluster/mlflow_server.sh       # print the command only
#
# Jobs then log to it with `--mlflow-uri http://ADDRESS:5000` (printed below). The host defaults to this
# machine's private address (its source address on the default route: what the other nodes reach it by),
# never 0.0.0.0: the server has no login, and anyone who reaches it can read, rewrite and delete every run
# and write artifacts, so it listens only where the cluster is (or pass --host 127.0.0.1 and reach it by
# port-forward). Runs go to a sqlite file on this machine's own disk, $NANOCHAT_MLFLOW_DIR/mlflow.db (default
# ~/mlflow; a shared disk's locks are not reliable), artifacts are uploaded through the server
# (--serve-artifacts) into $NANOCHAT_MLFLOW_DIR/artifacts; --backend-store-uri and --artifacts-destination
# (e.g. gs://bucket/mlflow) override them; PYTHON picks the interpreter (default python3). When a server
# already answers there, it is left running.
set -euo pipefail

dir="${NANOCHAT_MLFLOW_DIR:-$HOME/mlflow}"
host="" port=5000 store="" artifacts="" extra=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --host | -h) host="$2"; shift 2 ;;
        --port | -p) port="$2"; shift 2 ;;
        --backend-store-uri) store="$2"; shift 2 ;;
        --artifacts-destination) artifacts="$2"; shift 2 ;;
        --help)
            sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *) extra+=("$1"); shift ;;
    esac
done

if [[ -z "$host" ]]; then
    host="$(ip route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p')" || true
    if [[ -z "$host" ]]; then
        echo "error: cannot tell this machine's private address (no default route): pass --host ADDRESS" >&2
        exit 2
    fi
fi
if [[ "$host" == 0.0.0.0 || "$host" == "::" ]]; then
    echo "warning: --host ${host} serves runs to every network this machine is on, and the server has no login" >&2
fi
url="http://${host}:${port}"
if curl -sf --max-time 5 "${url}/health" >/dev/null 2>&1; then
    echo "an MLflow tracking server already answers at ${url}: left running"
    echo "log to it with --mlflow-uri ${url}"
    exit 0
fi

start=("${PYTHON:-python3}" -m mlflow server --host "$host" --port "$port"
    --backend-store-uri "${store:-sqlite:///${dir}/mlflow.db}"
    --serve-artifacts --artifacts-destination "${artifacts:-${dir}/artifacts}" "${extra[@]}")
echo "+ ${start[*]}"
echo "log to it with --mlflow-uri ${url}"
if [[ -n "${NANOCHAT_DRY_RUN:-}" ]]; then
    exit 0
fi
mkdir -p "$dir"
# no server-side jobs (MLflow's GenAI evaluations, prompt optimisation): runs and metrics need none, and
# each of their 7 worker processes would import MLflow on the head
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
exec "${start[@]}"
