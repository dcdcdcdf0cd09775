"""Reward functions that misbehave on a fixed, response-determined subset of samples, for the
gspo-train fault tests (imported by path in the reward worker: PYTHONPATH includes tests/)."""

import math
import zlib

from gspo_megatron.tasks.demo import copy_reward

# What a careless reward function returns instead of a number.
_POISON = [float("nan"), math.inf, "nan", None, -math.inf]


def _poisoned(response: str) -> int:
    """-1 for a clean sample, else which poison: about one sample in three, by the text alone,
    so every run that sees the same response treats it the same way."""
    h = zlib.crc32(response.encode())
    return h % len(_POISON) if h % 3 == 0 else -1


def copy_or_nan(prompt, response, answer):
    k = _poisoned(response)
    return copy_reward(prompt, response, answer) if k < 0 else _POISON[k]


def copy_or_raise(prompt, response, answer):
    if _poisoned(response) >= 0:
        raise ValueError("no reward for this one")
    return copy_reward(prompt, response, answer)
