"""The one exception type users see for bad input, and how command-line entry points end.

Every check that rejects a file, a config key, a layout or a data row raises ``GspoError`` with a
single line that names the offending thing and what would be valid. CLIs print that line and
exit with status 2 instead of a traceback. ``TrainingStopped`` is the same for a run that had to
stop on its own (exit 1): too many skipped steps, a collective that timed out. Ctrl-C and SIGTERM
are one line and exit status 130 / 143 (the shell's convention), after the same cleanup as any
other exception (temporary outputs removed).

Under torchrun the entry points also tie each worker's life to its launcher (Linux
``PR_SET_PDEATHSIG``): when torchrun itself is killed, with SIGKILL as a scheduler or the OOM
killer does, its workers get SIGKILL too instead of training on to the end unobserved.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable, NoReturn, TypeVar

from gspo_megatron.procutil import die_with_parent, kill_children

T = TypeVar("T")

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
EXIT_HUNG_UP = 129


class GspoError(Exception):
    """Bad input, described in one line."""


class TrainingStopped(Exception):
    """A run that cannot go on (not the input's fault), described in one line."""


class Terminated(BaseException):
    """SIGTERM (a scheduler's preemption, torchrun tearing a run down), raised like Ctrl-C so
    that the same cleanup runs."""


class HungUp(Terminated):
    """SIGHUP (a closed terminal or ssh session): ended as SIGTERM is, with its own status."""


_SIGNAL_EXITS = {
    HungUp: ("SIGHUP (the terminal or session closed)", EXIT_HUNG_UP, "terminated"),
    Terminated: ("SIGTERM", EXIT_TERMINATED, "terminated"),
    KeyboardInterrupt: ("SIGINT (Ctrl-C)", EXIT_INTERRUPTED, "interrupted"),
}


def exit_on_error(main: Callable[..., T]) -> Callable[..., T]:
    """Decorator for CLI entry points: a GspoError becomes one line on stderr and exit code 2,
    TrainingStopped one line and exit 1, Ctrl-C one line and exit 130, SIGTERM one line and
    exit 143."""

    def wrapped(*args, **kwargs) -> T:
        die_with_launcher()
        on_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main else None
        hup = signal.signal(signal.SIGHUP, _raise_hung_up) if on_main else None
        try:
            return main(*args, **kwargs)
        except GspoError as err:
            _die(str(err), EXIT_BAD_INPUT)
        except TrainingStopped as err:
            _die(str(err), EXIT_STOPPED, prefix="stopped")
        except (Terminated, KeyboardInterrupt) as err:
            # A signal reaches every rank at once: rank 0 speaks for all of them.
            what, code, prefix = _SIGNAL_EXITS[type(err)]
            _die(
                f"{what}; no partial output was left looking complete",
                code,
                prefix=prefix,
                quiet=os.environ.get("RANK", "0") != "0",
            )
        finally:
            if previous is not None:  # a caller in the same process (a test) gets its own back
                signal.signal(signal.SIGTERM, previous)
                signal.signal(signal.SIGHUP, hup)

    wrapped.__name__ = main.__name__
    wrapped.__doc__ = main.__doc__
    return wrapped


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _raise_hung_up(signum, frame) -> None:
    raise HungUp()


def _quiet_rank() -> bool:
    """Under torchrun every rank runs the same pre-flight on the same inputs and fails alike:
    rank 0 speaks for them. Once process groups exist a failure may be one rank's own, so
    every rank reports it."""
    return os.environ.get("RANK", "0") != "0" and not _distributed()


def _die(message: str, code: int, prefix: str = "error", quiet: bool = False) -> NoReturn:
    if not (quiet or _quiet_rank()):
        rank = os.environ.get("RANK")
        where = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{prefix}: {where}{message}", file=sys.stderr, flush=True)
    if "TORCHELASTIC_RUN_ID" in os.environ and _distributed():
        # A torchrun worker with process groups: megatron, vLLM and DCP leave threads and
        # groups behind whose teardown can block on peers that are already gone. Everything
        # worth keeping was written atomically before this point; children are ended here, as
        # the exit hooks os._exit skips would have. (A single process, or a caller in the same
        # process such as a test, gets a normal SystemExit.)
        sys.stdout.flush()
        kill_children()
        os._exit(code)
    sys.exit(code)


def _distributed() -> bool:
    # Without torch.distributed loaded no process group can exist; this module stays light
    # (every entry point and the reward worker import it), so torch is not imported for this.
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def die_with_launcher() -> None:
    """Under torchrun: SIGKILL this worker when torchrun's agent (its parent) dies. No-op outside
    torchrun: a process started from a shell keeps the shell's semantics."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        die_with_parent(os.getppid())
