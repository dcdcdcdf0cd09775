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

from gspo_megatron.models import ModelSpec


def block_bytes(spec: ModelSpec, dtype_bytes: int, engine_tp: int, block_size: int) -> int:
    """Bytes of one KV cache block (``block_size`` tokens) on one rank of an ``engine_tp``-way
    engine, as the model's family counts them (full attention: keys and values of every layer,
    the KV heads split over the TP ranks, replicated when there are fewer heads than ranks)."""
    return spec.kv_bytes_per_token(dtype_bytes, engine_tp) * block_size


def holding_gib(sequences: int, max_model_len: int, block_size: int, block_nbytes: int) -> float:
    """The KV cache, in GiB, that holds ``sequences`` of up to ``max_model_len`` tokens at once,
    rounded up at two significant digits: the size printed must itself hold them."""
    need = sequences * math.ceil(max_model_len / block_size) * block_nbytes / 2**30
    digits = 1 - math.floor(math.log10(need))
    return math.ceil(need * 10**digits) / 10**digits


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
    fit = max(num_blocks // math.ceil(max_model_len / block_size), 1)  # vLLM needs one to start
    if sequences <= fit:
        return None
    need = holding_gib(sequences, max_model_len, block_size, block_nbytes)
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
