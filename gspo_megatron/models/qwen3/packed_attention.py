"""megatron's local attention, one sequence at a time on packed rows (CPU, no context parallelism).

A packed row (``gspo_megatron.packing``) holds several sequences end to end, with a
block-diagonal causal mask. megatron's ``DotProductAttention`` would score every position
against every other and mask most of the products away: on a row of S positions it does S^2
work where the sequences need sum_i n_i^2. This subclass reads the sequence boundaries from the
mask itself (position q starts a sequence when it may not attend to q - 1) and runs the parent's
attention on each sequence's block with that block's mask, so the numbers are megatron's own.
An unpacked causal mask has no boundaries and goes to the parent unchanged.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention


def sequence_runs(mask: torch.Tensor) -> List[Tuple[int, int]]:
    """[1, 1, S, S] block-diagonal causal mask (True = masked) -> [start, end) of each block."""
    starts = torch.nonzero(mask[0, 0].diagonal(-1)).flatten() + 1
    bounds = [0] + starts.tolist() + [mask.shape[-1]]
    return list(zip(bounds[:-1], bounds[1:]))


class SegmentedDotProductAttention(DotProductAttention):
    """``DotProductAttention`` that attends within each packed sequence separately."""

    def forward(self, query, key, value, attention_mask, *args, **kwargs):
        one_row = (
            attention_mask is not None
            and attention_mask.shape[0] == 1
            and query.shape[0] == attention_mask.shape[-1]
        )
        runs = sequence_runs(attention_mask) if one_row else []
        if len(runs) < 2:  # not packed, or one sequence: megatron's attention as it is
            return super().forward(query, key, value, attention_mask, *args, **kwargs)
        parts = [
            super(SegmentedDotProductAttention, self).forward(
                query[s:e], key[s:e], value[s:e], attention_mask[:, :, s:e, s:e], *args, **kwargs
            )
            for s, e in runs
        ]
        return torch.cat(parts, dim=0)
