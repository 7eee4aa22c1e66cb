#!/usr/bin/env bash
# A maintainer's rehearsal, on a CPU machine, of the first run on the reference GPU node: the node's
# stack, no network, and tools/gpu_check.sh as a GPU session would run it. Not part of CI: it downloads
# about 3 GB once and builds mmcv's CUDA ops (about an hour on 2 cores).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: tools/gpu_rehearsal.sh [--dir DIR] [--python PY] [--stages LIST] [--rebuild]
                              [--limit STAGE=SECONDS]...

  --dir DIR      environments, wheelhouses, the mmcv build and logs (default
                 ~/.cache/norm_plugins/rehearsal, or $NORM_PLUGINS_REHEARSAL); never the repository
  --python PY    interpreter of the "system" environment (default: python3.12, the node's minor
                 version, if found, else python3)
  --stages LIST  gpu_check.sh's stages (default 1,2)
  --rebuild      drop the cached mmcv wheel and stage 2's venv first, to measure the build again
  --limit S=SEC  gpu_check.sh's stage limits (defaults here 1=1800, 2=14400: 2 cores, interpreter)
  (step 5 always runs: the kernel tests in the system triton's interpreter)

Steps, each timed with the load average in DIR/rehearsal.log:
 1. DIR/system: a venv, as the node's python3 is (/opt/torch/.venv), with the node's packages:
    torch 2.11.0 as PyPI serves it (the CUDA 13 build, which runs on a CPU), its triton 3.6.0,
    numpy 2.5.2, torchvision, onnx, onnxruntime, onnxscript, opencv-python-headless, matplotlib,
    scipy, pillow, pytest (downloaded once into DIR/downloads);
 2. DIR/wheelhouse-system: tools/make_wheelhouse.sh --present with that environment's pip list;
 3. DIR/carry: tools/make_carry.sh, the folder a GPU session carries (less what the node has, by
    tools/gpu_node_packages.txt); the packages it leaves out for that are installed into DIR/system
    from step 2, so the system environment holds everything the carried wheelhouse relies on;
 4. with the network cut (unshare --net, proven by a failing connection) and pip's configuration
    off: tools/gpu_check.sh --wheelhouse DIR/carry/wheelhouse, python3 being DIR/system's, with
    TORCH_CUDA_ARCH_LIST=9.0 (the H200's; no GPU here to read it from). Report: DIR/gpu_check;
 5. the kernel tests (tests/test_*triton*.py) in that triton's interpreter, with numpy 2.3 first on
    the path: the node's numpy 2.5 is too new for the interpreter of a triton < 3.7.
EOF
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { echo "[rehearsal] $*"; }
fail() {
  echo "[rehearsal] ERROR: $1" >&2
  echo "[rehearsal] fix: $2" >&2
  exit 1
}
elapsed() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

# The reference node (../shared/REFERENCE_FACTS.md): its Python, and the packages of its python3 that
# the check touches, at its versions where they matter.
NODE_PYTHON=3.12.3
NODE_PACKAGES=(torch==2.11.0 triton==3.6.0 numpy==2.5.2 torchvision==0.26.0 onnx==1.23.1 onnxruntime==1.30.0
               onnxscript==0.7.2 opencv-python-headless matplotlib scipy pillow pytest)
# triton < 3.7's interpreter calls int() on one-element arrays, which numpy refuses from 2.4 on (2.3
# warns), so on the node's stack the interpreter tests cannot run; step 5 runs them under its triton
# with the newest numpy that allows it.
INTERPRETER_NUMPY=numpy==2.3.5

DIR="${NORM_PLUGINS_REHEARSAL:-${XDG_CACHE_HOME:-$HOME/.cache}/norm_plugins/rehearsal}"
BASE="" STAGES=1,2 REBUILD=0 LIMITS=(--limit 1=1800 --limit 2=14400)
while (($#)); do
  case "$1" in
    --dir | --python | --stages | --limit) [[ $# -ge 2 ]] || fail "$1 needs a value" "see --help" ;;&
    --dir) DIR="$2"; shift ;;
    --python) BASE="$2"; shift ;;
    --stages) STAGES="$2"; shift ;;
    --limit) LIMITS+=(--limit "$2"); shift ;;
    --rebuild) REBUILD=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; fail "unknown option $1" "see the usage above" ;;
  esac
  shift
done
DIR="$(realpath -m "$DIR")"
[[ "$DIR" != "$ROOT" && "$DIR" != "$ROOT"/* ]] \
  || fail "--dir $DIR is inside the repository; the rehearsal puts several GB there" "choose a folder outside it"
mkdir -p "$DIR"
if [[ -z "$BASE" ]]; then  # the first that runs (a pyenv shim of a version not selected does not)
  for candidate in python3.12 "$(pyenv prefix 3.12 2>/dev/null | head -n 1)/bin/python3.12" python3; do
    if "$candidate" -c '' 2>/dev/null; then BASE="$(command -v "$candidate")"; break; fi
  done
fi
command -v unshare >/dev/null || fail "unshare (util-linux) is missing; the rehearsal cuts the network with it" \
                                      "apt-get install util-linux"
unshare --net true 2>/dev/null || fail "unshare --net is refused here" "run the rehearsal as root (or in a user namespace that allows it)"

SYS="$DIR/system"
LOG="$DIR/rehearsal.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
STEP_START=0
step() {
  STEP_START=$SECONDS
  say "== $1 (load: $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores)"
}
done_step() { say "   done in $(elapsed $((SECONDS - STEP_START))) (load: $(cut -d' ' -f1-3 /proc/loadavg))"; }

say "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, $(awk '/MemTotal/ { printf "%d GiB", $2 / 1048576 }' /proc/meminfo); log $LOG"

step "1. the system environment $SYS (the node's packages)"
"$BASE" -c 'import sys; assert sys.version_info >= (3, 9)' 2>/dev/null || fail "$BASE is not a Python >= 3.9" "--python PY"
[[ -x "$SYS/bin/python" ]] || "$BASE" -m venv "$SYS"
want="$(printf '%s\n' "${NODE_PACKAGES[@]}" | sha256sum | cut -c1-16)"
if [[ "$(cat "$SYS/.rehearsal_packages" 2>/dev/null)" != "$want" ]]; then
  "$SYS/bin/python" -m pip download -q -d "$DIR/downloads" "${NODE_PACKAGES[@]}" \
    || fail "downloading the node's packages failed" "check the package index (about 3 GB, once)"
  say "   downloaded: $(du -sh "$DIR/downloads" | cut -f1) in $DIR/downloads after $(elapsed $((SECONDS - STEP_START)))"
  "$SYS/bin/python" -m pip install -q --no-index --find-links "$DIR/downloads" "${NODE_PACKAGES[@]}" \
    || fail "installing the node's packages into $SYS failed" "read the pip error above"
  echo "$want" >"$SYS/.rehearsal_packages"
fi
INTERPRETER_SITE="$DIR/interpreter-${INTERPRETER_NUMPY/==/-}"
if [[ ! -d "$INTERPRETER_SITE" ]]; then
  "$SYS/bin/python" -m pip download -q --no-deps --only-binary=:all: -d "$DIR/downloads" "$INTERPRETER_NUMPY"
  "$SYS/bin/python" -m pip install -q --no-index --no-deps --target "$INTERPRETER_SITE" \
    "$DIR"/downloads/numpy-"${INTERPRETER_NUMPY#numpy==}"-*.whl
fi
"$SYS/bin/python" - "$NODE_PYTHON" <<'EOF'
import platform, sys
import numpy, torch, triton
print(f'[rehearsal]    Python {platform.python_version()} here, {sys.argv[1]} on the node'
      + ('' if platform.python_version() == sys.argv[1] else ' (the nearest this machine has)'))
print(f'[rehearsal]    torch {torch.__version__} (CUDA {torch.version.cuda} build, GPU visible: '
      f'{torch.cuda.is_available()}), triton {triton.__version__}, numpy {numpy.__version__}')
EOF
done_step

step "2. wheelhouse from the system environment's pip list (tools/make_wheelhouse.sh --present)"
PY_MINOR="$("$SYS/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
"$SYS/bin/python" -m pip list --format=freeze >"$DIR/system-present.txt"
rm -rf "$DIR/wheelhouse-system"
bash "$ROOT/tools/make_wheelhouse.sh" --python "$PY_MINOR" --out "$DIR/wheelhouse-system" --present "$DIR/system-present.txt"
done_step

step "3. the carried folder (tools/make_carry.sh), and the node's packages it relies on"
bash "$ROOT/tools/make_carry.sh" --python "$PY_MINOR" --out "$DIR/carry"
names() { find "$1" -maxdepth 1 -name '*.whl' -printf '%f\n' | cut -d- -f1 | tr 'A-Z_' 'a-z-' | sort -u; }
mapfile -t relied < <(comm -23 <(names "$DIR/wheelhouse-system") <(names "$DIR/carry/wheelhouse"))
if ((${#relied[@]})); then
  wheels=()
  for name in "${relied[@]}"; do
    wheels+=("$(find "$DIR/wheelhouse-system" -maxdepth 1 -iname "$(echo "$name" | tr - _)-*.whl" -print -quit)")
  done
  say "   the node has, the carry leaves out, installing into the system environment: ${relied[*]}"
  "$SYS/bin/python" -m pip install -q --no-index --no-deps "${wheels[@]}"
fi
done_step

if ((REBUILD)); then
  say "--rebuild: removing $DIR/wheels (the mmcv build) and $DIR/venv-gpu"
  rm -rf "$DIR/wheels" "$DIR/venv-gpu"
fi
# This machine's nvcc may be a wrapper script outside the toolkit; torch would then take CUDA_HOME
# from its folder and miss the headers. nvcc itself knows the toolkit it runs from.
cuda_home="${CUDA_HOME:-$(nvcc -dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=\(.*\)\/bin\/\.\.$/\1/p' | head -n 1)}"

# Where pip would download from, resolved before the cut, to show that it answers now and not once cut.
index="$("$SYS/bin/python" - <<'EOF'
import socket, urllib.parse
from pip._internal.models.index import PyPI
host = urllib.parse.urlsplit(PyPI.simple_url).hostname
address = socket.getaddrinfo(host, 443, socket.AF_INET)[0][4][0]
socket.create_connection((address, 443), timeout=10).close()
print(host, address)
EOF
)" || fail "the package index is not reachable even before the network is cut" "check the network"
say "the package index (${index// /, }) answers on port 443 before the cut"

step "4. tools/gpu_check.sh --stages $STAGES --wheelhouse $DIR/carry/wheelhouse, network cut"
cd "$ROOT"
# A new network namespace has only a loopback device (brought up: the node has one too). pip's
# configuration files and variables are dropped so that the wheelhouse is its only source.
nice -n 10 unshare --net -- env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT \
  PIP_CONFIG_FILE=/dev/null PATH="$SYS/bin:$PATH" NORM_PLUGINS_VENV="$DIR/venv-gpu" \
  NORM_PLUGINS_WHEEL_CACHE="$DIR/wheels" TORCH_CUDA_ARCH_LIST=9.0 ${cuda_home:+CUDA_HOME="$cuda_home"} \
  bash -c '
    set -euo pipefail
    ip link set lo up
    echo "[rehearsal]    network devices: $(ip -o link | cut -d: -f2 | paste -sd,)"
    python3 - $3 <<EOF
import socket, sys
for target in sys.argv[1:]:
    try:
        socket.create_connection((target, 443), timeout=5).close()
    except OSError as error:
        print(f"[rehearsal]    network cut: connecting to {target}:443 fails: {error}")
    else:
        raise SystemExit(f"[rehearsal] ERROR: {target}:443 is reachable, the network is not cut")
EOF
    config="$(python3 -m pip config list | paste -sd" ")"
    echo "[rehearsal]    pip configuration: ${config:-none}"
    echo "[rehearsal]    python3 = $(command -v python3); CUDA_HOME=${CUDA_HOME:-unset};" \
         "nvcc $(nvcc --version | sed -n "s/.*release \([0-9.]*\).*/\1/p")"
    exec bash tools/gpu_check.sh --stages "$0" --wheelhouse "$1" --out "$2" "${@:4}"
  ' "$STAGES" "$DIR/carry/wheelhouse" "$DIR/gpu_check" "$index" "${LIMITS[@]}" && rc=0 || rc=$?
done_step

step "5. the kernel tests in triton's interpreter with $INTERPRETER_NUMPY first on the path"
nice -n 10 env PATH="$SYS/bin:$PATH" PYTHONPATH="$INTERPRETER_SITE:$ROOT" TRITON_INTERPRET=1 \
  python3 -c 'import numpy, triton; print(f"[rehearsal]    triton {triton.__version__}, numpy {numpy.__version__}")'
nice -n 10 env PATH="$SYS/bin:$PATH" PYTHONPATH="$INTERPRETER_SITE:$ROOT" TRITON_INTERPRET=1 \
  python3 -m pytest -q -rfE -p no:cacheprovider tests/test_*triton*.py >"$DIR/interpreter.log" 2>&1 \
  && interpreted=0 || interpreted=$?
say "   $(grep -E '(passed|failed|skipped|error).* in [0-9.]+s' "$DIR/interpreter.log" | tail -n 1) (exit $interpreted; log $DIR/interpreter.log)"
done_step
say "gpu_check.sh exit $rc, interpreter tests exit $interpreted; report $DIR/gpu_check/report.md;" \
    "mmcv build log: $(ls "$DIR"/wheels/*/build.log 2>/dev/null | head -n 1)"
((rc == 0 && interpreted == 0))
