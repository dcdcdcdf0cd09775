"""Evaluation metrics over n samples per prompt: pass@k, mean reward, majority vote.

pass@k is the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained
on Code"): with n samples of which c pass, the probability that k samples drawn without
replacement include at least one that passes, 1 - C(n-c, k) / C(n, k), averaged over prompts.
It is computed as a product (1 - k / m for m = n-c+1..n), which stays exact in floating point
where the binomials overflow.

maj@n: the answer most samples of a prompt give (``rewards.builtin.final_answer``: the last
\\boxed{...} or 'Answer:' line; ties to the answer seen first) counts as right when a sample
giving it passes. Reported over the prompts where some sample states an answer.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn from n, c of them passing, passes)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    miss = 1.0
    for m in range(n - c + 1, n + 1):
        miss *= 1.0 - k / m
    return 1.0 - miss


def k_values(k_max: int) -> List[int]:
    """1, 2, 4, ... up to k_max, and k_max itself."""
    ks, k = [], 1
    while k < k_max:
        ks.append(k)
        k *= 2
    return ks + [k_max]


def majority_correct(answers: Sequence[Optional[str]], passed: Sequence[bool]) -> Optional[bool]:
    """Whether the most common stated answer is one a passing sample gave; None if no sample
    states an answer."""
    stated = [a for a in answers if a is not None]
    if not stated:
        return None
    counts = Counter(stated)
    top = max(counts.values())
    voted = next(a for a in stated if counts[a] == top)
    return any(p for a, p in zip(answers, passed) if a == voted)


def summarize(
    rewards: Sequence[Sequence[float]],
    k_max: int,
    threshold: float,
    answers: Optional[Sequence[Sequence[Optional[str]]]] = None,
) -> Dict[str, float]:
    """Per prompt, its samples' rewards (all prompts the same count n >= k_max) -> mean reward,
    pass@k for k in ``k_values(k_max)`` and, given the samples' stated answers, maj@n."""
    if not rewards:
        return {"prompts": 0.0}
    n = len(rewards[0])
    out: Dict[str, float] = {
        "prompts": float(len(rewards)),
        "samples_per_prompt": float(n),
        "mean_reward": sum(map(sum, rewards)) / (n * len(rewards)),
    }
    passed = [[r >= threshold for r in row] for row in rewards]
    for k in k_values(k_max):
        out[f"pass@{k}"] = sum(pass_at_k(n, sum(p), k) for p in passed) / len(rewards)
    if answers is not None:
        votes = [majority_correct(a, p) for a, p in zip(answers, passed)]
        voted = [v for v in votes if v is not None]
        if voted:
            out[f"maj@{n}"] = sum(voted) / len(voted)
            out["answered_prompts"] = float(len(voted))
    return out
