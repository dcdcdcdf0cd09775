"""A step's rollouts -> the learner's samples.

The trainer takes a batch of groups (a prompt and its G responses, each with its reward) from
the rollout source; the learner wants one ``Sample`` per response: its prompt and response ids,
its group-normalised advantage (GSPO's A_i = (r_i - mean) / std within the group), the engine's
log-probs and routes, and the mask of tokens it learns from (the policy's own tokens, less any
sampled more than ``rollout.max_token_age`` versions ago). Also the staleness figures of the
batch, which follow the same per-token versions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from gspo_megatron.learner.batch import Sample
from gspo_megatron.loss.advantages import group_advantages, silent_groups


@dataclass
class StepSamples:
    samples: List[Sample]
    """One per response, in group order (the order of ``pairs``)."""
    pairs: list
    """(prompt, completion) per response, in group order."""
    rewards: List[float]
    """Each response's reward, in group order."""
    advantages: List[float]
    silent_groups: int
    """Groups of different rewards whose advantages all vanished (reward/zero_advantage_groups)."""


def step_samples(
    rollout, ages: List[List[int]], group_size: int, max_token_age: int
) -> StepSamples:
    """``rollout``'s responses as samples; ``ages`` from ``token_ages`` (per response, per
    token), ``max_token_age`` as rollout.max_token_age (-1: no limit)."""
    # float64, scaled per group: any finite reward gives finite advantages.
    kept = torch.tensor([x for r in rollout.rewards for x in r], dtype=torch.float64)
    adv_t = group_advantages(kept, group_size) if kept.numel() else torch.zeros(0)
    adv = adv_t.tolist()
    silent = silent_groups(kept, adv_t, group_size) if kept.numel() else 0
    # (prompt, completion) in group order: rewards, advantages and samples all follow it.
    pairs = [(p, c) for p, g in zip(rollout.prompts, rollout.groups) for c in g]
    samples = [
        Sample(
            p.ids if c.prompt_ids is None else c.prompt_ids,
            c.token_ids,
            a,
            c.logprobs,
            routes=c.routes,
            response_mask=age_mask(c.loss_mask, age, max_token_age),
        )
        for (p, c), a, age in zip(pairs, adv, ages)
    ]
    return StepSamples(samples, pairs, kept.tolist(), adv, silent)


def token_ages(rollout, step: int) -> List[List[int]]:
    """Per response of ``rollout`` (group order), per token: how many versions behind the
    policy of ``step`` the policy that sampled it is."""
    ages = []
    for g in rollout.groups:
        for c in g:
            versions = c.versions or [rollout.version] * len(c.token_ids)
            ages.append([step - v for v in versions])
    return ages


def sampled_ages(rollout, ages: List[List[int]]) -> List[List[int]]:
    """``ages`` of the tokens the policy sampled: a multi-turn episode's environment tokens
    (loss mask 0) are left out of the staleness metrics."""
    comps = [c for g in rollout.groups for c in g]
    return [
        age if c.loss_mask is None else [a for a, m in zip(age, c.loss_mask) if m]
        for age, c in zip(ages, comps)
    ]


def age_mask(mask: Optional[List[int]], ages: List[int], max_age: int) -> Optional[List[int]]:
    """The response's loss mask with the tokens older than ``max_age`` (>= 0) masked out."""
    if max_age < 0:
        return mask
    mask = mask or [1] * len(ages)
    return [m if a <= max_age else 0 for m, a in zip(mask, ages)]


def staleness_metrics(ages: List[List[int]], rc) -> Dict[str, float]:
    """rollout/staleness_* over the batch's response tokens, and how many responses span
    several versions (rollout/partial_fraction) and how many tokens max_token_age masks."""
    flat = [a for row in ages for a in row] or [0]
    out = {
        "rollout/staleness_mean": sum(flat) / len(flat),
        "rollout/staleness_max": float(max(flat)),
        "rollout/partial_fraction": sum(len(set(r)) > 1 for r in ages) / max(len(ages), 1),
    }
    if rc.max_token_age >= 0:
        out["rollout/masked_old_tokens"] = sum(a > rc.max_token_age for a in flat) / len(flat)
    return out
