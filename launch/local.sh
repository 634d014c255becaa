#!/usr/bin/env bash
# Runs a multi-process JAX job on this machine: N processes with K fake CPU devices each, joined
# through a coordinator on a free loopback port, exactly as N hosts of a pod would be.
#
#   launch/local.sh --num_processes=2 --devices_per_process=2 -- \
#     python -m sora_jax.train --config=configs/demo.py --workdir=runs/mh --config.mesh.data=4
#
# Each process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (read by
# sora_jax/parallel/distributed.py), JAX_PLATFORMS=cpu and
# XLA_FLAGS=--xla_force_host_platform_device_count=K.
# Output lines are prefixed with the process id. SIGTERM/SIGINT are forwarded to every process (a
# preemption drill: they save and exit 0). If one process fails, the others are killed and the
# script exits with the failed process's status; otherwise with 0 once all have finished.
set -euo pipefail

num_processes=2
devices_per_process=1
while (($#)); do
  case "$1" in
    --num_processes=*) num_processes="${1#*=}" ;;
    --devices_per_process=*) devices_per_process="${1#*=}" ;;
    --) shift; break ;;
    *) echo "local.sh: unknown argument '$1' (usage: local.sh --num_processes=N" \
            "--devices_per_process=K -- command...)" >&2; exit 2 ;;
  esac
  shift
done
if (($# == 0)); then
  echo "local.sh: no command after '--'" >&2
  exit 2
fi

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
# Keep the caller's XLA flags, but this script decides the device count.
xla_flags="$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')"
xla_flags="${xla_flags} --xla_force_host_platform_device_count=${devices_per_process}"

pids=()
declare -A index_of
for ((i = 0; i < num_processes; i++)); do
  JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}" JAX_NUM_PROCESSES="${num_processes}" \
    JAX_PROCESS_ID="${i}" JAX_PLATFORMS=cpu XLA_FLAGS="${xla_flags}" \
    "$@" > >(sed -u "s/^/[${i}] /") 2>&1 &
  pids+=("$!")
  index_of[$!]=${i}
done

# Bash reports every killed child on its stderr with the whole command line; keep our own messages.
exec 3>&2 2>/dev/null

forward() { kill -s "$1" "${pids[@]}" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward INT' INT

# Poll rather than `wait -n`: bash may reap a child before `wait -n` asks for it.
status=0
running=("${pids[@]}")
while ((${#running[@]})); do
  sleep 0.2
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "${pid}" 2>/dev/null; then
      still+=("${pid}")
      continue
    fi
    set +e
    wait "${pid}" 2>/dev/null
    rc=$?
    set -e
    if ((rc != 0 && status == 0)); then
      status=${rc}
      echo "local.sh: process ${index_of[${pid}]} (pid ${pid}) exited with status ${rc};" \
           "stopping the others." >&3
      kill -KILL "${pids[@]}" 2>/dev/null || true
    fi
  done
  running=("${still[@]}")
done
wait  # the log prefixers
exit "${status}"
