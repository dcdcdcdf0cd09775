"""Where a step's batch comes from: the rollout source, colocated or on separate ranks.

A batch is ``sampling.StepRollout`` (prompts -> groups -> rewards) for step ``index``, sampled by
the policy ``version`` (optimizer steps' worth of RL steps done: the policy after step v - 1).
``Producer.produce`` makes one on whatever ranks hold the engines; the trainer consumes batch k
at step k with ``source.take(k)`` and, after its update, ``source.publish(k)``.

The schedule is fixed by ``rollout.max_staleness`` = s, not by timing: batch j is sampled by
version max(j - s, v0), v0 the version the run started (or resumed) from. With s = 0 each step
samples with the weights it trains from (the on-policy loop); with s = 1 the versions run
0, 0, 1, 2, ... and batch k + 1 is sampled while step k trains. Because the schedule does not
depend on which side is faster, a separate run equals the colocated run of the same s bit for
bit, and the batches sampled ahead (``queue``) are all a checkpoint needs to resume exactly.

- ``ColocatedSource``: the engines in the training ranks; at step k the weights are synced (the
  policy after k steps) and batches up to k + s are sampled, then the engine sleeps while the
  trainer trains. No overlap: the reference a separate run must equal.
- ``SeparateSource``: the trainer's end of the link (``rollout.link``); the rollout ranks run
  ``rollout.server.serve``. Before sending version k + 1 the trainer takes every batch sampled
  with version k (up to k + s): both sides then go through the same sequence of messages, and
  each waits only for what it needs.
"""

from __future__ import annotations

import pickle
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch.distributed as dist

from gspo_megatron.sampling import StepRollout, sample_step

QUEUE_FILE = "rollout_queue.pkl"
"""In a checkpoint: the batches sampled ahead of its step (s of them), in order."""


class Producer:
    """One step's batch from the engines: prompts -> groups (single responses or episodes) ->
    rewards, with dynamic sampling; collective over the ranks that hold the engines."""

    def __init__(self, cfg, prompts, tokenizer, engine, agent, rewards):
        self.cfg, self.prompts, self.tokenizer = cfg, prompts, tokenizer
        self.engine, self.agent, self.rewards = engine, agent, rewards

    def generate(self, prompts, step: int, round_: int):
        """A group per prompt: single responses from the engines, or multi-turn episodes."""
        if self.agent is not None:
            from gspo_megatron.rollout.episodes import agent_rollout

            return agent_rollout(self.agent, prompts, self.cfg.rollout.group_size, step, round_)
        return self.engine.generate([p.ids for p in prompts], step=step, round_=round_)

    def produce(self, index: int, version: int) -> StepRollout:
        cfg = self.cfg
        out = sample_step(
            lambda prompts, round_: self.generate(prompts, index, round_),
            self.rewards.score_across_ranks,
            lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True),
            self.prompts,
            index,
            cfg.train.prompts_per_step,
            cfg.data.seed,
            cfg.data.shuffle,
            cfg.rollout.dynamic_sampling,
            cfg.rollout.max_sampling_rounds,
        )
        out.index, out.version = index, version
        return out


def version_of(index: int, staleness: int, start: int) -> int:
    """The policy version that samples batch ``index``."""
    return max(index - staleness, start)


class ColocatedSource:
    def __init__(
        self,
        producer: Producer,
        engine,
        gatherer,
        staleness: int,
        steps: int,
        queue: Dict[int, StepRollout],
        validate: Optional[Callable[[], Dict[str, float]]] = None,
        eval_every: int = 0,
    ):
        self.producer, self.engine, self.gatherer = producer, engine, gatherer
        self.staleness, self.steps, self.queue = staleness, steps, queue
        self.validate, self.eval_every = validate, eval_every
        self.engine_version: Optional[int] = None

    def take(self, step: int) -> Tuple[StepRollout, Dict[str, float]]:
        metrics: Dict[str, float] = {"perf/sync_seconds": 0.0, "perf/sync_gb": 0.0}
        first = max(max(self.queue, default=step - 1) + 1, step)
        last = min(step + self.staleness, self.steps - 1)
        validation = bool(self.eval_every) and step % self.eval_every == 0
        if (first <= last or validation) and self.engine_version != step:
            # The sync comes right before sampling: on GPU the engine slept through the update
            # with its weights freed (sleep level 2), the sync re-allocates them, fills them
            # with the current policy and wakes the KV cache.
            metrics.update(self.engine.sync_from(self.gatherer).metrics)
            self.engine_version = step
        if validation:  # on the policy just synced
            metrics.update(self.validate())
        for j in range(first, last + 1):
            self.queue[j] = self.producer.produce(j, step)
        self.engine.sleep()
        return self.queue.pop(step), metrics

    def publish(self, step: int) -> Dict[str, float]:
        return {}


class SeparateSource:
    def __init__(self, role, groups, gatherer, cfg, steps: int, queue: Dict[int, StepRollout]):
        self.role, self.groups, self.gatherer = role, groups, gatherer
        self.staleness, self.steps, self.queue = cfg.rollout.max_staleness, steps, queue
        self.bucket_bytes = cfg.rollout.sync_bucket_mb << 20
        self.start_timeout_s = cfg.rollout.start_timeout_s
        self.received = max(queue, default=-1)
        self.wait = 0.0

    def start(self, step: int) -> Dict[str, float]:
        """The first transfer: the weights of ``step`` and what to sample next. Its time
        includes the wait for the rollout ranks' engines to start: logged apart."""
        self.groups.ready()
        self.groups.wait_for_peers(self.start_timeout_s)
        sent = self._send(step, max(self.received + 1, step))
        return {"perf/start_transfer_seconds": sent["perf/transfer_seconds"]}

    def take(self, step: int) -> Tuple[StepRollout, Dict[str, float]]:
        t0 = time.perf_counter()
        while step not in self.queue:
            self._receive()
        waited, self.wait = self.wait + time.perf_counter() - t0, 0.0
        return self.queue.pop(step), {"perf/trainer_wait_seconds": waited}

    def publish(self, step: int) -> Dict[str, float]:
        """After step ``step``'s update: the batches sampled with its weights, then the next
        version's weights if a batch still to come is sampled with it."""
        t0 = time.perf_counter()
        last = min(step + self.staleness, self.steps - 1)
        while self.received < last:
            self._receive()
        self.wait += time.perf_counter() - t0
        version = step + 1
        if version + self.staleness < self.steps:
            return self._send(version, self.received + 1)
        return {}

    def _send(self, version: int, next_index: int) -> Dict[str, float]:
        from gspo_megatron.rollout.link import send_weights

        header = {
            "version": version,
            "next_index": next_index,
            "steps": self.steps,
            "staleness": self.staleness,
        }
        stats = send_weights(
            self.groups, self.role.link_rank, self.gatherer, header, self.bucket_bytes
        )
        return stats.metrics

    def _receive(self) -> None:
        from gspo_megatron.rollout.link import FIRST_ROLLOUT, recv_object

        box: List[Optional[StepRollout]] = [None]
        if self.role.link_rank is not None:
            box[0] = recv_object(
                self.groups.cpu, FIRST_ROLLOUT, "waiting for a batch from the rollout ranks"
            )
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        batch = box[0]
        self.queue[batch.index] = batch
        self.received = batch.index


def dump_queue(queue: Dict[int, StepRollout]) -> bytes:
    return pickle.dumps([queue[k] for k in sorted(queue)])


def load_queue(data: bytes) -> Dict[int, StepRollout]:
    return {b.index: b for b in pickle.loads(data)}
