"""Rewards: math-verify answers, the format check, user functions by import path, weights,
and a function that raises or hangs scoring 0 without stopping the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import interruptible

from gspo_megatron.errors import GspoError
from gspo_megatron.rewards.builtin import final_answer, format_reward, math_reward
from gspo_megatron.rewards.runner import RewardConfig, RewardFn, RewardRunner

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize(
    "response,answer,expected",
    [
        (r"so the result is \boxed{\frac{1}{2}}", "0.5", 1.0),
        (r"\boxed{2x+2}", "2(x+1)", 1.0),
        ("Answer: 42", "42", 1.0),
        (r"\boxed{41}", "42", 0.0),
        ("I think it is 42", "42", 0.0),  # no stated final answer
    ],
)
def test_math_reward_checks_answers_mathematically(response, answer, expected):
    assert math_reward("q", response, answer) == expected


def test_final_answer_and_format():
    assert final_answer(r"a \boxed{1} then \boxed{\frac{3}{4}}") == r"\frac{3}{4}"
    assert final_answer("work\nFinal answer: 7\n") == "7"
    assert final_answer("no answer here") is None
    assert format_reward("q", r"\boxed{3}", None) == 1.0
    assert format_reward("q", "3", None) == 0.0


def test_runner_weights_errors_and_timeouts():
    cfg = RewardConfig(
        functions=[
            RewardFn("exact_match", 1.0),
            RewardFn("reward_fns:length_bonus", 0.5),
            RewardFn("reward_fns:raises", 1.0),
            RewardFn("reward_fns:hangs", 0.25),
        ],
        timeout_s=1.0,
    )
    runner = RewardRunner(cfg)
    try:
        items = [
            ("p", "Answer: 4", "4"),
            ("p", "please hang here now", "4"),
            ("p", "Answer: 5", "4"),
        ]
        t0 = time.perf_counter()
        totals, stats = runner.score(items)
        took = time.perf_counter() - t0
    finally:
        runner.close()
    # exact + 0.5 * length/10 + 0 (raises) + 0.25 * hangs (1 unless it hung); float sums of the
    # weighted terms, hence approx (rel 1e-6)
    assert totals[0] == pytest.approx(1.0 + 0.5 * 0.2 + 0.25)
    assert totals[1] == pytest.approx(0.0 + 0.5 * 0.4 + 0.0)  # hung: scored 0, run went on
    assert totals[2] == pytest.approx(0.0 + 0.5 * 0.2 + 0.25)
    assert stats["reward/errors"] == 3 and stats["reward/timeouts"] == 1
    assert stats["reward/exact_match"] == pytest.approx(1 / 3)
    assert "RuntimeError: boom" in runner.last_errors[0]
    assert took < 30  # the hang was cut at the timeout, not waited out


@pytest.mark.parametrize(
    "name,message",
    [
        ("nope", "rewards.functions[0].name='nope': not a built-in"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("reward_fns:missing", "module 'reward_fns' has no 'missing'"),
    ],
)
def test_bad_reward_names_fail_before_any_work(name, message):
    with pytest.raises(
        GspoError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
    ):
        RewardConfig(functions=[RewardFn(name)]).validate()


@pytest.mark.parametrize(
    "cfg,message",
    [
        (
            RewardConfig(functions=[RewardFn("format", float("nan"))]),
            "rewards.functions[0].weight=nan: must be a finite number",
        ),
        (RewardConfig(timeout_s=float("inf")), "rewards.timeout_s=inf must be a finite number"),
    ],
)
def test_weights_and_timeout_must_be_finite(cfg, message):
    # The YAML loader rejects these already; a config built in code must not get past either.
    with pytest.raises(GspoError) as err:
        cfg.validate()
    assert str(err.value) == message


# -- a faulty reward function costs one call, never the run ----------------------------------


def _runner(*names: str, timeout_s: float = 30.0) -> RewardRunner:
    return RewardRunner(RewardConfig(functions=[RewardFn(n) for n in names], timeout_s=timeout_s))


_MUST = "a reward must be a finite number"


def test_only_finite_real_numbers_become_rewards():
    good = [
        ("1", 1.0),
        ("0.25", 0.25),
        ("True", 1.0),
        ("False", 0.0),
        ("Fraction(1, 4)", 0.25),
        ("np.float32(0.5)", 0.5),
        ("np.int64(1)", 1.0),
        ("np.bool_(True)", 1.0),
        ("np.array(0.75)", 0.75),
        ("torch.tensor(0.5)", 0.5),
        ("torch.tensor(True)", 1.0),
    ]
    bad = [
        ("float('nan')", "nan (float)"),
        ("float('inf')", "inf (float)"),
        ("-float('inf')", "-inf (float)"),
        ("'nan'", "'nan' (str)"),
        ("'0.5'", "'0.5' (str)"),
        ("None", "None (NoneType)"),
        ("[1.0]", "[1.0] (list)"),
        ("1 + 0j", "(1+0j) (complex)"),
        ("10 ** 400", "(int)"),
        ("Decimal('0.5')", "Decimal('0.5') (Decimal)"),
        ("np.float64('nan')", "(float64)"),
        ("np.array([0.5])", "(ndarray)"),
        ("torch.tensor(float('nan'))", "tensor(nan) (Tensor)"),
        ("torch.tensor([0.5])", "tensor([0.5000]) (Tensor)"),
    ]
    # One worker for all cases: spawns cost seconds. The first torch case imports torch inside
    # the call; the timeout only bounds a hang here, and a clean-clone CI run once saw that
    # import outlast 30 s while the disk stalled.
    runner = _runner("reward_fns:returns", timeout_s=180.0)
    try:
        for expr, value in good:
            totals, stats = runner.score([("p", expr, None)])
            assert (totals, stats["reward/errors"], runner.last_errors) == ([value], 0, []), expr
        for expr, shown in bad:
            totals, stats = runner.score([("p", expr, None)])
            assert totals == [0.0] and stats["reward/errors"] == 1, expr
            assert runner.last_errors[0].startswith("reward_fns:returns: returned "), expr
            assert runner.last_errors[0].endswith(f"{shown}; {_MUST}"), runner.last_errors[0]
        totals, stats = runner.score(
            [
                ("p", "float('nan')", None),
                ("p", "1", None),
                ("p", "'0.5'", None),
                ("p", "True", None),
            ]
        )
    finally:
        runner.close()
    assert totals == [0.0, 1.0, 0.0, 1.0]
    assert stats["reward/returns"] == 0.5 and stats["reward/errors"] == 2
    assert runner.last_errors == [
        f"reward_fns:returns: returned nan (float); {_MUST}",
        f"reward_fns:returns: returned '0.5' (str); {_MUST}",
    ]


def test_exits_interrupts_and_killed_workers_are_errors_and_the_run_goes_on():
    # misbehaves is the last call of each item: a death at the end of a score() too.
    runner = _runner("reward_fns:length_bonus", "reward_fns:misbehaves", timeout_s=10.0)
    faults = ["sys.exit", "KeyboardInterrupt", "BaseException", "os._exit", "SIGKILL"]
    try:
        first = runner.score([("p", r, None) for r in ["ok"] + faults[:4] + ["ok"] + faults[4:]])
        second = runner.score([("p", "ok", None), ("p", "os._exit", None), ("p", "ok", None)])
    finally:
        runner.close()
    # length_bonus of a one-word response is 0.1; misbehaves gives 1 when it behaves.
    assert first[0] == pytest.approx([1.1, 0.1, 0.1, 0.1, 0.1, 1.1, 0.1])  # float sums
    assert (first[1]["reward/errors"], first[1]["reward/timeouts"]) == (5, 0)
    assert first[1]["reward/length_bonus"] == pytest.approx(0.1)
    assert second[0] == pytest.approx([1.1, 0.1, 1.1])
    assert (second[1]["reward/errors"], second[1]["reward/timeouts"]) == (1, 0)
    assert runner.last_errors == ["reward_fns:misbehaves: worker exited with status 3"]


def test_exit_messages_name_the_function_and_what_happened():
    runner = _runner("reward_fns:misbehaves", timeout_s=10.0)
    faults = ["sys.exit", "KeyboardInterrupt", "BaseException", "os._exit", "SIGKILL"]
    try:
        totals, stats = runner.score([("p", r, None) for r in faults])
    finally:
        runner.close()
    assert totals == [0.0] * 5 and stats["reward/errors"] == 5
    assert runner.last_errors == [
        "reward_fns:misbehaves: raised SystemExit: 3",
        "reward_fns:misbehaves: raised KeyboardInterrupt",
        "reward_fns:misbehaves: raised CustomStop: stop everything",
        "reward_fns:misbehaves: worker exited with status 3",
        "reward_fns:misbehaves: worker killed by signal 9 (SIGKILL)",
    ]


_SLOW_START = """
import multiprocessing, time
from reward_fns import hangs
if multiprocessing.parent_process() is not None:  # in the reward worker only
    time.sleep(0.8)  # as a heavy import (sympy, a tokenizer) does; longer than timeout_s
"""


def test_one_hang_costs_one_timeout_and_restarts_do_not_eat_call_time(tmp_path, monkeypatch):
    (tmp_path / "slow_start_rewards.py").write_text(_SLOW_START)
    monkeypatch.syspath_prepend(str(tmp_path))
    timeout_s = 0.5
    runner = _runner("slow_start_rewards:hangs", timeout_s=timeout_s)
    items = [("p", "hang", None)] + [("p", "ok", None)] * 15
    try:
        # The first score() starts on a fresh worker; the second on the one started after the
        # first hang. Each hang must cost one timeout, and the calls after it nothing.
        for _ in range(2):
            t0 = time.perf_counter()
            totals, stats = runner.score(items)
            took = time.perf_counter() - t0
            # The worker's start-up (0.8 s) outlasts timeout_s: if a restart ate the next
            # call's time, that call would time out and restart it again, and every call
            # after the hang would count as a timeout. Counted, not timed: the wall time is
            # one timeout plus start-ups, which a loaded machine stretches (2 s idle, 8.4 s
            # seen beside the rest of the suite, still with one timeout counted).
            assert (totals, stats["reward/timeouts"], stats["reward/errors"]) == (
                [0.0] + [1.0] * 15,
                1,
                0,
            ), f"{stats} in {took:.1f} s"
    finally:
        runner.close()
    assert runner.last_errors == [
        "slow_start_rewards:hangs: no result within timeout_s=0.5 s; worker killed"
    ]


@pytest.mark.parametrize(
    "module,source,message",
    [
        (
            "m_syntax",
            "import os\n\ndef f(p, r, a) return 1\n",
            "SyntaxError: expected ':' (m_syntax.py, line 3)",
        ),
        ("m_name", "x = undefined_name\n", "NameError: name 'undefined_name' is not defined"),
        ("m_zero", "x = 1 / 0\n", "ZeroDivisionError: division by zero"),
        ("m_runtime", "raise RuntimeError('no GPU\\nhere')\n", "RuntimeError: no GPU here"),
        ("m_exit", "import sys\nsys.exit(2)\n", "SystemExit: 2"),
        (
            "m_dep",
            "import no_such_dependency_xyz\n",
            "ModuleNotFoundError: No module named 'no_such_dependency_xyz'",
        ),
    ],
)
def test_a_module_that_fails_at_import_is_one_line_naming_it(
    tmp_path, monkeypatch, module, source, message
):
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(GspoError) as err:
        RewardConfig(functions=[RewardFn(f"{module}:f")]).validate()
    assert str(err.value) == (
        f"rewards.functions[0].name='{module}:f': importing module '{module}' failed: {message}"
    )


_PARENT_ONLY = """
import multiprocessing, time
if multiprocessing.parent_process() is not None:  # imports in the trainer, fails in the worker
    {}
def f(prompt, response, answer):
    return 1.0
"""


def test_a_worker_that_cannot_start_scores_errors_and_is_retried(tmp_path, monkeypatch):
    from gspo_megatron.rewards import worker as worker_mod

    (tmp_path / "fails_in_worker.py").write_text(
        _PARENT_ONLY.format("raise RuntimeError('no data dir')")
    )
    (tmp_path / "hangs_in_worker.py").write_text(_PARENT_ONLY.format("time.sleep(60)"))
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = _runner("fails_in_worker:f", "reward_fns:length_bonus")
    try:
        for _ in range(2):  # the next score() tries a new worker, and fails the same way
            totals, stats = runner.score([("p", "a b", None), ("p", "c", None)])
            assert totals == [0.0, 0.0] and stats["reward/errors"] == 4
            assert runner.last_errors[0] == (
                "fails_in_worker:f: reward worker failed to start: rewards.functions[0].name="
                "'fails_in_worker:f': importing module 'fails_in_worker' failed: RuntimeError: no data dir"
            )
    finally:
        runner.close()
    monkeypatch.setattr(worker_mod, "STARTUP_TIMEOUT_S", 1.0)
    runner = _runner("hangs_in_worker:f")
    try:
        t0 = time.perf_counter()
        totals, stats = runner.score([("p", "a", None)] * 3)
        assert time.perf_counter() - t0 < 10  # one start-up budget, not one per call
    finally:
        runner.close()
    assert totals == [0.0] * 3 and (stats["reward/errors"], stats["reward/timeouts"]) == (3, 0)
    assert runner.last_errors[0] == "hangs_in_worker:f: reward worker not ready after 1 s"


def test_no_process_to_be_had_scores_errors_not_a_crash(monkeypatch):
    from multiprocessing.context import SpawnProcess

    def cannot_fork(self):
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(SpawnProcess, "start", cannot_fork)
    runner = _runner("reward_fns:length_bonus")
    try:
        totals, stats = runner.score([("p", "a", None)] * 2)
        assert totals == [0.0, 0.0] and stats["reward/errors"] == 2
        assert runner.last_errors[0] == (
            "reward_fns:length_bonus: reward worker could not be spawned: "
            "BlockingIOError: [Errno 11] Resource temporarily unavailable"
        )
        monkeypatch.undo()
        assert runner.score([("p", "a", None)])[0] == [0.1]  # the next score() tries again
    finally:
        runner.close()


_TRAINER = """
import sys
from gspo_megatron.rewards.runner import RewardConfig, RewardFn, RewardRunner
runner = RewardRunner(RewardConfig(functions=[RewardFn("reward_fns:" + sys.argv[2])], timeout_s=60))
runner.score([(sys.argv[1], "r", None)])
"""


def _start_trainer(tmp_path, function: str):
    """A process that scores one item with `function` (which writes the worker's pid to a file,
    then hangs); returned once the worker is in the call, with the worker's psutil.Process."""
    import psutil

    pid_file = tmp_path / "worker.pid"
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    trainer = subprocess.Popen(
        [sys.executable, "-c", _TRAINER, str(pid_file), function],
        env=env,
        stderr=subprocess.DEVNULL,
        preexec_fn=interruptible,  # a test sends it SIGINT
    )
    # A bound on a hang, not a measurement: a clean-clone CI run once needed more than 60 s
    # (the disk stalled while both test workers started processes).
    deadline = time.monotonic() + 240
    while not pid_file.exists() or not pid_file.read_text():
        if trainer.poll() is not None or time.monotonic() > deadline:
            trainer.kill()
            raise AssertionError("the reward worker never started")
        time.sleep(0.05)
    return trainer, psutil.Process(int(pid_file.read_text()))


def _gone_within(proc, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _running(proc) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _running(proc)


def _running(proc) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE  # a zombie is dead, waiting to be reaped
    except psutil.NoSuchProcess:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_the_worker_dies_with_a_killed_trainer(tmp_path):
    trainer, worker = _start_trainer(tmp_path, "hangs_after_writing_pid")
    try:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        assert _gone_within(worker, 5), "the reward worker outlived its killed trainer"
    finally:
        trainer.kill()
        if _running(worker):
            worker.kill()


@pytest.mark.skipif(os.name != "posix", reason="signals")
def test_ctrl_c_ends_the_trainer_even_if_the_function_ignores_sigterm(tmp_path):
    # At exit multiprocessing SIGTERMs a daemon worker and then waits for it without a limit.
    trainer, worker = _start_trainer(tmp_path, "ignores_sigterm_and_hangs")
    try:
        trainer.send_signal(signal.SIGINT)
        try:
            trainer.wait(timeout=10)
        except subprocess.TimeoutExpired:
            raise AssertionError("the trainer is still waiting for its reward worker") from None
        assert _gone_within(worker, 5)
    finally:
        trainer.kill()
        if _running(worker):
            worker.kill()


_MAIN = """
import os, sys
with open(sys.argv[1] if __name__ == "__main__" else os.environ["MARKS"], "a") as f:
    f.write(__name__ + "\\n")  # one line per import of this module, in any process

def shout(prompt, response, answer):
    return 0.5

if __name__ == "__main__":
    from gspo_megatron.rewards.runner import RewardConfig, RewardFn, RewardRunner
    runner = RewardRunner(RewardConfig(functions=[RewardFn(sys.argv[2])], timeout_s=60))
    print(runner.score([("p", "r", None)])[0][0])
    runner.close()
"""


@pytest.mark.parametrize(
    "function, imports, score",
    [
        # A reward elsewhere: the worker does not re-import the trainer's main module.
        ("reward_fns:length_bonus", ["__main__"], "0.1"),
        # A reward defined in __main__ still works: the worker imports it, as multiprocessing does.
        ("__main__:shout", ["__main__", "__mp_main__"], "0.5"),
    ],
)
def test_the_worker_imports_the_trainers_main_module_only_for_a_reward_in_it(
    tmp_path, function, imports, score
):
    (tmp_path / "trainer_main.py").write_text(_MAIN)
    marks = tmp_path / "marks.txt"
    path = os.pathsep.join([str(tmp_path), str(TESTS), os.environ.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-m", "trainer_main", str(marks), function],
        env=dict(os.environ, PYTHONPATH=path, MARKS=str(marks)),
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == [score]
    assert marks.read_text().split() == imports


def _pids(path: Path) -> list:
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_a_call_over_the_memory_limit_fails_alone():
    """rewards.memory_gib=0.5: a function that allocates 3 GiB scores 0 with a line saying so;
    the worker stays and scores the next call."""
    cfg = RewardConfig(
        functions=[RewardFn("reward_fns:hogs_memory"), RewardFn("exact_match")], memory_gib=0.5
    )
    runner = RewardRunner(cfg)
    try:
        totals, stats = runner.score([("p", "a", "a")])
    finally:
        runner.close()
    assert totals == [1.0] and stats["reward/errors"] == 1
    assert runner.last_errors == [
        "reward_fns:hogs_memory: ran out of memory (rewards.memory_gib=0.5 GiB beyond what the "
        "worker held at start)"
    ]


@pytest.mark.parametrize("function", ["starts_processes", "starts_escaping_processes"])
def test_processes_a_function_starts_end_with_its_call(tmp_path, function):
    """A reward function that leaves processes behind (a sandbox, a tool): they end with the
    call that started them, never reparented to init to outlive it, even in a session of their
    own (out of reach of a process-group kill) or after a double fork and setsid; what the
    module started at import lives on with the worker."""
    import psutil

    pid_file = tmp_path / "children"
    cfg = RewardConfig(functions=[RewardFn(f"reward_fns:{function}")], timeout_s=30)
    runner = RewardRunner(cfg)
    try:
        totals, stats = runner.score([(str(pid_file), "r", None)] * 3)
        assert totals == [1.0] * 3 and stats["reward/errors"] == 0
        pids = _pids(pid_file)
        assert len(pids) == 6
        for pid in pids:  # (a pid already gone has no psutil.Process)
            try:
                assert _gone_within(psutil.Process(pid), 5), "a reward's child outlived its call"
            except psutil.NoSuchProcess:
                pass
        assert runner.score([(str(pid_file), "r", None)])[0] == [1.0]  # the worker goes on
    finally:
        runner.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pidfd / process groups")
def test_processes_a_function_starts_die_with_a_killed_trainer(tmp_path):
    """SIGKILL of the trainer (nothing of it runs) while a function that started processes
    hangs: the worker and the processes it started are gone within seconds."""
    import psutil

    trainer, worker = _start_trainer(tmp_path, "starts_processes_then_hangs")
    children = [psutil.Process(p) for p in _pids(tmp_path / "worker.pid.children")]
    try:
        assert len(children) == 2 and all(_running(c) for c in children)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        assert _gone_within(worker, 5), "the reward worker outlived its killed trainer"
        assert all(_gone_within(c, 5) for c in children), "a reward's child outlived the trainer"
    finally:
        trainer.kill()
        for p in [worker] + children:
            if _running(p):
                p.kill()


def test_printed_output_is_shown_capped(capfd):
    """A function printing 100 KB per call (print, stderr, a C-level write): the trainer's
    stderr shows its lines prefixed with the function's name, at most OUTPUT_BUDGET bytes of
    them in all and then one line saying the rest is not shown; the rewards are unaffected."""
    from gspo_megatron.guarded import OUTPUT_PER_CALL
    from gspo_megatron.rewards.runner import OUTPUT_BUDGET

    cfg = RewardConfig(functions=[RewardFn("reward_fns:prints_a_lot")], timeout_s=30)
    runner = RewardRunner(cfg)
    try:
        totals, _ = runner.score([("p", "r", None)] * 20)  # 2 MB printed
    finally:
        runner.close()
    assert totals == [0.25] * 20
    out, err = capfd.readouterr()
    assert out == ""  # nothing of the worker's reaches the trainer's stdout
    assert len(err) <= OUTPUT_BUDGET + 2000, len(err)  # + the prefixes and notes
    lines = err.splitlines()
    assert all(line.startswith("[reward prints_a_lot] ") for line in lines)
    # Each call sends its first OUTPUT_PER_CALL bytes and says how much more it printed.
    assert lines[0] == "[reward prints_a_lot] " + "x" * OUTPUT_PER_CALL
    assert (
        lines[1] == f"[reward prints_a_lot] ... ({100_003 - OUTPUT_PER_CALL} more bytes of "
        "this call's output not shown)"
    )
    assert "the rest of their output is not shown" in lines[-1]


def test_a_reward_with_an_episode_parameter_receives_the_episode():
    """Multi-turn episodes reach the functions that ask for them (``episode=``); the others are
    called as always, and single responses give such a function episode=None."""
    cfg = RewardConfig(
        functions=[RewardFn("reward_fns:tool_use", 1.0), RewardFn("exact_match", 1.0)]
    )
    runner = RewardRunner(cfg)
    try:
        episode = {"messages": [{"role": "user", "content": "q"}] * 3, "tool_calls": 2}
        totals, stats = runner.score([("q", "a", "a", episode), ("q", "a", "a")])
    finally:
        runner.close()
    assert stats["reward/errors"] == 0
    assert totals == pytest.approx([2.3 + 1.0, -1.0 + 1.0])
