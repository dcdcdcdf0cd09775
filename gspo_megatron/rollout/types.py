"""What a rollout engine returns: a completion per sampled response and a batch of them per call.

Kept apart from the engine (vLLM, torch) so that what only reads rollouts (sampling, episodes,
the link to rollout ranks, tests) imports no engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional

if TYPE_CHECKING:
    import numpy as np


@dataclass
class Completion:
    token_ids: List[int]
    logprobs: List[float]  # the engine's log-prob of each sampled token
    finish_reason: str  # "stop" (EOS / stop token) or "length"
    routes: Optional["np.ndarray"] = None
    """With route capture: the engine's expert ids for every token it fed through the model
    (prompt, then response but its last token) x MoE layer x top-k (``rollout.routes``)."""
    loss_mask: Optional[List[int]] = None
    """Multi-turn episodes: per token, 1 where the model sampled it, 0 where the environment
    wrote it (``rollout.transcript``); ``logprobs`` is 0.0 at those."""
    prompt_ids: Optional[List[int]] = None
    """Multi-turn episodes: the opening the environment gave (else the data set's prompt)."""
    agent: Optional[object] = None
    """Multi-turn episodes: the ``EpisodeRecord`` (messages, turns, tool calls, failures)."""
    versions: Optional[List[int]] = None
    """Partial rollouts: per token, the policy version that sampled it (None: all the
    batch's ``version``)."""


@dataclass
class RolloutBatch:
    """Per prompt, in the input order: its group of completions, or None if it was skipped."""

    groups: List[Optional[List[Completion]]]
    skipped_overlong: int = 0
    skipped_empty: int = 0
    seconds: float = 0.0
    stats: Dict[str, float] = field(default_factory=dict)
    extra: Dict[str, float] = field(default_factory=dict)
    """Further metrics of how the groups were made (multi-turn episodes: ``agent/*``)."""

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for g in self.groups if g for c in g)

    def summary(self) -> Dict[str, float]:
        """The ``rollout/*`` metrics of these groups (and ``perf/rollout_seconds``)."""
        comps = [c for g in self.groups if g for c in g]
        lengths = [len(c.token_ids) for c in comps] or [0]
        return {
            "rollout/tokens": float(self.num_tokens),
            # Exact: a sum of integers below 2^53, then one division.
            "rollout/response_length_mean": sum(lengths) / len(lengths),
            "rollout/response_length_max": float(max(lengths)),
            "rollout/truncated_fraction": sum(c.finish_reason == "length" for c in comps)
            / max(len(comps), 1),
            "perf/rollout_seconds": self.seconds,
            "rollout/skipped_overlong": float(self.skipped_overlong),
            "rollout/skipped_empty": float(self.skipped_empty),
            **self.extra,
        }
