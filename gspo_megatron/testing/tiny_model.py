"""Tiny random models of every family and a tokenizer, made locally (nothing is downloaded).

The quickstart, the demo and the tests use these. ``make_hf_model`` draws weights with a wider
spread than transformers' default init so that router choices and attention patterns are far
from uniform: a parity check on such a model tests something.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from gspo_megatron.models import family_of_model_type

TINY_VOCAB = 250  # deliberately not a multiple of 128: exercises vocabulary padding


# What the tiny MoE and dense models share: 4 layers, hidden 64, GQA 4:2 with head_dim 16.
_TINY_SHAPE = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, head_dim=16)
_TINY_SHAPE.update(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
_TINY_SHAPE.update(max_position_embeddings=256)


def tiny_moe_config(**overrides):
    """Qwen3-MoE: 4 experts (2 per token, renormalised), layer 2 dense, untied embeddings."""
    return tiny_config("qwen3_moe", **overrides)


def tiny_dense_config(**overrides):
    """Dense Qwen3 with tied embeddings."""
    return tiny_config("qwen3", **overrides)


def tiny_glm_config(**overrides):
    """GLM-4.5-style MoE: 8 experts in 2 groups (top-2 from the best group), one shared expert,
    layer 0 dense, sigmoid routing weights scaled by 2.5, q/k/v biases, q/k norms, RoPE on half
    of each head, one MTP layer in the checkpoint (``make_hf_model`` writes it)."""
    return tiny_config("glm4_moe", **overrides)


def tiny_config(model_type: str, **overrides):
    """A tiny model of the family that reads ``model_type``: its own fields over the shared
    shape."""
    family = family_of_model_type(model_type)
    return family.tiny.tiny_config(model_type, **{**_TINY_SHAPE, **overrides})


def make_hf_model(config, out: Path, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Create, randomise and save_pretrained a model; returns it (fp32 or ``dtype``). A GLM
    config's MTP layers (which transformers does not build) are written as random tensors
    after the decoder layers, as released checkpoints hold them."""
    torch.manual_seed(seed)
    family = family_of_model_type(config.model_type)
    config.architectures = [family.model_types[config.model_type]]
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
    family.tiny.complete_checkpoint(Path(out), config, dtype)
    return model


def complete_checkpoint(out: Path, config) -> None:
    """What save_pretrained leaves out of a tiny fp32 checkpoint of this family (GLM: its MTP
    layers), written into ``out``."""
    family_of_model_type(config.model_type).tiny.complete_checkpoint(Path(out), config)


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
