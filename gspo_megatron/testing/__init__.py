"""References and fixtures that prove the library right, kept apart from the library itself.

Nothing in training imports these. The tests, the tools (parity checks, benchmarks) and the
demo do:

- ``tiny_model``: tiny random Qwen3 / Qwen3-MoE models and a word-level tokenizer, made locally;
- ``hf_reference``: log-probs from HF transformers, the reference for every Megatron log-prob;
- ``gather``: full tensors (weights, gradients) from any parallel layout, to compare layouts;
- ``generate``: greedy decoding with the trainer's Megatron model, the reference a rollout
  engine's greedy continuation must equal after a weight sync;
- ``chat_tokenizer``: a byte-level BPE tokenizer with a ChatML chat template and the tool-call
  tokens, trained locally (re-encoding really drifts with it), for multi-turn tests and the
  agent demo;
- ``sleepy_env``: an environment whose steps sleep (tools/bench_agent.py).
"""
