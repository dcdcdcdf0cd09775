"""How a sequence is split over context-parallel ranks: the zigzag split megatron's attention
expects (chunk r and its mirror 2*CP-1-r of 2*CP equal chunks), which balances causal attention
work between the ranks. The trainer's micro-batches, the attention and the log-prob gathers all
index with it."""

from __future__ import annotations

import torch


def zigzag_indices(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Positions held by ``cp_rank``: chunks r and 2*cp-1-r of 2*cp equal chunks."""
    if cp_size == 1:
        return torch.arange(seq_len)
    if seq_len % (2 * cp_size):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2*CP={2 * cp_size}")
    c = seq_len // (2 * cp_size)
    first, second = cp_rank, 2 * cp_size - 1 - cp_rank
    return torch.cat(
        [torch.arange(first * c, (first + 1) * c), torch.arange(second * c, (second + 1) * c)]
    )
