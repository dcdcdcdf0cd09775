"""Rewards: math-verify answers, the format check, user functions by import path, weights,
and a function that raises or hangs scoring 0 without stopping the run."""

from __future__ import annotations

import time

import pytest

from gspo_megatron.errors import GspoError
from gspo_megatron.rewards.builtin import final_answer, format_reward, math_reward
from gspo_megatron.rewards.runner import RewardConfig, RewardFn, RewardRunner


@pytest.mark.parametrize("response,answer,expected", [
    (r"so the result is \boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{2x+2}", "2(x+1)", 1.0),
    ("Answer: 42", "42", 1.0),
    (r"\boxed{41}", "42", 0.0),
    ("I think it is 42", "42", 0.0),  # no stated final answer
])
def test_math_reward_checks_answers_mathematically(response, answer, expected):
    assert math_reward("q", response, answer) == expected


def test_final_answer_and_format():
    assert final_answer(r"a \boxed{1} then \boxed{\frac{3}{4}}") == r"\frac{3}{4}"
    assert final_answer("work\nFinal answer: 7\n") == "7"
    assert final_answer("no answer here") is None
    assert format_reward("q", r"\boxed{3}", None) == 1.0
    assert format_reward("q", "3", None) == 0.0


def test_runner_weights_errors_and_timeouts():
    cfg = RewardConfig(functions=[RewardFn("exact_match", 1.0), RewardFn("reward_fns:length_bonus", 0.5),
                                  RewardFn("reward_fns:raises", 1.0), RewardFn("reward_fns:hangs", 0.25)],
                       timeout_s=1.0)
    runner = RewardRunner(cfg)
    try:
        items = [("p", "Answer: 4", "4"), ("p", "please hang here now", "4"), ("p", "Answer: 5", "4")]
        t0 = time.perf_counter()
        totals, stats = runner.score(items)
        took = time.perf_counter() - t0
    finally:
        runner.close()
    # exact + 0.5 * length/10 + 0 (raises) + 0.25 * hangs (1 unless it hung)
    assert totals[0] == pytest.approx(1.0 + 0.5 * 0.2 + 0.25)
    assert totals[1] == pytest.approx(0.0 + 0.5 * 0.4 + 0.0)  # hung: scored 0, run went on
    assert totals[2] == pytest.approx(0.0 + 0.5 * 0.2 + 0.25)
    assert stats["reward/errors"] == 3 and stats["reward/timeouts"] == 1
    assert stats["reward/exact_match"] == pytest.approx(1 / 3)
    assert "RuntimeError: boom" in runner.last_errors[0]
    assert took < 30  # the hang was cut at the timeout, not waited out


@pytest.mark.parametrize("name,message", [
    ("nope", "rewards.functions[0].name='nope': not a built-in"),
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("reward_fns:missing", "module 'reward_fns' has no 'missing'"),
])
def test_bad_reward_names_fail_before_any_work(name, message):
    with pytest.raises(GspoError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        RewardConfig(functions=[RewardFn(name)]).validate()
