#!/usr/bin/env bash
# Distributed evaluation with torchrun: tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCESSES [test.py args]
# Same environment as tools/dist_train.sh (NNODES, NODE_RANK, MASTER_ADDR, PORT); CPU over gloo
# when there are no GPUs.
set -euo pipefail
USAGE="tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCESSES [test.py args]"
if [[ $# -lt 3 ]]; then echo "error: missing arguments; usage: $USAGE" >&2; exit 2; fi
source "$(dirname "${BASH_SOURCE[0]}")/_python.sh"
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
shift 3
require_count NUM_PROCESSES "$GPUS" "$USAGE"
torchrun_exec "$GPUS" "$ROOT/tools/test.py" "$CONFIG" "$CHECKPOINT" --launcher pytorch "$@"
