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
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux; a no-op elsewhere). The kernel sends it
    when the parent *thread* that started this process exits, so start children from the main
    thread. Exits at once if the parent is already gone (``parent_pid`` is the pid it had)."""
    if not sys.platform.startswith("linux"):
        return

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def kill_group(proc) -> None:
    """SIGKILL the process group that ``proc`` (a started multiprocessing process that made
    itself a group leader) leads: the process, its guard and whatever it started (a handler a
    user's code set for SIGTERM must not keep any of it, or its parent waiting on it, alive);
    then reap it."""
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
