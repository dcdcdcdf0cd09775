"""Qwen3-format tool calls parsed from assistant text, and the built-in tool environment's
answers to them (plain Python, no processes)."""

from __future__ import annotations

import pytest

from gspo_megatron.rollout.episodes.tool_calls import parse_tool_calls
from gspo_megatron.rollout.episodes.tool_env import ToolEnvironment, schema_of, tool


def test_well_formed_calls_in_order():
    text = (
        'I will look.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
        '<tool_call>{"name": "neg", "arguments": "{\\"x\\": 3}"}</tool_call> done'
    )
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments, c.error) for c in calls] == [
        ("add", {"a": 1, "b": 2}, None),
        ("neg", {"x": 3}, None),  # arguments as a JSON string holding an object
    ]
    assert parse_tool_calls("no calls here") == []


def test_malformed_calls_are_errors_not_dropped():
    cases = {
        "<tool_call>{not json}</tool_call>": "not valid JSON",
        "<tool_call>[1, 2]</tool_call>": "must be a JSON object",
        '<tool_call>{"arguments": {}}</tool_call>': 'no "name" string',
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>': '"arguments" of f must be',
        '<tool_call>{"name": "f", "arguments": {}}': "is never closed",
        "x</tool_call>": "without an opening",
    }
    for text, why in cases.items():
        (call,) = parse_tool_calls(text)
        assert call.error is not None and why in call.error, (text, call.error)
        assert "error" in call.as_dict()


def test_calls_beyond_the_limit_become_errors():
    one = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    calls = parse_tool_calls(one * 3, limit=2)
    assert [c.error is None for c in calls] == [True, True, False]
    assert "more than 2 tool calls in one turn" in calls[2].error


class Calc(ToolEnvironment):
    system_prompt = "Use the tools."

    def tools(self):
        return [add, self.scale, broken]

    @tool("Multiply by the row's factor.", x={"type": "number"})
    def scale(self, x: float):
        return {"value": x * self.row["factor"]}


@tool("Add two integers.")
def add(a: int, b: int = 0) -> int:
    return a + b


def broken() -> str:
    """Always fails."""
    raise ValueError("nope")


def test_tool_environment_answers_every_call():
    env = Calc({"prompt": "go", "factor": 3})
    assert env.reset() == [
        {"role": "system", "content": "Use the tools."},
        {"role": "user", "content": "go"},
    ]
    specs = {s["function"]["name"]: s["function"] for s in env.tool_specs()}
    assert specs["add"]["parameters"] == {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a"],
    }
    assert specs["broken"]["description"] == "Always fails."
    assert specs["scale"]["parameters"]["properties"] == {"x": {"type": "number"}}
    calls = [
        {"name": "add", "arguments": {"a": 2, "b": 5}},
        {"name": "scale", "arguments": {"x": 2}},
        {"name": "add", "arguments": {"c": 1}},
        {"name": "nope", "arguments": {}},
        {"name": "broken", "arguments": {}},
        {"error": "the tool call is not valid JSON (x)", "raw": "{x"},
    ]
    messages, done, reward = env.step("...", calls)
    assert not done and reward is None
    assert [m["role"] for m in messages] == ["tool"] * 6
    contents = [m["content"] for m in messages]
    assert contents[:2] == ["7", '{"value": 6}']
    assert contents[2].startswith("error: bad arguments for add")
    assert contents[3] == "error: no tool named 'nope' (tools: add, scale, broken)"
    assert contents[4] == "error: broken failed: ValueError: nope"
    assert contents[5] == "error: the tool call is not valid JSON (x)"
    # A turn without calls is the answer.
    assert env.step("42", []) == ([], True, None)


def test_schema_from_annotations():
    def f(name: str, count: int, ratio: float, flag: bool, other=None):
        """First line.

        More."""

    s = schema_of(f)["function"]
    assert s["description"] == "First line."
    assert s["parameters"]["required"] == ["name", "count", "ratio", "flag"]
    assert [v["type"] for v in s["parameters"]["properties"].values()] == [
        "string",
        "integer",
        "number",
        "boolean",
        "string",
    ]


@pytest.mark.parametrize("depth,malformed", [(64, False), (65, True), (100_000, True)])
def test_nesting_is_bounded_the_same_everywhere(depth, malformed):
    """The verdict on a deep call is a fixed bound, not the interpreter's stack: a call nested
    64 deep parses (as JSON does), one level more is an error, never a RecursionError."""
    args = "[" * (depth - 2) + "]" * (depth - 2)  # inside the call's object and its arguments
    text = '<tool_call>{"name": "f", "arguments": {"a": ' + args + "}}</tool_call>"
    if depth > 1000:
        text = "<tool_call>" + "[" * depth + "</tool_call>"
    (call,) = parse_tool_calls(text)
    assert (call.error is not None) == malformed
    if malformed:
        assert call.error == "the tool call nests deeper than 64 levels"
    # Brackets inside JSON strings are text, not nesting.
    quoted = '<tool_call>{"name": "f", "arguments": {"s": "' + "[" * 500 + '"}}</tool_call>'
    assert parse_tool_calls(quoted)[0].error is None
