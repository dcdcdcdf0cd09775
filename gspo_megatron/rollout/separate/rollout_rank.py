"""A separate rollout rank's whole run: receive weights, sample batches, send them up.

Every rollout rank hosts (a tensor-parallel shard of) a vLLM engine and runs this loop in
lockstep with the others (the engines' collectives and the reward workers are over the rollout
ranks' own default group). The trainer's first transfer says which batch comes next and how
many the run has; batch j is sampled by version max(j - s, first version)
(``rollout.source``; with partial rollouts started by it and finished by the next), so the rank
does each version's work and then waits for the next transfer, which brings back the batches
it left in flight.
No model, no optimizer, no checkpoint here: what a resume needs (the batches sampled ahead)
lives with the trainer, which restarts this loop where it left off.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from gspo_megatron.checkpoint.model import HF_SUBDIR
from gspo_megatron.rollout.partial import InFlight
from gspo_megatron.rollout.separate.link import (
    ROOT,
    TransferStats,
    receive_header,
    receive_weights,
    send_object,
)
from gspo_megatron.rollout.source import Producer, Schedule, do_work


class RolloutServer:
    def __init__(self, plan, role, groups, dtype):
        from gspo_megatron.rewards.runner import RewardRunner
        from gspo_megatron.rollout.engines.engine import RolloutEngine

        cfg = self.cfg = plan.cfg
        self.role, self.groups = role, groups
        self.engine = RolloutEngine(
            Path(cfg.model.ckpt) / HF_SUBDIR,
            cfg.rollout,
            dtype,
            dummy_weights=True,
            capture_routes=plan.capture_routes,
        )
        self.agent = None
        if cfg.agent.enabled:
            from gspo_megatron.rollout.episodes.loop import make_runner

            self.agent = make_runner(cfg.agent, cfg.rollout, plan.tokenizer, self.engine)
        note = self.engine.waves_note(cfg.train.prompts_per_step)
        if note and role.rank == 0:  # the trainer's rank 0 prints; this one is the rollout's
            print(note, file=sys.stderr, flush=True)
        self.rewards = RewardRunner(cfg.rewards)
        self.producer = Producer(
            cfg, plan.prompts, plan.tokenizer, self.engine, self.agent, self.rewards
        )
        self.version = -1

    def _receive(self) -> dict:
        """One transfer into the engine; returns its header with the time spent waiting for it."""
        me = self.role.link_rank
        t0 = time.perf_counter()
        header = receive_header(self.groups, me)
        waited = time.perf_counter() - t0
        self.engine.load_from(receive_weights(self.groups, me, TransferStats()))
        self.version = header["version"]
        return dict(header, waited=waited)

    def run(self) -> None:
        header = self._receive()
        schedule = Schedule(
            header["staleness"], header["steps"], header["version"], header["partial"]
        )
        j, pending = header["next_index"], set()
        wait = header["waited"]
        while True:
            inflight = header["inflight"]
            for made in do_work(self.producer, schedule, self.version, j, inflight):
                if isinstance(made, InFlight):
                    pending.add(made.index)
                else:
                    # The trainer logs the transfer from its side; the rollout ranks' idle
                    # time is ours.
                    made.stats["perf/rollout_wait_seconds"] = wait
                    wait = 0.0
                    pending.discard(made.index)
                if made.index >= j:
                    j = made.index + 1
                if self.role.rank == 0:
                    send_object(self.groups.cpu, made, ROOT, "sending a batch to the trainer")
            # Done when the last batch is made and none is in flight, or in flight only for a
            # version this run never has (the trainer's last checkpoint carries it).
            if j >= schedule.horizon and (not pending or self.version >= schedule.steps - 1):
                return
            header = self._receive()
            wait += header["waited"]

    def close(self) -> None:
        self.rewards.close()
        if self.agent is not None:
            self.agent.envs.close()
        self.engine.close()


def serve(plan, role, groups, dtype) -> None:
    """A rollout rank's main: serve until the run's last batch is sent."""
    server = None
    try:
        try:
            server = RolloutServer(plan, role, groups, dtype)
        except Exception as err:  # the trainer is told at once, not after its start-up bound
            groups.ready(
                failure=f"rollout rank {role.launch_rank}: {' '.join(str(err).split())}"[:400]
            )
            raise
        groups.ready()
        groups.wait_for_peers(plan.cfg.rollout.start_timeout_s)
        server.run()
    finally:
        if server is not None:
            server.close()
