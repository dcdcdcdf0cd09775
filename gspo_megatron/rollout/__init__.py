"""Rollouts: vLLM engines colocated with the trainer, and the in-memory weight sync into them."""
