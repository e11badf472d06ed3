#!/usr/bin/env bash
# `make ui`: the Prefect server and the MLflow UI, both bound to 127.0.0.1, until Ctrl-C.
# Ports: PREFECT_PORT (4200), MLFLOW_PORT (5000). Prefect keeps its database in ./.prefect,
# MLflow reads the pipeline's store sqlite:///<repo>/mlflow.db (artifacts in ./mlartifacts).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
BIN="$ROOT/.venv/bin"
PREFECT_PORT=${PREFECT_PORT:-4200}
MLFLOW_PORT=${MLFLOW_PORT:-5000}
export PREFECT_HOME=${PREFECT_HOME:-$ROOT/.prefect}
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT=false
STORE=${MLFLOW_TRACKING_URI:-sqlite:///$ROOT/mlflow.db}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$PREFECT_PORT" "$MLFLOW_PORT"; do
  if port_busy "$p"; then echo "error: port $p on 127.0.0.1 is already in use (set PREFECT_PORT/MLFLOW_PORT)" >&2; exit 1; fi
done

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

mkdir -p "$PREFECT_HOME"
"$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" >"$PREFECT_HOME/server.log" 2>&1 &
pids+=($!)
"$BIN/mlflow" ui --host 127.0.0.1 --port "$MLFLOW_PORT" --backend-store-uri "$STORE" \
  --default-artifact-root "$ROOT/mlartifacts" >"$PREFECT_HOME/mlflow-ui.log" 2>&1 &
pids+=($!)

wait_up() {  # wait_up NAME URL LOG
  for _ in $(seq 1 120); do
    if curl -fs -o /dev/null "$2"; then return 0; fi
    sleep 1
  done
  echo "error: $1 did not come up on $2; see $3" >&2; exit 1
}
wait_up "Prefect server" "http://127.0.0.1:$PREFECT_PORT/api/health" "$PREFECT_HOME/server.log"
wait_up "MLflow UI" "http://127.0.0.1:$MLFLOW_PORT/health" "$PREFECT_HOME/mlflow-ui.log"

cat <<MSG
Prefect UI : http://127.0.0.1:$PREFECT_PORT
MLflow UI  : http://127.0.0.1:$MLFLOW_PORT   (store $STORE)
In another shell, from $ROOT:
  export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
  .venv/bin/python -m flows.serve          # deployment '$( "$BIN/python" -c 'from dalle.config import load_params; print(load_params().schedule.deployment)' 2>/dev/null || echo dalle-nightly)' with its cron schedule
  .venv/bin/prefect deployment run 'dalle-pipeline/<deployment>'   # a run now
Ctrl-C stops both servers.
MSG
wait -n "${pids[@]}"
