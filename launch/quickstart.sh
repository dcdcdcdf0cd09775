#!/usr/bin/env bash
# Set up the CPU environment and run the demo: a tiny Qwen3-MoE learns a copy task with GSPO,
# on CPU, two processes (torchrun, gloo), vLLM rollouts in-process, in a few minutes.
#   1. gspo_megatron.tasks.demo writes the task data, a random tiny model after a short supervised
#      warm start (answer shape only; see README) and its megatron checkpoint;
#   2. gspo-train trains it with launch/configs/tiny_cpu.yaml;
#   3. tools/plot_metrics.py draws the reward and clip-fraction curves.
# Output: outputs/quickstart/ (run/tensorboard, run/checkpoints, run/metrics.jsonl, curves.png).
# Extra arguments are config overrides for the run, e.g. train.steps=40.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
# PYTHON chose the interpreter .venv is made with (PYTHON=python3.12 bash launch/quickstart.sh);
# from here on everything runs in .venv.
export PYTHON=.venv/bin/python
export PYTHONWARNINGS=ignore
OUT=outputs/quickstart
PY=.venv/bin/python
START=$(date +%s)
# (held_out.jsonl: an init/ from before the demo had validation is made again)
if [ ! -f "$OUT/init/mcore/metadata.json" ] || [ ! -f "$OUT/init/held_out.jsonl" ]; then
  $PY -m gspo_megatron.tasks.demo --out "$OUT/init"
fi
# A fresh run each time (the demo is about watching it learn); use --resume by hand to continue.
rm -rf "$OUT/run"
NPROC_PER_NODE=2 bash launch/train.sh launch/configs/tiny_cpu.yaml "$@"
$PY tools/plot_metrics.py --run "$OUT/run" --out "$OUT/curves.png"
echo "quickstart: done in $(( $(date +%s) - START )) s; TensorBoard: .venv/bin/tensorboard --logdir $OUT/run/tensorboard"
