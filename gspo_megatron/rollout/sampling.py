"""A step's rollout: prompts -> groups of responses -> rewards, with dynamic sampling.

A group whose rewards are all equal has advantage 0 for every member: it adds nothing to the
gradient and only dilutes the batch. With ``rollout.dynamic_sampling`` (DAPO) such groups are
dropped and more prompts are sampled, round after round, until ``train.prompts_per_step``
informative groups are collected or ``rollout.max_sampling_rounds`` is reached; the step then
trains on what it has.

Everything is a function of (seed, step, round): round 0 is the step's own prompts
(``PromptSet.batch``); round r > 0 draws prompts not yet used in the step with
``random.Random(f"{seed}/{step}/{r}")``, and the engine seeds each prompt's sampling from
(rollout seed, step, round, index). A resumed run therefore samples exactly what an
uninterrupted one would.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

from gspo_megatron.data import Prompt, PromptSet

if TYPE_CHECKING:  # the engine module imports vLLM and megatron: not at gspo-train's start-up
    from gspo_megatron.rollout.types import Completion, RolloutBatch

Scorer = Callable[[List[Tuple[str, str, Optional[str]]]], Tuple[List[float], Dict, Optional[str]]]
"""texts (prompt, response, answer) -> (rewards, reward metrics, first reward error or None):
``RewardRunner.score_across_ranks``."""


@dataclass
class StepRollout:
    """The groups that reach the loss, in order, with their rewards, and the step's metrics."""

    prompts: List[Prompt] = field(default_factory=list)
    groups: List[List["Completion"]] = field(default_factory=list)
    rewards: List[List[float]] = field(default_factory=list)
    sampled_rewards: List[float] = field(default_factory=list)
    """Every response's reward of every round (what the policy scored, kept or not)."""
    sampled_groups: int = 0
    filtered_groups: int = 0
    rounds: int = 0
    num_tokens: int = 0
    stats: Dict[str, float] = field(default_factory=dict)
    first_error: Optional[str] = None
    episodes: int = 0
    """Multi-turn episodes sampled (every round's), and of them those whose environment failed."""
    failed_episodes: int = 0
    first_env_failure: Optional[str] = None
    """The first failed episode's '<failure>: <detail>' (None if none failed)."""
    index: int = 0
    """The step this batch is for (``rollout.source``)."""
    version: int = 0
    """The policy that sampled it: the one after ``version`` steps."""


def informative(rewards: Sequence[float]) -> bool:
    """A group with some spread in its rewards (non-zero advantages)."""
    return max(rewards) != min(rewards)


def draw_more(
    prompt_set: PromptSet, used: set, count: int, seed: int, step: int, round_: int
) -> List[Prompt]:
    """``count`` prompts of ``prompt_set`` whose rows are not in ``used``, drawn with a generator
    seeded by (seed, step, round) (fewer if the set runs out)."""
    free = [p for p in prompt_set.prompts if p.row not in used]
    rng = random.Random(f"{seed}/{step}/{round_}")
    return rng.sample(free, min(count, len(free)))


def sample_step(
    generate: Callable[[List[Prompt], int], "RolloutBatch"],
    score: Scorer,
    decode: Callable[[List[int]], str],
    prompt_set: PromptSet,
    step: int,
    prompts_per_step: int,
    data_seed: int,
    shuffle: bool,
    dynamic: bool,
    max_rounds: int,
) -> StepRollout:
    """Sample, score and (with ``dynamic``) filter one step's groups. ``generate(ids, round)``
    samples a group per prompt (None for a prompt the engine skipped); collective, like
    ``score``. Every rank gets the same result. Multi-turn episodes are scored on their last
    assistant turn, plus their environment's per-turn rewards; an episode whose environment
    failed scores 0 (``episode_rewards``)."""
    from gspo_megatron.rollout.types import RolloutBatch

    out = StepRollout()
    prompts = prompt_set.batch(step, prompts_per_step, data_seed, shuffle)
    used = {p.row for p in prompts}
    batches, reward_parts = [], []
    for round_ in range(max_rounds if dynamic else 1):
        if round_:
            need = prompts_per_step - len(out.groups)
            # Draw for the keep rate seen so far (at least 1 in 4): one more round, not many.
            rate = max(len(out.groups) / max(out.sampled_groups, 1), 0.25)
            prompts = draw_more(prompt_set, used, math.ceil(need / rate), data_seed, step, round_)
            used |= {p.row for p in prompts}
            if not prompts:
                break
        batch = generate(prompts, round_)
        batches.append(batch)
        out.rounds = round_ + 1
        got = [(p, g) for p, g in zip(prompts, batch.groups) if g is not None]
        texts = [reward_item(p, c, decode) for p, g in got for c in g]
        rewards, stats, error = score(texts)
        rewards = episode_rewards(rewards, [c for _, g in got for c in g])
        reward_parts.append((stats, len(texts)))
        out.first_error = out.first_error or error
        for c in (c for _, g in got for c in g if c.agent is not None):
            out.episodes += 1
            if c.agent.failure is not None:
                out.failed_episodes += 1
                out.first_env_failure = out.first_env_failure or (
                    f"{c.agent.failure}: {c.agent.failure_detail}"
                )
        out.sampled_rewards += rewards
        k = 0
        for p, g in got:
            r = rewards[k : k + len(g)]
            k += len(g)
            out.sampled_groups += 1
            if dynamic and not informative(r):
                out.filtered_groups += 1
            elif len(out.groups) < prompts_per_step:
                out.prompts.append(p)
                out.groups.append(g)
                out.rewards.append(r)
        if len(out.groups) >= prompts_per_step:
            break
    merged = RolloutBatch(
        [g for b in batches for g in b.groups],
        skipped_overlong=sum(b.skipped_overlong for b in batches),
        skipped_empty=sum(b.skipped_empty for b in batches),
        seconds=sum(b.seconds for b in batches),
        extra=merge_extra([b.extra for b in batches]),
    )
    out.num_tokens = merged.num_tokens
    out.stats = {**merged.summary(), **merge_reward_stats(reward_parts)}
    if dynamic:
        out.stats["rollout/sampling_rounds"] = float(out.rounds)
        out.stats["reward/filtered_groups"] = float(out.filtered_groups)
    return out


def reward_item(p: Prompt, c: "Completion", decode: Callable[[List[int]], str]) -> tuple:
    """What the reward functions get: (prompt, response, answer), and for a multi-turn
    episode its record (``episode=`` for a function that asks for it)."""
    item = (p.text, response_text(c, decode), p.answer)
    if c.agent is None:
        return item
    rec = c.agent
    episode = {
        "messages": rec.messages,
        "metadata": rec.metadata,
        "turns": rec.turns,
        "tool_calls": rec.tool_calls,
        "malformed_calls": rec.malformed_calls,
        "truncated": rec.truncated,
    }
    return item + (episode,)


def response_text(c: "Completion", decode: Callable[[List[int]], str]) -> str:
    """What the reward functions score: a multi-turn episode's last assistant turn, else the
    whole response."""
    return c.agent.final_text if c.agent is not None else decode(c.token_ids)


def episode_rewards(rewards: Sequence[float], comps: Sequence["Completion"]) -> List[float]:
    """Multi-turn episodes: the reward functions' score plus the environment's per-turn rewards
    (``agent.turn_rewards``), 0 for an episode whose environment failed; others unchanged."""
    out = []
    for r, c in zip(rewards, comps):
        if c.agent is not None:
            r = 0.0 if c.agent.failure is not None else r + c.agent.env_reward
        out.append(float(r))
    return out


def merge_extra(parts: Sequence[Dict[str, float]]) -> Dict[str, float]:
    """Rounds' extra rollout metrics (``agent/*``): counts add up, means are averaged."""
    merged: Dict[str, float] = {}
    for key in dict.fromkeys(k for p in parts for k in p):
        values = [p[key] for p in parts if key in p]
        mean = key.endswith("_mean") or key in MEAN_KEYS
        merged[key] = sum(values) / len(values) if mean else sum(values)
    return merged


MEAN_KEYS = ("agent/tool_calls", "agent/model_tokens", "agent/env_tokens")


def merge_reward_stats(parts: Sequence[Tuple[Dict[str, float], int]]) -> Dict[str, float]:
    """One step's reward metrics from its rounds' (metrics, responses scored): counts and times
    add up, per-function means are weighted by the responses scored."""
    n = sum(count for _, count in parts) or 1
    merged: Dict[str, float] = {}
    for key in dict.fromkeys(k for stats, _ in parts for k in stats):
        values = [(stats[key], count) for stats, count in parts if key in stats]
        if key in ("reward/errors", "reward/timeouts") or key.startswith("perf/"):
            merged[key] = sum(v for v, _ in values)
        else:
            merged[key] = sum(v * count for v, count in values) / n
    return merged
