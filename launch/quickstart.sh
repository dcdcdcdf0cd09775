#!/usr/bin/env bash
# Set up the CPU environment and run the main job on a small built-in default.
# Until the GSPO trainer lands, the main job is: make a tiny random Qwen3-MoE, convert it to a
# megatron-core checkpoint, and show Megatron's log-probs equal HF transformers' under several
# parallel layouts (torchrun on CPU/gloo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export PYTHONWARNINGS=ignore
OUT=outputs/quickstart
mkdir -p "$OUT"
[ -f "$OUT/hf/config.json" ] || .venv/bin/python tools/make_tiny_model.py --out "$OUT/hf"
.venv/bin/python tools/check_parity.py --hf-dir "$OUT/hf" --work "$OUT" \
  --layouts "1;2:--tp 2;2:--pp 2;2:--ep 2;4:--tp 2 --ep 2"
