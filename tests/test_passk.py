"""pass@k, maj@n and the evaluation summary against brute force."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from gspo_megatron.passk import k_values, majority_correct, pass_at_k, summarize


def _brute_pass_at_k(passed, k) -> float:
    """The fraction of all k-subsets of the samples that hold a passing one."""
    subsets = list(itertools.combinations(passed, k))
    return sum(any(s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_equals_enumeration(n):
    for c in range(n + 1):
        passed = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            # A float64 product of <= 20 ratios against an exact fraction: ~1e-15 of rounding.
            assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(passed, k), abs=1e-12)


def test_pass_at_k_stays_exact_where_binomials_overflow_floats():
    n, c, k = 2000, 3, 500
    want = 1 - math.comb(n - c, k) / math.comb(n, k)  # exact integers, one division
    # A product of 500 float64 ratios (~500 roundings of 1.1e-16): rel 1e-12 is 20x that bound.
    assert pass_at_k(n, c, k) == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 1, 5)


def test_majority_vote():
    assert majority_correct(["1", "2", "2", None], [True, False, False, False]) is False
    assert majority_correct(["2", "1", "2"], [False, False, True]) is True
    assert majority_correct(["1", "2"], [True, False]) is True  # a tie goes to the first seen
    assert majority_correct([None, None], [True, True]) is None


def test_summary_against_brute_force():
    rng = random.Random(0)
    rewards = [[rng.choice([0.0, 0.5, 1.0]) for _ in range(6)] for _ in range(20)]
    got = summarize(rewards, k_max=6, threshold=1.0)
    assert k_values(6) == [1, 2, 4, 6]
    for k in (1, 2, 4, 6):
        want = sum(_brute_pass_at_k([r >= 1.0 for r in row], k) for row in rewards) / 20
        assert got[f"pass@{k}"] == pytest.approx(want, abs=1e-12)
    # Float sums in another order (pytest.approx's default rel 1e-6).
    assert got["mean_reward"] == pytest.approx(sum(map(sum, rewards)) / 120)
    assert got["pass@1"] == pytest.approx(sum(r == 1.0 for row in rewards for r in row) / 120)
