#!/usr/bin/env bash
# Every GPU check of the project, one table (tools/gpu_check.py says what each check does):
#   bash tools/gpu_check.sh [OUT_DIR]      (default outputs/gpu_check; writes gpu_check.json there)
# Needs a CUDA GPU and an environment with torch, megatron-core and transformers (Transformer
# Engine optional: its layer spec is checked when it imports). On a machine without a package
# index, put the wheels in .whl/ (see docs/benchmarks.md): they are installed to /tmp/site first.
# PYTHON picks the interpreter (default: .venv/bin/python when present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/gpu_check}
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to torch ($PY); run it on a GPU machine" >&2
  exit 2
fi
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH} PYTHONWARNINGS=ignore
exec "$PY" tools/gpu_check.py all --out "$OUT"
