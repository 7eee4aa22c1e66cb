#!/usr/bin/env bash
# Creates (or refreshes) .venv with the pinned OpenMMLab stack and norm_plugins in editable mode.
# Idempotent: a stamp of the dependency files skips everything when nothing changed, and the
# mmcv 2.1.0 wheel (compiled CPU ops, ~9 min on 2 cores) is built once into a cache outside the repo.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
WHEELS="${NORM_PLUGINS_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/norm_plugins/wheels}"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"
MMCV_PIN="mmcv==2.1.0"
# mmcv's setup.py and mmengine's `mmdet::` config resolution import pkg_resources (gone in 81).
BUILD_PINS=("setuptools>=77,<81" wheel ninja psutil numpy)

say() { echo "[setup] $*"; }
fail() {
  echo "[setup] ERROR: $1" >&2
  echo "[setup] fix: $2" >&2
  exit 1
}

stamp_of() { cat "$ROOT/setup.cfg" "$ROOT/pyproject.toml" "$0" | sha256sum | cut -c1-16; }
STAMP="$VENV/.norm_plugins_stamp"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(stamp_of)" ]]; then
  say "environment up to date: $VENV"
  exit 0
fi

"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 9)' 2>/dev/null \
  || fail "$PYTHON is missing or older than 3.9" "install Python 3.9-3.11 or set PYTHON=/path/to/python3"

if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV" || fail "could not create $VENV" "install the venv module (Debian: apt-get install python3-venv)"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

say "installing $TORCH_PIN (CPU build) and build tools"
"${PIP[@]}" install -q "$TORCH_PIN" "${BUILD_PINS[@]}" \
  || fail "installing $TORCH_PIN failed" "check the package index; a CPU wheel of torch 2.13.0 must be reachable"

mkdir -p "$WHEELS"
if ! ls "$WHEELS"/mmcv-2.1.0-*.whl >/dev/null 2>&1; then
  say "building $MMCV_PIN with compiled ops into $WHEELS (first time only, about 10 minutes on 2 cores)"
  MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "${PIP[@]}" wheel -q --no-build-isolation --no-deps \
    -w "$WHEELS" "$MMCV_PIN" \
    || fail "building $MMCV_PIN failed (see the compiler output above)" \
            "make sure gcc/g++ and the Python headers are installed, then rerun this script"
else
  say "reusing cached mmcv wheel from $WHEELS"
fi

say "installing mmcv, mmengine, mmdet, mmsegmentation and norm_plugins (editable)"
"${PIP[@]}" install -q --find-links "$WHEELS" "$MMCV_PIN" \
  || fail "installing the cached mmcv wheel failed" "delete $WHEELS/mmcv-*.whl and rerun to rebuild it"
"${PIP[@]}" install -q --no-build-isolation -e "$ROOT[dev]" \
  || fail "installing norm_plugins and its pinned dependencies failed" "read the pip error above"

"$VENV/bin/python" -c 'import mmcv._ext, mmdet.models, mmseg.models, norm_plugins' \
  || fail "the installed stack does not import" "remove $VENV and rerun this script"
stamp_of >"$STAMP"
say "ready: $VENV"
