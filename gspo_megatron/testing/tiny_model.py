"""Tiny random models of every family and a tokenizer, made locally (nothing is downloaded).

The quickstart, the demo and the tests use these. ``make_hf_model`` draws weights with a wider
spread than transformers' default init so that router choices and attention patterns are far
from uniform: a parity check on such a model tests something.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Glm4MoeConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3MoeConfig,
)

from gspo_megatron.models import FAMILIES

TINY_VOCAB = 250  # deliberately not a multiple of 128: exercises vocabulary padding


# What the tiny MoE and dense models share: 4 layers, hidden 64, GQA 4:2 with head_dim 16.
_TINY_SHAPE = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, head_dim=16)
_TINY_SHAPE.update(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
_TINY_SHAPE.update(max_position_embeddings=256)


def tiny_moe_config(**overrides):
    """4 experts (2 per token, renormalised), layer 2 dense, untied embeddings."""
    kw = dict(_TINY_SHAPE, moe_intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
    kw.update(norm_topk_prob=True, mlp_only_layers=[2], rms_norm_eps=1e-6)
    kw.update(
        tie_word_embeddings=False, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}
    )
    kw.update(overrides)
    return Qwen3MoeConfig(**kw)


def tiny_dense_config(**overrides):
    """Dense Qwen3 with tied embeddings."""
    rope = {"rope_theta": 1000000.0, "rope_type": "default"}
    kw = dict(_TINY_SHAPE, tie_word_embeddings=True, rope_parameters=rope)
    kw.update(overrides)
    return Qwen3Config(**kw)


def tiny_glm_config(**overrides):
    """GLM-4.5-style MoE: 8 experts in 2 groups (top-2 from the best group), one shared expert,
    layer 0 dense, sigmoid routing weights scaled by 2.5, q/k/v biases, q/k norms, RoPE on half
    of each head, one MTP layer in the checkpoint (``make_hf_model`` writes it)."""
    kw = dict(_TINY_SHAPE, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2)
    kw.update(n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1)
    kw.update(routed_scaling_factor=2.5, norm_topk_prob=True, attention_bias=True)
    kw.update(use_qk_norm=True, rms_norm_eps=1e-5, tie_word_embeddings=False)
    kw.update(num_nextn_predict_layers=1)
    rope = {"rope_theta": 10000.0, "rope_type": "default", "partial_rotary_factor": 0.5}
    kw.update(rope_parameters=rope)
    kw.update(overrides)
    return Glm4MoeConfig(**kw)


def _architecture(model_type: str) -> str:
    return next(f.model_types[model_type] for f in FAMILIES if model_type in f.model_types)


def make_hf_model(config, out: Path, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Create, randomise and save_pretrained a model; returns it (fp32 or ``dtype``). A GLM
    config's MTP layers (which transformers does not build) are written as random tensors
    after the decoder layers, as released checkpoints hold them."""
    torch.manual_seed(seed)
    config.architectures = [_architecture(config.model_type)]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # Large enough to change which experts the sigmoid scores alone would pick.
                b.normal_(0.0, 0.1)
    model = model.to(dtype)
    model.save_pretrained(out)
    mtp = getattr(config, "num_nextn_predict_layers", 0) or 0
    if mtp:
        add_mtp_layers(Path(out), config, dtype)
    return model


def add_mtp_layers(out: Path, config, dtype: torch.dtype = torch.float32) -> None:
    """Some random tensors of each of the config's multi-token-prediction layers, named as in
    GLM-4.5's releases, into ``out/model.safetensors`` (transformers neither builds nor saves
    them)."""
    count = getattr(config, "num_nextn_predict_layers", 0) or 0
    path = out / "model.safetensors"
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


def write_tokenizer(out: Path, vocab_size: int = TINY_VOCAB) -> None:
    """A word-level tokenizer ("w0".."wN", <unk>, <eos>) saved as HF tokenizer files."""
    vocab = {f"w{i}": i for i in range(vocab_size - 2)}
    vocab.update({"<unk>": vocab_size - 2, "<eos>": vocab_size - 1})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>"
    ).save_pretrained(out)


def random_rows(
    n: int,
    vocab_size: int = TINY_VOCAB,
    seed: int = 0,
    max_prompt: int = 12,
    max_response: int = 14,
):
    """``n`` random (prompt_ids, response_ids) pairs for scoring checks."""
    rng = random.Random(seed)
    return [
        (
            [rng.randrange(vocab_size) for _ in range(rng.randint(1, max_prompt))],
            [rng.randrange(vocab_size) for _ in range(rng.randint(1, max_response))],
        )
        for _ in range(n)
    ]
