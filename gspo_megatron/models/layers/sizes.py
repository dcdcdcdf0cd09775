"""What a GPT-style decoder's shape implies, for the families to compose into their own rules:
which sizes a parallel layout must divide, the FLOPs of its matrix multiplies, its KV-cache
bytes. (A family whose layers differ, e.g. linear attention, adds or replaces terms.)

FLOPs are 2 per multiply-add, counted as PyTorch's FlopCounterMode counts HF transformers' eager
forward (tests/test_flops.py holds every family to equality).
"""

from __future__ import annotations

from typing import List, Tuple

Division = Tuple[str, int, int, str]
"""(what, its size, the parallel size that must divide it, that parallel dimension's name)."""


def tensor_parallel_divisions(spec, layout) -> List[Division]:
    """TP splits attention heads, query groups, vocabulary rows and the dense MLP."""
    return [
        ("num_attention_heads", spec.num_attention_heads, layout.tp, "TP"),
        ("num_key_value_heads (query groups)", spec.num_query_groups, layout.tp, "TP"),
        ("padded vocabulary", spec.padded_vocab_size, layout.tp, "TP"),
        ("intermediate_size", spec.ffn_hidden_size, layout.tp, "TP"),
    ]


def expert_divisions(spec, layout) -> List[Division]:
    """EP splits the routed experts, ETP each expert's MLP."""
    return [
        ("num_experts", spec.num_experts, layout.ep, "EP"),
        ("moe_intermediate_size", spec.moe_ffn_hidden_size, layout.expert_tp, "ETP"),
    ]


def attention_projection_flops(spec) -> int:
    """Per token and layer: q/k/v and the output projection."""
    h = spec.hidden_size
    q = spec.num_attention_heads * spec.head_dim
    kv = spec.num_query_groups * spec.head_dim
    return 2 * h * (q + 2 * kv) + 2 * q * h


def swiglu_flops(hidden: int, intermediate: int) -> int:
    """Per token: a SwiGLU MLP's three matrices."""
    return 2 * 3 * hidden * intermediate


def routed_flops(spec) -> int:
    """Per token and MoE layer: the router and ``top_k`` experts."""
    h = spec.hidden_size
    return 2 * h * spec.num_experts + spec.moe_top_k * swiglu_flops(h, spec.moe_ffn_hidden_size)


def lm_head_flops(spec) -> int:
    return 2 * spec.hidden_size * spec.vocab_size


def full_attention_flops(spec, layers: int, n: int) -> int:
    """A sequence of n tokens through ``layers`` softmax-attention layers: scores and their
    weighted sum over the full square (megatron's throughput convention; a causal kernel skips
    half)."""
    return layers * 4 * n * n * spec.num_attention_heads * spec.head_dim


def full_attention_kv_bytes(spec, layers: int, dtype_bytes: int, engine_tp: int) -> int:
    """Per token: keys and values of ``layers`` attention layers on one rank of an
    ``engine_tp``-way vLLM engine, which splits the KV heads over its ranks and replicates them
    when there are fewer heads than ranks."""
    heads_per_rank = max(spec.num_query_groups // engine_tp, 1)
    return 2 * layers * heads_per_rank * spec.head_dim * dtype_bytes
