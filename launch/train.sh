#!/usr/bin/env bash
# Single node: one torchrun, all local devices.
#   bash launch/train.sh launch/configs/qwen3_30b_a3b.yaml [--resume] [section.key=value ...]
# NPROC_PER_NODE defaults to the number of GPUs (1 process on a CPU-only machine).
# PYTHON defaults to the repo's .venv when present (launch/setup.sh), else python on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 CONFIG.yaml [--resume] [section.key=value ...]" >&2; exit 2; }
CONFIG=$1; shift
source launch/torchrun_env.sh
# Bad input is one line and exit status 2 here, before torchrun (whose report of a failed worker
# is a 40-line banner and exit status 1).
WORLD_SIZE=$NPROC_PER_NODE LOCAL_WORLD_SIZE=$NPROC_PER_NODE "$PYTHON" -m gspo_megatron.train --check --config "$CONFIG" "$@"
exec "$PYTHON" -m gspo_megatron.distributed.torchrun --standalone --nproc-per-node "$NPROC_PER_NODE" \
  -m gspo_megatron.train --config "$CONFIG" "$@"
