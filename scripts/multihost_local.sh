#!/usr/bin/env bash
# A multi-host run on this machine: N processes of launch.py (one CPU device each, whatever
# --config.cpu_devices says) joined by
# jax.distributed over 127.0.0.1, as the hosts of a Cloud TPU slice are.
# Usage: bash scripts/multihost_local.sh WORKDIR [launch.py flags...]
#   e.g. bash scripts/multihost_local.sh /tmp/mh --config configs/smoke.py
# MARK_PROCESSES=N sets the process count (default 2). Every line a process prints starts
# with [process I]. If one process fails or is killed, the others are stopped (SIGTERM, then
# SIGKILL after MARK_STOP_GRACE seconds, default 30) and the script exits with its status;
# Ctrl-C stops them all. Relaunching the same command resumes after the last finished task.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ]; then
  echo "usage: bash scripts/multihost_local.sh WORKDIR [launch.py flags...]" >&2
  exit 2
fi
workdir="$1"
shift
processes="${MARK_PROCESSES:-2}"
grace="${MARK_STOP_GRACE:-30}"
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()

stop_all() {  # SIGTERM (each process stops between two steps), then SIGKILL the stragglers
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for _ in $(seq "$grace"); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && return
    sleep 1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null; done
}
trap 'echo "multihost_local: interrupted, stopping all processes" >&2; stop_all; exit 130' INT TERM

for ((i = 0; i < processes; i++)); do
  JAX_NUM_CPU_DEVICES=1 python launch.py "$@" --workdir "$workdir" \
    --coordinator_address="127.0.0.1:$port" --num_processes="$processes" --process_id="$i" \
    > >(sed -u "s/^/[process $i] /") 2> >(sed -u "s/^/[process $i] /" >&2) &
  pids+=($!)
done

status=0
remaining=$processes
declare -A done_pids=()
while [ "$remaining" -gt 0 ]; do
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [ -n "${done_pids[$pid]:-}" ] && continue
    kill -0 "$pid" 2>/dev/null && continue
    wait "$pid"
    code=$?
    done_pids[$pid]=1
    remaining=$((remaining - 1))
    if [ "$code" != 0 ] && [ "$status" = 0 ]; then
      status=$code
      echo "multihost_local: process $i exited with status $code; stopping the others" >&2
      stop_all
    fi
  done
  sleep 0.5
done
exit "$status"
