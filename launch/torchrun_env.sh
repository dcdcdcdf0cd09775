# Sourced by launch/train.sh and launch/multinode.sh (from the repo root): what they both need.
# PYTHON: the repo's .venv when present (launch/setup.sh), else python on PATH.
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
# NPROC_PER_NODE: one process per local GPU, else 1.
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [ "${NPROC_PER_NODE:-0}" -gt 0 ] || NPROC_PER_NODE=1
fi
