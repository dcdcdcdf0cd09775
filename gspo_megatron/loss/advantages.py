"""Group-normalised advantages (GRPO/GSPO): each response against the other responses to its prompt."""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale_by_std: bool = True
) -> torch.Tensor:
    """A_i = (r_i - mean_group r) / (std_group r + eps); groups are consecutive runs of
    ``group_size``. std is the sample standard deviation (0 for a group of one). A group whose
    rewards are all equal gets 0 for every member. ``scale_by_std=False`` keeps r_i - mean."""
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.reshape(-1, group_size).to(torch.float64)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(rewards.shape).to(torch.float32)
