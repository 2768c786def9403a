#!/usr/bin/env bash
# Run one training command on every worker of a Cloud TPU VM slice (same command everywhere:
# JAX's multi-controller runtime; jax.distributed starts from the TPU metadata).
#
#   bash train/launch_tpu_pod.sh TPU_NAME ZONE CONFIG.yaml [--set key=value ...]
#
# Assumes this repository is checked out at the same path ($REPO_DIR, default ~/jais2-jax) on
# every worker with its environment installed (`pip install -e ".[tpu]"`), and that data and
# output_dir are on storage every worker sees (gcsfuse, Filestore). Preemption: the workers get
# SIGTERM, save a checkpoint and exit 143; rerunning this command resumes. The exit status is
# train.py's (pipefail in the workers' shell, bash), not that of the `tee` writing its log.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG.yaml [--set key=value ...]" >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; shift 2
REPO_DIR=${REPO_DIR:-'~/jais2-jax'}
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
  --command "set -o pipefail; cd $REPO_DIR && python train/train.py$ARGS --no-progress 2>&1 | tee -a train-\$(hostname).log"
