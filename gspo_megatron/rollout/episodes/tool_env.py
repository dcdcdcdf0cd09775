"""The built-in tool environment: the model calls Python functions, reads their results, answers.

Subclass ``ToolEnvironment`` and list the tools; each is a plain function (or a method, to reach
the episode's data row) with a JSON-schema description given by ``@tool``::

    class Lookup(ToolEnvironment):
        system_prompt = "Use the lookup tool, then answer with the value."

        def tools(self):
            return [self.lookup]

        @tool("The value stored under a key.", key={"type": "string"})
        def lookup(self, key):
            return self.row["table"].get(key, "no such key")

and name it in the config: ``agent.environment: mymodule:Lookup``. The opening is the system
prompt (with the tools rendered into it by the chat template, as Qwen3's does) and the row's
``prompt_field`` as the user turn. Each assistant turn's tool calls (parsed by the trainer,
``rollout.tool_calls``) are run in order and answered with one ``tool`` message each: the
result (text, or JSON for other values), or ``error: ...`` for a malformed call, an unknown tool,
bad arguments or an exception in the tool, so the model can learn from its mistakes. A turn
without tool calls is the final answer and ends the episode; the reward functions score it.
"""

from __future__ import annotations

import inspect
import json
from typing import Any, Callable, Dict, List, Optional, Sequence

from gspo_megatron.rewards.registry import describe

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}
# Annotations are strings in modules with `from __future__ import annotations`.
_JSON_TYPES.update({t.__name__: name for t, name in list(_JSON_TYPES.items())})


def tool(description: str, name: Optional[str] = None, **properties: Dict[str, Any]):
    """Mark a function as a tool: its JSON-schema description (``properties``: parameter name
    -> JSON schema; every parameter without a default is required)."""

    def mark(fn: Callable) -> Callable:
        fn.tool_schema = schema_of(fn, description, name, properties)
        return fn

    return mark


def schema_of(
    fn: Callable, description: str = "", name: Optional[str] = None, properties=None
) -> dict:
    """The OpenAI-style function schema chat templates render (Qwen3's among them); parameters
    not described in ``properties`` get their type from the annotation (string otherwise)."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.name != "self"]
    props = dict(properties or {})
    for p in params:
        if p.name not in props:
            props[p.name] = {"type": _JSON_TYPES.get(p.annotation, "string")}
    required = [p.name for p in params if p.default is inspect.Parameter.empty]
    return {
        "type": "function",
        "function": {
            "name": name or fn.__name__,
            "description": description or (inspect.getdoc(fn) or "").split("\n")[0],
            "parameters": {"type": "object", "properties": props, "required": required},
        },
    }


class ToolEnvironment:
    """Tools for the model to call; see the module docstring."""

    system_prompt: str = ""
    prompt_field: str = "prompt"
    render_tools: bool = True
    """Give the chat template the tools' schemas (rendered into the system turn); False leaves
    the opening to ``system_prompt`` (a model fine-tuned on the calls, a short context)."""

    def __init__(self, row: dict):
        self.row = row
        self._by_name = {}
        for fn in self.tools():
            spec = getattr(fn, "tool_schema", None) or schema_of(fn)
            self._by_name[spec["function"]["name"]] = (fn, spec)

    def tools(self) -> Sequence[Callable]:
        """The tools of this episode (functions or bound methods)."""
        return ()

    def tool_specs(self) -> List[dict]:
        """What the chat template renders into the system turn."""
        if not self.render_tools:
            return []
        return [spec for _, spec in self._by_name.values()]

    def reset(self) -> List[dict]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return messages + [{"role": "user", "content": str(self.row[self.prompt_field])}]

    def step(self, assistant_text: str, tool_calls: Sequence[dict]):
        if not tool_calls:
            return [], True, None
        return [{"role": "tool", "content": self.run(c)} for c in tool_calls], False, None

    def run(self, call: dict) -> str:
        """One call's observation."""
        if "error" in call:
            return f"error: {call['error']}"
        name = call["name"]
        if name not in self._by_name:
            return f"error: no tool named {name!r} (tools: {', '.join(self._by_name)})"
        fn, _ = self._by_name[name]
        try:
            inspect.signature(fn).bind(**call["arguments"])
        except TypeError as err:
            return f"error: bad arguments for {name}: {err}"
        try:
            result = fn(**call["arguments"])
        except Exception as err:  # the tool's own failure is the model's observation
            return f"error: {name} failed: {describe(err)}"
        return result if isinstance(result, str) else json.dumps(result)
