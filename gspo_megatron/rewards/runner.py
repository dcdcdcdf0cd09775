"""Weighted reward functions, run in a guarded worker process.

Functions are named in the config: a built-in (``math``, ``format``, ``exact_match``) or
``package.module:function``. They are imported once at start-up, so a typo, a missing module or
a module that fails at import (any exception, SyntaxError and SystemExit included) is one line
that names it, before any model is built.

Scoring happens in one separate process (``rewards.worker``; spawned, so it shares no locks or
threads with the trainer). What a faulty function can do to a run is bounded:

- a call that raises anything (SystemExit and KeyboardInterrupt included), or returns anything
  but a finite real number (NaN, inf, a string, None, a list...), scores 0 and counts in
  ``reward/errors``: one bad value must not become a reward, a NaN one would end up in the weights;
- a call that kills the worker (``os._exit``, a signal) scores 0 and counts as an error; a call
  still running after ``timeout_s`` has the worker killed, scores 0 and counts in
  ``reward/timeouts``. Either way a fresh worker is started at once and the run goes on;
- a worker reports ready once it has imported the functions, and a call's ``timeout_s`` runs from
  when the worker starts it, so a restart's start-up (its own ``STARTUP_TIMEOUT_S``) never eats
  into the next call's time. A worker that cannot start scores every call of that ``score()`` as
  an error, with the reason; the next ``score()`` tries again;
- a ``score()``'s calls go to the worker as one batch and come back one reply each (one round
  trip instead of one per call); the calls after one that failed go to the fresh worker;
- the worker never outlives the trainer: a trainer that exits (an exception, Ctrl-C, which the
  worker ignores and leaves to the trainer) SIGKILLs it first, where multiprocessing's own exit
  hook would SIGTERM it and wait without a limit; one killed with SIGKILL takes it along (Linux
  ``PR_SET_PDEATHSIG``) instead of leaving it hung in a user's function. Processes a function
  starts die with the worker (it leads a process group, killed whole);
- what a function prints is captured in the worker and shown on the trainer's stderr prefixed
  with the function's name, up to ``OUTPUT_BUDGET`` bytes per run, so that a function printing
  megabytes per call cannot flood the logs.

The total reward of a response is sum_k weight_k * fn_k(prompt, response, answer). Per-function
means and the error / timeout counts are reported as ``reward/<name>``, ``reward/errors``,
``reward/timeouts``; ``RewardRunner.last_errors`` keeps the first few "<name>: <what happened>".
"""

from __future__ import annotations

import atexit
import math
import multiprocessing as mp
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch.distributed as dist

from gspo_megatron.distributed.exchange import all_gather_objects
from gspo_megatron.errors import GspoError
from gspo_megatron.rewards.registry import resolve
from gspo_megatron.rewards.worker import Job, Reply, Worker

MAX_LAST_ERRORS = 5
"""Problems kept per score() in RewardRunner.last_errors; the counts cover all of them."""
OUTPUT_BUDGET = 64 << 10
"""Bytes of the reward functions' printed output shown on the trainer's stderr per runner (a
run's rank); what is printed beyond it is dropped, with one line saying so."""


@dataclass(frozen=True)
class RewardFn:
    """One reward term."""

    name: str = "math"
    """A built-in (math, format, exact_match) or an import path 'package.module:function'."""
    weight: float = 1.0
    """Multiplies this term in the total reward."""


@dataclass(frozen=True)
class RewardConfig:
    """Reward terms and how they are run."""

    functions: List[RewardFn] = field(default_factory=lambda: [RewardFn("math", 1.0)])
    """Terms summed with their weights (paper-style math RL: math 1.0)."""
    timeout_s: float = 10.0
    """Per call, from when the worker starts it; a call past it is killed and scores 0."""
    memory_gib: float = 4.0
    """Memory the reward worker may take beyond what it holds once the functions are imported
    (0: no limit): a call that goes over it fails and scores 0, with a line saying so, instead
    of the machine running out (each process a function starts has the same cap)."""

    def validate(self, allow_empty: bool = False) -> None:
        """``allow_empty``: another source of rewards exists (an environment's per-turn ones)."""
        if not self.functions and not allow_empty:
            raise GspoError("rewards.functions is empty: name at least one reward function")
        if not self.timeout_s > 0:
            raise GspoError(f"rewards.timeout_s={self.timeout_s} must be > 0")
        if not math.isfinite(self.timeout_s):
            raise GspoError(f"rewards.timeout_s={self.timeout_s} must be a finite number")
        if not (math.isfinite(self.memory_gib) and self.memory_gib >= 0):
            raise GspoError(
                f"rewards.memory_gib={self.memory_gib} must be a finite number >= 0 (0 = no limit)"
            )
        for i, f in enumerate(self.functions):
            if not math.isfinite(f.weight):
                raise GspoError(
                    f"rewards.functions[{i}].weight={f.weight}: must be a finite number"
                )
            resolve(f.name, f"rewards.functions[{i}].name")


class RewardRunner:
    """Scores (prompt, response, answer) items with the configured functions in one guarded
    worker process, replaced whenever a call kills it or runs past the timeout."""

    def __init__(self, cfg: RewardConfig):
        cfg.validate()
        self.cfg = cfg
        self.names = [f.name for f in cfg.functions]
        self.weights = [f.weight for f in cfg.functions]
        self.last_errors: List[str] = []
        """The first few problems of the last score(), each "<function name>: <what happened>"."""
        self._ctx = mp.get_context("spawn")
        # Spawned now, so that its imports overlap the trainer's own start-up.
        self._worker: Optional[Worker] = Worker(self._ctx, self.names, cfg.memory_gib)
        self._cannot_start: Optional[str] = None
        self._output_shown = 0
        # Before multiprocessing's exit hook, which would SIGTERM the worker and wait for it.
        atexit.register(self.close)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.kill()
        self._worker = None
        atexit.unregister(self.close)

    def score(
        self, items: Sequence[Tuple[str, str, Optional[str]]]
    ) -> Tuple[List[float], Dict[str, float]]:
        """Total reward per item, and metrics (per-function means, errors, timeouts)."""
        values = [[0.0] * len(self.names) for _ in items]
        errors = timeouts = 0
        self.last_errors = []
        self._cannot_start = None  # a worker that could not start gets one new try per score()
        t0 = time.perf_counter()
        jobs = [
            (k, prompt, response, answer, episode[0] if episode else None)
            for prompt, response, answer, *episode in items
            for k in range(len(self.names))
        ]
        for j, (reply, timed_out) in enumerate(self._score_all(jobs)):
            i, k = divmod(j, len(self.names))
            values[i][k], err = reply
            if err is None:
                continue
            if timed_out:
                timeouts += 1
            else:
                errors += 1
            if len(self.last_errors) < MAX_LAST_ERRORS:
                self.last_errors.append(f"{self.names[k]}: {err}")
        totals = [sum(w * v for w, v in zip(self.weights, row)) for row in values]
        n = max(len(items), 1)
        stats = {
            f"reward/{_tag(name)}": sum(row[k] for row in values) / n
            for k, name in enumerate(self.names)
        }
        stats.update(
            {
                "reward/errors": float(errors),
                "reward/timeouts": float(timeouts),
                "perf/reward_seconds": time.perf_counter() - t0,
            }
        )
        return totals, stats

    def score_across_ranks(
        self, items: Sequence[Tuple[str, str, Optional[str]]]
    ) -> Tuple[List[float], Dict[str, float], Optional[str]]:
        """Every rank passes the same ``items``; rank k scores items k, k + world, ... in its
        own worker and every rank gets all rewards, the metrics merged over ranks (counts add
        up, per-function means are weighted by items, times are the slowest rank's) and the
        first problem any rank met ("<function name>: <what happened>", None if none)."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        mine = items[rank::world]
        totals, stats = self.score(mine)
        parts = all_gather_objects((totals, stats, len(mine), self.last_errors[:1]))
        rewards = [0.0] * len(items)
        for r, part in enumerate(parts):
            rewards[r::world] = part[0]
        n = sum(p[2] for p in parts) or 1
        merged: Dict[str, float] = {}
        for key in stats:
            if key in ("reward/errors", "reward/timeouts"):
                merged[key] = sum(p[1][key] for p in parts)
            elif key.startswith("perf/"):
                merged[key] = max(p[1][key] for p in parts)
            else:
                merged[key] = sum(p[1][key] * p[2] for p in parts) / n
        first = next((p[3][0] for p in parts if p[3]), None)
        return rewards, merged, first

    def _score_all(self, jobs: List[Job]) -> List[Tuple[Reply, bool]]:
        """Each call's Reply, and whether it timed out. The calls go to the worker as one
        batch; a call that kills the worker or times out costs that call only: a fresh worker
        gets the calls after it."""
        out: List[Tuple[Reply, bool]] = []
        while len(out) < len(jobs):
            if self._cannot_start is None and (self._worker is None or not self._worker.alive()):
                self._replace_worker()  # first use after close(), or it died between calls
            if self._cannot_start is None:
                self._cannot_start = self._worker.wait_ready()
            if self._cannot_start is not None:
                out += [((0.0, self._cannot_start), False)] * (len(jobs) - len(out))
                break
            self._worker.send(jobs[len(out) :])
            for job in jobs[len(out) :]:
                reply, outcome, output = self._worker.reply(self.cfg.timeout_s)
                if output is not None:
                    self._show_output(job[0], *output)
                out.append((reply, outcome == "timeout"))
                if outcome != "ok":
                    # Replace it at once: the new worker imports while this call is recorded;
                    # the next call's time only starts once it is ready.
                    self._replace_worker()
                    break
        return out

    def _show_output(self, k: int, head: bytes, size: int) -> None:
        """A call's printed output (its first ``head`` bytes of ``size``) on the trainer's
        stderr, each line prefixed with the function's name, up to OUTPUT_BUDGET bytes per
        runner; then one line saying that the rest is not shown (a reward printing megabytes
        per call would otherwise flood the logs)."""
        room = OUTPUT_BUDGET - self._output_shown
        if room <= 0:
            return
        tag = f"[reward {_tag(self.names[k])}] "
        shown = head[:room]
        lines = shown.decode("utf-8", errors="replace").splitlines()
        if size > len(shown):
            lines.append(f"... ({size - len(shown)} more bytes of this call's output not shown)")
        self._output_shown += len(shown)
        if self._output_shown >= OUTPUT_BUDGET:
            lines.append(
                f"the reward functions printed {OUTPUT_BUDGET >> 10} KiB in this run: the rest "
                f"of their output is not shown"
            )
        sys.stderr.write("".join(tag + line + "\n" for line in lines))
        sys.stderr.flush()

    def _replace_worker(self) -> None:
        if self._worker is not None:
            self._worker.kill()
        self._worker = Worker(self._ctx, self.names, self.cfg.memory_gib)


def _tag(name: str) -> str:
    return name.split(":")[-1]
