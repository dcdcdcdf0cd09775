#!/usr/bin/env bash
# Single node: one torchrun, all local devices.
#   bash launch/train.sh launch/configs/qwen3_30b_a3b.yaml [--resume] [section.key=value ...]
# NPROC_PER_NODE defaults to the number of GPUs (1 process on a CPU-only machine).
# PYTHON defaults to the repo's .venv when present (launch/setup.sh), else python on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 CONFIG.yaml [--resume] [section.key=value ...]" >&2; exit 2; }
CONFIG=$1; shift
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${NPROC_PER_NODE:-0}" -gt 0 ] || NPROC_PER_NODE=1
fi
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC_PER_NODE" \
  -m gspo_megatron.train --config "$CONFIG" "$@"
