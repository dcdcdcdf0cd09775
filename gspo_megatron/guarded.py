"""What a guarded child process running user code (a reward function, an agent environment)
and the trainer's handle on it share: the child's printed output captured and bounded, a user
value checked and shown in a message, the child's exit told in words, and the spawn that skips
the trainer's main module.

The process mechanics (the guard that outlives the child, killing a whole tree) are in
``procutil``; ``rewards.worker`` and ``rollout.env_pool`` are the two users.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import numbers
import os
import reprlib
import resource
import signal
import sys
import tempfile
import types
from typing import Optional, Sequence, Tuple

OUTPUT_PER_CALL = 16 << 10
"""Bytes of a call's printed output sent back with its reply (the rest is counted, not sent)."""

Output = Tuple[bytes, int]  # (the first OUTPUT_PER_CALL bytes printed, how many bytes in all)


def capture_output(prefix: str = "gspo-output-") -> int:
    """Point fds 1 and 2 (sys.stdout / sys.stderr, C code, child processes) at an unlinked
    scratch file in append mode, and return its fd: user code that prints megabytes per call
    must not flood the trainer's terminal and logs, which get a bounded part of it instead."""
    fd, name = tempfile.mkstemp(prefix=prefix)
    os.unlink(name)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
    flush_std()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    return fd


def take_output(fd: int) -> Optional[Output]:
    """What was printed since the last call (None if nothing): its first OUTPUT_PER_CALL bytes
    and its size; the file is emptied (writes append, so they start again at 0)."""
    flush_std()
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    head = os.pread(fd, min(size, OUTPUT_PER_CALL), 0)
    os.ftruncate(fd, 0)
    return head, size


def flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # closed or replaced by user code: nothing of ours to flush
            pass


def finite_real(raw: object) -> Optional[float]:
    """raw as a float if it is a finite real number (bool as 1/0: `return got == answer` is
    common), including numpy scalars and 0-d numpy arrays / torch tensors; else None."""
    real = isinstance(raw, numbers.Real)  # int, float, bool, numpy integer / floating scalars
    # A numpy or torch value means its module is imported already: nothing to import here.
    np, torch = sys.modules.get("numpy"), sys.modules.get("torch")
    if np is not None and isinstance(raw, (np.bool_, np.ndarray)):
        real = raw.ndim == 0 and raw.dtype.kind in "biuf"
    if torch is not None and isinstance(raw, torch.Tensor):
        real = raw.ndim == 0 and not raw.is_complex()
    if not real:
        return None
    try:
        value = float(raw)
    except (OverflowError, ValueError):  # an int past float's range
        return None
    return value if math.isfinite(value) else None


@contextlib.contextmanager
def main_module_hidden(names: Sequence[str]):
    """A spawned child imports the parent's main module first (multiprocessing does it so that
    functions defined there can be unpickled). The trainer's main module is gspo-train's, and
    importing it (torch and all) cost every fresh reward worker 3.4 s on the demo before it
    could import the reward functions: a first step waiting on it, and each restart after a
    timeout again. The child needs none of it, unless one of ``names`` (``module:function``)
    lives in __main__."""
    if any(str(n).startswith("__main__:") for n in names):
        yield
        return
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def exit_reason(code: Optional[int]) -> str:
    """A child's exit status (``Process.exitcode``) in words, after its name: "killed by signal
    9 (SIGKILL)", "exited with status 3"."""
    if code is None:
        return "closed its pipe and did not exit"
    if code < 0:
        try:
            return f"killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with status {code}"


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80


def show(raw: object) -> str:
    """A user value for a one-line message: at most about 80 characters of its repr."""
    try:
        return _REPR.repr(raw)
    except Exception:  # a broken __repr__ is the user code's problem, not ours
        return f"<unprintable {type(raw).__name__}>"


_MEMORY_NOTE = "no limit set: the machine's own"


def limit_memory(gib: float, setting: str, holder: str) -> None:
    """Cap this process's data memory at what it holds now plus ``gib`` GiB (0: no cap), the
    value of config key ``setting``; ``memory_note`` then names it (``holder``: what the
    process is called in that line)."""
    global _MEMORY_NOTE
    if not gib:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = _data_bytes() + int(gib * (1 << 30))
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    _MEMORY_NOTE = f"{setting}={gib:g} GiB beyond what the {holder} held at start"


def memory_note() -> str:
    """What a MemoryError in this process ran into: its ``limit_memory``, or none."""
    return _MEMORY_NOTE


def _data_bytes() -> int:
    """This process's data memory as the kernel counts it against RLIMIT_DATA (VmData)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0
