"""EnvPool: user environments in guarded processes, one per live episode. A scripted episode,
tool calls, every way an environment can fail costing only its own episode, concurrent steps,
process reuse, nothing left behind by close() or by a SIGKILLed trainer, and the pre-flight
check of the class."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterable, List

import psutil
import pytest
from conftest import REPO, child_env

from gspo_megatron.errors import GspoError
from gspo_megatron.guarded import OUTPUT_PER_CALL
from gspo_megatron.rollout.episodes import env_pool
from gspo_megatron.rollout.episodes.env_pool import EnvLimits, EnvPool, check_environment

TESTS = Path(__file__).resolve().parent


def _pid(reply) -> int:
    """The env process's pid, which the test environments' reset message ends with."""
    return int(reply.messages[-1]["content"].split("=")[-1].split()[-1])


def _running(pids: Iterable[int]) -> List[int]:
    """Those of pids that are still running (a zombie, which nobody may reap in a container,
    has ended)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _group(pgid: int) -> List[int]:
    """The running processes of a process group (an env process, its guard, what it started)."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
        except ProcessLookupError:
            pass
    return _running(members)


def _wait_until_gone(pids: List[int], timeout_s: float = 5.0) -> None:
    """Assert that all of pids end within timeout_s (a SIGKILLed process dies once scheduled;
    a guard notices its trainer's death within a poll)."""
    deadline = time.monotonic() + timeout_s
    while _running(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _running(pids) == []


def test_a_scripted_episode_over_three_turns():
    with EnvPool("agent_envs:Scripted", step_timeout_s=10) as pool:
        opened = pool.reset({"a": {"question": "2+2?"}, "b": {"question": "3+3?"}})
        assert [m["role"] for m in opened["a"].messages] == ["system", "user"]
        assert opened["b"].messages[1]["content"].startswith("3+3?")
        assert (opened["a"].done, opened["a"].reward, opened["a"].failure) == (False, None, None)
        with pytest.raises(ValueError, match="live already"):
            pool.reset({"a": {"question": "again"}})

        texts = ["x", "yy", "zzz"]
        for turn, text in enumerate(texts, 1):
            replies = pool.step({"a": (text, []), "b": (text * 2, [])})
            assert list(replies) == ["a", "b"]
            a, b = replies["a"], replies["b"]
            assert (a.reward, b.reward) == (len(text), 2 * len(text))  # a reward per turn
            assert a.done is (turn == 3) and a.failure is None
            assert a.messages == (
                [] if turn == 3 else [{"role": "user", "content": f"turn {turn}"}]
            )

        with pytest.raises(ValueError, match="is done"):
            pool.step({"a": ("more", [])})
        assert pool.finish("a") == {"seen": texts, "question": "2+2?"}
        with pytest.raises(ValueError, match="not live"):
            pool.step({"a": ("x", [])})
        with pytest.raises(ValueError, match="not live"):
            pool.step({"never": ("x", [])})


def test_tool_calls_reach_a_step_that_takes_them():
    calls = [{"name": "search", "arguments": {"q": "gspo"}}, "opaque"]
    with EnvPool("agent_envs:WithTools", step_timeout_s=10) as pool:
        pool.reset({0: {"question": "q"}})
        (reply,) = pool.step({0: ("calling", calls)}).values()
    assert reply.failure is None
    assert reply.messages == [{"role": "tool", "content": repr(calls), "name": "echo"}]


# assistant text -> (failure, what the detail says)
FAULTS = {
    "raise": ("error", "step raised RuntimeError: boom"),
    "KeyboardInterrupt": ("error", "step raised KeyboardInterrupt"),
    "hang": ("timeout", "step gave no reply within step_timeout_s=1 s"),
    "sys.exit": ("exit", "step called sys.exit(3)"),
    "os._exit": ("exit", "environment process exited with status 7 during step"),
    "pair": ("invalid", "expected a tuple (messages, done, reward)"),
    "list": ("invalid", "(list); expected a tuple"),
    "messages not a list": ("invalid", "step returned messages 'fine' (str); expected a list"),
    "message not a dict": ("invalid", "step returned messages[0] = 'fine' (str)"),
    "no content": ("invalid", "step returned messages[0] without a str 'content'"),
    "bad role": ("invalid", "messages[0] with role 'robot'; allowed: system, user, assistant"),
    "content not str": ("invalid", "step returned messages[1] without a str 'content'"),
    "done not bool": ("invalid", "step returned done=1 (int), not a bool"),
    "nan reward": ("invalid", "reward=nan (float); expected None or a finite number"),
    "bool reward": ("invalid", "reward=True (bool)"),
    "str reward": ("invalid", "reward='1.0' (str)"),
    "empty not done": ("invalid", "step returned no messages with done=False"),
    "not json": ("invalid", "step returned messages[0] that is not JSON (TypeError"),
    "surrogate": (
        "invalid",
        "step returned messages[0] in which 'content' is not valid Unicode text (surrogates not "
        "allowed '\\ud800' at character 2)",
    ),
    "tool_calls not a list": (
        "invalid",
        "step returned messages[0]: 'tool_calls' is 'notalist' (str); expected a list of",
    ),
    "tool call without name": ("invalid", "messages[0]: 'tool_calls'[0] has no 'name' str"),
    "tool_calls in a user turn": (
        "invalid",
        "'tool_calls' in a user message (only assistant messages have them)",
    ),
    "name not str": ("invalid", "step returned messages[0]: 'name' is 3 (int), not a str"),
}


def test_each_fault_fails_only_its_own_episode():
    with EnvPool("agent_envs:Misbehaves", step_timeout_s=1) as pool:
        opened = pool.reset(
            {
                "ok": {},
                "custom str": {},
                "construct": {"construct": "raise"},
                "reset empty": {"reset": "empty"},
                "reset not a list": {"reset": "not a list"},
                "reset surrogate": {"reset": "surrogate"},
                **{kind: {} for kind in FAULTS},
            }
        )
        assert opened["construct"].failure == "error"
        assert opened["construct"].detail == "Misbehaves(row) raised ValueError: bad row"
        assert (opened["reset empty"].failure, opened["reset empty"].detail) == (
            "invalid",
            "reset returned no messages",
        )
        assert opened["reset not a list"].failure == "invalid"
        assert (opened["reset surrogate"].failure, opened["reset surrogate"].detail) == (
            "invalid",
            "reset returned messages[1] in which 'content' is not valid Unicode text "
            "(surrogates not allowed '\\udfff' at character 0)",
        )
        pids = {kind: _pid(opened[kind]) for kind in FAULTS}

        # All the faults in one call: the hang's timeout (1 s) is what the call costs.
        replies = pool.step({kind: (kind, []) for kind in ["ok", "custom str", *FAULTS]})
        for kind, (failure, detail) in FAULTS.items():
            reply = replies[kind]
            assert (reply.failure, reply.messages, reply.done, reply.reward) == (
                failure,
                [],
                True,
                None,
            ), kind
            assert detail in reply.detail and "\n" not in reply.detail, (kind, reply.detail)
            with pytest.raises(ValueError, match="not live"):
                pool.step({kind: ("ok", [])})
        assert replies["hang"].output == "stepping hang\n"  # what it printed before it hung
        assert replies["raise"].output == "stepping raise\n"
        assert replies["ok"].failure is None and replies["ok"].reward == 1.0
        custom = replies["custom str"].messages[0]["content"]
        assert custom == "plain?" and type(custom) is str  # nothing of the user's module's
        assert _running(pids.values()) == []  # every failed episode's process is killed
        assert pool.step({"ok": ("ok", [])})["ok"].failure is None  # the others go on


def test_an_environment_over_its_memory_limit_fails_its_episode_only():
    """agent.env_memory_gib=0.5: a step that allocates 3 GiB fails its episode with a line
    saying so (the machine never sees the 3 GiB); a sandbox the environment starts has the same
    cap; the other episodes go on."""
    with EnvPool("agent_envs:Misbehaves", 10, limits=EnvLimits(memory_gib=0.5)) as pool:
        pool.reset({k: {} for k in ("hog", "child", "ok")})
        replies = pool.step({"hog": ("hog", []), "child": ("hog in a child", []), "ok": ("ok", [])})
    assert (replies["hog"].failure, replies["hog"].detail) == (
        "error",
        "step ran out of memory (agent.env_memory_gib=0.5 GiB beyond what the process held at "
        "start)",
    )
    assert replies["child"].messages[0]["content"] == "1 MemoryError"
    assert replies["ok"].failure is None


def test_metadata_that_fails_gives_nothing():
    with EnvPool("agent_envs:Misbehaves", step_timeout_s=0.5) as pool:
        pids = {
            k: _pid(r)
            for k, r in pool.reset({k: {"metadata": k} for k in ("raise", "hang")}).items()
        }
        assert pool.finish("raise") == {} and pool.finish("hang") == {}
        assert _running(pids.values()) == []  # not reused after a failure


@pytest.mark.parametrize(
    "path,detail",
    [
        (
            "agent_envs:missing",
            "agent.environment='agent_envs:missing': module 'agent_envs' has no 'missing'",
        ),
        ("no_such_module_xyz:Env", "cannot import module 'no_such_module_xyz'"),
        ("agent_envs:not_a_class", "not a class (function)"),
    ],
)
def test_a_class_that_cannot_be_loaded_fails_its_resets(path, detail):
    with EnvPool(path, step_timeout_s=5) as pool:
        replies = pool.reset({0: {}, 1: {}})
    assert [r.failure for r in replies.values()] == ["error", "error"]
    assert detail in replies[0].detail


def test_printed_output_comes_back_capped():
    with EnvPool("agent_envs:Prints", step_timeout_s=10) as pool:
        (opened,) = pool.reset({0: {}}).values()
        assert opened.output == "hello from reset\nand from C on fd 2\n"
        (reply,) = pool.step({0: ("go", [])}).values()
    head, note = reply.output.split("\n", 1)
    assert head == "x" * OUTPUT_PER_CALL
    assert note == f"... ({100_001 - OUTPUT_PER_CALL} more bytes of this call's output not kept)"


def test_steps_of_a_turn_run_concurrently():
    n, sleep = 32, 0.2
    with EnvPool("agent_envs:Sleeps", step_timeout_s=10) as pool:
        pool.reset({k: {} for k in range(n)})
        start = time.monotonic()
        replies = pool.step({k: ("go", []) for k in range(n)})
        took = time.monotonic() - start
    assert all(r.failure is None for r in replies.values())
    # The sleeps overlap; what comes on top is waking 32 processes and reading 32 replies one
    # after another, on a CI box of 2 cores that other tests load: 4x the sleep leaves room for
    # that (0.21 s measured on an idle box) while 32 serial calls would take 32x.
    assert took < sleep * 4
    spans = [[float(t) for t in r.messages[0]["content"].split()] for r in replies.values()]
    assert took < sum(end - start for start, end in spans) / 8  # the serial sum, as measured
    assert max(start for start, _ in spans) < min(end for _, end in spans)  # all at once


def test_ctrl_c_does_not_reach_an_env_in_a_call():
    with EnvPool("agent_envs:Sleeps", step_timeout_s=10) as pool:
        pid = int(pool.reset({0: {}})[0].messages[0]["content"])
        # Ctrl-C goes to the terminal's foreground process group; send it to the env's own
        # group as well, in the middle of its 0.2 s step.
        timer = threading.Timer(0.1, os.killpg, (pid, signal.SIGINT))
        timer.start()
        reply = pool.step({0: ("go", [])})[0]
        timer.join()
    assert reply.failure is None


def test_processes_are_reused_except_after_a_failure():
    with EnvPool("agent_envs:Misbehaves", step_timeout_s=10) as pool:
        first = {k: _pid(r) for k, r in pool.reset({k: {} for k in "abc"}).items()}
        assert len(set(first.values())) == 3
        assert pool.step({"a": ("raise", [])})["a"].failure == "error"
        assert pool.finish("b") == {"fine": True} and pool.finish("c") == {"fine": True}
        second = {k: _pid(r) for k, r in pool.reset({k: {} for k in "def"}).items()}
        assert first["a"] not in second.values()  # the failed one is gone
        assert {first["b"], first["c"]} < set(second.values())  # the freed ones serve again
        for key in "def":
            pool.finish(key)
        third = {_pid(r) for r in pool.reset({k: {} for k in "ghi"}).values()}
        assert third == set(second.values())


def test_a_free_process_that_died_idle_is_not_handed_out():
    with EnvPool("agent_envs:Misbehaves", step_timeout_s=10) as pool:
        pid = _pid(pool.reset({"a": {"metadata": "exit later"}})["a"])
        assert pool.finish("a") == {"fine": True}
        # Until the fork server has reaped it and said so, it looks alive to the pool.
        deadline = time.monotonic() + 5
        while psutil.pid_exists(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.1)
        reply = pool.reset({"b": {}})["b"]
        assert reply.failure is None and _pid(reply) != pid


def test_spawn_where_there_is_no_forkserver(monkeypatch):
    monkeypatch.setattr(env_pool, "START_METHOD", "spawn")
    with EnvPool("agent_envs:Misbehaves", step_timeout_s=10) as pool:
        pids = [_pid(r) for r in pool.reset({0: {}, 1: {}}).values()]
        start = time.monotonic()
        replies = pool.step({0: ("os._exit", []), 1: ("ok", [])})
        # Under spawn the guard holds the pipe that multiprocessing reaps by: an exit must
        # not wait on it (that was 5 s).
        assert time.monotonic() - start < 2
        assert replies[0].detail == "environment process exited with status 7 during step"
        assert replies[1].failure is None
    _wait_until_gone(pids)


def test_close_leaves_no_process_behind():
    pool = EnvPool("agent_envs:StartsChild", step_timeout_s=10)
    opened = pool.reset({k: {} for k in range(3)})
    pids = [int(p) for r in opened.values() for p in r.messages[0]["content"].split()]
    # Each group is led by the env's guard, with the env (the reset's pid) and its child in it.
    groups = [os.getpgid(int(r.messages[0]["content"].split()[0])) for r in opened.values()]
    members = [pid for g in groups for pid in _group(g)]
    assert len(_running(pids)) == 6 and len(members) == 9  # and a guard each
    pool.finish(0)  # a free process too
    pool.close()
    pool.close()  # idempotent
    assert _running(groups) == []  # the env processes are joined
    # The rest of each group (guard, sleep) got its SIGKILL; on a loaded box it may take a
    # moment to be scheduled and die.
    _wait_until_gone(members)
    assert [_group(g) for g in groups] == [[], [], []]
    with pytest.raises(ValueError, match="closed"):
        pool.reset({9: {}})


def test_what_an_episode_started_ends_with_it_wherever_it_went():
    """An environment that starts processes in a session of their own and double-forked after
    setsid (out of reach of a process-group kill): finishing or releasing an episode ends them
    (its process serves the next one), and so does closing the pool."""
    pool = EnvPool("agent_envs:StartsEscaping", step_timeout_s=10)
    opened = pool.reset({k: {} for k in range(3)})
    started = {k: [int(p) for p in r.messages[0]["content"].split()] for k, r in opened.items()}
    assert len(_running([p for ps in started.values() for p in ps])) == 6
    pool.finish(0)
    pool.release([1])
    _wait_until_gone(started[0] + started[1])
    assert len(_running(started[2])) == 2
    pool.close()
    _wait_until_gone(started[2])


TRAINER = """
import json, sys, time
sys.path.insert(0, {tests!r})
from gspo_megatron.rollout.episodes.env_pool import EnvPool
pool = EnvPool({env!r}, step_timeout_s=10)
replies = pool.reset({{k: {{}} for k in range(2)}})
print(json.dumps([r.messages[0]["content"] for r in replies.values()]), flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("env", ["agent_envs:StartsChild", "agent_envs:StartsEscaping"])
def test_env_processes_die_with_a_sigkilled_trainer(env):
    """Nothing of a SIGKILLed trainer's environments stays: the env processes, what they
    started wherever it went, the guards, and so the fork server and resource tracker (which
    an escaped process holding their pipes would keep alive)."""
    trainer = subprocess.Popen(
        [sys.executable, "-c", TRAINER.format(tests=str(TESTS), env=env)],
        cwd=REPO,
        env=child_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = trainer.stdout.readline()
        envs = [int(p) for content in json.loads(line) for p in content.split()]
        # Everything it started: env processes, their guards and sleeps, the fork server.
        descendants = [p.pid for p in psutil.Process(trainer.pid).children(recursive=True)]
        assert set(envs) <= set(descendants)
    finally:
        trainer.kill()
        trainer.wait()
    _wait_until_gone(descendants)


def test_a_preload_from_another_file_is_not_used(tmp_path):
    """The fork server runs in the trainer's working directory, first on its sys.path, and
    may preload a module of the same name from there; episodes get the trainer's module."""
    env = "class Env:\n    def __init__(self, row): pass\n    def reset(self): return [{{'role': 'user', 'content': {!r}}}]\n    def step(self, text): return [], True, None\n"
    for where in ("cwd", "path"):
        (tmp_path / where).mkdir()
        (tmp_path / where / "shadowed_env.py").write_text(env.format(where))
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path / "path")!r})
        import shadowed_env  # as the pre-flight does
        from gspo_megatron.rollout.episodes.env_pool import EnvPool
        with EnvPool("shadowed_env:Env", 10) as pool:
            print(pool.reset({{0: {{}}}})[0].messages[0]["content"])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path / "cwd",
        env=dict(child_env(), PYTHONPATH=str(REPO)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "path"


@pytest.mark.parametrize(
    "path,message",
    [
        ("agent_envs", "agent.environment='agent_envs': not an import path 'package.module:Class'"),
        ("exact_match", "not an import path"),  # a built-in reward is no environment
        ("no_such_module_xyz:Env", "cannot import module 'no_such_module_xyz'"),
        ("agent_envs:missing", "module 'agent_envs' has no 'missing'"),
        ("agent_envs:NOT_CALLABLE", "'agent_envs:NOT_CALLABLE': not callable"),
        ("agent_envs:not_a_class", "'agent_envs:not_a_class': not a class (function)"),
        ("agent_envs:NoStep", "'agent_envs:NoStep': class has no callable 'step'"),
    ],
)
def test_check_environment_rejects_what_is_no_environment(path, message):
    with pytest.raises(GspoError) as err:
        check_environment(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_check_environment_accepts_a_class():
    check_environment("agent_envs:Scripted")
