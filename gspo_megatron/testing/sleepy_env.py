"""An environment whose every step sleeps: what a slow tool (a sandbox, a search) costs per
turn when episodes step concurrently (tools/bench_agent.py)."""

from __future__ import annotations

import time

SLEEP_S = 0.1


class SleepyEnv:
    """Three turns; each step sleeps ``row["sleep_s"]`` (default ``SLEEP_S``) and answers."""

    def __init__(self, row: dict):
        self.row, self.turn = row, 0

    def reset(self):
        return [{"role": "user", "content": str(self.row.get("prompt", "go"))}]

    def step(self, text: str):
        time.sleep(float(self.row.get("sleep_s", SLEEP_S)))
        self.turn += 1
        return [{"role": "tool", "content": f"result {self.turn}"}], self.turn >= 3, None
