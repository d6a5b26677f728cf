#!/usr/bin/env bash
# Start a local MLflow tracking server for segtune, the shell twin of
# tracking.server.start_server:
#
#   infra/local/mlflow-server.sh [HOME] [PORT]
#
#   HOME  directory for the server's data (default: ./.mlflow-server)
#           mlflow.db      SQLite store of experiments, runs and registered models
#           mlartifacts/   artifacts, uploaded through the server (mlflow-artifacts:/)
#           server.log     the server's output
#           server.json    {pid, port, uri, started}: what `segtune server stop` reads
#   PORT  TCP port on 127.0.0.1 (default: 5000)
#
# The server binds to 127.0.0.1 only; from another machine use an SSH tunnel:
#   ssh -L PORT:127.0.0.1:PORT this-host      then open http://127.0.0.1:PORT
# Stop it with `segtune server stop`, or: kill -TERM -- -"$(jq .pid HOME/server.json)"
# (the negative pid signals the server's whole process group, its uvicorn worker too).
#
# MLFLOW (env) names the mlflow executable (default: mlflow next to .venv/bin/python,
# else mlflow on PATH).
set -euo pipefail

home="${1:-.mlflow-server}"
port="${2:-5000}"
mkdir -p "$home"
home="$(cd "$home" && pwd)"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
mlflow="${MLFLOW:-}"
if [[ -z "$mlflow" ]]; then
  if [[ -x "$repo/.venv/bin/mlflow" ]]; then mlflow="$repo/.venv/bin/mlflow"; else mlflow="mlflow"; fi
fi

uri="http://127.0.0.1:$port"
if curl -fsS -m 2 "$uri/health" >/dev/null 2>&1; then
  echo "A server already answers at $uri; not starting another." >&2
  exit 0
fi

# MLflow 3.x otherwise starts ~7 huey job consumers (GenAI jobs segtune never submits).
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

# setsid: own session and process group, so stopping the group stops every worker.
setsid "$mlflow" server \
  --host 127.0.0.1 \
  --port "$port" \
  --backend-store-uri "sqlite:///$home/mlflow.db" \
  --artifacts-destination "$home/mlartifacts" \
  --workers 1 \
  >>"$home/server.log" 2>&1 </dev/null &
pid=$!
printf '{"pid": %d, "port": %d, "uri": "%s", "started": "%s"}\n' \
  "$pid" "$port" "$uri" "$(date -u +%Y-%m-%dT%H:%M:%S+00:00)" >"$home/server.json"

for _ in $(seq 120); do
  if curl -fsS -m 2 "$uri/health" >/dev/null 2>&1; then
    echo "MLflow server (pid $pid) at $uri, data in $home"
    exit 0
  fi
  if ! kill -0 "$pid" 2>/dev/null; then break; fi
  sleep 0.5
done

echo "MLflow server did not become healthy at $uri; tail of $home/server.log:" >&2
tail -n 30 "$home/server.log" >&2
kill -TERM -- "-$pid" 2>/dev/null || true
rm -f "$home/server.json"
exit 1
