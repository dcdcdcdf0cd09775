"""HF <-> megatron names and tensor layouts for Qwen3 / Qwen3-MoE (the shared vocabulary and the
layout changes are ``models/layers/tensor_map.py``): per layer, attention with q/k norms and no
biases, then a routed MoE (router + experts) or a dense SwiGLU MLP."""

from __future__ import annotations

from typing import Iterator, List

from gspo_megatron.models.layers import tensor_map as tm
from gspo_megatron.models.layers.tensor_map import TensorMapping
from gspo_megatron.models.qwen3.spec import Qwen3Spec


def _layer(spec: Qwen3Spec, layer: int, m: str, h: str) -> Iterator[TensorMapping]:
    yield from tm.attention(spec, m, h, qk_norm=True, qkv_bias=False)
    if spec.moe_layers[layer]:
        yield from tm.routed_experts(spec, m, h)
    else:
        yield from tm.swiglu(m + "mlp.", h + "mlp.", spec.ffn_hidden_size, spec.hidden_size)


def tensor_mappings(spec: Qwen3Spec) -> List[TensorMapping]:
    """Every tensor of the model, in HF order (embedding, layers, final norm, lm_head)."""
    return tm.model_mappings(spec, lambda layer, m, h: _layer(spec, layer, m, h))
