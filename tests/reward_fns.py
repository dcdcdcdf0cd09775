"""User reward functions for tests/test_rewards.py (imported by path, in the reward worker)."""

import time


def length_bonus(prompt, response, answer):
    return min(len(response.split()) / 10.0, 1.0)


def raises(prompt, response, answer):
    raise RuntimeError("boom")


def hangs(prompt, response, answer):
    if "hang" in response:
        time.sleep(60)
    return 1.0
