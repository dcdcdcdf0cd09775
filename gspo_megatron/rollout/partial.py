"""Partial rollouts: a batch started by one policy version and finished by the next.

With ``rollout.partial`` a weight transfer interrupts generation. Where it falls is fixed, not
timed: every response's first ``rollout.partial_tokens`` tokens (its head) are sampled by the
version that starts the batch; the responses still running then (they hit the head's length, not
EOS) continue under the next version from where they stopped, their prompt plus head as a token
prompt (the tail). Each token keeps the version that sampled it (``Completion.versions``) and the
log-prob the engine gave it then: the behaviour policy of that token for the rollout correction.

Between the two halves a batch is ``InFlight``: it travels up to the trainer with the other
batches and back down with the next transfer, so the rollout ranks hold nothing a resume needs
(a checkpoint saves it with the batches queued ahead). The seeds of the tails are keyed by
(rollout seed, batch, prompt, member) like the heads', so a resumed run continues exactly.

Multi-turn episodes are interrupted between turns instead: the first ``rollout.partial_turns``
turns of every episode under the starting version, the rest under the next, each turn seeded as
in an uninterrupted episode. The environments' state is not carried: it is rebuilt by replaying
the calls each episode's environment was sent (``episodes.EpisodeRunner.resume``), so the rollout
ranks still hold nothing between the two halves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import List, Sequence

from gspo_megatron.data import Prompt


@dataclass
class InFlight:
    """Batch ``index``'s responses as far as the policy ``version`` sampled them."""

    index: int
    version: int
    prompts: List[Prompt]
    batch: object
    """The heads: a ``RolloutBatch`` (groups per prompt, None where the engine skipped one), or
    for multi-turn episodes their first turns (``episodes.Suspended``)."""


def start_batch(engine, prompts: Sequence[Prompt], index: int, version: int, head_tokens: int):
    """Sample the heads of batch ``index`` (the engine's usual seeds, a shorter budget)."""
    batch = engine.generate([p.ids for p in prompts], step=index, max_new_tokens=head_tokens)
    for group in batch.groups:
        for c in group or ():
            c.versions = [version] * len(c.token_ids)
    return InFlight(index, version, list(prompts), batch)


def finish_batch(engine, item: InFlight, version: int, max_new_tokens: int, head_tokens: int):
    """Continue every response of ``item`` still running under the engine's weights (policy
    ``version``); returns the whole ``RolloutBatch``. Collective, like ``engine.generate``."""
    batch = item.batch
    requests, open_ = [], []
    for i, group in enumerate(batch.groups):
        for m, c in enumerate(group or ()):
            if c.finish_reason == "length" and len(c.token_ids) == head_tokens:
                prompt = list(item.prompts[i].ids) + list(c.token_ids)
                key = f"partial/{item.index}/{i}/{m}"
                requests.append((len(requests), prompt, max_new_tokens - head_tokens, key))
                open_.append(c)
    t0 = time.perf_counter()
    tails = engine.sample_turns(requests, stop_token_id=None)
    for (k, *_), c in zip(requests, open_):
        tail = tails[k]
        c.token_ids = list(c.token_ids) + list(tail.token_ids)
        c.logprobs = list(c.logprobs) + list(tail.logprobs)
        c.versions = list(c.versions) + [version] * len(tail.token_ids)
        c.finish_reason = tail.finish_reason
    batch.seconds += time.perf_counter() - t0
    return batch
