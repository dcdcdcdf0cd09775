"""Group-normalised advantages (GRPO/GSPO): each response against the other responses to its prompt."""

from __future__ import annotations

from typing import Tuple

import torch


def _scaled_groups(rewards: torch.Tensor, group_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Groups of ``group_size`` consecutive rewards in float64, each scaled by a power of two
    into [-1, 1], and the exponents e [G, 1] (r = r' x 2^e). A group mean sums group_size values
    and a std squares them, which for rewards near 1e154 (squares) or 1e308 (sums) overflow to
    inf in float64 and turn every advantage into 0 or NaN; scaled, nothing can. A power of two
    scales exactly, so rewards of ordinary size give the same bits as unscaled arithmetic."""
    r = rewards.reshape(-1, group_size).to(torch.float64)
    _, exponent = torch.frexp(r.abs().amax(dim=1, keepdim=True))  # 0 for an all-zero group
    return torch.ldexp(r, -exponent), exponent


def group_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale_by_std: bool = True
) -> torch.Tensor:
    """A_i = (r_i - mean_group r) / (std_group r + eps); groups are consecutive runs of
    ``group_size``. std is the sample standard deviation (0 for a group of one). A group whose
    rewards are all equal gets 0 for every member. ``scale_by_std=False`` keeps r_i - mean.
    Finite rewards of any size give finite advantages (computed on rewards scaled into [-1, 1]:
    (r - mean) / (std + eps) = (r' - mean') / (std' + eps / 2^e) for r = r' x 2^e)."""
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r, exponent = _scaled_groups(rewards, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale_by_std:
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
        centred = centred / (std + torch.ldexp(torch.full_like(std, eps), -exponent))
    else:
        centred = torch.ldexp(centred, exponent)
    return centred.reshape(rewards.shape).to(torch.float32)


def reward_mean_std(rewards: torch.Tensor) -> Tuple[float, float]:
    """The mean and sample std of all ``rewards`` (the step's ``reward/mean`` and ``reward/std``),
    finite for any finite rewards: computed like the group statistics, on rewards scaled by
    a power of two. A result beyond float64's range (a std of rewards near 1e308) is
    the largest finite float instead of inf."""
    if rewards.numel() == 0:
        return 0.0, 0.0
    r, exponent = _scaled_groups(rewards.flatten(), rewards.numel())
    r, exponent = r[0], exponent.reshape(())
    big = torch.finfo(torch.float64).max
    mean = float(torch.ldexp(r.mean(), exponent).clamp(-big, big))
    std = float(torch.ldexp(r.std(), exponent).clamp(max=big)) if r.numel() > 1 else 0.0
    return mean, std


def equal_reward_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[G] bool: the groups whose rewards are all equal (advantage 0 by definition). Compared
    exactly, not as std == 0, which overflows for rewards near float64's range."""
    r = rewards.reshape(-1, group_size)
    return (r == r[:, :1]).all(dim=1)


def silent_groups(rewards: torch.Tensor, advantages: torch.Tensor, group_size: int) -> int:
    """Groups whose rewards differ but whose advantages all came out 0: differences far below
    the advantage's eps (1e-6), so small that A = (r - mean) / (std + eps) underflows float32.
    Such a group teaches nothing although its rewards say it should."""
    differ = ~equal_reward_groups(rewards, group_size)
    zero = (advantages.reshape(-1, group_size) == 0).all(dim=1)
    return int((differ & zero).sum())
