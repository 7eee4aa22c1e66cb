#!/usr/bin/env bash
# Creates (or refreshes) .venv with the pinned OpenMMLab stack and norm_plugins in editable mode.
# Idempotent: a stamp of the dependency files and options skips everything when nothing changed.
# mmcv 2.1.0 (compiled ops: ~10 min on 2 cores for CPU, ~4 min on 16 cores for one CUDA arch) is
# built once per flavour (Python, torch build, CPU or CUDA ops with their archs) into a cache outside
# the repository, so a wheel built for one torch or device is never installed against another.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: tools/setup_env.sh [--system-torch] [--cpu-torch] [--wheelhouse DIR]

  (default)        install the pinned torch==2.13.0 from the package index (on an ordinary
                   machine that is the CUDA build, several GB)
  --cpu-torch      install torch 2.13.0's CPU build from torch's CPU wheel index
  --system-torch   use the torch of $PYTHON (containers, cluster modules): the venv sees the
                   system site-packages and torch is never reinstalled
                   (also NORM_PLUGINS_SYSTEM_TORCH=1)
  --wheelhouse DIR install with no package index at all, from DIR (tools/make_wheelhouse.sh)

mmcv's ops are built for CUDA when torch is a CUDA build and nvcc is found (FORCE_CUDA=1,
TORCH_CUDA_ARCH_LIST from the visible GPUs unless set, MAX_JOBS from the cores), else for CPU.
Environment: PYTHON (base interpreter, default python3), NORM_PLUGINS_VENV (default .venv),
NORM_PLUGINS_WHEEL_CACHE (default ~/.cache/norm_plugins/wheels), NORM_PLUGINS_MMCV_OPS
(auto, cpu or cuda), NORM_PLUGINS_EXTRAS (the package extras to install), NORM_PLUGINS_HEARTBEAT
(seconds between the build's progress lines, default 30), TORCH_CUDA_ARCH_LIST, MAX_JOBS.
EOF
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HELPER="$ROOT/tools/_setup_env.py"
VENV="${NORM_PLUGINS_VENV:-$ROOT/.venv}"
WHEELS="${NORM_PLUGINS_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/norm_plugins/wheels}"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"
CPU_TORCH_INDEX="https://download.pytorch.org/whl/cpu"
MMCV_PIN="mmcv==2.1.0"
HEARTBEAT="${NORM_PLUGINS_HEARTBEAT:-30}"

say() { echo "[setup] $*"; }
fail() {
  echo "[setup] ERROR: $1" >&2
  echo "[setup] fix: $2" >&2
  exit 1
}
elapsed() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

SYSTEM_TORCH="${NORM_PLUGINS_SYSTEM_TORCH:-0}"
CPU_TORCH=0
WHEELHOUSE=""
while (($#)); do
  case "$1" in
    --system-torch) SYSTEM_TORCH=1 ;;
    --cpu-torch) CPU_TORCH=1 ;;
    --wheelhouse) [[ $# -ge 2 ]] || fail "--wheelhouse needs a folder" "tools/setup_env.sh --wheelhouse DIR"
      WHEELHOUSE="$(cd "$2" && pwd)" || fail "no wheelhouse folder $2" "make one with tools/make_wheelhouse.sh"
      shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; fail "unknown option $1" "see the usage above" ;;
  esac
  shift
done
[[ "$SYSTEM_TORCH" == 1 && "$CPU_TORCH" == 1 ]] \
  && fail "--system-torch and --cpu-torch exclude each other" "pick one"

EXTRAS="${NORM_PLUGINS_EXTRAS:-}"
if [[ -n "$WHEELHOUSE" ]]; then
  [[ -f "$WHEELHOUSE/wheelhouse.txt" ]] \
    || fail "$WHEELHOUSE has no wheelhouse.txt" "make the folder with tools/make_wheelhouse.sh"
  [[ -n "$EXTRAS" ]] || EXTRAS="$(sed -n 's/^extras=//p' "$WHEELHOUSE/wheelhouse.txt")"
fi
# The pinned triton (dev) belongs to the pinned torch; a system torch keeps its own.
[[ -n "$EXTRAS" ]] || { if [[ "$SYSTEM_TORCH" == 1 ]]; then EXTRAS=test,deploy,study; else EXTRAS=dev; fi; }

MODE="system_torch=$SYSTEM_TORCH cpu_torch=$CPU_TORCH wheelhouse=$WHEELHOUSE extras=$EXTRAS ops=${NORM_PLUGINS_MMCV_OPS:-auto}"
stamp_of() {
  { cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" "${BASH_SOURCE[0]}" "$HELPER"; echo "$MODE"; } | sha256sum | cut -c1-16
}
STAMP="$VENV/.norm_plugins_stamp"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(stamp_of)" ]]; then
  say "environment up to date: $VENV"
  exit 0
fi

"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 9)' 2>/dev/null \
  || fail "$PYTHON is missing or older than 3.9" "install Python 3.9-3.12 or set PYTHON=/path/to/python3"
if [[ -n "$WHEELHOUSE" ]]; then
  want="$(sed -n 's/^python=//p' "$WHEELHOUSE/wheelhouse.txt")"
  have="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  [[ "$want" == "$have" ]] \
    || fail "$WHEELHOUSE is for Python $want, $PYTHON is $have" "tools/make_wheelhouse.sh --python $have --out DIR"
fi

VENV_ARGS=()
if [[ "$SYSTEM_TORCH" == 1 ]]; then
  "$PYTHON" -c 'import torch' 2>/dev/null \
    || fail "--system-torch, but $PYTHON cannot import torch" \
            "set PYTHON to the interpreter that has torch, or leave out --system-torch"
  VENV_ARGS=(--system-site-packages)
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating virtual environment $VENV${VENV_ARGS:+ (sees the system site-packages)}"
  "$PYTHON" -m venv "${VENV_ARGS[@]}" "$VENV" \
    || fail "could not create $VENV" "install the venv module (Debian: apt-get install python3-venv)"
fi
if grep -qx 'include-system-site-packages *= *true' "$VENV/pyvenv.cfg"; then sees=1; else sees=0; fi
[[ "$sees" == "$SYSTEM_TORCH" ]] \
  || fail "$VENV $([[ $sees == 1 ]] && echo sees || echo "does not see") the system site-packages, so it does not fit $([[ $SYSTEM_TORCH == 1 ]] && echo "--system-torch" || echo "the pinned torch (no --system-torch)")" \
          "remove $VENV, or set NORM_PLUGINS_VENV to another folder"

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [[ "$SYSTEM_TORCH" == 1 ]]; then
  linked="$("$PYTHON" "$HELPER" link-system-site "$SITE")"
  [[ -z "$linked" ]] || say "$linked"
fi

PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
SOURCE=()
[[ -z "$WHEELHOUSE" ]] || SOURCE=(--no-index --find-links "$WHEELHOUSE")
mapfile -t BUILD_PINS < <("$PYTHON" "$HELPER" build-pins)

CONSTRAINTS=()
if [[ "$SYSTEM_TORCH" == 1 ]]; then
  # Pin the system's torch (and triton) so that no requirement can pull another one in.
  "$VENV/bin/python" "$HELPER" torch-pins >"$VENV/norm_plugins-system-torch.txt"
  CONSTRAINTS=(-c "$VENV/norm_plugins-system-torch.txt")
  recorded="$("$VENV/bin/python" "$HELPER" record-system-cv2 "$SITE")"
  [[ -z "$recorded" ]] || say "$recorded (so pip does not install a second OpenCV over it)"
  say "using the system torch ($(paste -sd' ' "$VENV/norm_plugins-system-torch.txt")); installing build tools"
  "${PIP[@]}" install -q "${SOURCE[@]}" "${CONSTRAINTS[@]}" "${BUILD_PINS[@]}" \
    || fail "installing the build tools failed" "read the pip error above"
elif [[ "$CPU_TORCH" == 1 ]]; then
  say "installing $TORCH_PIN, CPU build ($CPU_TORCH_INDEX), and build tools"
  index=(--extra-index-url "$CPU_TORCH_INDEX")
  [[ -z "$WHEELHOUSE" ]] || index=()
  "${PIP[@]}" install -q "${SOURCE[@]}" "${index[@]}" "$TORCH_PIN+cpu" "${BUILD_PINS[@]}" \
    || fail "installing $TORCH_PIN+cpu failed" "check that $CPU_TORCH_INDEX (or the wheelhouse) is reachable"
else
  say "installing $TORCH_PIN and build tools (pip picks the build: CUDA from PyPI, several GB; --cpu-torch for CPU only)"
  "${PIP[@]}" install -q "${SOURCE[@]}" "$TORCH_PIN" "${BUILD_PINS[@]}" \
    || fail "installing $TORCH_PIN failed" "check the package index, or use --cpu-torch / --system-torch"
fi

PLAN="$("$VENV/bin/python" "$HELPER" plan 2>"$VENV/norm_plugins-plan.err")" || {
  sed 's/^/[setup] /' "$VENV/norm_plugins-plan.err" >&2
  exit 1
}
eval "$PLAN"  # FLAVOUR, OPS, TORCH_BUILD, BUILD_ENV
say "installed: $TORCH_BUILD; mmcv ops for $OPS (${BUILD_ENV[*]})"
FLAVOUR_DIR="$WHEELS/$FLAVOUR"

build_progress() {  # build_progress TMPDIR START: one heartbeat line
  local src objects total
  src="$(find "$1" -maxdepth 7 -type d -path '*/mmcv/ops/csrc/pytorch' -print -quit 2>/dev/null)"
  objects="$(find "$1" -name '*.o' 2>/dev/null | wc -l)"
  if [[ -n "$src" ]]; then
    total="$(find "$src" "$src/cpu" -maxdepth 1 -name '*.cpp' | wc -l)"
    [[ "$OPS" != cuda ]] || total=$((total + $(find "$src/cuda" -maxdepth 1 \( -name '*.cu' -o -name '*.cpp' \) | wc -l)))
    say "building mmcv: $(elapsed $((SECONDS - $2))), $objects/$total files compiled"
  else
    say "building mmcv: $(elapsed $((SECONDS - $2))), preparing the source"
  fi
}

build_mmcv() {
  local log="$FLAVOUR_DIR/build.log" tmp pid start=$SECONDS next
  tmp="$(mktemp -d)"
  mkdir -p "$FLAVOUR_DIR"
  say "building $MMCV_PIN with $OPS ops into $FLAVOUR_DIR (once per flavour; about 10 minutes on 2 cores"
  say "for CPU ops, 4 minutes on 16 cores for one CUDA arch); a line every $HEARTBEAT s; log: $log"
  # TMPDIR puts pip's build tree where the heartbeat can count the compiled objects.
  env TMPDIR="$tmp" "${BUILD_ENV[@]}" "${PIP[@]}" wheel -v --no-build-isolation --no-deps "${SOURCE[@]}" \
    -w "$tmp/wheel" "$MMCV_PIN" >"$log" 2>&1 &
  pid=$!
  next=$((SECONDS + HEARTBEAT))
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if ((SECONDS >= next)); then
      build_progress "$tmp" "$start"
      next=$((SECONDS + HEARTBEAT))
    fi
  done
  if ! wait "$pid"; then
    # The compiler's own error lines if any (pip's output around them is long), else the log's end.
    { grep -E ': (fatal )?error' "$log" | tail -n 15 || tail -n 20 "$log"; } | sed 's/^/[setup]   /' >&2
    rm -rf "$tmp"
    fail "building $MMCV_PIN failed after $(elapsed $((SECONDS - start))); the whole log: $log" \
         "install what the log asks for (gcc/g++, the Python headers, nvcc for CUDA ops), then rerun"
  fi
  mv "$tmp"/wheel/mmcv-*.whl "$FLAVOUR_DIR/"
  rm -rf "$tmp"
  echo "$TORCH_BUILD; ${BUILD_ENV[*]}" >"$FLAVOUR_DIR/built-with.txt"
  say "built $MMCV_PIN in $(elapsed $((SECONDS - start)))"
}

WHEEL="$(ls "$FLAVOUR_DIR"/mmcv-2.1.0-*.whl 2>/dev/null | head -n 1 || true)"
if [[ -z "$WHEEL" && -d "$WHEELS" ]]; then
  adopted="$("$VENV/bin/python" "$HELPER" adopt-legacy "$WHEELS" "$FLAVOUR_DIR" "$OPS")"
  [[ -z "$adopted" ]] || say "moved $adopted from the flat cache of an earlier set-up into $FLAVOUR_DIR"
  WHEEL="$(ls "$FLAVOUR_DIR"/mmcv-2.1.0-*.whl 2>/dev/null | head -n 1 || true)"
fi
BUILT=0
if [[ -z "$WHEEL" ]]; then
  build_mmcv
  BUILT=1
  WHEEL="$(ls "$FLAVOUR_DIR"/mmcv-2.1.0-*.whl | head -n 1)"
else
  say "reusing cached mmcv wheel $WHEEL"
fi

say "installing mmcv, mmengine, mmdet, mmsegmentation and norm_plugins[$EXTRAS] (editable)"
# An mmcv built for another torch or device may be in the venv: reinstall unless it came from this wheel.
MMCV_MARK="$VENV/.norm_plugins_mmcv_wheel"
install_mmcv() {
  if [[ "$(cat "$MMCV_MARK" 2>/dev/null)" != "$WHEEL $(stat -c %Y "$WHEEL")" ]]; then
    "${PIP[@]}" install -q --force-reinstall --no-deps "$WHEEL" \
      || fail "installing $WHEEL failed" "delete $FLAVOUR_DIR and rerun to rebuild it"
    echo "$WHEEL $(stat -c %Y "$WHEEL")" >"$MMCV_MARK"
  fi
}
install_mmcv
"${PIP[@]}" install -q --no-build-isolation "${SOURCE[@]}" "${CONSTRAINTS[@]}" --find-links "$FLAVOUR_DIR" \
  -e "$ROOT[$EXTRAS]" \
  || fail "installing norm_plugins and its pinned dependencies failed" "read the pip error above"
# A cached wheel may have been built on another machine (one carried to an offline GPU node): if its
# compiled ops do not load against this machine's libraries, build them here after all.
if ((!BUILT)) && ! loaded="$("$VENV/bin/python" -c 'import mmcv._ext' 2>&1)"; then
  say "the cached $(basename "$WHEEL") does not load here ($(tail -n 1 <<<"$loaded")); building mmcv on this machine"
  mv "$WHEEL" "$WHEEL.unloadable"
  build_mmcv
  WHEEL="$(ls "$FLAVOUR_DIR"/mmcv-2.1.0-*.whl | head -n 1)"
  install_mmcv
fi

"$VENV/bin/python" -c 'import mmcv._ext, mmdet.models, mmseg.models, norm_plugins' \
  || fail "the installed stack does not import" "remove $VENV and rerun this script"
checked="$("$VENV/bin/python" "$HELPER" check-ops "$OPS")" \
  || fail "mmcv's compiled ops do not run" "delete $FLAVOUR_DIR and rerun to rebuild them"
say "$checked"
stamp_of >"$STAMP"
say "ready: $VENV ($TORCH_BUILD, mmcv ops for $OPS) in $(elapsed $SECONDS)"
