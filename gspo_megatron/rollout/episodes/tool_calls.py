"""Tool calls in Qwen3's format, parsed from an assistant turn's text.

Qwen3 (and its chat template) writes each call as a JSON object between tags::

    <tool_call>
    {"name": "lookup", "arguments": {"key": "k17"}}
    </tool_call>

A turn may hold several. Everything that is not a well-formed call becomes an error entry
instead of being dropped: the environment answers it with an error observation (the model can
learn the format from it) and the trainer counts it (``agent/malformed_calls``). A call is well
formed when its JSON is an object with a non-empty string ``name`` and an ``arguments`` object
(a JSON string holding an object is accepted too: models trained on OpenAI-style traces write
that).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


@dataclass
class ToolCall:
    """One call as the model wrote it: a well-formed ``name`` and ``arguments``, or ``error``
    saying why it is not one (then ``raw`` holds what stood between the tags)."""

    name: str = ""
    arguments: Dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None
    raw: str = ""

    def as_dict(self) -> dict:
        """What environments receive (plain JSON-able data: it crosses a process boundary)."""
        if self.error is not None:
            return {"error": self.error, "raw": self.raw}
        return {"name": self.name, "arguments": self.arguments}


def parse_tool_calls(text: str, limit: Optional[int] = None) -> List[ToolCall]:
    """Every ``<tool_call>`` of ``text`` in order; calls beyond ``limit`` (agent.max_tool_calls_
    per_turn) become errors; an opening tag never closed is one error at the end."""
    calls = [_parse_one(m.group(1)) for m in _CALL.finditer(text)]
    rest = _CALL.sub("", text)
    if OPEN in rest:
        tail = rest[rest.index(OPEN) + len(OPEN) :]
        calls.append(ToolCall(error=f"{OPEN} is never closed by {CLOSE}", raw=tail.strip()))
    elif CLOSE in rest:
        calls.append(ToolCall(error=f"{CLOSE} without an opening {OPEN}"))
    if limit is not None:
        for k in range(limit, len(calls)):
            if calls[k].error is None:
                calls[k] = ToolCall(
                    error=f"more than {limit} tool calls in one turn (agent.max_tool_calls_per_turn)",
                    raw=json.dumps({"name": calls[k].name, "arguments": calls[k].arguments}),
                )
    return calls


MAX_DEPTH = 64
"""Nesting of a call's JSON at most (arrays and objects): deeper is malformed. json's decoder
recurses per level and raises RecursionError near the interpreter's limit, at a depth that
depends on the caller's stack; a fixed bound gives every rank the same verdict on the same
text (a policy under RL can degenerate into '[[[[...')."""


def _parse_one(body: str) -> ToolCall:
    raw = body.strip()
    if _depth(raw) > MAX_DEPTH:
        return ToolCall(error=f"the tool call nests deeper than {MAX_DEPTH} levels", raw=raw)
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as err:
        return ToolCall(error=f"the tool call is not valid JSON ({err})", raw=raw)
    if not isinstance(obj, dict):
        return ToolCall(error='the tool call must be a JSON object {"name", "arguments"}', raw=raw)
    name, args = obj.get("name"), obj.get("arguments", {})
    if not isinstance(name, str) or not name:
        return ToolCall(error='the tool call has no "name" string', raw=raw)
    if isinstance(args, str) and _depth(args) <= MAX_DEPTH:
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            pass
    if not isinstance(args, dict):
        return ToolCall(error=f'the "arguments" of {name} must be a JSON object', raw=raw)
    return ToolCall(name=name, arguments=args)


def _depth(text: str) -> int:
    """The deepest nesting of [ and { in ``text`` outside JSON strings."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest
