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
from conftest import REPO, free_port

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
            "train.collective_timeout_s": TIMEOUT_S,
        },
    )
    nodes = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"]
        cmd += ["--node-rank", str(node), "--nproc-per-node", "1", "--master-addr", "127.0.0.1"]
        cmd += ["--master-port", port, "-m", "gspo_megatron.train", "--config"]
        cmd += ["launch/configs/tiny_cpu.yaml"] + overrides
        log = out.parent / f"node{node}.log"
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=tr.env(),
            stdout=open(log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        nodes.append((proc, log))
    deadline = time.time() + 300
    while not (out / "checkpoints" / "latest").exists():  # a step done and saved
        for proc, log in nodes:
            assert proc.poll() is None, f"node ended early:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline
        time.sleep(0.05)
    return nodes


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


@pytest.mark.parametrize("fault", ["dies", "hangs"])
def test_a_rollout_rank_that_dies_or_hangs_ends_the_trainer_in_one_line(demo_init, tmp_path, fault):
    out = tmp_path / "run"
    (trainer, tlog), (rollout, rlog) = two_nodes(demo_init, out)
    rank = worker(rollout)
    t0 = time.time()
    try:
        rank.send_signal(signal.SIGKILL if fault == "dies" else signal.SIGSTOP)
        text = ended(trainer, tlog, TIMEOUT_S + 30)
    finally:
        tr.kill_tree(rollout)
    line = stopped_line(text)
    assert trainer.returncode != 0
    assert "the rollout ranks (1..1 of the launch)" in line, line
    assert "the last complete checkpoint is " in line and "step_0000" in line, line
    if fault == "hangs":  # the wait is bounded by the timeout, not cut short
        assert f"train.collective_timeout_s={TIMEOUT_S}" in line, line
        assert time.time() - t0 >= TIMEOUT_S - 1
    else:
        assert time.time() - t0 < TIMEOUT_S, "a closed connection ends the wait at once"


def test_a_trainer_that_dies_takes_the_rollout_rank_with_it(demo_init, tmp_path):
    out = tmp_path / "run"
    (trainer, tlog), (rollout, rlog) = two_nodes(demo_init, out)
    rank = worker(trainer)
    family = [rank] + rank.children(recursive=True)  # its checkpoint writer's manager too
    try:
        rank.send_signal(signal.SIGKILL)
        text = ended(rollout, rlog, TIMEOUT_S + 30)
    finally:
        tr.kill_tree(trainer)
    _, alive = psutil.wait_procs(family, timeout=10)
    assert not alive, f"left behind by the killed trainer: {alive}"
    line = stopped_line(text)
    assert rollout.returncode != 0
    assert "rollout rank 1: the trainer (ranks 0..0 of the launch) stopped answering" in line, line
