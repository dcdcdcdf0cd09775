"""User reward functions for tests/test_rewards.py and the gspo-train runs of tests/train_runs.py
(imported by path, in the reward worker)."""

import os
import signal
import sys
import time
from decimal import Decimal
from fractions import Fraction
from pathlib import Path


def length_bonus(prompt, response, answer):
    return min(len(response.split()) / 10.0, 1.0)


def raises(prompt, response, answer):
    raise RuntimeError("boom")


def hangs(prompt, response, answer):
    if "hang" in response:
        time.sleep(60)
    return 1.0


def returns(prompt, response, answer):
    """The value that `response` spells in Python, e.g. "float('nan')" or "np.float32(0.5)"."""
    import numpy as np

    torch = __import__("torch") if "torch" in response else None  # only the cases that need it
    return eval(response, {"np": np, "torch": torch, "Decimal": Decimal, "Fraction": Fraction})


class CustomStop(BaseException):
    pass


def misbehaves(prompt, response, answer):
    """Ends its call the way `response` names (as buggy user code does), else returns 1."""
    if response == "sys.exit":
        sys.exit(3)
    if response == "KeyboardInterrupt":
        raise KeyboardInterrupt
    if response == "BaseException":
        raise CustomStop("stop everything")
    if response == "os._exit":
        os._exit(3)
    if response == "SIGKILL":
        os.kill(os.getpid(), signal.SIGKILL)
    return 1.0


def hangs_after_writing_pid(prompt, response, answer):
    """Writes the worker's pid to the file named by `prompt`, then hangs for a minute."""
    Path(prompt).write_text(str(os.getpid()))
    time.sleep(60)
    return 1.0


def ignores_sigterm_and_hangs(prompt, response, answer):
    """Ignores SIGTERM (as code with its own handler for it can), then hangs as above."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return hangs_after_writing_pid(prompt, response, answer)


FLAT_WORDS = {f"w{i}" for i in range(1, 7)}
"""Answers starting with one of these words score flat (see copy_or_flat)."""


def copy_or_flat(prompt, response, answer):
    """The demo's copy reward, except that every response to a prompt whose answer starts with
    one of FLAT_WORDS (about 6 prompts in 16) scores 0.5: those groups have all rewards equal, as
    a solved or hopeless prompt does, and carry no gradient. For gspo-train runs (the reward
    worker finds this module through PYTHONPATH=tests)."""
    from gspo_megatron.tasks.demo import copy_reward

    if (answer or "").split()[:1] and answer.split()[0] in FLAT_WORDS:
        return 0.5
    return copy_reward(prompt, response, answer)


def _start_sleepers(pid_file: Path, n: int = 2) -> None:
    """Start n `sleep` processes (as a reward running a sandbox or a tool would) and append their
    pids to pid_file."""
    import subprocess

    for _ in range(n):
        child = subprocess.Popen(["sleep", "600"])
        with open(pid_file, "a") as f:
            f.write(f"{child.pid}\n")


def starts_processes(prompt, response, answer):
    """Leaves two child processes running per call (their pids appended to the file `prompt`)."""
    _start_sleepers(Path(prompt))
    return 1.0


def starts_escaping_processes_env(prompt, response, answer):
    """starts_escaping_processes, the pids appended to $GSPO_TEST_CHILDREN."""
    return starts_escaping_processes(os.environ["GSPO_TEST_CHILDREN"], response, answer)


def starts_escaping_processes(prompt, response, answer):
    """Leaves two processes running per call that a process-group kill cannot reach: one in a
    session of its own (as sandboxes are started, so that their own timeout can kill them), one
    double-forked after setsid (a daemon); pids appended to the file `prompt`."""
    import subprocess

    child = subprocess.Popen(["sleep", "600"], start_new_session=True)
    with open(prompt, "a") as f:
        f.write(f"{child.pid}\n")
    _daemon(Path(prompt))
    return 1.0


def _daemon(pid_file: Path) -> None:
    """A `sleep` double-forked after setsid (its parent exits: it is an orphan in a session of
    its own); its pid appended to pid_file before this returns."""
    read, write = os.pipe()
    first = os.fork()
    if first == 0:
        try:
            os.close(read)
            os.setsid()
            if os.fork() == 0:
                os.write(write, f"{os.getpid()}\n".encode())
                os.execvp("sleep", ["sleep", "600"])
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(first, 0)
    pid = os.read(read, 32).decode()
    os.close(read)
    with open(pid_file, "a") as f:
        f.write(pid)


def hogs_memory(prompt, response, answer):
    """Allocates 3 GiB (a runaway verifier)."""
    return float(len(bytearray(3 << 30)) > 0)


def starts_processes_then_hangs(prompt, response, answer):
    """Starts two child processes (pids in `prompt`.children), then as hangs_after_writing_pid."""
    _start_sleepers(Path(prompt + ".children"))
    return hangs_after_writing_pid(prompt, response, answer)


def prints_a_lot(prompt, response, answer):
    """Prints 100 KB per call (Python's stdout and stderr, and a C-level write to fd 1)."""
    print("x" * 50_000)
    print("e" * 30_000, file=sys.stderr)
    os.write(1, b"c" * 20_000 + b"\n")
    return 0.25


def constant(prompt, response, answer):
    """Every response scores the same: every group is flat, so dynamic sampling finds nothing."""
    return 0.5


def huge_or_tiny(prompt, response, answer):
    """The demo's copy reward x 1e300 for prompts whose answer starts with an even word (float64's
    sums and squares of such rewards overflow) and x 1e-300 for the others (their differences
    are far below the advantage's eps). Each call also prints 20 KB and leaves a child process
    running (its pid appended to $GSPO_TEST_CHILDREN): a noisy function with a sandbox."""
    from gspo_megatron.tasks.demo import copy_reward

    print("r" * 20_000)
    _start_sleepers(Path(os.environ["GSPO_TEST_CHILDREN"]), n=1)
    scale = 1e300 if int((answer or "w1").split()[0][1:]) % 2 == 0 else 1e-300
    return copy_reward(prompt, response, answer) * scale


def tool_use(prompt, response, answer, episode):
    """Multi-turn episodes: 1 per tool call the episode made, read from its record (a single
    response gets episode=None)."""
    if episode is None:
        return -1.0
    return float(episode["tool_calls"]) + 0.1 * len(episode["messages"])
