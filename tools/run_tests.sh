#!/usr/bin/env bash
# The README's test command: installs the pinned stack if needed, then runs the whole pytest suite
# (slow end-to-end tests included). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
