"""Sums over a process group that keep the gradient (context-parallel shards of a sequence)."""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllReduceSum(torch.autograd.Function):
    """Sum over a group; backward passes the gradient through (every rank computes the same
    downstream objective, and each rank's own terms receive it)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_over_group(x: torch.Tensor, group) -> torch.Tensor:
    """x summed over ``group`` (None or a group of one: x itself)."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)


def extreme_over_group(x: torch.Tensor, group, op) -> torch.Tensor:
    """A detached min or max (``op``: dist.ReduceOp.MIN / MAX) over ``group``."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=op, group=group)
    return x
