#!/usr/bin/env bash
# Downloads, on a connected machine, everything tools/setup_env.sh --wheelhouse DIR needs on a machine
# without network: the mmcv 2.1.0 sdist (built there, for its torch and GPUs), the pure-Python wheels
# and the manylinux wheels of the compiled dependencies for the target's Python version.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: tools/make_wheelhouse.sh --python 3.X --out DIR [--extras LIST] [--present FILE]
                                [--with-torch | --cpu-torch] [--platform TAG]...

  --python 3.X     the target's Python version (required)
  --out DIR        the wheelhouse folder (created; copy it to the target)
  --extras LIST    norm_plugins extras to include (default: test, what tools/gpu_check.sh needs;
                   add deploy (ONNX, ~37 MB) and study (scikit-learn, ~10 MB) for those tools)
  --present FILE   packages the target already has, left out: the output of
                   `python3 -m pip list --format=freeze` there, or bare names one per line
  --with-torch     include torch==2.13.0 from the package index (the CUDA build, several GB)
  --cpu-torch      include torch 2.13.0's CPU build
  --platform TAG   manylinux platform tags of the target (default: manylinux 2.17 to 2.28, x86_64)

By default torch is left out: the target brings its own and installs with
`tools/setup_env.sh --system-torch --wheelhouse DIR` (or tools/gpu_check.sh --wheelhouse DIR).
PYTHON (default: the repository's .venv) must have torch and setuptools<81: pip runs mmcv's
setup.py, which imports both, to read the sdist's metadata.
EOF
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HELPER="$ROOT/tools/_setup_env.py"
fail() {
  echo "[wheelhouse] ERROR: $1" >&2
  echo "[wheelhouse] fix: $2" >&2
  exit 1
}
say() { echo "[wheelhouse] $*"; }

TARGET_PY="" OUT="" EXTRAS=test PRESENT="" TORCH="" PLATFORMS=()
while (($#)); do
  case "$1" in
    --python | --out | --extras | --present | --platform)
      [[ $# -ge 2 ]] || fail "$1 needs a value" "see --help" ;;&
    --python) TARGET_PY="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    --extras) EXTRAS="$2"; shift ;;
    --present) PRESENT="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"; shift ;;
    --platform) PLATFORMS+=("$2"); shift ;;
    --with-torch) TORCH="torch==2.13.0" ;;
    --cpu-torch) TORCH="torch==2.13.0+cpu" ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; fail "unknown option $1" "see the usage above" ;;
  esac
  shift
done
[[ "$TARGET_PY" =~ ^3\.[0-9]+$ ]] || fail "--python 3.X is required (the target's Python version)" "e.g. --python 3.12"
[[ -n "$OUT" ]] || fail "--out DIR is required" "e.g. --out wheelhouse-py${TARGET_PY}"
[[ -z "$PRESENT" || -f "$PRESENT" ]] || fail "no file $PRESENT" "on the target: python3 -m pip list --format=freeze > present.txt"
if ((${#PLATFORMS[@]} == 0)); then
  PLATFORMS=(manylinux2014_x86_64)
  for minor in $(seq 17 28); do PLATFORMS+=("manylinux_2_${minor}_x86_64"); done
fi

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
"$PYTHON" -c 'import torch, pkg_resources' 2>/dev/null \
  || fail "$PYTHON lacks torch or setuptools<81, which mmcv's setup.py imports when pip reads the sdist" \
          "run tools/setup_env.sh first (its .venv is the default), or set PYTHON to such an interpreter"
PIP=("$PYTHON" -m pip --disable-pip-version-check)

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

say "mmcv 2.1.0 source distribution"
"${PIP[@]}" download -q --no-deps --no-binary mmcv --no-build-isolation -d "$OUT" mmcv==2.1.0 \
  || fail "downloading the mmcv 2.1.0 sdist failed" "read the pip error above"
tar -xzOf "$OUT/mmcv-2.1.0.tar.gz" mmcv-2.1.0/requirements/runtime.txt >"$work/mmcv-runtime.txt"

present=()
[[ -z "$PRESENT" ]] || present=(--present "$PRESENT")
"$PYTHON" "$HELPER" wheelhouse-requirements "$ROOT/setup.cfg" "$work/mmcv-runtime.txt" --extras "$EXTRAS" \
  ${TORCH:+--with-torch "$TORCH"} "${present[@]}" >"$work/requirements.txt"
constraints=()
if [[ -n "$PRESENT" ]]; then
  # The target's versions of what it has, so the rest resolves against them.
  "$PYTHON" "$HELPER" present-pins "$PRESENT" >"$work/present-pins.txt"
  constraints=(-c "$work/present-pins.txt")
fi
index=()
[[ "$TORCH" != *+cpu ]] || index=(--extra-index-url https://download.pytorch.org/whl/cpu)
say "wheels for Python $TARGET_PY: $(paste -sd' ' "$work/requirements.txt")"
platform_args=()
for tag in "${PLATFORMS[@]}"; do platform_args+=(--platform "$tag"); done
"${PIP[@]}" download -q --only-binary=:all: --python-version "$TARGET_PY" --implementation cp \
  "${platform_args[@]}" "${index[@]}" "${constraints[@]}" -d "$OUT" -r "$work/requirements.txt" \
  || fail "downloading the wheels for Python $TARGET_PY failed" "read the pip error above"
if [[ -n "$PRESENT" ]]; then
  pruned="$("$PYTHON" "$HELPER" prune-present "$OUT" "$PRESENT")"
  [[ -z "$pruned" ]] || say "left out, the target has them: $pruned"
fi

cat >"$OUT/wheelhouse.txt" <<EOF
python=$TARGET_PY
extras=$EXTRAS
torch=${TORCH:-system}
present=${PRESENT:+$(basename "$PRESENT")}
EOF
size="$(du -sm "$OUT" | cut -f1)"
say "largest files:"
ls -lS "$OUT" | awk 'NR > 1 && NR <= 7 { printf "[wheelhouse]   %6.1f MiB  %s\n", $5 / 1048576, $9 }'
say "$OUT: $(ls "$OUT" | wc -l) files, $size MiB"
say "on the target: bash tools/setup_env.sh$([[ -n "$TORCH" ]] || echo " --system-torch") --wheelhouse DIR"
