#!/usr/bin/env bash
# MLflow tracking server for a team: runs, metrics and registered models in PostgreSQL,
# artifacts (checkpoints, figures) in an S3-compatible object store, proxied by the server.
#
#   infra/mlflow/mlflow-server.sh start --backend-store-uri postgresql://USER:PASS@HOST:5432/mlflow \
#                                       --artifacts-destination s3://BUCKET/mlartifacts \
#                                       [--home DIR] [--host 127.0.0.1] [--port 5000] [--workers 4] \
#                                       [--auth] [--allowed-hosts HOSTS]
#   infra/mlflow/mlflow-server.sh stop [--home DIR]
#
# Each option may also come from the environment: MLFLOW_BACKEND_STORE_URI,
# MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_HOST, MLFLOW_PORT, MLFLOW_WORKERS.
#
#   --home DIR   the server's own files (default ./.mlflow-team): server.log, server.json
#                ({pid, port, uri, started}: `segtune server stop --home DIR` reads it too),
#                basic_auth.ini when --auth is on.
#   --host       127.0.0.1 unless you say otherwise. Binding 0.0.0.0 exposes the server to the
#                network: do it only with --auth (or behind an authenticating proxy), and list
#                the names clients use in --allowed-hosts (MLflow rejects other Host headers).
#   --workers    uvicorn worker processes; PostgreSQL takes concurrent writers from all of them.
#
# Artifacts are proxied (`mlflow-artifacts:/` URIs): only this server needs bucket credentials
# (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or an instance role) and, for MinIO / Ceph / moto,
# MLFLOW_S3_ENDPOINT_URL=http://host:9000. Trials on Ray nodes need nothing but the tracking URI.
#
# --auth turns on MLflow's basic-auth app (`--app-name basic-auth`): every request needs a user
# and password; clients set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (on every Ray
# node too, e.g. in the cluster's env). The admin password must be given in
# MLFLOW_AUTH_ADMIN_PASSWORD, at least 12 characters and not a well-known default; it is set the
# first time the auth store is created (rotate it later with MLflow's update-password API).
# The users live in MLFLOW_AUTH_DATABASE_URI (default sqlite:///HOME/basic_auth.db; use a second
# PostgreSQL database, not the tracking one, as both keep an `alembic_version` table).
#
# MLFLOW (env) names the mlflow executable (default: .venv/bin/mlflow, else mlflow on PATH).
# The server needs `psycopg2-binary` and `boto3` installed beside MLflow.
set -euo pipefail

cmd="${1:-}"
[[ -n "$cmd" ]] && shift
home=".mlflow-team"
backend="${MLFLOW_BACKEND_STORE_URI:-}"
artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-}"
host="${MLFLOW_HOST:-127.0.0.1}"
port="${MLFLOW_PORT:-5000}"
workers="${MLFLOW_WORKERS:-4}"
auth=0
allowed_hosts=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --home) home="$2"; shift 2 ;;
    --backend-store-uri) backend="$2"; shift 2 ;;
    --artifacts-destination) artifacts="$2"; shift 2 ;;
    --host) host="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --auth) auth=1; shift ;;
    --allowed-hosts) allowed_hosts="$2"; shift 2 ;;
    *) echo "unknown option: $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
mlflow="${MLFLOW:-}"
if [[ -z "$mlflow" ]]; then
  if [[ -x "$repo/.venv/bin/mlflow" ]]; then mlflow="$repo/.venv/bin/mlflow"; else mlflow="mlflow"; fi
fi

stop() {
  [[ -f "$home/server.json" ]] || { echo "no server recorded in $home"; return 0; }
  local pid
  pid="$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$home/server.json")"
  if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q mlflow; then
    kill -TERM -- "-$pid" 2>/dev/null || true   # the server's process group: uvicorn workers too
    for _ in $(seq 75); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    echo "stopped the MLflow server (process group $pid)"
  fi
  rm -f "$home/server.json"
}

case "$cmd" in
  start) ;;
  stop) stop; exit 0 ;;
  *) echo "usage: $0 start|stop [options]  (see the header of $0)" >&2; exit 2 ;;
esac

[[ -n "$backend" ]] || { echo "--backend-store-uri (or MLFLOW_BACKEND_STORE_URI) is required, e.g. postgresql://mlflow:PASS@127.0.0.1:5432/mlflow" >&2; exit 2; }
[[ -n "$artifacts" ]] || { echo "--artifacts-destination (or MLFLOW_ARTIFACTS_DESTINATION) is required, e.g. s3://bucket/mlartifacts" >&2; exit 2; }
mkdir -p "$home"
home="$(cd "$home" && pwd)"

if [[ "$host" != "127.0.0.1" && "$host" != "localhost" && "$host" != "::1" && "$auth" != 1 ]]; then
  echo "warning: binding $host without --auth: anyone who reaches port $port can read and change every run." >&2
fi

args=(server --host "$host" --port "$port" --workers "$workers"
      --backend-store-uri "$backend" --artifacts-destination "$artifacts" --serve-artifacts)
[[ -n "$allowed_hosts" ]] && args+=(--allowed-hosts "$allowed_hosts")

if [[ "$auth" == 1 ]]; then
  pw="${MLFLOW_AUTH_ADMIN_PASSWORD:-}"
  case "${pw,,}" in
    "" ) echo "--auth needs MLFLOW_AUTH_ADMIN_PASSWORD (12+ characters) for the admin user." >&2; exit 2 ;;
    password|password1234|admin|admin1234|changeme|mlflow|mlflow1234) \
      echo "MLFLOW_AUTH_ADMIN_PASSWORD is a well-known default; choose another." >&2; exit 2 ;;
  esac
  if [[ ${#pw} -lt 12 ]]; then
    echo "MLFLOW_AUTH_ADMIN_PASSWORD must have at least 12 characters." >&2; exit 2
  fi
  auth_db="${MLFLOW_AUTH_DATABASE_URI:-sqlite:///$home/basic_auth.db}"
  # The password stays in the environment; the ini file holds no secret.
  (umask 077; cat >"$home/basic_auth.ini" <<EOF
[mlflow]
default_permission = READ
database_uri = $auth_db
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
  )
  export MLFLOW_AUTH_CONFIG_PATH="$home/basic_auth.ini"
  # The auth app signs CSRF tokens with this key; all workers (and restarts) must share it.
  if [[ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]]; then
    if [[ ! -s "$home/flask_secret_key" ]]; then
      (umask 077; od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$home/flask_secret_key")
    fi
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$home/flask_secret_key")"
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
  args+=(--app-name basic-auth)
fi

client_host="$host"
[[ "$host" == "0.0.0.0" || "$host" == "::" ]] && client_host="127.0.0.1"
uri="http://$client_host:$port"
if curl -fsS -m 2 "$uri/health" >/dev/null 2>&1; then
  echo "A server already answers at $uri; not starting another." >&2
  exit 1
fi

# MLflow 3.x otherwise starts ~7 huey consumers for GenAI jobs that segtune never submits.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
setsid "$mlflow" "${args[@]}" >>"$home/server.log" 2>&1 </dev/null &
pid=$!
printf '{"pid": %d, "port": %d, "uri": "%s", "started": "%s"}\n' \
  "$pid" "$port" "$uri" "$(date -u +%Y-%m-%dT%H:%M:%S+00:00)" >"$home/server.json"

for _ in $(seq 240); do
  if curl -fsS -m 2 "$uri/health" >/dev/null 2>&1; then
    echo "MLflow server (pid $pid) at $uri: runs in ${backend%%://*}, artifacts in $artifacts$([[ $auth == 1 ]] && echo ', basic auth on')"
    exit 0
  fi
  kill -0 "$pid" 2>/dev/null || break
  sleep 0.5
done
echo "MLflow server did not become healthy at $uri; tail of $home/server.log:" >&2
tail -n 30 "$home/server.log" >&2
stop >/dev/null
exit 1
