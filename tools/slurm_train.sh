#!/usr/bin/env bash
# Training under Slurm: tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [train.py args]
# GPUS (total, default 8), GPUS_PER_NODE (default 8), CPUS_PER_TASK (default 5), SRUN_ARGS and
# PORT (rendezvous port, default 29500) come from the environment; srun starts one task per GPU.
set -euo pipefail
USAGE="tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [train.py args]"
if [[ $# -lt 4 ]]; then echo "error: missing arguments; usage: $USAGE" >&2; exit 2; fi
source "$(dirname "${BASH_SOURCE[0]}")/_python.sh"
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
WORK_DIR=$4
shift 4
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
require_count GPUS "$GPUS" "$USAGE"
require_count GPUS_PER_NODE "$GPUS_PER_NODE" "$USAGE"
export MASTER_PORT="${PORT:-29500}"
# shellcheck disable=SC2086  # SRUN_ARGS holds several srun options
srun -p "$PARTITION" --job-name="$JOB_NAME" \
  --gres="gpu:$GPUS_PER_NODE" --ntasks="$GPUS" --ntasks-per-node="$GPUS_PER_NODE" \
  --cpus-per-task="${CPUS_PER_TASK:-5}" --kill-on-bad-exit=1 ${SRUN_ARGS:-} \
  "$PYTHON" -u "$ROOT/tools/train.py" "$CONFIG" --work-dir="$WORK_DIR" --launcher=slurm "$@"
