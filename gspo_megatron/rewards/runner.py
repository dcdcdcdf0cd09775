"""Weighted reward functions, run in a guarded worker process.

Functions are named in the config: a built-in (``math``, ``format``, ``exact_match``) or
``package.module:function``. They are imported once at start-up, so a typo is one line before
any model is built. Scoring happens in a separate process (spawned, so it shares no locks or
threads with the trainer): each call gets ``timeout_s``; a call that raises scores 0 and counts
as an error, a call that hangs is cut off by killing the worker (which is restarted), scores 0
and counts as a timeout. The run goes on either way.

The total reward of a response is sum_k weight_k * fn_k(prompt, response, answer). Per-function
means and the error / timeout counts are reported as ``reward/<name>``, ``reward/errors``,
``reward/timeouts``.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from gspo_megatron.errors import GspoError


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
    """Per call; a call past it is killed and scores 0."""

    def validate(self) -> None:
        if not self.functions:
            raise GspoError("rewards.functions is empty: name at least one reward function")
        if not self.timeout_s > 0:
            raise GspoError(f"rewards.timeout_s={self.timeout_s} must be > 0")
        for i, f in enumerate(self.functions):
            resolve(f.name, f"rewards.functions[{i}].name")


def resolve(name: str, where: str = "reward") -> Callable:
    from gspo_megatron.rewards.builtin import BUILTIN

    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise GspoError(f"{where}='{name}': not a built-in ({', '.join(BUILTIN)}) nor an import "
                        f"path 'package.module:function'")
    module, attr = name.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as err:
        raise GspoError(f"{where}='{name}': cannot import module '{module}' ({err})") from None
    except AttributeError:
        raise GspoError(f"{where}='{name}': module '{module}' has no '{attr}'") from None
    if not callable(fn):
        raise GspoError(f"{where}='{name}': not callable")
    return fn


Job = Tuple[int, int, str, str, Optional[str]]  # (item, function index, prompt, response, answer)


def _worker(conn, names: Sequence[str]) -> None:
    fns = [resolve(n) for n in names]
    while True:
        job = conn.recv()
        if job is None:
            return
        item, k, prompt, response, answer = job
        try:
            value, err = float(fns[k](prompt, response, answer)), None
        except Exception:
            value, err = 0.0, traceback.format_exc(limit=2).strip().splitlines()[-1]
        conn.send((item, k, value, err))


class RewardRunner:
    """Scores (prompt, response, answer) items; one worker process, restarted after a hang."""

    def __init__(self, cfg: RewardConfig):
        cfg.validate()
        self.cfg = cfg
        self.names = [f.name for f in cfg.functions]
        self.weights = [f.weight for f in cfg.functions]
        self._ctx = mp.get_context("spawn")
        self._proc = None
        self._conn = None
        self.last_errors: List[str] = []
        self._warm = False  # the first call also waits for the worker's imports

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_worker, args=(child, self.names), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join()
        self._proc = self._conn = None

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send(None)
                self._proc.join(timeout=5)
            except (BrokenPipeError, OSError):
                pass
        self._kill()

    def score(self, items: Sequence[Tuple[str, str, Optional[str]]]) -> Tuple[List[float], Dict[str, float]]:
        """Total reward per item, and metrics (per-function means, errors, timeouts)."""
        values = [[0.0] * len(self.names) for _ in items]
        errors = timeouts = 0
        self.last_errors = []
        t0 = time.perf_counter()
        for i, (prompt, response, answer) in enumerate(items):
            for k in range(len(self.names)):
                if self._proc is None or not self._proc.is_alive():
                    self._start()
                budget = self.cfg.timeout_s + (0.0 if self._warm else 30.0)
                self._conn.send((i, k, prompt, response, answer))
                if not self._conn.poll(budget):
                    self._kill()
                    timeouts += 1
                    continue
                self._warm = True
                _, _, value, err = self._conn.recv()
                if err is not None:
                    errors += 1
                    if len(self.last_errors) < 5:
                        self.last_errors.append(f"{self.names[k]}: {err}")
                values[i][k] = value
        totals = [sum(w * v for w, v in zip(self.weights, row)) for row in values]
        n = max(len(items), 1)
        stats = {f"reward/{_tag(name)}": sum(row[k] for row in values) / n
                 for k, name in enumerate(self.names)}
        stats.update({"reward/errors": float(errors), "reward/timeouts": float(timeouts),
                      "perf/reward_seconds": time.perf_counter() - t0})
        return totals, stats


def _tag(name: str) -> str:
    return name.split(":")[-1]
