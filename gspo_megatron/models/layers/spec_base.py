"""What every family's spec computes the same way from its fields (a base of the families' frozen
spec dataclasses): the padded vocabulary, the weights' dtype, the shape fields all families
share, the layout divisions and FLOPs of a decoder of attention + dense or MoE MLP layers, and
the attention terms of a model whose every layer attends (a family whose layers differ
overrides those)."""

from __future__ import annotations

import torch

from gspo_megatron.models.layers import sizes
from gspo_megatron.models.layers.hf_config import DTYPES, padded


class DecoderSpec:
    """Needs the ``ModelSpec`` fields plus ``vocab_pad_multiple``."""

    @property
    def padded_vocab_size(self) -> int:
        return padded(self.vocab_size, self.vocab_pad_multiple)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.torch_dtype]

    def decoder_shape(self) -> dict:
        """The shape fields every family has (a family's ``shape_summary`` adds its own)."""
        return {
            "architecture": self.architecture,
            "vocab_size": self.vocab_size,
            "padded_vocab_size": self.padded_vocab_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_query_groups": self.num_query_groups,
            "head_dim": self.head_dim,
            "ffn_hidden_size": self.ffn_hidden_size,
            "num_experts": self.num_experts,
            "moe_ffn_hidden_size": self.moe_ffn_hidden_size,
            "moe_layers": list(self.moe_layers),
            "tie_word_embeddings": self.tie_word_embeddings,
        }

    def layout_divisions(self, layout) -> list:
        """The sizes ``layout`` must divide: (what, size, parallel size, dimension)."""
        out = sizes.tensor_parallel_divisions(self, layout)
        return out + (sizes.expert_divisions(self, layout) if self.is_moe else [])

    def moe_mlp_flops(self) -> int:
        """Per token: a MoE layer's MLP (the router and top-k experts; a family with shared
        experts adds them)."""
        return sizes.routed_flops(self)

    def matmul_flops_per_token(self) -> int:
        """Forward matrix-multiply FLOPs per token, attention scores aside."""
        dense = sizes.swiglu_flops(self.hidden_size, self.ffn_hidden_size)
        routed = self.moe_mlp_flops() if self.is_moe else 0
        per_layer = sizes.attention_projection_flops(self)
        mlps = sum(routed if moe else dense for moe in self.moe_layers)
        return self.num_layers * per_layer + mlps + sizes.lm_head_flops(self)

    def attention_flops(self, n: int) -> int:
        """Attention-score FLOPs of one sequence of n tokens (every layer attends)."""
        return sizes.full_attention_flops(self, self.num_layers, n)

    def kv_bytes_per_token(self, dtype_bytes: int, engine_tp: int) -> int:
        """vLLM's KV cache per token on one engine rank (every layer attends)."""
        return sizes.full_attention_kv_bytes(self, self.num_layers, dtype_bytes, engine_tp)
