#!/usr/bin/env bash
# Runs the trainer on every host of a Cloud TPU VM slice: one process per host, joined by
# jax.distributed.initialize()'s TPU detection (sora_jax/parallel/distributed.py); needs the gcloud CLI.
#
#   launch/tpu_pod.sh --tpu=my-v5p-32 --zone=us-east5-a -- \
#     python -m sora_jax.train --config=configs/demo.py --workdir=/mnt/runs/demo
#
# The committed HEAD of this checkout goes to ~/sora_jax on every worker (git archive), is installed
# with pip (SETUP overrides the command), and the command runs there with output prefixed by worker.
# --workdir must be one directory every host sees (Filestore NFS, or a bucket mounted with gcsfuse):
# Orbax checkpoints are written by all hosts together. A maintenance event or spot preemption sends
# SIGTERM: all hosts save at one step and exit 0; run the same line again to resume.
set -euo pipefail

tpu="" zone="" project=()
while (($#)); do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project=("--project=${1#*=}") ;;
    --) shift; break ;;
    *) echo "tpu_pod.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z "${tpu}" || -z "${zone}" || $# -eq 0 ]]; then
  echo "usage: tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] -- command..." >&2
  exit 2
fi
setup="${SETUP:-pip install -q -e . 'jax[tpu]>=0.10,<0.11'}"
where=(--zone="${zone}" "${project[@]}" --worker=all)

archive="$(mktemp -d)"
trap 'rm -rf "${archive}"' EXIT
git -C "$(dirname "$0")/.." archive --format=tar.gz -o "${archive}/sora_jax.tar.gz" HEAD
gcloud compute tpus tpu-vm scp "${archive}/sora_jax.tar.gz" "${tpu}:~/sora_jax.tar.gz" "${where[@]}"
command="$(printf '%q ' "$@")"
gcloud compute tpus tpu-vm ssh "${tpu}" "${where[@]}" --command="set -e; rm -rf ~/sora_jax
  mkdir ~/sora_jax && tar -xzf ~/sora_jax.tar.gz -C ~/sora_jax && cd ~/sora_jax
  ${setup} && ${command}"
