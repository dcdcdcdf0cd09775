"""Separate rollout ranks and bounded staleness, end to end under torchrun/gloo (real vLLM on
the rollout rank, real megatron on the trainer): a separate run equals the colocated run of the
same rollout.max_staleness bit for bit (metrics and every checkpoint tensor), the versions
follow the schedule (0, 0, 1, 2, ... at s = 1), and SIGKILL + --resume at s = 1 ends equal to
the uninterrupted run (the batch sampled ahead travels in the checkpoint).

One engine in both placements (the colocated run has one rank, the separate one a trainer and
a rollout rank), one thread per process (``train_runs.env``): the same sums in the same order."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest
import torch
import train_runs as tr

SEPARATE = {"rollout.placement": "separate", "rollout.num_ranks": 1}


def launch(nproc: int, log: Path, overrides, resume: bool = False) -> subprocess.Popen:
    return tr.torchrun(log, overrides, resume=resume, nproc=nproc)


def rows(run: Path) -> list:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def learned(run: Path) -> list:
    """What was learned: every metric but timings (perf/*)."""
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows(run)]


def final_tensors(run: Path, step: int = tr.STEPS) -> dict:
    got = tr.checkpoint_tensors(run / "checkpoints" / f"step_{step:06d}")
    return {k: v for k, v in got.items() if isinstance(v, torch.Tensor)}


def assert_same_tensors(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), what
    assert any(k.startswith("optimizer.") for k in want) and len(want) > 20, what
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def runs(demo_init, tmp_path_factory):
    """colocated / separate x s = 0 / 1, launched a few at a time (the cores are shared, the
    results are not: one thread each, a fixed schedule). With the s = 1 pair, a third run of
    the separate s = 1 config is SIGKILLed at a random moment after its first checkpoint and
    resumed to the end (``killed``)."""
    root = tmp_path_factory.mktemp("async")
    out = {}
    for s in (0, 1):
        procs = []
        for name, nproc, extra in (("colocated", 1, {}), ("separate", 2, SEPARATE)):
            run = root / f"{name}{s}"
            overrides = tr.overrides(demo_init, run, **extra, **{"rollout.max_staleness": s})
            log = root / f"{name}{s}.log"
            procs.append((launch(nproc, log, overrides), log))
            out[(name, s)] = run
        if s == 1:
            out["killed"] = kill_and_resume(root / "killed", demo_init)
        for proc, log in procs:
            tr.wait(proc, log)
    out["killed"] = out["killed"]()
    return out


def kill_and_resume(out: Path, demo_init: Path):
    """Start the run, SIGKILL it at a random moment after its first checkpoint (the rollout
    rank may be mid-batch, a batch may be on the wire); returns what resumes it to the end."""
    overrides = tr.overrides(demo_init, out, **SEPARATE, **{"rollout.max_staleness": 1})
    seed = random.randrange(1 << 30)
    log = out.parent / "killed_a.log"
    proc = launch(2, log, overrides)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "latest").exists():
        assert proc.poll() is None, f"run ended early:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.01)
    time.sleep(random.Random(seed).uniform(0.0, 3.0))
    tr.kill_tree(proc)
    latest = (out / "checkpoints" / "latest").read_text().strip()

    def resume():
        log = out.parent / "killed_b.log"
        proc = launch(2, log, overrides, resume=True)
        tr.wait(proc, log)
        if latest != f"step_{tr.STEPS:06d}":
            assert "resumed from" in log.read_text()
        return out, seed

    return resume


@pytest.mark.parametrize("s", [0, 1])
def test_separate_rollout_ranks_equal_the_colocated_run_bit_for_bit(runs, s):
    col, sep = runs[("colocated", s)], runs[("separate", s)]
    assert learned(sep) == learned(col)
    versions = [r["rollout/policy_version"] for r in rows(sep)]
    assert versions == [max(k - s, 0) for k in range(tr.STEPS)]  # 0, 0, 1, 2, 3 at s = 1
    assert [r["rollout/staleness_max"] for r in rows(sep)] == [
        k - v for k, v in enumerate(versions)
    ]
    assert all(r["rollout/dropped_stale"] == 0 for r in rows(sep))
    for step in (tr.STEPS - 1, tr.STEPS):
        assert_same_tensors(final_tensors(sep, step), final_tensors(col, step), f"step {step}")
    for r in rows(sep):  # the link was used, and timed
        assert r["perf/trainer_wait_seconds"] >= 0 and r["perf/rollout_wait_seconds"] >= 0
    assert rows(sep)[0]["perf/transfer_gb"] > 0
    # s = 1: every checkpoint but the last holds the one batch sampled ahead of its step.
    queued = sorted(p.parent.name for p in (sep / "checkpoints").glob("*/rollout_queue.pkl"))
    assert queued == ([f"step_{tr.STEPS - 1:06d}"] if s else [])


def test_sigkill_then_resume_with_staleness_one_matches_uninterrupted(runs):
    """Killed and resumed (``kill_and_resume``): the same metrics and weights as the run never
    killed. No batch lost (each step logged once, the same rewards), none trained twice."""
    ref = runs[("separate", 1)]
    out, seed = runs["killed"]
    assert_same_tensors(final_tensors(out), final_tensors(ref), f"kill seed {seed}")
    got = {r["step"]: r for r in learned(out)}
    assert sorted(got) == list(range(1, tr.STEPS + 1))
    want = {r["step"]: r for r in learned(ref)}
    assert all(got[k] == want[k] for k in got), f"kill seed {seed}"
