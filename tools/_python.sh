# Sourced by the launch scripts: ROOT is the repository, PYTHON the interpreter to run.
# PYTHON from the environment wins; otherwise the repository's .venv (tools/setup_env.sh), else python3.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

torchrun_exec() {  # torchrun_exec NUM_PROCESSES SCRIPT [ARGS...]: this node's share of the job
  local nproc=$1
  shift
  exec "$PYTHON" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" \
    --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${PORT:-29500}" \
    --nproc_per_node="$nproc" "$@"
}

require_count() {  # require_count NAME VALUE USAGE
  if ! [[ "$2" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: $1 must be a positive integer, got '$2'; usage: $3" >&2
    exit 2
  fi
}
