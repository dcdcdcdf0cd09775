"""The reward worker: one spawned process that imports the reward functions and answers calls,
and the trainer's handle on it.

The process shares no locks or threads with the trainer (spawned). It reports ready once the
functions are imported, so that a call's timeout runs from when it starts and never pays
for a start-up. Inside, every call is guarded: anything a function raises (SystemExit and
KeyboardInterrupt included) or returns other than a finite real number becomes an error reply.
It ignores Ctrl-C (the trainer decides what that means) and dies with the trainer (Linux
``PR_SET_PDEATHSIG``), so that it is never left hung in a user's function.

Whatever a call starts (a sandbox, a ``subprocess``, a pool) ends with the call, in whatever
session or process group it put itself: the worker runs under a guard process that runs no user
code and is a child subreaper, so every such process stays in the guard's tree; the worker kills
the call's leftovers after each call (``procutil.Strays``), every kill of the worker is of the
whole tree and group, and the guard kills the tree when the trainer dies, however it dies
(``procutil.split_off_guard``). What a
function prints (its own prints, C code, its child processes: file descriptors 1 and 2) goes to
a scratch file, emptied after each call, and reaches the trainer with the reply: at most
``guarded.OUTPUT_PER_CALL`` bytes of it (``RewardRunner`` shows it, up to a budget per run).
"""

from __future__ import annotations

import importlib
import inspect
import os
import signal
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Callable, Optional, Sequence, Tuple

from gspo_megatron.errors import GspoError
from gspo_megatron.guarded import (
    Output,
    capture_output,
    exit_reason,
    finite_real,
    limit_memory,
    main_module_hidden,
    memory_note,
    show,
    take_output,
)
from gspo_megatron.procutil import Strays, kill_group, split_off_guard
from gspo_megatron.rewards.builtin import WORKER_IMPORTS
from gspo_megatron.rewards.registry import describe, resolve

STARTUP_TIMEOUT_S = 120.0
"""How long a fresh worker may take to start and import the functions (not part of any call)."""

Job = Tuple[int, str, str, Optional[str], Optional[dict]]
"""(function index, prompt, response, answer, episode): ``episode`` is a multi-turn episode's
record (messages, metadata, turns, tool calls; None for a single response), passed to a
function that has a parameter named ``episode``."""
Reply = Tuple[float, Optional[str]]  # (value, None) or (0.0, what went wrong)


def _serve(conn, names: Sequence[str], parent_pid: int, memory_gib: float = 0.0) -> None:
    """Worker main: lead a process group with a guard in it, capture fds 1 and 2, import the
    functions, send None (ready) or why it cannot start, then answer each Job with
    (Reply, Output) until the trainer kills it or goes away."""
    os.setpgid(0, 0)  # before any child exists: all of them join this group
    split_off_guard(parent_pid, conn)  # from here on the worker, its guard above it
    # Ctrl-C reaches the whole process group; the trainer decides what it means and stops this
    # worker, which must not report it as a fault of whatever function it was running.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    capture = capture_output()
    try:
        fns = [resolve(n, f"rewards.functions[{k}].name") for k, n in enumerate(names)]
        _import_lazy_dependencies(names)
    except BaseException as exc:  # SystemExit at import is a failed start too
        conn.send(str(exc) if isinstance(exc, GspoError) else describe(exc))
        return
    strays = Strays()  # what the functions' modules started at import lives on
    limit_memory(memory_gib, "rewards.memory_gib", "worker")
    conn.send(None)
    try:
        while True:
            # A batch of calls, answered one reply each as it finishes: one round trip per
            # score() instead of one per call (measured: 64 calls 5-8 ms -> 2-3 ms).
            for k, prompt, response, answer, episode in conn.recv():
                reply = _run_one(fns[k], prompt, response, answer, episode)
                strays.end()  # nothing a call started outlives it
                conn.send((reply, take_output(capture)))
    except (EOFError, OSError):  # the trainer is gone: nobody to answer
        return


def _run_one(
    fn: Callable, prompt: str, response: str, answer: Optional[str], episode: Optional[dict] = None
) -> Reply:
    # BaseException: sys.exit() or KeyboardInterrupt in a reward function is that call's
    # fault, no reason to stop this worker.
    try:
        if takes_episode(fn):
            raw = fn(prompt, response, answer, episode=episode)
        else:
            raw = fn(prompt, response, answer)
        value = finite_real(raw)
    except MemoryError:
        return 0.0, f"ran out of memory ({memory_note()})"
    except BaseException as exc:
        return 0.0, f"raised {describe(exc)}"
    if value is None:
        return (
            0.0,
            f"returned {show(raw)} ({type(raw).__name__}); a reward must be a finite number",
        )
    return value, None


def takes_episode(fn: Callable) -> bool:
    """Whether a reward function asks for the multi-turn episode (a parameter ``episode``)."""
    try:
        return "episode" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


def _import_lazy_dependencies(names: Sequence[str]) -> None:
    for name in names:
        for module in WORKER_IMPORTS.get(name, ()):
            importlib.import_module(module)


_NO_ANSWER = object()


@dataclass(frozen=True)
class _Died:
    reason: str


class Worker:
    """One worker process and its pipe. Spawned at once; `wait_ready` waits for its imports."""

    def __init__(self, ctx, names: Sequence[str], memory_gib: float = 0.0):
        self.conn, child = ctx.Pipe()
        args = (child, list(names), os.getpid(), memory_gib)
        self.proc = ctx.Process(target=_serve, args=args, daemon=True)
        self.ready = False
        self.failed: Optional[str] = None
        """Why this worker cannot score (it is gone then)."""
        try:
            with main_module_hidden(names):
                self.proc.start()
        except OSError as err:  # no process to be had (EAGAIN, ENOMEM): errors, not a crash
            self.failed = f"reward worker could not be spawned: {describe(err)}"
        child.close()  # else the worker's death would not show as EOF on our end

    def alive(self) -> bool:
        return self.failed is None and self.proc.is_alive()

    def wait_ready(self) -> Optional[str]:
        """None once the worker has imported the functions, else why it cannot score."""
        if self.failed is None and not self.ready:
            got = self._receive(STARTUP_TIMEOUT_S)
            self.ready = got is None
            if got is _NO_ANSWER:
                self.failed = f"reward worker not ready after {STARTUP_TIMEOUT_S:g} s"
            elif not self.ready:
                why = got.reason if isinstance(got, _Died) else got
                self.failed = f"reward worker failed to start: {why}"
            if self.failed is not None:
                self.kill()
        return self.failed

    def send(self, jobs: Sequence[Job]) -> None:
        """Queue ``jobs``: the worker runs them in order and answers each (``reply``). A
        worker that died meanwhile shows in the first ``reply``."""
        try:
            self.conn.send(list(jobs))
        except OSError:  # it died between calls: _receive sees that
            pass

    def reply(self, timeout_s: float) -> Tuple[Reply, str, Optional[Output]]:
        """The next queued call's Reply, "ok" and what it printed (None if nothing); else
        (0, why), "timeout" (killed here after timeout_s) or "died" (it exited in the call),
        and None: then the worker is gone, with the calls queued after it (replace it and send
        them again). The call's time runs from here: the worker starts it when the one before
        it has answered."""
        got = self._receive(timeout_s)
        if got is _NO_ANSWER:
            self.kill()
            reply = (0.0, f"no result within timeout_s={timeout_s:g} s; worker killed")
            return reply, "timeout", None
        if isinstance(got, _Died):
            return (0.0, got.reason), "died", None
        reply, output = got
        return reply, "ok", output

    def _receive(self, timeout_s: float) -> object:
        """The next message, _NO_ANSWER after timeout_s, or _Died when the worker exited."""
        ready = wait([self.conn, self.proc.sentinel], timeout_s)
        if not ready:
            return _NO_ANSWER
        if self.conn in ready:
            try:
                return self.conn.recv()
            except (EOFError, OSError):
                pass
        self.proc.join(timeout=5)  # its pipes close a moment before it can be reaped
        code = self.proc.exitcode
        self.kill()
        return _Died(f"worker {exit_reason(code)}")

    def kill(self) -> None:
        """SIGKILL the worker's process group: the worker, its guard and whatever a function
        started (a handler that a user's function set for SIGTERM must not keep any of it, or
        the trainer waiting on it, alive)."""
        if self.proc.pid is not None:  # it was spawned
            kill_group(self.proc)
        self.conn.close()
