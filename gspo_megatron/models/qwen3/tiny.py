"""Tiny random Qwen3 models for tests and demos: the family's own fields over a shared shape
(``gspo_megatron.testing.tiny_model`` gives the shape and writes the checkpoint)."""

from __future__ import annotations

from transformers import Qwen3Config, Qwen3MoeConfig


def tiny_config(model_type: str, **fields):
    """qwen3_moe: 4 experts (2 per token, renormalised), layer 2 dense, untied embeddings;
    qwen3: dense with tied embeddings. ``fields`` (the shape, overrides) win."""
    if model_type == "qwen3_moe":
        kw = dict(moe_intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
        kw.update(norm_topk_prob=True, mlp_only_layers=[2], rms_norm_eps=1e-6)
        kw.update(tie_word_embeddings=False)
        kw.update(rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
        return Qwen3MoeConfig(**{**kw, **fields})
    rope = {"rope_theta": 1000000.0, "rope_type": "default"}
    return Qwen3Config(**{"tie_word_embeddings": True, "rope_parameters": rope, **fields})


def complete_checkpoint(out, config, dtype=None) -> None:
    """Nothing beyond what save_pretrained writes."""
