"""HF <-> megatron names and tensor layouts for GLM-4.5-style MoE (the shared vocabulary and
layout changes are ``models/layers/tensor_map.py``). Per layer: attention with q/k/v biases
and optional q/k norms; then, in the first ``first_k_dense_replace`` layers, a dense SwiGLU MLP,
else the router (its weight and the frozen ``e_score_correction_bias``, megatron's
``router.expert_bias``), the routed experts and the shared experts.

The multi-token-prediction layers of released checkpoints (``model.layers.{num_layers + i}.*``)
are not part of the megatron model: ``untrained`` names them, and the converters carry them from
the HF input to every HF export unchanged, so that vLLM's speculative decoding still finds them.
"""

from __future__ import annotations

from typing import Iterator, List

from gspo_megatron.models.glm4_moe.spec import Glm4MoeSpec
from gspo_megatron.models.layers import tensor_map as tm
from gspo_megatron.models.layers.tensor_map import TensorMapping


def _layer(spec: Glm4MoeSpec, layer: int, m: str, h: str) -> Iterator[TensorMapping]:
    H = spec.hidden_size
    yield from tm.attention(spec, m, h, qk_norm=spec.qk_norm, qkv_bias=spec.qkv_bias)
    if not spec.moe_layers[layer]:
        yield from tm.swiglu(m + "mlp.", h + "mlp.", spec.ffn_hidden_size, H)
        return
    yield from tm.routed_experts(spec, m, h)
    E = spec.num_experts
    yield tm.copy(m + "mlp.router.expert_bias", h + "mlp.gate.e_score_correction_bias", (E,))
    shared = spec.shared_ffn_hidden_size
    yield from tm.swiglu(m + "mlp.shared_experts.", h + "mlp.shared_experts.", shared, H)


def tensor_mappings(spec: Glm4MoeSpec) -> List[TensorMapping]:
    """Every tensor of the model, in HF order (embedding, layers, final norm, lm_head)."""
    return tm.model_mappings(spec, lambda layer, m, h: _layer(spec, layer, m, h))


def untrained(spec: Glm4MoeSpec, hf_name: str) -> bool:
    """Whether an HF tensor belongs to a multi-token-prediction layer (carried, not trained)."""
    mtp = range(spec.num_layers, spec.num_layers + spec.num_mtp_layers)
    return any(hf_name.startswith(f"model.layers.{i}.") for i in mtp)
