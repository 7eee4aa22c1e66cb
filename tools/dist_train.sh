#!/usr/bin/env bash
# Distributed training with torchrun: tools/dist_train.sh CONFIG NUM_PROCESSES [tools/train.py args]
# One process per GPU; on a machine without GPUs the processes train on CPU over gloo.
# Several nodes: run it on every node with NNODES, NODE_RANK (0..NNODES-1), MASTER_ADDR (node 0's
# address) and PORT (default 29500) set the same way everywhere but NODE_RANK.
set -euo pipefail
USAGE="tools/dist_train.sh CONFIG NUM_PROCESSES [train.py args]"
if [[ $# -lt 2 ]]; then echo "error: missing arguments; usage: $USAGE" >&2; exit 2; fi
source "$(dirname "${BASH_SOURCE[0]}")/_python.sh"
CONFIG=$1
GPUS=$2
shift 2
require_count NUM_PROCESSES "$GPUS" "$USAGE"
torchrun_exec "$GPUS" "$ROOT/tools/train.py" "$CONFIG" --launcher pytorch "$@"
