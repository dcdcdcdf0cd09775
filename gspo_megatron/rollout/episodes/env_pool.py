"""User-defined multi-turn environments, one guarded OS process per live episode.

An environment is a class named by an import path ``package.module:Class``: ``Class(row)`` per
episode (``row``: the data row), ``reset()`` -> the opening messages, ``step(assistant_text)``
(or ``step(assistant_text, tool_calls)`` when it takes a second positional parameter) ->
``(messages, done, reward)``, and optionally ``metadata()`` -> a JSON-able dict for the rewards.

Each live episode runs in a process of its own, so that an environment that raises, hangs,
exits or returns garbage costs only that episode (an ``EnvReply`` with ``failure`` set), and so
that the step calls of one turn run concurrently: the pool sends every call of a turn, then
waits for all of them, each against its own deadline. Everything that comes back is checked in
the child and sent as plain JSON types, so the trainer never unpickles (never imports) anything
of the user's module. A finished episode's process goes to a free list and serves a later
episode; a process whose episode failed, in any way, is killed and never reused.

The guarding is the reward worker's (``rewards.worker``), reused: each process leads a process
group with a guard in it that SIGKILLs the group when the trainer dies however it dies, ignores
Ctrl-C (the trainer decides what it means), and its fds 1 and 2 go to a scratch file of which
each reply carries at most ``OUTPUT_PER_CALL`` bytes. Every kill is of the whole group, so
whatever an environment started (a sandbox, a tool's subprocess) ends with its episode.

Start method: forkserver, with this module and (when the trainer has imported it already, as
the pre-flight does) the user's module preloaded in the server; spawn where forkserver is not
available. Both are safe from a trainer that holds many threads (vLLM, torch): neither forks
the trainer. Measured on the 2-core CI box (Python 3.11; wall time of ``reset`` of N episodes
in fresh processes, median of 5 pools; the server's own start, 0.12 s once per trainer
process, excluded):

    =====================================  =========  =========  ==================
    start method                           N = 1      N = 32     (module: + numpy)
    =====================================  =========  =========  ==================
    spawn                                  0.12 s     2.2 s      0.21 s / 3.8 s
    forkserver, module imported per child  0.013 s    0.25 s     0.10 s / 1.9 s
    forkserver, module preloaded           0.009 s    0.17 s     0.010 s / 0.20 s
    =====================================  =========  =========  ==================

A preloaded module is also shared copy-on-write instead of imported once per episode process
(a module that imports torch: hundreds of MB each). It is preloaded only when the trainer has
imported it: an import that fails in the server with anything but ImportError (a SyntaxError,
``sys.exit``) would take the server down for every later start. The server imports it from
its own sys.path (Python 3.11's ignores the trainer's): where that finds nothing the episodes
import the module after the fork, correct and slower; where it finds another file of that name
the episodes drop it and import the trainer's (``_forget_other_preload``). The server is
multiprocessing's one per process, so one that something else started first keeps its own
preload list. A module that starts threads at import is forked with them held.
"""

from __future__ import annotations

import inspect
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Set, Tuple

from gspo_megatron.errors import GspoError
from gspo_megatron.guarded import (
    OUTPUT_PER_CALL,
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
from gspo_megatron.rewards.registry import describe, resolve

WHERE = "agent.environment"
"""The config key that names the environment class (in every error about it)."""

ROLES = ("system", "user", "assistant", "tool")
"""The roles a message from an environment may have."""

START_METHOD = "forkserver"
"""multiprocessing start method of the env processes (spawn where this one is not available)."""

Failure = Optional[str]  # None, or "error" | "timeout" | "exit" | "invalid"


@dataclass(frozen=True)
class EnvLimits:
    """Bounds on what one call of an environment may send back, applied in its process before
    the reply leaves it: within the call's timeout, so that no reply, however large, costs the
    trainer more than a bounded amount of work (``episodes.make_runner`` derives them from the
    agent's token limits and the tokenizer)."""

    message_chars: Optional[int] = None
    """A message's content longer than this is cut to it here (the trainer's token cut then
    marks it ' [truncated]'); None: not cut here."""
    reply_chars: Optional[int] = None
    """Characters of text one reply may hold in all (every string of its messages, and of the
    tool specs at reset) after the cuts: more fails the episode as invalid; None: no bound."""
    memory_gib: float = 0.0
    """agent.env_memory_gib: memory the process may take beyond what it holds once the class is
    imported (``guarded.limit_memory``; 0: no limit)."""


Result = Tuple[Failure, str, Any, Optional[Output]]  # (failure, detail, value, printed output)


@dataclass
class EnvReply:
    """What one reset or step call of one episode gave."""

    messages: List[dict]  # [] on failure
    done: bool  # True on failure
    reward: Optional[float]  # None on failure
    failure: Failure  # None, or "error" | "timeout" | "exit" | "invalid"
    detail: str = ""  # one line: what went wrong
    output: str = ""  # what the env printed (fds 1/2) in this call, at most OUTPUT_PER_CALL bytes
    tools: Optional[List[dict]] = None
    """reset only: the environment's ``tool_specs()`` (JSON schemas the chat template renders
    into the system turn), when it has that method."""


PROBE = """
import json, os, sys
result = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # what the module prints goes to stderr, the verdict alone to stdout
from gspo_megatron.rollout.episodes.env_pool import _probe
result.write(json.dumps(_probe(sys.argv[1], json.load(sys.stdin))))
"""
PROGRESS_EVERY_S = 10.0
"""A pre-flight trial that takes longer says what it is waiting for, this often."""


def check_environment(
    env_path: str,
    row: Optional[dict] = None,
    timeout_s: float = 120.0,
    say: Optional[Callable[[str], None]] = None,
) -> None:
    """Pre-flight: the path names an importable class with callable ``reset`` and ``step`` that
    ``Class(row)`` constructs from ``row`` (the first data row; None: not tried); GspoError
    (one line) otherwise. The trial runs in a child process first, so that a module that ends
    its process at import (``os._exit``) or hangs fails the check instead of ending or stalling
    the trainer; then the class is imported here too (the fork server preloads what the trainer
    has imported). ``say`` gets a line every ``PROGRESS_EVERY_S`` of a slow trial."""
    _check_path(env_path)  # before a process is started
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen(
        [sys.executable, "-c", PROBE, env_path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    what = "importing and constructing it from the first data row" if row else "importing it"
    started, data = time.monotonic(), json.dumps(row)
    while True:
        waited = time.monotonic() - started
        try:
            out, err = proc.communicate(data, timeout=min(PROGRESS_EVERY_S, timeout_s - waited))
            break
        except subprocess.TimeoutExpired:
            data = None
            waited = time.monotonic() - started
            if waited >= timeout_s:
                proc.kill()
                proc.communicate()
                raise GspoError(
                    f"{WHERE}='{env_path}': {what} took more than agent.env_start_timeout_s="
                    f"{timeout_s:g} s (raise it for a module that imports slowly)"
                ) from None
            if say is not None:
                say(f"pre-flight: {what} ({WHERE}='{env_path}'): {waited:.0f} s so far")
    try:
        verdict = json.loads(out) if proc.returncode == 0 else False
    except ValueError:
        verdict = False
    if verdict is False:
        last = (err.strip().splitlines() or [""])[-1][:300]
        raise GspoError(
            f"{WHERE}='{env_path}': {what} ended its process (exit status {proc.returncode})"
            + (f": {last}" if last else " without a word")
        )
    if verdict is not None:
        raise GspoError(verdict)
    load_environment(env_path)


def _check_path(env_path: object) -> None:
    if not isinstance(env_path, str) or ":" not in env_path:
        # resolve() would offer the built-in reward functions, which are no environments.
        raise GspoError(f"{WHERE}={env_path!r}: not an import path 'package.module:Class'")


def _probe(env_path: str, row: Optional[dict]) -> Optional[str]:
    """The pre-flight trial, in its own process: why ``env_path`` is no environment that can be
    made from ``row``, or None."""
    try:
        cls = load_environment(env_path)
        if row is not None:
            _guarded(f"{WHERE}='{env_path}': {cls.__name__}(row) on the first data row", cls, row)
    except GspoError as err:
        return str(err)
    except _Failed as failed:
        return failed.detail
    except BaseException as exc:
        return f"{WHERE}='{env_path}': {describe(exc)}"
    return None


def load_environment(env_path: str) -> type:
    """The class ``env_path`` names (imported here); GspoError (one line) if it is none."""
    _check_path(env_path)
    cls = resolve(env_path, WHERE)
    if not isinstance(cls, type):
        raise GspoError(f"{WHERE}='{env_path}': not a class ({type(cls).__name__})")
    for method in ("reset", "step"):
        if not callable(getattr(cls, method, None)):
            raise GspoError(f"{WHERE}='{env_path}': class has no callable '{method}'")
    return cls


# -- the env process ------------------------------------------------------------------------


class _Failed(Exception):
    """A call's failure, as it goes into the reply."""

    def __init__(self, failure: str, detail: str):
        super().__init__(detail)
        self.failure, self.detail = failure, detail


def _serve(
    conn, env_path: str, module_file: Optional[str], trainer_pid: int, limits: EnvLimits
) -> None:
    """Env process main: lead a process group with a guard in it, capture fds 1 and 2, import
    the class, send None (ready) or why it cannot, then answer jobs ("reset", row),
    ("step", text, tool_calls) and ("finish",) with a Result each until the trainer kills it
    or goes away. ``module_file``: the file of the class's module in the trainer, if loaded."""
    os.setpgid(0, 0)  # before any child exists: all of them join this group
    split_off_guard(trainer_pid, conn)  # from here on the worker, its guard above it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to decide on
    capture = capture_output()
    try:
        _forget_other_preload(env_path, module_file)
        cls = load_environment(env_path)
    except BaseException as exc:  # SystemExit at import is a failed start too
        conn.send(str(exc) if isinstance(exc, GspoError) else describe(exc))
        return
    limit_memory(limits.memory_gib, "agent.env_memory_gib", "process")
    host = _Host(cls, limits)
    conn.send(os.getpid())  # ready; the pid is where a hung call's output can be read
    try:
        while True:
            failure, detail, value = host.run(conn.recv())
            conn.send((failure, detail, value, take_output(capture)))
    except (EOFError, OSError):  # the trainer is gone: nobody to answer
        return


def _forget_other_preload(env_path: str, module_file: Optional[str]) -> None:
    """If the fork server preloaded the module from another file than the trainer's (the
    server is `python -c`, so the working directory comes first on its path, and Python 3.11's
    server ignores the trainer's sys.path), forget that package: the import that follows
    finds the trainer's file, this process's sys.path being the trainer's by now."""
    module = env_path.split(":", 1)[0]
    loaded = sys.modules.get(module)
    if module_file is None or loaded is None or getattr(loaded, "__file__", None) == module_file:
        return
    top = module.split(".")[0]
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        del sys.modules[name]


class _Host:
    """The env process's side of one episode after another."""

    def __init__(self, cls: type, limits: EnvLimits):
        self.cls, self.limits = cls, limits
        self.env: Any = None
        self.tool_calls = False  # whether env.step takes them
        self.strays = Strays()  # what the module started at import lives on

    def run(self, job: tuple) -> Tuple[Failure, str, Any]:
        try:
            if job[0] == "reset":
                return None, "", self._reset(job[1])
            if job[0] == "step":
                return None, "", self._step(job[1], job[2])
            try:  # finish or release
                return None, "", self._finish() if job[0] == "finish" else None
            finally:
                self.env = None
                self.strays.end()  # nothing the episode started outlives it
        except _Failed as failed:
            return failed.failure, failed.detail, None
        except BaseException as exc:  # a check tripped on a returned object's own code
            return "invalid", f"checking what the environment returned raised {describe(exc)}", None

    def _reset(self, row: dict) -> List[dict]:
        self.env = None
        env = _guarded(f"{self.cls.__name__}(row)", self.cls, row)
        self.tool_calls = _takes_tool_calls(env.step)
        raw = _guarded("reset", env.reset)
        messages = _messages(raw, "reset", self.limits.message_chars)
        if not messages:
            raise _Failed("invalid", "reset returned no messages")
        tools = None
        if callable(getattr(env, "tool_specs", None)):
            tools = _guarded("tool_specs", env.tool_specs)
            if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
                raise _Failed("invalid", f"tool_specs returned {show(tools)}, not a list of dicts")
            tools = [_plain(t, "tool_specs returned a dict") for t in tools]
        self._check_size("reset", messages, tools)
        self.env = env
        return messages, tools

    def _step(self, text: str, tool_calls: list) -> Tuple[List[dict], bool, Optional[float]]:
        args = (text, tool_calls) if self.tool_calls else (text,)
        raw = _guarded("step", self.env.step, *args)
        # A tuple only: `return messages` (a list) must not read as (messages[0], ...).
        if not isinstance(raw, tuple) or len(raw) != 3:
            raise _Failed(
                "invalid",
                f"step returned {show(raw)} ({type(raw).__name__}); expected a tuple "
                f"(messages, done, reward)",
            )
        messages, done, reward = (
            _messages(raw[0], "step", self.limits.message_chars),
            raw[1],
            raw[2],
        )
        if not isinstance(done, bool):
            raise _Failed(
                "invalid", f"step returned done={show(done)} ({type(done).__name__}), not a bool"
            )
        if not messages and not done:
            raise _Failed("invalid", "step returned no messages with done=False")
        self._check_size("step", messages)
        return messages, done, _reward(reward)

    def _check_size(self, what: str, *parts) -> None:
        bound = self.limits.reply_chars
        size = _text_chars(parts)
        if bound is not None and size > bound:
            raise _Failed(
                "invalid",
                f"{what} returned {size:,} characters of text (each message cut to "
                f"{self.limits.message_chars:,}), more than one reply may hold ({bound:,}, "
                f"from agent.max_episode_tokens)",
            )

    def _finish(self) -> dict:
        env, self.env = self.env, None
        metadata = getattr(env, "metadata", None)
        if metadata is None:
            return {}
        raw = _guarded("metadata", metadata)
        if not isinstance(raw, dict):
            raise _Failed("invalid", f"metadata returned {type(raw).__name__}, not a dict")
        return _plain(raw, "metadata returned a dict")


def _guarded(what: str, fn, *args):
    """fn(*args); whatever it raises becomes the call's failure: sys.exit() "exit", anything
    else (KeyboardInterrupt included) "error"."""
    try:
        return fn(*args)
    except MemoryError:
        raise _Failed("error", f"{what} ran out of memory ({memory_note()})") from None
    except SystemExit as exc:
        raise _Failed("exit", f"{what} called sys.exit({show(exc.code)})") from None
    except BaseException as exc:
        raise _Failed("error", f"{what} raised {describe(exc)}") from None


def _takes_tool_calls(step) -> bool:
    """Whether a bound ``step`` accepts a second positional argument."""
    try:
        params = list(inspect.signature(step).parameters.values())
    except (TypeError, ValueError):  # no signature to be had (a C callable): one argument
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in positional for p in params) >= 2 or any(
        p.kind is inspect.Parameter.VAR_POSITIONAL for p in params
    )


def _messages(raw: object, what: str, max_chars: Optional[int] = None) -> List[dict]:
    """``raw`` checked as a list of messages, each content cut to ``max_chars``."""
    if not isinstance(raw, list):
        raise _Failed(
            "invalid",
            f"{what} returned messages {show(raw)} ({type(raw).__name__}); expected a list",
        )
    out = []
    for i, message in enumerate(raw):
        where = f"{what} returned messages[{i}]"
        if not isinstance(message, dict):
            raise _Failed("invalid", f"{where} = {show(message)} ({type(message).__name__})")
        role = message.get("role")
        if not isinstance(role, str):
            raise _Failed("invalid", f"{where} without a str 'role'")
        if role not in ROLES:
            raise _Failed("invalid", f"{where} with role {show(role)}; allowed: {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise _Failed("invalid", f"{where} without a str 'content'")
        if max_chars is not None and len(message["content"]) > max_chars:
            message = {**message, "content": message["content"][:max_chars]}
        problem = message_problem(message)
        if problem is not None:
            raise _Failed("invalid", f"{where}: {problem}")
        out.append(_plain(message, where))
    return out


def message_problem(message: dict) -> Optional[str]:
    """Why a message with a valid role and str content cannot go to the chat template, or
    None. Checked here, in the environment's process, rather than found by the template in the
    trainer: the keys chat templates read (Qwen3's and the OpenAI form) must have the shapes
    they expect (``_plain`` checks that every text is valid Unicode)."""
    for key in ("name", "tool_call_id", "reasoning_content"):
        if key in message and not isinstance(message[key], str):
            return f"'{key}' is {show(message[key])} ({type(message[key]).__name__}), not a str"
    if "tool_calls" in message:
        if message["role"] != "assistant":
            return (
                f"'tool_calls' in a {message['role']} message (only assistant messages have them)"
            )
        problem = _tool_calls_problem(message["tool_calls"])
        if problem is not None:
            return problem
    return None


def _tool_calls_problem(calls: object) -> Optional[str]:
    """A message's ``tool_calls``: a list of {"name", "arguments"} (Qwen3) or {"type":
    "function", "function": {"name", "arguments"}} (OpenAI), arguments an object or its JSON
    text."""
    form = (
        'expected a list of {"name": str, "arguments": object} or '
        '{"type": "function", "function": {...}}'
    )
    if not isinstance(calls, list):
        return f"'tool_calls' is {show(calls)} ({type(calls).__name__}); {form}"
    for k, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            return f"'tool_calls'[{k}] is {show(call)}; {form}"
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            return f"'tool_calls'[{k}] has no 'name' str; {form}"
        if not isinstance(fn.get("arguments", {}), (dict, str)):
            return f"'tool_calls'[{k}]'s 'arguments' is {show(fn['arguments'])}; {form}"
    return None


def _text_problem(value: object, path: str = "") -> Optional[str]:
    """The first str inside ``value`` that is not valid Unicode (a lone surrogate), named."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            where = f"'{path}'" if path else "a text"
            return (
                f"{where} is not valid Unicode text ({err.reason} {value[err.start]!r} at "
                f"character {err.start})"
            )
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        problem = _text_problem(key, path) if isinstance(key, str) else None
        problem = problem or _text_problem(item, f"{path}.{key}" if path else str(key))
        if problem is not None:
            return problem
    return None


def _text_chars(value: object) -> int:
    """Characters of every str in ``value`` (plain JSON data), keys excepted."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
    return total


def _plain(value: dict, where: str) -> dict:
    """value as plain JSON types (what the trainer can unpickle without the user's module)."""
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        plain = json.loads(text)
    except (TypeError, ValueError, RecursionError) as exc:
        raise _Failed("invalid", f"{where} that is not JSON ({describe(exc)})") from None
    try:  # a lone surrogate is a str that no tokenizer (and no UTF-8 file) can take
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            problem = _text_problem(plain)
        except RecursionError:
            problem = None
        detail = f"{where} in which {problem or 'a text is not valid Unicode'}"
        raise _Failed("invalid", detail) from None
    return plain


def _reward(raw: object) -> Optional[float]:
    """None, or raw as a finite float; True/False are no rewards (a done flag in the wrong
    place, most likely)."""
    if raw is None:
        return None
    dtype = getattr(raw, "dtype", None)  # numpy / torch booleans too
    boolean = (
        isinstance(raw, bool) or getattr(dtype, "kind", None) == "b" or str(dtype) == "torch.bool"
    )
    value = None if boolean else finite_real(raw)
    if value is None:
        raise _Failed(
            "invalid",
            f"step returned reward={show(raw)} ({type(raw).__name__}); expected None or a "
            f"finite number",
        )
    return value


# -- the trainer's side ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Died:
    reason: str


class _EnvProcess:
    """One env process and its pipe, started at once; ``ready`` once it has imported the
    class."""

    def __init__(self, ctx, env_path: str, module_file: Optional[str], limits: EnvLimits):
        self.conn, child = ctx.Pipe()
        args = (child, env_path, module_file, os.getpid(), limits)
        self.proc = ctx.Process(target=_serve, args=args, daemon=True)
        self.ready = False
        self.worker_pid: Optional[int] = None  # the process under the guard that runs the env
        self.started = time.monotonic()
        self.exitcode: Optional[int] = None  # once killed
        self._killed = False
        try:
            with main_module_hidden([env_path]):
                self.proc.start()
        except BaseException:
            self.conn.close()
            raise
        finally:
            child.close()  # else the process's death would not show as EOF on our end

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, job: tuple) -> None:
        try:
            self.conn.send(job)
        except OSError:  # it died between calls: receive() sees that
            pass

    def receive(self) -> object:
        """The next message, or _Died when the process is gone (call when it is ready)."""
        try:
            if self.conn.poll():
                return self.conn.recv()
        except (EOFError, OSError):
            pass
        # Its end of the pipe closes as the worker exits; the guard above it then kills what
        # the worker left and exits as the worker did, a moment later.
        self.proc.join(timeout=5)
        self.kill()
        return _Died(exit_reason(self.exitcode))

    def salvage_output(self) -> Optional[Output]:
        """What a hung call printed so far (its scratch file, through /proc), None if none."""
        try:
            fd = os.open(f"/proc/{self.worker_pid}/fd/1", os.O_RDONLY)
        except OSError:
            return None
        try:
            size = os.fstat(fd).st_size
            return (os.pread(fd, min(size, OUTPUT_PER_CALL), 0), size) if size else None
        except OSError:
            return None
        finally:
            os.close(fd)

    def kill(self) -> None:
        """SIGKILL the process group: the process, its guard and whatever the env started;
        then release its pipes (a long run goes through many processes). Idempotent."""
        if self._killed:
            return
        self._killed = True
        kill_group(self.proc)
        self.exitcode = self.proc.exitcode
        self.proc.close()
        self.conn.close()


@dataclass
class _Episode:
    proc: _EnvProcess
    done: bool = False


class EnvPool:
    """Episodes of one environment class, each in a guarded process of its own (see the module
    docstring). Use it from one thread (under spawn, the main one: the kernel's parent-death
    signal follows the thread that started a process)."""

    def __init__(
        self,
        env_path: str,
        step_timeout_s: float,
        start_timeout_s: float = 120.0,
        limits: EnvLimits = EnvLimits(),
    ):
        if not (step_timeout_s > 0 and start_timeout_s > 0):
            raise GspoError(
                f"env pool timeouts must be > 0 (step {step_timeout_s}, start {start_timeout_s})"
            )
        self.env_path = env_path
        self.step_timeout_s = float(step_timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self.limits = limits
        self._ctx = _context(env_path)
        module = sys.modules.get(env_path.split(":", 1)[0]) if isinstance(env_path, str) else None
        self._module_file: Optional[str] = getattr(module, "__file__", None)
        self._episodes: Dict[Hashable, _Episode] = {}
        self._free: List[_EnvProcess] = []
        self._procs: Set[_EnvProcess] = set()  # every process alive: close() ends them all
        self._closed = False

    def __enter__(self) -> "EnvPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reset(self, episodes: Dict[Hashable, dict]) -> Dict[Hashable, EnvReply]:
        """Start an episode per key: ``Class(row)`` and ``reset()`` in a process of its own, all
        concurrently. A reply with ``failure`` set means that episode is over already (its key
        is forgotten); the others are live until ``finish``."""
        self._check_open()
        for key in episodes:
            if key in self._episodes:
                raise ValueError(f"episode {key!r} is live already; finish it first")
        calls, replies = {}, {}
        for key, row in episodes.items():
            try:
                proc = self._take_free() or self._start()
            except OSError as err:  # no process to be had (EAGAIN, ENOMEM): that episode fails
                replies[key] = _failed("error", f"no environment process: {describe(err)}")
                continue
            calls[key] = (proc, ("reset", row))
        for key, (proc, (failure, detail, value, output)) in self._exchange(calls).items():
            if failure is None:
                self._episodes[key] = _Episode(proc)
                messages, tools = value
                replies[key] = EnvReply(
                    messages, False, None, None, output=_text(output), tools=tools
                )
            else:
                replies[key] = _failed(failure, detail, output)
        return {key: replies[key] for key in episodes}

    def step(self, calls: Dict[Hashable, Tuple[str, list]]) -> Dict[Hashable, EnvReply]:
        """``step(assistant_text[, tool_calls])`` for each key, concurrently, each within
        step_timeout_s of being sent. A failed episode is over (its key forgotten); one that
        replied done=True takes no more steps and waits for ``finish``."""
        self._check_open()
        jobs = {}
        for key, (text, tool_calls) in calls.items():
            episode = self._live(key)
            if episode.done:
                raise ValueError(f"episode {key!r} is done; finish it instead of stepping it")
            jobs[key] = (episode.proc, ("step", text, list(tool_calls or [])))
        replies = {}
        for key, (_, (failure, detail, value, output)) in self._exchange(jobs).items():
            if failure is None:
                messages, done, reward = value
                self._episodes[key].done = done
                replies[key] = EnvReply(messages, done, reward, None, output=_text(output))
            else:
                replies[key] = _failed(failure, detail, output)
        return {key: replies[key] for key in calls}

    def finish(self, key: Hashable) -> dict:
        """End a live episode: its ``metadata()`` ({} without one, or on any failure in it),
        then its process serves a later episode (or is killed, if metadata failed)."""
        self._check_open()
        episode = self._live(key)
        ((_, (failure, _, value, _)),) = self._exchange({key: (episode.proc, ("finish",))}).values()
        if failure is None:
            self._episodes.pop(key)
            self._free.append(episode.proc)
            return value
        return {}

    def release(self, keys: Sequence[Hashable]) -> None:
        """End live episodes without ``metadata()``: their processes end what the episodes
        started and serve later episodes, as after ``finish`` (the next ``reset`` builds a new
        instance there)."""
        self._check_open()
        jobs = {key: (self._live(key).proc, ("release",)) for key in keys}
        for key, (proc, (failure, _, _, _)) in self._exchange(jobs).items():
            if failure is None:
                self._episodes.pop(key)
                self._free.append(proc)

    def close(self) -> None:
        """Kill every env process (and whatever it started). Idempotent."""
        self._closed = True
        for proc in list(self._procs):
            self._kill(proc)
        self._episodes.clear()
        self._free.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the env pool is closed")

    def _live(self, key: Hashable) -> _Episode:
        try:
            return self._episodes[key]
        except KeyError:
            raise ValueError(
                f"episode {key!r} is not live (never reset, failed or finished)"
            ) from None

    def _take_free(self) -> Optional[_EnvProcess]:
        """A free process that is still alive (one that died idle, say from a thread the last
        episode left behind, must not fail the next episode), or None."""
        while self._free:
            proc = self._free.pop()
            # An idle process has nothing to say: anything readable is the EOF of a worker
            # that ended (its guard exits a moment later).
            if proc.proc.is_alive() and not proc.conn.poll():
                return proc
            self._kill(proc)
        return None

    def _start(self) -> _EnvProcess:
        proc = _EnvProcess(self._ctx, self.env_path, self._module_file, self.limits)
        self._procs.add(proc)
        return proc

    def _kill(self, proc: _EnvProcess) -> None:
        proc.kill()
        self._procs.discard(proc)

    def _exchange(
        self, calls: Dict[Hashable, Tuple[_EnvProcess, tuple]]
    ) -> Dict[Hashable, Tuple[_EnvProcess, Result]]:
        """Send every job (each as soon as its process is ready) and wait for every reply, each
        against its own deadline: start_timeout_s from the start for a fresh process to become
        ready, then step_timeout_s from when the job was sent. A process that fails in any way
        is killed and its key forgotten. If the wait itself is interrupted (Ctrl-C in the
        trainer), every process of the calls is killed and every key forgotten: a reply the
        trainer never saw leaves an episode a turn ahead of it, and one still coming could not
        be told from the next call's."""
        results: Dict[Hashable, Tuple[_EnvProcess, Result]] = {}
        deadlines: Dict[Hashable, float] = {}
        for key, (proc, job) in calls.items():
            if proc.ready:
                proc.send(job)
                deadlines[key] = time.monotonic() + self.step_timeout_s
            else:
                deadlines[key] = proc.started + self.start_timeout_s
        started, notice = time.monotonic(), time.monotonic() + PROGRESS_EVERY_S
        try:
            while deadlines:
                by_object = {}
                for key in deadlines:
                    proc = calls[key][0]
                    by_object[proc.conn] = by_object[proc.proc.sentinel] = key
                left = min(min(deadlines.values()), notice) - time.monotonic()
                keys = {by_object[o] for o in wait(list(by_object), max(left, 0.0))}
                if time.monotonic() >= notice:
                    notice += PROGRESS_EVERY_S
                    self._say_starting([calls[k][0] for k in deadlines], started)
                for key in keys:
                    proc, job = calls[key]
                    result = self._answer(proc, job, proc.receive())
                    if result is None:  # it became ready: the job is on its way now
                        deadlines[key] = time.monotonic() + self.step_timeout_s
                    else:
                        self._record(results, key, proc, result)
                        del deadlines[key]
                now = time.monotonic()
                for key in [k for k, at in deadlines.items() if at <= now]:
                    proc, job = calls[key]
                    self._record(results, key, proc, self._timed_out(proc, job))
                    del deadlines[key]
        except BaseException:
            for key, (proc, _) in calls.items():
                self._kill(proc)
                self._episodes.pop(key, None)
            raise
        return results

    def _say_starting(self, waiting: List[_EnvProcess], since: float) -> None:
        """A slow import must not look like a hang: say what the wait is for."""
        starting = sum(not p.ready for p in waiting)
        if starting:
            print(
                f"environment: {starting} process(es) still importing {WHERE}="
                f"'{self.env_path}' ({time.monotonic() - since:.0f} s so far; "
                f"agent.env_start_timeout_s={self.start_timeout_s:g})",
                file=sys.stderr,
                flush=True,
            )

    def _record(self, results: dict, key: Hashable, proc: _EnvProcess, result: Result) -> None:
        results[key] = (proc, result)
        if result[0] is not None:  # a process that failed is never reused
            self._kill(proc)
            self._episodes.pop(key, None)

    def _answer(self, proc: _EnvProcess, job: tuple, got: object) -> Optional[Result]:
        """The call's Result from what the process sent (or that it died); None when that was
        its ready message and the job has been sent."""
        if not proc.ready:
            if isinstance(got, int):  # the worker's pid: it has loaded the class
                proc.ready, proc.worker_pid = True, got
                proc.send(job)
                return None
            if isinstance(got, _Died):
                return "error", f"environment process {got.reason} while starting", None, None
            return "error", got, None, None  # why the class cannot be loaded, one line
        if isinstance(got, _Died):
            return "exit", f"environment process {got.reason} during {job[0]}", None, None
        return got

    def _timed_out(self, proc: _EnvProcess, job: tuple) -> Result:
        if not proc.ready:
            detail = (
                f"environment process not ready within start_timeout_s={self.start_timeout_s:g} s"
            )
            return "timeout", detail + "; killed", None, None
        output = proc.salvage_output()
        detail = f"{job[0]} gave no reply within step_timeout_s={self.step_timeout_s:g} s; killed"
        return "timeout", detail, None, output


def _context(env_path: str):
    """The multiprocessing context for env processes (see the module docstring)."""
    if START_METHOD != "forkserver" or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    module = env_path.split(":", 1)[0] if isinstance(env_path, str) else ""
    # Takes effect only if the server is not running yet (it is one per trainer process).
    ctx.set_forkserver_preload([__name__] + ([module] if module in sys.modules else []))
    return ctx


def _failed(failure: str, detail: str, output: Optional[Output] = None) -> EnvReply:
    return EnvReply([], True, None, failure, detail, _text(output))


def _text(output: Optional[Output]) -> str:
    if output is None:
        return ""
    head, size = output
    text = head.decode("utf-8", errors="replace")
    if size > len(head):
        text += f"\n... ({size - len(head)} more bytes of this call's output not kept)"
    return text
