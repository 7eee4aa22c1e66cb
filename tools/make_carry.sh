#!/usr/bin/env bash
# Makes, on a connected machine, the folder to carry to the reference GPU node (no network there): the
# wheelhouse of tools/make_wheelhouse.sh for the node's Python, less what the node has
# (tools/gpu_node_packages.txt), and checks that it fits what travels to the node.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: tools/make_carry.sh [--out DIR] [--python 3.X] [--present FILE] [--extras LIST] [--mmcv-wheels CACHE]
       tools/make_carry.sh --check DIR

  --out DIR       the folder to carry (default gpu_carry, ignored by git); DIR/wheelhouse is remade
  --python 3.X    the node's Python (default 3.12)
  --present FILE  what the node has (default tools/gpu_node_packages.txt)
  --extras LIST   norm_plugins extras (default test, what tools/gpu_check.sh needs)
  --mmcv-wheels CACHE
                  also carry mmcv wheels with CUDA ops built for that Python, from a wheel cache of
                  tools/setup_env.sh (tools/gpu_rehearsal.sh builds the node's into its DIR/wheels):
                  with NORM_PLUGINS_WHEEL_CACHE=DIR/wheels the node skips the build (4 minutes on
                  16 cores), and builds after all if the wheel does not load there
  --check DIR     only check the size of an existing folder to carry

Stops when DIR is 60 MiB or more, or when the working tree and DIR together exceed the 64 MiB that
travel to the node. Then, on the node: bash tools/gpu_check.sh --stages 2 --wheelhouse DIR/wheelhouse
EOF
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
say() { echo "[carry] $*"; }
fail() {
  echo "[carry] ERROR: $1" >&2
  echo "[carry] fix: $2" >&2
  exit 1
}
LIMIT_MIB=60       # the carried folder
TRAVEL_MIB=64      # everything that travels: the working tree and the carried folders

OUT="$ROOT/gpu_carry" PY=3.12 PRESENT="$ROOT/tools/gpu_node_packages.txt" EXTRAS=test CHECK_ONLY=0 MMCV_WHEELS=""
while (($#)); do
  case "$1" in
    --out | --python | --present | --extras | --check | --mmcv-wheels)
      [[ $# -ge 2 ]] || fail "$1 needs a value" "see --help" ;;&
    --out) OUT="$2"; shift ;;
    --check) OUT="$2"; CHECK_ONLY=1; shift ;;
    --python) PY="$2"; shift ;;
    --present) PRESENT="$2"; shift ;;
    --extras) EXTRAS="$2"; shift ;;
    --mmcv-wheels) MMCV_WHEELS="$2"; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; fail "unknown option $1" "see the usage above" ;;
  esac
  shift
done
if ((CHECK_ONLY)); then
  [[ -d "$OUT" ]] || fail "no folder $OUT to check" "make it with tools/make_carry.sh --out $OUT"
fi
[[ -f "$PRESENT" ]] || fail "no file $PRESENT" "give the node's \`python3 -m pip list --format=freeze\` with --present"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
if [[ "$OUT" == "$ROOT"/* ]] && ! git -C "$ROOT" check-ignore -q "$OUT" 2>/dev/null; then
  fail "$OUT is inside the repository but not ignored, so it would travel twice and land in commits" \
       "use the default gpu_carry/ (in .gitignore) or a folder outside the repository"
fi

if ((!CHECK_ONLY)); then
  rm -rf "$OUT/wheelhouse"  # wheels of an earlier run may be other versions: two of one package stop pip
  bash "$ROOT/tools/make_wheelhouse.sh" --python "$PY" --out "$OUT/wheelhouse" --present "$PRESENT" --extras "$EXTRAS"
  rm -rf "$OUT/wheels"
  if [[ -n "$MMCV_WHEELS" ]]; then
    found=0
    for flavour in "$MMCV_WHEELS"/cp${PY/./}-*-ops-cuda-*/; do
      wheel="$(ls "$flavour"mmcv-2.1.0-*.whl 2>/dev/null | head -n 1 || true)"
      [[ -n "$wheel" ]] || continue
      mkdir -p "$OUT/wheels/$(basename "$flavour")"
      cp "$wheel" "$flavour"built-with.txt "$OUT/wheels/$(basename "$flavour")/"
      say "carrying $(basename "$flavour")/$(basename "$wheel") ($(du -m "$wheel" | cut -f1) MiB)"
      found=1
    done
    ((found)) || fail "no mmcv wheel with CUDA ops for Python $PY in $MMCV_WHEELS" \
                      "build one with tools/gpu_rehearsal.sh (its DIR/wheels), or leave out --mmcv-wheels"
  fi
fi

mib() { echo $((($1 + 1048575) / 1048576)); }
size="$(du -sb "$OUT" | cut -f1)"
if ((size >= LIMIT_MIB * 1048576)); then
  say "largest files:"
  find "$OUT" -type f -printf '%s %P\n' | sort -rn | head -n 8 \
    | awk '{ printf "[carry]   %6.1f MiB  %s\n", $1 / 1048576, $2 }'
  fail "$OUT is $(mib "$size") MiB, over the $LIMIT_MIB MiB that may be carried to the node" \
       "list more of the node's packages in $PRESENT (its pip list), or carry fewer extras than '$EXTRAS'"
fi
tree=0
if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  # What travels besides the carried folder: tracked files and untracked ones git does not ignore.
  tree="$(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
          | { xargs -0 -r stat -c %s -- 2>/dev/null || true; } | awk '{ total += $1 } END { print total + 0 }')"
  ((size + tree <= TRAVEL_MIB * 1048576)) \
    || fail "the working tree ($(mib "$tree") MiB) and $OUT ($(mib "$size") MiB) exceed the $TRAVEL_MIB MiB that travel" \
            "remove large untracked files from the working tree, or carry less"
fi
say "$OUT: $(mib "$size") MiB (limit $LIMIT_MIB), with the working tree $(mib $((size + tree))) MiB of $TRAVEL_MIB"
if [[ "$OUT" == "$ROOT"/* ]]; then
  rel="${OUT#"$ROOT"/}"
  cache=""
  [[ ! -d "$OUT/wheels" ]] || cache="NORM_PLUGINS_WHEEL_CACHE=$rel/wheels "
  say "carry: [\"$rel\"]; on the node: ${cache}bash tools/gpu_check.sh --stages 2 --wheelhouse $rel/wheelhouse"
else
  say "to carry it, copy it into the repository under an ignored folder (e.g. gpu_carry/) and name that folder in carry"
fi
