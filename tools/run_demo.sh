#!/usr/bin/env bash
# The embedded demo, end to end on a fresh machine (CPU is enough):
#   1. set up .venv with the pinned OpenMMLab stack (tools/setup_env.sh; skipped when up to date),
#   2. generate the synthetic shapes dataset into data/shapes (skipped when present),
#   3. train Mask R-CNN with Switchable Normalization on it from scratch (progress and ETA in the log),
#   4. evaluate COCO bbox and segm mAP on the validation images,
#   5. print one summary line with the metrics, the checkpoint and the logs.
# Extra arguments go to tools/train.py, e.g. --cfg-options train_cfg.max_iters=200.
# WORK_DIR (default work_dirs/demo_mask-rcnn_sn) sets where checkpoints and logs go.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CONFIG=configs/demo/mask-rcnn_r18-sn_fpn_1xb8-600i_shapes-128.py
WORK_DIR=${WORK_DIR:-work_dirs/demo_mask-rcnn_sn}

bash tools/setup_env.sh
PYTHON=.venv/bin/python
"$PYTHON" tools/make_shapes_dataset.py --out data/shapes
"$PYTHON" tools/train.py "$CONFIG" --work-dir "$WORK_DIR" "$@"
CHECKPOINT=$(cat "$WORK_DIR/last_checkpoint")
TRAIN_LOG=$(realpath "$(ls -t "$WORK_DIR"/*/*.log | head -n1)")
"$PYTHON" tools/test.py "$CONFIG" "$CHECKPOINT" --work-dir "$WORK_DIR" \
  --metrics-json "$WORK_DIR/demo_metrics.json"
"$PYTHON" -m norm_plugins.demo.summary "$WORK_DIR/demo_metrics.json" "$TRAIN_LOG"
