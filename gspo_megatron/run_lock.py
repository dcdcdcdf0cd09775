"""One run per output directory: ``train.output_dir/run.lock``, held for the run's life.

Two gspo-train runs writing into one output directory overwrite each other's metrics, and one
then takes the other's checkpoint for its own. Rank 0 of a run (the only process that writes the
directory's shared files) takes an exclusive ``flock`` on ``run.lock`` before any heavy work and
holds it until the process ends; the kernel releases it when the process dies however it dies,
so a crashed run never leaves the directory locked. The file also records who holds it (pid,
host, start time, the torchrun job), which the refusal names; a record left by a run that is no
longer running is reported when the next run takes the lock over.

``gspo-train --check`` (which the launch scripts run on every node before torchrun) probes the
lock without keeping it: a second launch into a directory in use is refused at once. A node's
check that finds the lock held by its own job's rank 0 (same ``MASTER_ADDR:MASTER_PORT``, the
rendezvous every rank of one launch shares) lets it be.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

import psutil

from gspo_megatron.errors import GspoError

LOCK_FILE = "run.lock"
_RECORD_BYTES = 1024
"""The record is written in one pwrite of this many bytes (JSON padded with spaces), so that a
reader sees a whole record or the previous one, never half of one."""
_ACQUIRE_WAIT_S = 3.0
"""How long the run's rank 0 retries a lock held for a moment by a node's --check probe, and how
long a rank's check waits for a held lock's record to name its own launch."""


def job_id() -> Optional[str]:
    """The torchrun launch this process belongs to (its rendezvous address), None outside one."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    return f"{addr}:{port}" if addr and port else None


def _record() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start_time": psutil.Process().create_time(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "job": job_id(),
    }


def _read(fd: int) -> Optional[dict]:
    for _ in range(5):  # a record being written right now: read it again
        try:
            return json.loads(os.pread(fd, _RECORD_BYTES, 0).decode() or "null")
        except (ValueError, UnicodeDecodeError):
            time.sleep(0.05)
    return None


def _alive_here(record: dict) -> bool:
    """Whether the recorded process runs on this host (its pid, with the same start time: a
    reused pid is another process)."""
    try:
        started = psutil.Process(int(record["pid"])).create_time()
    except (psutil.NoSuchProcess, KeyError, ValueError, TypeError):
        return False
    except psutil.Error:
        return True
    return abs(started - float(record.get("start_time", 0))) < 0.1


def _holder(record: Optional[dict]) -> str:
    if not record:
        return "a process that has not written its record yet"
    return f"pid {record.get('pid')} on host {record.get('host')}, started {record.get('started')}"


def _refuse(out: Path, record: Optional[dict]) -> GspoError:
    return GspoError(
        f"train.output_dir={out} is in use by another gspo-train run ({_holder(record)}); wait "
        f"for it to end, stop it, or choose another train.output_dir"
    )


class RunLock:
    """The lock of one output directory, held by this process once ``acquire`` returns."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / LOCK_FILE
        self.fd: Optional[int] = None

    def _open(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def acquire(self) -> None:
        """Take the lock for this process's life, or refuse in one line naming the holder. A
        record of a run that died is reported (stderr) and replaced."""
        fd = self._open()
        deadline = time.monotonic() + _ACQUIRE_WAIT_S
        while not _try_lock(fd):
            if time.monotonic() > deadline:
                record = _read(fd)
                os.close(fd)
                raise _refuse(self.out, record)
            time.sleep(0.05)
        previous = _read(fd)
        if previous and _alive_here(previous) and previous.get("pid") != os.getpid():
            # Free to lock yet held by a live process here: a filesystem without working locks.
            os.close(fd)
            raise _refuse(self.out, previous)
        if previous:
            print(
                f"{self.path}: taking over the lock left by a run that is no longer running "
                f"({_holder(previous)})",
                file=sys.stderr,
                flush=True,
            )
        text = json.dumps(_record()).encode()
        os.pwrite(fd, text.ljust(_RECORD_BYTES), 0)
        os.ftruncate(fd, _RECORD_BYTES)
        self.fd = fd
        # A forked child (megatron's checkpoint writers and their manager) would share the lock
        # and keep it after this process died: the children close their copy at once.
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        """The run is over: its record goes, then the lock (the file is left for the next run,
        which finds it empty)."""
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd = None


def check_run_lock(out: Path) -> None:
    """Refuse if another run holds the lock of ``out`` (probed, not kept; nothing is created):
    the pre-flight of every rank and ``--check``. A lock held by this launch's own rank 0 (a
    node checking after node 0 started) is no conflict."""
    path = Path(out) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    except OSError as err:
        raise GspoError(f"{path}: cannot open the run's lock file ({err.strerror})") from None
    try:
        # Under a launch the holder may be this launch's rank 0 between taking the lock and
        # writing its record (an empty file, or the record of a dead run it is taking over):
        # read again for a moment before refusing. Seen with a rollout rank whose pre-flight
        # ended just after the trainer's rank 0 had taken the lock.
        deadline = time.monotonic() + (_ACQUIRE_WAIT_S if job_id() is not None else 0.0)
        while True:
            if _try_lock(fd):
                fcntl.flock(fd, fcntl.LOCK_UN)
                return
            record = _read(fd)
            if record and job_id() is not None and record.get("job") == job_id():
                return
            if time.monotonic() >= deadline:
                raise _refuse(Path(out), record)
            time.sleep(0.05)
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a filesystem without flock: the record's pid check is all there is
        return True
    return True
