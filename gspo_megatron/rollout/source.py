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

With ``rollout.partial`` (``rollout.partial``, the module) batch j is started by that version
and, if the next version exists by step j, finished by it: the work of a version v is first the
tails of the batches v - 1 started (``InFlight``), then the heads of the batches v starts
(``do_work`` over ``Schedule.heads``). Both placements do that work in that order.

- ``ColocatedSource``: the engines in the training ranks; at step k the weights are synced (the
  policy after k steps) and version k's work is done, then the engine sleeps while the trainer
  trains. No overlap: the reference a separate run must equal.
- ``SeparateSource``: the trainer's end of the link (``rollout.link``); the rollout ranks run
  ``rollout.rollout_rank.serve``. Before sending version k + 1 (with the batches in flight it is to
  finish) the trainer takes every message of version k's work: both sides then go through the
  same sequence of messages, and each waits only for what it needs.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch.distributed as dist

from gspo_megatron import moved
from gspo_megatron.rollout.partial import InFlight, finish_batch, start_batch
from gspo_megatron.rollout.sampling import StepRollout, sample_step

Queued = Union[StepRollout, InFlight]

QUEUE_FILE = "rollout_queue.pkl"
"""In a checkpoint: the batches sampled ahead of its step (s of them, the last possibly in
flight), in order."""


class Producer:
    """One step's batch from the engines: prompts -> groups (single responses or episodes) ->
    rewards, with dynamic sampling; collective over the ranks that hold the engines."""

    def __init__(self, cfg, prompts, tokenizer, engine, agent, rewards):
        self.cfg, self.prompts, self.tokenizer = cfg, prompts, tokenizer
        self.engine, self.agent, self.rewards = engine, agent, rewards

    def generate(self, prompts, step: int, round_: int):
        """A group per prompt: single responses from the engines, or multi-turn episodes."""
        if self.agent is not None:
            from gspo_megatron.rollout.episodes.loop import agent_rollout

            return agent_rollout(self.agent, prompts, self.cfg.rollout.group_size, step, round_)
        return self.engine.generate([p.ids for p in prompts], step=step, round_=round_)

    def produce(self, index: int, version: int) -> StepRollout:
        return self._scored(
            index, version, lambda prompts, round_: self.generate(prompts, index, round_)
        )

    def start(self, index: int, version: int) -> InFlight:
        """The heads of batch ``index`` (``rollout.partial``)."""
        cfg = self.cfg
        prompts = self.prompts.batch(
            index, cfg.train.prompts_per_step, cfg.data.seed, cfg.data.shuffle
        )
        if self.agent is not None:
            from gspo_megatron.rollout.episodes.loop import start_episodes

            turns = cfg.rollout.head_turns(cfg.agent.max_turns)
            state = start_episodes(
                self.agent, prompts, cfg.rollout.group_size, index, turns, version
            )
            return InFlight(index, version, list(prompts), state)
        return start_batch(self.engine, prompts, index, version, cfg.rollout.head_tokens)

    def finish(self, item: InFlight, version: int) -> StepRollout:
        """Batch ``item`` finished by the engines' policy ``version``, then scored."""
        rc = self.cfg.rollout
        if self.agent is not None:
            from gspo_megatron.rollout.episodes.loop import finish_episodes

            batch = finish_episodes(self.agent, item.batch, rc.group_size, item.index, version)
        else:
            batch = finish_batch(self.engine, item, version, rc.max_new_tokens, rc.head_tokens)

        def generate(prompts, round_):
            assert [p.row for p in prompts] == [p.row for p in item.prompts], "prompts moved"
            return batch

        return self._scored(item.index, item.version, generate)

    def _scored(self, index: int, version: int, generate) -> StepRollout:
        cfg = self.cfg
        out = sample_step(
            generate,
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
    """The policy version that samples (with partial rollouts: starts) batch ``index``."""
    return max(index - staleness, start)


@dataclass(frozen=True)
class Schedule:
    """Which batches a policy version samples: fixed by the run's settings and its first
    version ``start``, shared by the trainer and the rollout ranks."""

    staleness: int
    steps: int
    start: int
    partial: bool = False

    @property
    def horizon(self) -> int:
        """Batches sampled: the run's, and the ``staleness`` ones after them that a longer run
        samples by its last step. The final checkpoint carries those (``queue``), so a
        completed run resumed with more train.steps trains on what an uninterrupted longer run
        would have, sampled by the same versions."""
        return self.steps + self.staleness

    def finisher(self, index: int, version: int) -> int:
        """The version that finishes batch ``index`` started by ``version``: with partial
        rollouts the next one, if it exists by the batch's step."""
        return version + 1 if self.partial and version + 1 <= index else version

    def heads(self, version: int, next_index: int) -> List[Tuple[int, bool]]:
        """(batch, whole) for the batches ``version`` starts from ``next_index`` on; whole: it
        also finishes them (no later version comes before their step)."""
        out, j = [], next_index
        while j < self.horizon and version_of(j, self.staleness, self.start) <= version:
            out.append((j, self.finisher(j, version) == version))
            j += 1
        return out

    def has_work(self, version: int, next_index: int, inflight: List[InFlight]) -> bool:
        if version >= self.steps:  # no such version in this run
            return False
        return bool(inflight) or bool(self.heads(version, next_index))


def in_flight(queue: Dict[int, Queued]) -> List[InFlight]:
    """The batches of ``queue`` started and not finished, in order."""
    return [queue[k] for k in sorted(queue) if isinstance(queue[k], InFlight)]


def do_work(producer: Producer, schedule: Schedule, version: int, next_index: int, inflight):
    """Version ``version``'s work, in order: each StepRollout (finished or whole) or InFlight
    (started) as it is made."""
    for item in inflight:
        yield producer.finish(item, version)
    for j, whole in schedule.heads(version, next_index):
        yield producer.produce(j, version) if whole else producer.start(j, version)


class ColocatedSource:
    def __init__(
        self,
        producer: Producer,
        engine,
        gatherer,
        schedule: Schedule,
        queue: Dict[int, Queued],
        validate: Optional[Callable[[], Dict[str, float]]] = None,
        eval_every: int = 0,
    ):
        self.producer, self.engine, self.gatherer = producer, engine, gatherer
        self.schedule, self.queue = schedule, queue
        self.validate, self.eval_every = validate, eval_every
        self.engine_version: Optional[int] = None

    def take(self, step: int) -> Tuple[StepRollout, Dict[str, float]]:
        metrics: Dict[str, float] = {"perf/sync_seconds": 0.0, "perf/sync_gb": 0.0}
        next_index = max(max(self.queue, default=step - 1) + 1, step)
        inflight = in_flight(self.queue)
        validation = bool(self.eval_every) and step % self.eval_every == 0
        work = self.schedule.has_work(step, next_index, inflight)
        if (work or validation) and self.engine_version != step:
            # The sync comes right before sampling: on GPU the engine slept through the update
            # with its weights freed (sleep level 2), the sync re-allocates them, fills them
            # with the current policy and wakes the KV cache.
            metrics.update(self.engine.sync_from(self.gatherer).metrics)
            self.engine_version = step
        if validation:  # on the policy just synced
            metrics.update(self.validate())
        for made in do_work(self.producer, self.schedule, step, next_index, inflight):
            self.queue[made.index] = made
        self.engine.sleep()
        return self.queue.pop(step), metrics

    def publish(self, step: int) -> Dict[str, float]:
        return {}


class SeparateSource:
    def __init__(self, role, groups, gatherer, cfg, schedule: Schedule, queue: Dict[int, Queued]):
        self.role, self.groups, self.gatherer = role, groups, gatherer
        self.schedule, self.queue = schedule, queue
        self.bucket_bytes = cfg.rollout.sync_bucket_mb << 20
        self.start_timeout_s = cfg.rollout.start_timeout_s
        self.started = max(queue, default=-1)  # the last batch started (or made whole)
        self.expect = 0  # messages of the engines' current version still to come
        self.wait = 0.0

    def start(self, step: int) -> Dict[str, float]:
        """The first transfer: the weights of ``step`` and what to sample next. Its time
        includes the wait for the rollout ranks' engines to start: logged apart."""
        self.groups.ready()
        self.groups.wait_for_peers(self.start_timeout_s)
        sent = self._send(step, max(self.started + 1, step))
        return {"perf/start_transfer_seconds": sent["perf/transfer_seconds"]}

    def take(self, step: int) -> Tuple[StepRollout, Dict[str, float]]:
        t0 = time.perf_counter()
        while not isinstance(self.queue.get(step), StepRollout):
            self._receive()
        waited, self.wait = self.wait + time.perf_counter() - t0, 0.0
        return self.queue.pop(step), {"perf/trainer_wait_seconds": waited}

    def publish(self, step: int) -> Dict[str, float]:
        """After step ``step``'s update: the rest of the batches its weights sample, then the
        next version's weights (with the batches it is to finish) if it has work."""
        t0 = time.perf_counter()
        while self.expect:
            self._receive()
        self.wait += time.perf_counter() - t0
        version, next_index = step + 1, self.started + 1
        if self.schedule.has_work(version, next_index, in_flight(self.queue)):
            return self._send(version, next_index)
        return {}

    def _send(self, version: int, next_index: int) -> Dict[str, float]:
        from gspo_megatron.rollout.separate.link import send_weights

        inflight = in_flight(self.queue)
        schedule = self.schedule
        header = {
            "version": version,
            "next_index": next_index,
            "steps": schedule.steps,
            "staleness": schedule.staleness,
            "partial": schedule.partial,
            "inflight": inflight,
        }
        self.expect = len(inflight) + len(schedule.heads(version, next_index))
        stats = send_weights(
            self.groups, self.role.link_rank, self.gatherer, header, self.bucket_bytes
        )
        return stats.metrics

    def _receive(self) -> None:
        from gspo_megatron.rollout.separate.link import FIRST_ROLLOUT, recv_object

        box: List[Optional[Queued]] = [None]
        if self.role.link_rank is not None:
            box[0] = recv_object(
                self.groups.cpu, FIRST_ROLLOUT, "waiting for a batch from the rollout ranks"
            )
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        made = box[0]
        if made.index not in self.queue:  # a head or a whole batch, not a tail
            self.started = made.index
        self.queue[made.index] = made
        self.expect -= 1


def dump_queue(queue: Dict[int, Queued]) -> bytes:
    return pickle.dumps([queue[k] for k in sorted(queue)])


def load_queue(data: bytes) -> Dict[int, Queued]:
    # Queues saved before the package re-organisation name some classes by their old module.
    return {b.index: b for b in moved.loads(data)}
