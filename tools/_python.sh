# Sourced by the launch scripts: ROOT is the repository, PYTHON the interpreter to run.
# PYTHON from the environment wins; otherwise the repository's .venv (tools/setup_env.sh), else python3.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

require_count() {  # require_count NAME VALUE USAGE
  if ! [[ "$2" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: $1 must be a positive integer, got '$2'; usage: $3" >&2
    exit 2
  fi
}
