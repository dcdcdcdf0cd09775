"""Whether a step's sequences fit in an engine's KV cache at once.

vLLM admits a sequence only when the cache has blocks for it; the rest wait until running ones
finish. A step whose sequences do not all fit is generated in waves, and each wave pays every
decode step again: on CPU, with the demo's config and a model of 4 layers at hidden 512, a step
of 128 sequences ran in 3 waves (48 forward passes for 16 tokens) in 0.86-0.94 s, against
0.55 s in one wave. vLLM says nothing about it; the trainer says it once at start-up, with the
size that would hold the whole step.
"""

from __future__ import annotations

import math
from typing import Optional


def block_bytes(hf_config: dict, dtype_bytes: int, engine_tp: int, block_size: int) -> int:
    """Bytes of one KV cache block (keys and values of ``block_size`` tokens in every layer) of
    a Qwen3 / Qwen3-MoE model on one rank of a ``engine_tp``-way engine. vLLM splits the KV
    heads over the TP ranks and replicates them when there are fewer heads than ranks."""
    heads = hf_config.get("num_key_value_heads") or hf_config["num_attention_heads"]
    head_dim = (
        hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]
    )
    heads_per_rank = max(heads // engine_tp, 1)
    layers = hf_config["num_hidden_layers"]
    return 2 * layers * heads_per_rank * head_dim * block_size * dtype_bytes


def waves_note(
    sequences: int,
    max_model_len: int,
    num_blocks: int,
    block_size: int,
    block_nbytes: int,
    on_gpu: bool,
) -> Optional[str]:
    """One line when ``sequences`` of up to ``max_model_len`` tokens do not fit in ``num_blocks``
    blocks at once (None when they do): how many fit, in how many waves the step may run, and
    the cache size that holds them all."""
    per_sequence = math.ceil(max_model_len / block_size)
    fit = max(num_blocks // per_sequence, 1)  # vLLM refuses to start below one
    if sequences <= fit:
        return None
    need_gib = sequences * per_sequence * block_nbytes / 2**30
    # Rounded up at two significant digits: the size printed must itself hold the step.
    digits = 1 - math.floor(math.log10(need_gib))
    need = math.ceil(need_gib * 10**digits) / 10**digits
    fix = (
        f"about {need:g} GiB of KV cache per engine would hold them all (raise "
        f"rollout.gpu_memory_utilization)"
        if on_gpu
        else f"rollout.kv_cache_gib={need:g} holds them all"
    )
    return (
        f"rollout: each engine's KV cache holds {fit} sequences of the longest allowed length "
        f"({max_model_len} tokens: rollout.max_prompt_tokens + rollout.max_new_tokens) at once, "
        f"and a step samples {sequences} per engine: vLLM may generate them in up to "
        f"{math.ceil(sequences / fit)} waves, each paying every decode step again; {fix}"
    )
