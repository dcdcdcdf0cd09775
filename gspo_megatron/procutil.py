"""Process lifetimes: children that must not outlive the process that started them.

A trainer rank is started by torchrun and starts a reward worker and (inside megatron's
checkpoint writer) multiprocessing helpers. When a parent is SIGKILLed (a scheduler, the OOM
killer, a user) nothing in Python runs, so the kernel has to end the children:
``die_with_parent`` asks Linux for SIGKILL when the parent dies. When a process ends itself with
``os._exit`` (after a failure with peers gone, see ``errors``), ``kill_children`` ends the
multiprocessing children first, which multiprocessing's exit hooks would otherwise have done.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import select
import signal
import sys
import time
from typing import AbstractSet, List, Optional, Set

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux; a no-op elsewhere). The kernel sends it
    when the parent *thread* that started this process exits, so start children from the main
    thread. Exits at once if the parent is already gone (``parent_pid`` is the pid it had)."""
    if not _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL):
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def split_off_guard(trainer_pid: int, conn) -> None:
    """Split this process (a group leader about to run user code) in two. The parent becomes a
    guard that runs no user code: a child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``), so that
    every process the user's code starts stays its descendant even after a double fork or in a
    session of its own, where a process-group kill does not reach. It waits until the trainer
    or the child is gone, SIGKILLs its whole tree (``kill_tree``), and exits as the child did.
    The child returns from here and does the work; it dies if the guard is SIGKILLed.

    Every other way out is covered too: the trainer SIGKILLs the tree and the group
    (``kill_group``) while the guard holds it together. Only a SIGKILL of the guard by someone
    else (the OOM killer) can leave a process of the user's behind."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    trainer = _pidfd(trainer_pid)
    guard = os.getpid()
    worker = os.fork()
    if worker == 0:
        if trainer is not None:
            os.close(trainer)
        die_with_parent(guard)
        return
    status = None
    try:
        conn.close()  # the worker's end of the pipe: its death must read as EOF to the trainer
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        status = _watch(trainer, trainer_pid, worker)
        kill_tree(guard)
    finally:
        _exit_as(status)


def _watch(trainer: Optional[int], trainer_pid: int, worker: int) -> Optional[int]:
    """Wait until the trainer or the worker is gone, reaping the orphans the subreaper adopts
    meanwhile; the worker's wait status if it ended (None if the trainer went first)."""
    worker_fd = _pidfd(worker)
    fds = [fd for fd in (trainer, worker_fd) if fd is not None]
    while True:
        select.select(fds, [], [], 1.0 if len(fds) == 2 else 0.5)
        status = None
        while True:  # the worker and any adopted orphan that has ended
            try:
                pid, code = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == worker:
                status = code
        if status is not None:
            return status
        if trainer is not None:
            if select.select([trainer], [], [], 0)[0]:
                return None
        elif os.getppid() <= 1 or not _alive(trainer_pid):
            return None


def _exit_as(status: Optional[int]) -> None:
    """End the guard as its worker ended (wait status ``status``; None: with 0), so that its
    parent reads the worker's exit status or signal from it."""
    if status is not None and os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            signal.signal(sig, signal.SIG_DFL)  # (SIGKILL and SIGSTOP have no handler to reset)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
        except (OSError, ValueError):
            pass
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # a signal whose default is not to end the process
    os._exit(0 if status is None else os.WEXITSTATUS(status))


def kill_tree(root: int, spare: AbstractSet[int] = frozenset()) -> None:
    """SIGKILL every descendant of ``root`` but ``spare`` (never ``root`` itself, nor the
    caller; a spared process's own descendants are not spared): each is stopped as it is found,
    so none can fork past the walk, and the walk is repeated until it finds nothing new; then
    all are killed at once, and those that are the caller's children reaped."""
    spare = set(spare) | {os.getpid()}
    found: Set[int] = set()
    while True:
        new = [p for p in descendants(root) if p not in found and p not in spare]
        if not new:
            break
        for pid in new:
            _signal(pid, signal.SIGSTOP)
            found.add(pid)
    for pid in found:
        _signal(pid, signal.SIGKILL)
    for pid in found:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:  # not ours to reap (the guard reaps the orphans it adopted)
            _wait_ended(pid)


def _wait_ended(pid: int, timeout_s: float = 2.0) -> None:
    """Wait (briefly) until a SIGKILLed process that is not our child has ended: gone, or a
    zombie for its parent to reap (SIGKILL takes effect when the process is next scheduled)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state in (b"Z", b"X"):
            return
        time.sleep(0.001)


class Strays:
    """The processes a worker's calls leave behind (its side of ``split_off_guard``): those
    alive when it is made (what the user's module started at import) are spared; ``end()``
    SIGKILLs every other process of the guard's tree but this one."""

    def __init__(self):
        self.guard = os.getppid()
        self.spare = set(descendants(self.guard))

    def end(self) -> None:
        kill_tree(self.guard, self.spare)


def descendants(root: int) -> List[int]:
    """The pids of ``root``'s descendants now (children first), from /proc."""
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        for child in _children(pid):
            out.append(child)
            todo.append(child)
    return out


def _children(pid: int) -> List[int]:
    kids: List[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
        except OSError:
            continue
    return kids


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _pidfd(pid: int) -> Optional[int]:
    """A file descriptor that becomes readable when ``pid`` ends (Linux 5.3+), or None."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _prctl(option: int, value: int) -> bool:
    """Linux ``prctl(option, value)``; whether it could be asked (not elsewhere)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):
        return False
    return True


def kill_group(proc) -> None:
    """SIGKILL what ``proc`` (a started multiprocessing process that made itself a group leader
    and a guard with ``split_off_guard``) holds: every descendant, wherever it put itself, then
    the process group (a handler a user's code set for SIGTERM must not keep any of it, or its
    parent waiting on it, alive); then reap it."""
    if proc.pid is not None and proc.exitcode is None:
        kill_tree(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # not (yet) leading its group, or the group is gone already
    if proc.is_alive():
        proc.kill()
    proc.join()


def kill_children() -> None:
    """SIGKILL every live multiprocessing child of this process (reward worker, the managers
    megatron's checkpoint writer starts)."""
    for child in multiprocessing.active_children():
        try:
            child.kill()
            child.join(timeout=5)
        except (OSError, ValueError):
            pass


def exit_without_teardown() -> None:
    """End a finished CLI (gspo-train, gspo-eval): run the exit hooks (logging,
    multiprocessing's children, vLLM's), flush, and skip the interpreter's teardown, whose last
    garbage collection walks every object vLLM, megatron and transformers made (1.8 s of each
    rank's exit on the demo, for memory the OS takes back). gc.freeze() skips the walk too, but
    then triton's bindings report their objects as leaked, a page of noise. Call it only once
    everything the process wrote is closed."""
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
