"""What every family's spec computes the same way from its fields (a base of the families' frozen
spec dataclasses): the padded vocabulary, the weights' dtype, the shape fields all families
share, and the attention terms of a model whose every layer attends (a family with other
layers overrides those)."""

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

    def attention_flops(self, n: int) -> int:
        """Attention-score FLOPs of one sequence of n tokens (every layer attends)."""
        return sizes.full_attention_flops(self, self.num_layers, n)

    def kv_bytes_per_token(self, dtype_bytes: int, engine_tp: int) -> int:
        """vLLM's KV cache per token on one engine rank (every layer attends)."""
        return sizes.full_attention_kv_bytes(self, self.num_layers, dtype_bytes, engine_tp)
