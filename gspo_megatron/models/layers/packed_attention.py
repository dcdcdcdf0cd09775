"""Causal attention for megatron's local layer spec (CPU, no context parallelism), through
``torch.nn.functional.scaled_dot_product_attention``, one sequence at a time on packed rows.

megatron's ``DotProductAttention`` repeats the key/value heads for GQA, writes the whole
[b * heads, S, S] score matrix, softmaxes it with the mask applied and multiplies it back, each a
separate op whose result autograd keeps for the backward pass. PyTorch's fused CPU attention
(flash attention: blocks of queries against blocks of keys, causal blocks skipped, the softmax
kept as running sums) computes the same function without the score matrix, and with GQA read
in place.

A packed row (``gspo_megatron.learner.packing``) holds several sequences end to end, with a
block-diagonal causal mask. Attending over the whole row would do S^2 work where the sequences
need sum_i n_i^2, so the row is split at the sequence boundaries, read from the mask itself
(position q starts a sequence when it may not attend to q - 1), and each sequence attends
causally to itself. A mask that is not causal within those blocks goes to megatron's own
attention unchanged, as does attention dropout (never used here: the families train without it).
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention


def sequence_runs(mask: torch.Tensor) -> List[Tuple[int, int]]:
    """[1, 1, S, S] block-diagonal causal mask (True = masked) -> [start, end) of each block."""
    starts = torch.nonzero(mask[0, 0].diagonal(-1)).flatten() + 1
    bounds = [0] + starts.tolist() + [mask.shape[-1]]
    return list(zip(bounds[:-1], bounds[1:]))


def _causal_within(mask: torch.Tensor, runs: List[Tuple[int, int]]) -> bool:
    """Whether ``mask`` [1, 1, S, S] is exactly causal inside each run and masked across runs."""
    want = torch.ones(mask.shape[-2:], dtype=torch.bool, device=mask.device)
    for s, e in runs:
        want[s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool, device=mask.device).triu(1)
    return torch.equal(mask[0, 0], want)


class SegmentedDotProductAttention(DotProductAttention):
    """``DotProductAttention`` through fused causal attention, per packed sequence."""

    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        sq, b, heads, dim = query.shape
        usable = (
            attention_mask is not None
            and attention_mask.dtype == torch.bool
            and attention_mask.shape[:2] == (1, 1)
            and attention_mask.shape[-1] == sq == key.shape[0]
            and (self.attention_dropout.p == 0.0 or not self.training)
            and not args
            and kwargs.get("attention_bias") is None
            and kwargs.get("packed_seq_params") is None
        )
        runs = sequence_runs(attention_mask) if usable else []
        if not runs or not _causal_within(attention_mask, runs):
            return super().forward(query, key, value, attention_mask, *args, **kwargs)
        # [s, b, heads, dim] -> [b, heads, s, dim]; key/value keep their (fewer) GQA heads.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        gqa = k.shape[1] != heads
        parts = [
            F.scaled_dot_product_attention(
                q[:, :, s:e],
                k[:, :, s:e],
                v[:, :, s:e],
                is_causal=True,
                scale=self.softmax_scale,
                enable_gqa=gqa,
            )
            for s, e in runs
        ]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)
