#!/usr/bin/env bash
# A local Ray cluster for segtune: one head and N worker nodes on this machine, each a
# `ray start --block` process in its own process group, with token authentication on.
#
#   infra/local/ray-cluster.sh start [--home DIR] [--port PORT] [--workers N] [--cpus N] [--gpus N]
#                                    [--object-store-mb MB]
#   infra/local/ray-cluster.sh stop  [--home DIR]
#   infra/local/ray-cluster.sh status [--home DIR]
#
#   --home DIR        the cluster's files (default: ./.segtune/ray-cluster):
#                       auth_token     the cluster's token (mode 600), made once and kept, so a
#                                      restart or a node added later uses the same one
#                       cluster.env    `source` it: RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH
#                       head.pid, worker-<i>.pid   the `ray start` pids = their process groups
#                       head.log, worker-<i>.log   what each `ray start` printed
#                       temp_dir       where Ray's session files (and their logs) are
#   --port PORT       the head's GCS port (default 6380); node i's dashboard agent listens on
#                     PORT+1+i. Every other port Ray needs is picked free by Ray itself.
#   --workers N       worker nodes besides the head (default 1)
#   --cpus N / --gpus N   what each node offers to trials (default 1 CPU, 0 GPU). Nodes on one
#                     machine share its cores; the numbers are what Ray schedules against.
#   --object-store-mb MB  each node's object store (default 512; trials pass small objects)
#
# Token authentication (Ray 2.60 turns it on; segtune keeps it on): every process of the
# cluster -- each node, and each driver such as `segtune sweep` -- needs RAY_AUTH_MODE=token
# and the same token, here through RAY_AUTH_TOKEN_PATH=<home>/auth_token. On one machine the
# file is simply shared; on several machines copy it to each node (scp, a Kubernetes Secret,
# the cluster launcher's file_mounts). A process with another token is refused.
#
# Stop: `stop` SIGTERMs each recorded process group (the raylet, GCS and agents with it),
# SIGKILLs what is left after 15 s, workers first. It never runs `ray stop`, which would end
# every Ray process on the machine, other users' included.
#
# RAY (env) names the ray executable (default: ray next to .venv/bin/python, else on PATH).
set -euo pipefail

cmd="${1:-}"
[[ -n "$cmd" ]] && shift
home=".segtune/ray-cluster"; port=6380; workers=1; cpus=1; gpus=0; store_mb=512
while [[ $# -gt 0 ]]; do
  case "$1" in
    --home) home="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --workers) workers="$2"; shift 2 ;;
    --cpus) cpus="$2"; shift 2 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --object-store-mb) store_mb="$2"; shift 2 ;;
    *) echo "unknown option: $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ray="${RAY:-}"
if [[ -z "$ray" ]]; then
  if [[ -x "$repo/.venv/bin/ray" ]]; then ray="$repo/.venv/bin/ray"; else ray="ray"; fi
fi

# True if pid is alive and still a `ray start` (a recorded pid may have been reused).
is_ray_start() {
  local pid="$1"
  kill -0 "$pid" 2>/dev/null || return 1
  [[ -r "/proc/$pid/cmdline" ]] || return 0
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "ray start"
}

# True while a live (non-zombie) process is left in process group $1.
group_alive() {
  local pgid="$1" f line rest
  [[ -d /proc/self ]] || { kill -0 -- "-$pgid" 2>/dev/null; return; }
  for f in /proc/[0-9]*/stat; do
    read -r line 2>/dev/null <"$f" || continue
    rest="${line##*) }"          # fields after the command name: state ppid pgrp ...
    read -r state _ pgrp _ <<<"$rest"
    [[ "$state" != Z && "$pgrp" == "$pgid" ]] && return 0
  done
  return 1
}

stop_one() {
  local pidfile="$1" pid
  [[ -f "$pidfile" ]] || return 0
  pid="$(cat "$pidfile")"
  if is_ray_start "$pid"; then
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 75); do group_alive "$pid" || break; sleep 0.2; done
    if group_alive "$pid"; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
    echo "stopped $(basename "$pidfile" .pid) (process group $pid)"
  fi
  rm -f "$pidfile"
}

stop_all() {
  local f
  for f in "$home"/worker-*.pid; do [[ -e "$f" ]] && stop_one "$f"; done
  stop_one "$home/head.pid"
  if [[ -f "$home/temp_dir" ]]; then rm -rf "$(cat "$home/temp_dir")"; rm -f "$home/temp_dir"; fi
}

# Start one `ray start --block` in its own session (setsid: pid = process group id).
start_node() {
  local name="$1"; shift
  setsid "$ray" start --block "$@" >"$home/$name.log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid" >"$home/$name.pid"
  for _ in $(seq 240); do
    if grep -q "Ray runtime started" "$home/$name.log" 2>/dev/null; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 0.25
  done
  echo "$name did not start; tail of $home/$name.log:" >&2
  tail -n 30 "$home/$name.log" >&2
  return 1
}

case "$cmd" in
  start)
    mkdir -p "$home"
    home="$(cd "$home" && pwd)"
    if [[ -f "$home/head.pid" ]] && is_ray_start "$(cat "$home/head.pid")"; then
      echo "A cluster from $home is running (head pid $(cat "$home/head.pid")); stop it first." >&2
      exit 1
    fi
    if [[ ! -s "$home/auth_token" ]]; then
      (umask 077; od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$home/auth_token")
    fi
    chmod 600 "$home/auth_token"
    # A short temp dir: Ray's unix sockets live there and their paths are limited to 107 bytes.
    temp_dir="$(mktemp -d /tmp/segtune-ray-XXXXXX)"
    echo "$temp_dir" >"$home/temp_dir"
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$home/auth_token"
    # Draining on SIGTERM waits up to 30 s for work that a local cluster is ending anyway.
    export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}"
    address="127.0.0.1:$port"
    common=(--node-ip-address 127.0.0.1 --num-cpus "$cpus" --num-gpus "$gpus"
            --object-store-memory "$((store_mb * 1024 * 1024))" --disable-usage-stats)
    trap 'stop_all' ERR
    start_node head --head --port "$port" --temp-dir "$temp_dir" --include-dashboard false \
      --dashboard-agent-listen-port "$((port + 1))" "${common[@]}"
    for i in $(seq "$workers"); do
      start_node "worker-$i" --address "$address" --dashboard-agent-listen-port "$((port + 1 + i))" \
        "${common[@]}"
    done
    # A node that printed "started" may not be in the head's view yet; a sweep started now
    # would see fewer nodes. Wait until `ray status` lists them all as active.
    want=$((workers + 1)); active=0
    for _ in $(seq 60); do
      active="$("$ray" status --address "$address" 2>/dev/null \
        | awk '/^Active:/{on=1; next} /^[A-Z]/{on=0} on && /node_/{n++} END{print n+0}')"
      [[ "$active" -ge "$want" ]] && break
      sleep 1
    done
    if [[ "$active" -lt "$want" ]]; then
      echo "only $active of $want nodes joined the cluster within 60 s; see $home/*.log" >&2
      false
    fi
    trap - ERR
    cat >"$home/cluster.env" <<EOF
export RAY_ADDRESS=$address
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH=$home/auth_token
EOF
    echo "Ray cluster at $address: head + $workers worker node(s), $cpus CPU / $gpus GPU each."
    echo "Use it:  source $home/cluster.env && segtune sweep FILE --address \$RAY_ADDRESS"
    echo "Stop it: $0 stop --home $home"
    ;;
  stop)
    [[ -d "$home" ]] || { echo "no cluster files in $home"; exit 0; }
    home="$(cd "$home" && pwd)"
    stop_all
    ;;
  status)
    for f in "$home"/head.pid "$home"/worker-*.pid; do
      [[ -e "$f" ]] || continue
      if is_ray_start "$(cat "$f")"; then state=running; else state=gone; fi
      echo "$(basename "$f" .pid): pid $(cat "$f") $state"
    done
    ;;
  *)
    echo "usage: $0 start|stop|status [--home DIR] [...]  (see the header of $0)" >&2
    exit 2
    ;;
esac
