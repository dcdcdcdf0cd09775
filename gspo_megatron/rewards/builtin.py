"""Built-in reward functions. Signature of every reward function, built-in or user-supplied:

    fn(prompt: str, response: str, answer: str | None) -> float   # in [0, 1] by convention

``answer`` is the row's reference answer (``data.answer_field``), None when not configured.
"""

from __future__ import annotations

import re
from typing import Optional

_BOXED = re.compile(r"\\boxed\{")
_ANSWER_LINE = re.compile(r"(?im)^\s*(?:final\s+)?answer\s*[:=]\s*(\S.*)$")


def final_answer(response: str) -> Optional[str]:
    """The last \\boxed{...} content, else the last 'Answer: ...' line, else None."""
    starts = [m.end() for m in _BOXED.finditer(response)]
    if starts:
        i, depth = starts[-1], 1
        for j in range(i, len(response)):
            depth += {"{": 1, "}": -1}.get(response[j], 0)
            if depth == 0:
                return response[i:j].strip()
        return None
    lines = _ANSWER_LINE.findall(response)
    return lines[-1].strip() if lines else None


def format_reward(prompt: str, response: str, answer: Optional[str]) -> float:
    """1 if the response states a final answer (\\boxed{...} or an 'Answer:' line), else 0."""
    return 1.0 if final_answer(response) else 0.0


def math_reward(prompt: str, response: str, answer: Optional[str]) -> float:
    """1 if the response's final answer equals the reference mathematically (math-verify:
    LaTeX/plain expressions, sets, intervals, numbers in any notation), else 0."""
    if answer is None:
        raise ValueError("math reward needs a reference answer (set data.answer_field)")
    from math_verify import parse, verify  # here: it brings sympy, which the trainer never needs

    stated = final_answer(response)
    if stated is None:
        return 0.0
    gold = parse(_as_math(answer))
    pred = parse(_as_math(stated))
    if not gold or not pred:
        return 0.0
    return 1.0 if verify(gold, pred) else 0.0


def _as_math(text: str) -> str:
    # math-verify extracts from LaTeX environments; a bare "42" or "x+1" is wrapped so that it
    # parses the same way as "\\boxed{42}".
    return text if "$" in text or "\\" in text else f"${text}$"


def exact_match_reward(prompt: str, response: str, answer: Optional[str]) -> float:
    """1 if the final answer (or the whole stripped response) equals the reference string."""
    if answer is None:
        raise ValueError("exact_match reward needs a reference answer (set data.answer_field)")
    stated = final_answer(response)
    got = stated if stated is not None else response.strip()
    return 1.0 if got == str(answer).strip() else 0.0


BUILTIN = {"math": math_reward, "format": format_reward, "exact_match": exact_match_reward}

NEEDS_ANSWER = ("math", "exact_match")
"""Built-ins that compare with the row's reference answer: without one every call would fail."""

WORKER_IMPORTS = {"math": ("math_verify",)}
"""What a built-in imports on its first call: not at start-up, so that the trainer process never
loads it (math-verify brings sympy); the reward worker imports it before it reports ready, so
that no call's timeout pays for it."""
