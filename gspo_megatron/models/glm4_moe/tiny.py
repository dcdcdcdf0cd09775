"""Tiny random GLM-4.5-style models for tests and demos: the family's own fields over a shared
shape (``gspo_megatron.testing.tiny_model`` gives the shape and writes the checkpoint)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import Glm4MoeConfig


def tiny_config(model_type: str, **fields):
    """8 experts in 2 groups (top-2 from the best group), one shared expert, layer 0 dense,
    sigmoid routing weights scaled by 2.5, q/k/v biases, q/k norms, RoPE on half of each head,
    one MTP layer in the checkpoint (``complete_checkpoint`` writes it). ``fields`` win."""
    kw = dict(moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2)
    kw.update(n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1)
    kw.update(routed_scaling_factor=2.5, norm_topk_prob=True, attention_bias=True)
    kw.update(use_qk_norm=True, rms_norm_eps=1e-5, tie_word_embeddings=False)
    kw.update(num_nextn_predict_layers=1)
    rope = {"rope_theta": 10000.0, "rope_type": "default", "partial_rotary_factor": 0.5}
    kw.update(rope_parameters=rope)
    return Glm4MoeConfig(**{**kw, **fields})


def complete_checkpoint(out: Path, config, dtype: torch.dtype = torch.float32) -> None:
    """Some random tensors of each of the config's multi-token-prediction layers, named as in
    GLM-4.5's releases, into ``out/model.safetensors`` (transformers neither builds nor saves
    them)."""
    count = getattr(config, "num_nextn_predict_layers", 0) or 0
    if not count:
        return
    path = Path(out) / "model.safetensors"
    tensors = load_file(str(path))
    H = config.hidden_size
    for i in range(config.num_hidden_layers, config.num_hidden_layers + count):
        p = f"model.layers.{i}."
        for name, shape in (
            ("eh_proj.weight", (H, 2 * H)),
            ("enorm.weight", (H,)),
            ("hnorm.weight", (H,)),
            ("shared_head.norm.weight", (H,)),
            ("input_layernorm.weight", (H,)),
            ("self_attn.o_proj.weight", (H, H)),
        ):
            tensors[p + name] = torch.randn(shape).to(dtype)
    save_file(tensors, str(path), metadata={"format": "pt"})
