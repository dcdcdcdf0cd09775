"""Qwen3Spec reads both config spellings and matches transformers' own layer construction."""

from __future__ import annotations

import pytest

from gspo_megatron.errors import GspoError
from gspo_megatron.models import SUPPORTED_ARCHITECTURES, spec_from_hf_config
from gspo_megatron.testing.tiny_model import tiny_dense_config, tiny_moe_config


def _released_style(cfg: dict) -> dict:
    """The spelling of released Qwen3-MoE configs: num_experts and a top-level rope_theta."""
    cfg = dict(cfg)
    cfg["num_experts"] = cfg.pop("num_local_experts")
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    return cfg


def test_both_spellings_give_the_same_spec():
    cfg = tiny_moe_config().to_dict()
    cfg["architectures"] = ["Qwen3MoeForCausalLM"]
    assert spec_from_hf_config(cfg) == spec_from_hf_config(_released_style(cfg))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(mlp_only_layers=[0, 3]),
        dict(decoder_sparse_step=2),
        dict(decoder_sparse_step=2, mlp_only_layers=[1]),
    ],
)
def test_moe_layer_pattern_matches_transformers(overrides):
    from transformers import Qwen3MoeForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = tiny_moe_config(**overrides)
    model = Qwen3MoeForCausalLM(config)
    hf_pattern = tuple(
        isinstance(layer.mlp, Qwen3MoeSparseMoeBlock) for layer in model.model.layers
    )
    cfg = config.to_dict()
    cfg["architectures"] = ["Qwen3MoeForCausalLM"]
    assert spec_from_hf_config(cfg).moe_layers == hf_pattern


def test_unsupported_architecture_lists_supported():
    with pytest.raises(GspoError) as err:
        spec_from_hf_config({"architectures": ["LlamaForCausalLM"]}, where="x/config.json")
    msg = str(err.value)
    assert "x/config.json" in msg and "LlamaForCausalLM" in msg
    assert all(a in msg for a in SUPPORTED_ARCHITECTURES)


def test_unsupported_rope_scaling_is_named():
    cfg = tiny_dense_config().to_dict()
    cfg["architectures"] = ["Qwen3ForCausalLM"]
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
    with pytest.raises(GspoError, match="rope type 'yarn' is not supported"):
        spec_from_hf_config(cfg)


def test_vocab_padding_is_layout_independent():
    cfg = tiny_dense_config().to_dict()
    cfg["architectures"] = ["Qwen3ForCausalLM"]
    spec = spec_from_hf_config(cfg)
    assert spec.vocab_size == 250 and spec.padded_vocab_size == 256
    cfg["vocab_size"] = 151936  # Qwen3's: already a multiple of 128
    assert spec_from_hf_config(cfg).padded_vocab_size == 151936
