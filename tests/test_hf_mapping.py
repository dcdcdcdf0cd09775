"""The name/shape mapping agrees with megatron-core's own sharded state dict, and inverts."""

from __future__ import annotations

import pytest
import torch

from gspo_megatron.models import family_of_config, spec_from_hf_config
from gspo_megatron.testing.tiny_model import make_hf_model, tiny_dense_config, tiny_moe_config

# The Qwen3 family's mapping module (tensor_mappings, to_mcore, to_hf, QKV), through the face.
hf_mapping = family_of_config({"model_type": "qwen3_moe"}).mapping


def _spec(config):
    cfg = config.to_dict()
    cfg["architectures"] = [
        {"qwen3_moe": "Qwen3MoeForCausalLM", "qwen3": "Qwen3ForCausalLM"}[config.model_type]
    ]
    return spec_from_hf_config(cfg)


def _megatron_checkpoint_keys(spec):
    """Keys and global shapes megatron itself would save for this model on one rank."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from gspo_megatron.checkpoint.model import model_sharded_state_dict
    from gspo_megatron.distributed.parallel import ParallelLayout, init_distributed
    from gspo_megatron.models import build_model

    init_distributed(ParallelLayout())
    model = build_model(spec, ParallelLayout())
    keys = {}
    for value in model_sharded_state_dict(model).values():
        if isinstance(value, ShardedTensor):
            keys[value.key] = tuple(value.global_shape)
        elif isinstance(value, ShardedTensorFactory):
            for sh in value.build():  # the SwiGLU halves, as megatron writes them
                keys[sh.key] = tuple(sh.global_shape)
    return keys


@pytest.mark.parametrize(
    "config",
    [
        tiny_moe_config(),
        tiny_moe_config(mlp_only_layers=[]),
        tiny_dense_config(),
        tiny_dense_config(tie_word_embeddings=False),
    ],
    ids=["moe-mixed", "moe-all", "dense-tied", "dense-untied"],
)
def test_mapping_keys_equal_megatron_sharded_keys(config):
    spec = _spec(config)
    ours = {m.mcore_key: m.mcore_shape for m in hf_mapping.tensor_mappings(spec)}
    assert ours == _megatron_checkpoint_keys(spec)


def test_mapping_covers_every_hf_tensor_exactly_once(tmp_path):
    for config in (tiny_moe_config(), tiny_dense_config(tie_word_embeddings=False)):
        # Compared with the file, not model.state_dict(): transformers 5 fuses the experts of
        # a MoE layer into one tensor in memory, while checkpoints (and vLLM) use per-expert names.
        make_hf_model(config, tmp_path / config.model_type)
        ours = {}
        for m in hf_mapping.tensor_mappings(_spec(config)):
            for name, shape in zip(m.hf_names, m.hf_shapes):
                assert name not in ours
                ours[name] = shape
        from safetensors import safe_open

        with safe_open(str(tmp_path / config.model_type / "model.safetensors"), "pt") as f:
            on_disk = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert ours == on_disk


def test_qkv_interleave_is_per_query_group_and_inverts():
    spec = _spec(tiny_moe_config())
    m = next(m for m in hf_mapping.tensor_mappings(spec) if m.kind == hf_mapping.QKV)
    D, H = spec.head_dim, spec.hidden_size
    q = torch.randn(spec.num_attention_heads * D, H)
    k = torch.randn(spec.num_query_groups * D, H)
    v = torch.randn(spec.num_query_groups * D, H)
    fused = hf_mapping.to_mcore(spec, m, [q, k, v])
    per = spec.num_attention_heads // spec.num_query_groups
    # Group 1 starts after group 0's `per` query heads, key head and value head.
    g1 = fused[(per + 2) * D :]
    assert torch.equal(g1[: per * D], q[per * D : 2 * per * D])
    assert torch.equal(g1[per * D : (per + 1) * D], k[D : 2 * D])
    back = dict(hf_mapping.to_hf(spec, m, fused))
    assert all(torch.equal(back[n], t) for n, t in zip(m.hf_names, (q, k, v)))


def test_vocab_rows_are_padded_with_zeros_and_unpadded():
    spec = _spec(tiny_dense_config())
    m = hf_mapping.tensor_mappings(spec)[0]
    w = torch.randn(spec.vocab_size, spec.hidden_size)
    padded = hf_mapping.to_mcore(spec, m, [w])
    assert padded.shape[0] == spec.padded_vocab_size and not padded[spec.vocab_size :].any()
    assert torch.equal(hf_mapping.to_hf(spec, m, padded)[0][1], w)
