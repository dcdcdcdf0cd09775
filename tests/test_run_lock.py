"""One run per output directory (gspo_megatron.run_lock): a second run is refused at once naming
the holder, a lock left by a dead run is reported and taken over, a launch's own nodes are no
conflict; and end to end, a gspo-train started into the directory of a running one stops in its
pre-flight."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import train_runs as tr
from conftest import REPO, child_env

from gspo_megatron.errors import GspoError
from gspo_megatron.run_lock import LOCK_FILE, RunLock, check_run_lock

_HOLD = """
import sys, time
from gspo_megatron.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


_HOLD_WRITING = """
import fcntl, os, sys, time
from gspo_megatron.run_lock import RunLock
lock = RunLock(sys.argv[1])
fd = lock._open()
fcntl.flock(fd, fcntl.LOCK_EX)  # taken, its record not written yet (as inside acquire)
print("locked", flush=True)
time.sleep(1.0)
os.close(fd)
lock.acquire()
time.sleep(600)
"""


def _holder(out: Path, env=None, script: str = _HOLD) -> subprocess.Popen:
    """A process that takes the lock of ``out`` and keeps it (until killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(out)],
        cwd=REPO,
        env=dict(child_env(), **(env or {})),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
    holder = _holder(tmp_path / "run")
    try:
        with pytest.raises(GspoError) as probe:
            check_run_lock(tmp_path / "run")  # the pre-flight's check (every rank, --check)
        t0 = time.monotonic()
        with pytest.raises(GspoError) as taken:
            RunLock(tmp_path / "run").acquire()  # rank 0 of a second run
        assert time.monotonic() - t0 < 10
    finally:
        holder.kill()
        holder.wait()
    for err in (probe, taken):
        text = str(err.value)
        assert text.startswith(f"train.output_dir={tmp_path / 'run'} is in use by another ")
        assert f"pid {holder.pid} on host {socket.gethostname()}" in text


def test_a_lock_left_by_a_dead_run_is_reported_and_taken_over(tmp_path, capsys):
    holder = _holder(tmp_path / "run")
    holder.send_signal(signal.SIGKILL)  # nothing of it runs: the kernel drops the flock
    holder.wait()
    check_run_lock(tmp_path / "run")  # free: no refusal
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    try:
        err = capsys.readouterr().err
        assert "taking over the lock left by a run that is no longer running" in err
        assert f"pid {holder.pid} on host" in err
        record = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid()
    finally:
        lock.release()
    # A run that ended normally leaves no record: the next one takes the lock without a word.
    again = RunLock(tmp_path / "run")
    again.acquire()
    again.release()
    assert capsys.readouterr().err == ""


def test_a_launchs_own_rank_0_is_no_conflict(tmp_path, monkeypatch):
    """A node's --check that runs after node 0's rank 0 took the lock (same rendezvous) lets it
    be; a check from another launch is refused."""
    job = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29512"}
    holder = _holder(tmp_path / "run", env=job)
    try:
        for key, value in job.items():
            monkeypatch.setenv(key, value)
        check_run_lock(tmp_path / "run")
        monkeypatch.setenv("MASTER_PORT", "29513")
        with pytest.raises(GspoError, match="is in use by another gspo-train run"):
            check_run_lock(tmp_path / "run")
    finally:
        holder.kill()
        holder.wait()


def test_a_launchs_rank_0_still_writing_its_record_is_no_conflict(tmp_path, monkeypatch):
    """The lock taken by this launch's rank 0, whose record is not written yet (another rank's
    pre-flight can look in between): the check waits for the record instead of refusing."""
    job = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29512"}
    holder = _holder(tmp_path / "run", env=job, script=_HOLD_WRITING)
    try:
        for key, value in job.items():
            monkeypatch.setenv(key, value)
        check_run_lock(tmp_path / "run")
        record = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert record["pid"] == holder.pid and record["job"] == "10.0.0.1:29512"
    finally:
        holder.kill()
        holder.wait()


def test_gspo_train_into_the_directory_of_a_running_one_is_refused(demo_init, tmp_path):
    """Two gspo-train into one train.output_dir: the second stops in its pre-flight with one
    line naming the first (before any model is built), and the first trains on."""
    out = tmp_path / "run"
    argv = tr.overrides(demo_init, out, **{"train.steps": 200})
    cmd = [sys.executable, "-m", "gspo_megatron.train", "--config", "launch/configs/tiny_cpu.yaml"]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(
        cmd + argv, cwd=REPO, env=tr.env(), stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_FILE).is_file() or not (out / LOCK_FILE).read_text().strip():
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        second = subprocess.run(
            cmd + argv, cwd=REPO, env=tr.env(), capture_output=True, text=True, timeout=120
        )
        assert first.poll() is None  # still training
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2, second.stderr[-3000:]
    lines = second.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: train.output_dir={out} is in use by another gspo-train")
    assert f"pid {first.pid} on host {socket.gethostname()}" in lines[-1]
