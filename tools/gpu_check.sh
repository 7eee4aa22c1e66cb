#!/usr/bin/env bash
# One command for a fresh GPU machine: set up against the machine's own torch, run the GPU tests and
# both benchmarks, and print one Markdown report (versions, GPU, test summary, tables).
# About 9 minutes on one H100 with 16 cores, most of it the one-time mmcv CUDA build.
set -uo pipefail

usage() {
  cat <<'EOF'
usage: tools/gpu_check.sh [--wheelhouse DIR] [--out DIR]

  --wheelhouse DIR  install with no network, from tools/make_wheelhouse.sh's folder
  --out DIR         logs and report.md (default work_dirs/gpu_check)

Runs: 1. tools/setup_env.sh --system-torch (venv $NORM_PLUGINS_VENV, default .venv-gpu; mmcv CUDA
ops for the visible GPUs, MAX_JOBS = the cores); 2. pytest -m cuda; 3. tools/benchmark_norm.py and
tools/benchmark_e2e.py on cuda; 4. the Markdown report. PYTHON: the interpreter with the system torch.
EOF
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/work_dirs/gpu_check"
SETUP_ARGS=(--system-torch)
while (($#)); do
  case "$1" in
    --wheelhouse) SETUP_ARGS+=(--wheelhouse "${2:?--wheelhouse needs a folder}"); shift ;;
    --out) OUT="${2:?--out needs a folder}"; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; echo "[gpu_check] ERROR: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
export NORM_PLUGINS_VENV="${NORM_PLUGINS_VENV:-$ROOT/.venv-gpu}"
PYTHON="${PYTHON:-python3}"
VPY="$NORM_PLUGINS_VENV/bin/python"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT"

elapsed() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }
FAILED=()
STEP_START=0
step() {  # step N TITLE
  STEP_START=$SECONDS
  echo "[gpu_check] step $1/4 at $(elapsed $SECONDS): $2"
}
finish() {  # finish NAME STATUS LOG
  local took=$((SECONDS - STEP_START))
  if [[ "$2" == 0 ]]; then
    echo "[gpu_check]   $1 done in $(elapsed $took)"
  else
    echo "[gpu_check]   $1 FAILED (exit $2) after $(elapsed $took); log: $3"
    FAILED+=("$1")
  fi
  eval "TOOK_${1//[^A-Za-z0-9]/_}=$took"
}

"$PYTHON" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null || {
  echo "[gpu_check] ERROR: $PYTHON's torch sees no CUDA GPU" >&2
  echo "[gpu_check] fix: run on a GPU machine, with PYTHON set to the interpreter whose torch has CUDA" >&2
  exit 1
}

step 1 "set-up (tools/setup_env.sh ${SETUP_ARGS[*]}); the mmcv CUDA build prints a line every 30 s"
PYTHON="$PYTHON" bash tools/setup_env.sh "${SETUP_ARGS[@]}" 2>&1 | tee "$OUT/setup.log"
finish setup "${PIPESTATUS[0]}" "$OUT/setup.log"
if ((${#FAILED[@]})); then
  echo "[gpu_check] the set-up failed, so nothing else can run; see $OUT/setup.log" >&2
  exit 1
fi

step 2 "GPU tests (pytest -m cuda)"
"$VPY" -m pytest -m cuda -q -rfEs -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest.log" | grep -E '^(FAILED|ERROR)|passed|failed|deselected|no tests ran'
finish tests "${PIPESTATUS[0]}" "$OUT/pytest.log"

step 3 "benchmarks: one layer (tools/benchmark_norm.py), one training iteration (tools/benchmark_e2e.py)"
"$VPY" tools/benchmark_norm.py --device cuda --repeats 10 >"$OUT/benchmark_norm.md" 2>"$OUT/benchmark_norm.err"
finish benchmark_norm $? "$OUT/benchmark_norm.err"
STEP_START=$SECONDS
"$VPY" tools/benchmark_e2e.py --device cuda --warmup 2 --iters 5 >"$OUT/benchmark_e2e.md" 2>"$OUT/benchmark_e2e.err"
finish benchmark_e2e $? "$OUT/benchmark_e2e.err"

step 4 "report"
{
  echo "# norm_plugins GPU check"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)," \
       "$(getconf _NPROCESSORS_ONLN) cores, total $(elapsed $SECONDS)"
  echo
  echo '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
  "$VPY" - 2>&1 <<'EOF'
import platform
import torch, mmcv, mmengine, mmdet, mmseg
from mmcv.ops import get_compiling_cuda_version
print(f'Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, '
      f'cuDNN {torch.backends.cudnn.version()}), '
      f'GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible"}')
print(f'mmcv {mmcv.__version__} (ops compiled with CUDA {get_compiling_cuda_version()}), '
      f'mmengine {mmengine.__version__}, mmdet {mmdet.__version__}, mmseg {mmseg.__version__}')
try:
    import triton
    print(f'triton {triton.__version__}')
except ImportError:
    print('triton: not installed')
EOF
  echo '```'
  echo
  echo "## Steps"
  echo
  echo "| step | time | result |"
  echo "| --- | --- | --- |"
  for name in setup tests benchmark_norm benchmark_e2e; do
    took="TOOK_$name"
    result=ok
    [[ " ${FAILED[*]} " != *" $name "* ]] || result=FAILED
    echo "| $name | $(elapsed "${!took:-0}") | $result |"
  done
  echo
  echo "## GPU tests (pytest -m cuda)"
  echo
  echo '```'
  grep -E '^(FAILED|ERROR|SKIPPED)|passed|failed|error|deselected|no tests ran' "$OUT/pytest.log" | tail -n 40
  echo '```'
  for bench in benchmark_norm benchmark_e2e; do
    echo
    echo "## tools/$bench.py --device cuda"
    echo
    # The table and the tools' comment lines (as quotes, not headings), without the model builders' logging.
    grep -E '^(\||# )' "$OUT/$bench.md" | sed 's/^# \(.*\)/> \1\n/'
    [[ ! -s "$OUT/$bench.err" || " ${FAILED[*]} " != *" $bench "* ]] || { echo '```'; tail -n 20 "$OUT/$bench.err"; echo '```'; }
  done
} >"$OUT/report.md"
cat "$OUT/report.md"
echo "[gpu_check] report: $OUT/report.md (logs beside it); total $(elapsed $SECONDS)"
((${#FAILED[@]} == 0)) || { echo "[gpu_check] failed: ${FAILED[*]}" >&2; exit 1; }
