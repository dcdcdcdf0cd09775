"""Faults with separate rollout ranks, as on a cluster: the trainer and the rollout rank are two
'nodes' (two torchrun launches of one process each on loopback), so no launcher tears the run
down for us. A rollout rank that dies or hangs ends the trainer within
train.collective_timeout_s with one line naming the rollout ranks and the last complete
checkpoint; a trainer that dies takes the rollout rank with it; nothing waits forever."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import train_runs as tr
from conftest import free_port

TIMEOUT_S = 20


def two_nodes(demo_init: Path, out: Path):
    port = str(free_port())
    overrides = tr.overrides(
        demo_init,
        out,
        **{
            "rollout.placement": "separate",
            "rollout.num_ranks": 1,
            "rollout.max_staleness": 1,
            "train.steps": 50,
            # The fault goes in right after the first checkpoint (step 5), the next is 5 steps
            # away: a kill mid-save would also orphan megatron's forked writers (a known leak,
            # not what these tests are about).
            "train.save_every": 5,
            "train.collective_timeout_s": TIMEOUT_S,
        },
    )
    nodes = []
    for node in (0, 1):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
        launcher += ["--node-rank", str(node), "--nproc-per-node", "1"]
        launcher += ["--master-addr", "127.0.0.1", "--master-port", port]
        log = out.parent / f"node{node}.log"
        nodes.append((tr.torchrun(log, overrides, launcher=launcher), log))
    return nodes


def saved(out: Path, nodes) -> bool:
    """A step done and saved (the fault then has a checkpoint to name)."""
    for proc, log in nodes:
        assert proc.poll() is None, f"node ended early:\n{log.read_text()[-3000:]}"
    return (out / "checkpoints" / "latest").exists()


def worker(launcher: subprocess.Popen) -> psutil.Process:
    """The gspo-train process a node's torchrun started."""
    kids = [
        p
        for p in psutil.Process(launcher.pid).children()
        if "gspo_megatron" in " ".join(p.cmdline())
    ]
    assert len(kids) == 1, kids
    return kids[0]


def ended(proc: subprocess.Popen, log: Path, within: float) -> str:
    try:
        proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        tr.kill_tree(proc)
        raise AssertionError(
            f"still running {within:g} s after the fault:\n{log.read_text()[-3000:]}"
        ) from None
    return log.read_text()


def stopped_line(text: str) -> str:
    lines = [x for x in text.splitlines() if x.startswith("stopped: ")]
    assert lines, text[-3000:]
    return lines[0]


FAULTS = ("rollout dies", "rollout hangs", "trainer dies")


@pytest.fixture(scope="module")
def faults(demo_init, tmp_path_factory):
    """The three faults, each in a two-node run of its own, all at once (start-up is the cost;
    rollout.start_timeout_s covers it, train.collective_timeout_s only what follows): as soon
    as a run has saved a step its fault goes in; then each run's end is timed from its fault."""
    runs = {}
    for fault in FAULTS:
        out = tmp_path_factory.mktemp(fault.replace(" ", "_")) / "run"
        runs[fault] = (out, two_nodes(demo_init, out))
    deadline, victims, t0 = time.time() + 400, {}, {}
    while len(victims) < len(runs):  # each fault as soon as its own run has saved a step
        assert time.time() < deadline
        for fault, (out, nodes) in runs.items():
            if fault in victims or not saved(out, nodes):
                continue
            (trainer, _), (rollout, _) = nodes
            rank = worker(trainer if fault == "trainer dies" else rollout)
            victims[fault] = [rank] + rank.children(recursive=True)  # with its own children
            rank.send_signal(signal.SIGSTOP if fault == "rollout hangs" else signal.SIGKILL)
            t0[fault] = time.time()
        time.sleep(0.05)
    results = {}
    try:
        for fault, (_out, ((trainer, tlog), (rollout, rlog))) in runs.items():
            proc, log = (rollout, rlog) if fault == "trainer dies" else (trainer, tlog)
            left = t0[fault] + TIMEOUT_S + 30 - time.time()
            text = ended(proc, log, max(left, 1))
            results[fault] = (text, time.time() - t0[fault], proc.returncode)
    finally:
        for _, nodes in runs.values():
            for proc, _ in nodes:
                tr.kill_tree(proc)
    for fault, family in victims.items():
        _, alive = psutil.wait_procs(family, timeout=10)
        results[fault] += (alive,)
    return results


@pytest.mark.parametrize("fault", ["rollout dies", "rollout hangs"])
def test_a_rollout_rank_that_dies_or_hangs_ends_the_trainer_in_one_line(faults, fault):
    text, seconds, code, _ = faults[fault]
    line = stopped_line(text)
    assert code != 0
    assert "the rollout ranks (1..1 of the launch)" in line, line
    assert "the last complete checkpoint is " in line and "step_0000" in line, line
    if fault == "rollout hangs":  # the wait is bounded by the timeout, not cut short
        assert f"train.collective_timeout_s={TIMEOUT_S}" in line, line
        assert seconds >= TIMEOUT_S - 1
    else:
        assert seconds < TIMEOUT_S, "a closed connection ends the wait at once"


def test_a_trainer_that_dies_takes_the_rollout_rank_with_it(faults):
    text, seconds, code, alive = faults["trainer dies"]
    line = stopped_line(text)
    assert code != 0
    assert "rollout rank 1: the trainer (ranks 0..0 of the launch) stopped answering" in line, line
    assert not alive, f"left behind by the killed trainer: {alive}"
