#!/usr/bin/env bash
# The check of a fresh GPU machine, in stages, most valuable first, each under its own time limit:
#   stage 1, nothing installed: the layer-level GPU tests and tools/benchmark_norm.py on cuda, with the
#            machine's own python3 and PYTHONPATH=. (without a GPU: the kernels in Triton's interpreter);
#   stage 2: tools/setup_env.sh --system-torch (mmcv's CUDA build), the other GPU tests, benchmark_e2e.
# report.md under --out is rewritten as each step starts and ends, so a run killed at any point still
# returns what it measured. `bash tools/gpu_check.sh --help` for the options; tools/_gpu_check.py runs it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
command -v "$PYTHON" >/dev/null || {
  echo "[gpu_check] ERROR: no interpreter $PYTHON" >&2
  echo "[gpu_check] fix: set PYTHON to the machine's Python, the one with its torch" >&2
  exit 2
}
exec "$PYTHON" "$ROOT/tools/_gpu_check.py" "$@"
