#!/usr/bin/env bash
# Set up the CPU environment and run the agent demo: a tiny Qwen3-MoE learns, with GSPO, to call
# a lookup tool and answer with the value it returns (multi-turn episodes, the tool in a process
# of its own per episode), on CPU, two processes (torchrun, gloo), vLLM rollouts in-process.
#   1. gspo_megatron.tasks.agent_demo writes the task data, a BPE chat tokenizer with the tool-call
#      tokens, a random tiny model after a short warm start (the two turns' shape) and its
#      megatron checkpoint;
#   2. gspo-train trains it with launch/configs/tiny_agent_cpu.yaml;
#   3. tools/plot_metrics.py draws the reward and the tool-call rate.
# Output: outputs/agent_demo/ (run/tensorboard, run/checkpoints, run/metrics.jsonl, curves.png).
# Extra arguments are config overrides for the run, e.g. train.steps=40 or
# agent.environment=mymodule:MyEnv (another environment on the same model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export PYTHON=.venv/bin/python
export PYTHONWARNINGS=ignore
OUT=outputs/agent_demo
PY=.venv/bin/python
START=$(date +%s)
if [ ! -f "$OUT/init/mcore/metadata.json" ]; then
  $PY -m gspo_megatron.tasks.agent_demo --out "$OUT/init"
fi
rm -rf "$OUT/run"
NPROC_PER_NODE=2 bash launch/train.sh launch/configs/tiny_agent_cpu.yaml "$@"
$PY tools/plot_metrics.py --run "$OUT/run" --out "$OUT/curves.png"
echo "agent demo: done in $(( $(date +%s) - START )) s; TensorBoard: .venv/bin/tensorboard --logdir $OUT/run/tensorboard"
