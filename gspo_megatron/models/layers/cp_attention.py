"""Exact causal attention under context parallelism without Transformer Engine (CPU).

On GPU, TE's attention runs context parallelism as a ring. megatron's local attention refuses
CP > 1, so without TE this module stands in: each rank all-gathers the keys and values of the
whole sequence over the CP group (the backward pass reduce-scatters their gradients), and
attends from its own queries with a causal mask built from the zigzag positions (and, for packed
sequences, the given mask over the whole row). Memory is
O(sequence) for K/V per rank, which is fine for the CPU path it serves.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule

from gspo_megatron.distributed.context_parallel import zigzag_indices


class AllGatherCPAttention(MegatronModule):
    """Same call signature as megatron's DotProductAttention; inputs are [s, b, heads, dim]."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        if (attention_dropout if attention_dropout is not None else config.attention_dropout) > 0:
            raise ValueError("AllGatherCPAttention does not implement attention dropout")
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.cp_group = (
            pg_collection.cp
            if pg_collection is not None and hasattr(pg_collection, "cp")
            else parallel_state.get_context_parallel_group()
        )

    def forward(
        self,
        query,
        key,
        value,
        attention_mask,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        assert packed_seq_params is None and attention_bias is None
        cp = torch.distributed.get_world_size(self.cp_group)
        rank = torch.distributed.get_rank(self.cp_group)
        sq, b, nh, hd = query.shape
        total = sq * cp
        # [S, b, groups, dim] in rank order: rank r's rows are its two zigzag chunks.
        key_all = gather_from_sequence_parallel_region(key, True, group=self.cp_group)
        value_all = gather_from_sequence_parallel_region(value, True, group=self.cp_group)
        key_pos = torch.cat([zigzag_indices(total, cp, r) for r in range(cp)]).to(query.device)
        q_pos = zigzag_indices(total, cp, rank).to(query.device)

        groups = key.shape[2]
        rep = nh // groups
        q = query.permute(1, 2, 0, 3)  # [b, nh, sq, hd]
        k = key_all.repeat_interleave(rep, dim=2).permute(1, 2, 3, 0)  # [b, nh, hd, S]
        v = value_all.repeat_interleave(rep, dim=2).permute(1, 2, 0, 3)  # [b, nh, S, hd]
        scores = torch.matmul(q.float(), k.float()) * self.softmax_scale  # [b, nh, sq, S]
        masked = key_pos[None, :] > q_pos[:, None]
        if attention_mask is not None:
            # Packed sequences: a [b, 1, S, S] mask over the whole row (True = masked) keeps
            # each sequence to itself; take this rank's query rows, keys in gathered order.
            masked = masked | attention_mask[:, :, q_pos][:, :, :, key_pos]
        scores = scores.masked_fill(masked, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        out = torch.matmul(probs, v)  # [b, nh, sq, hd]
        return out.permute(2, 0, 1, 3).reshape(sq, b, nh * hd)
