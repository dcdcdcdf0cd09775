"""Typed dataclass configs from YAML plus dotted command-line overrides.

``load(Config, "run.yaml", ["rollout.group_size=16", "optim.lr=1e-6"])`` reads the file, applies
the overrides (each value parsed as YAML, so ``16`` is an int, ``[1, 2]`` a list, ``null`` None),
and builds the nested dataclasses, checking every key and every value's type against the field's
annotation. Any problem is one ``GspoError`` line that names the dotted key and what is allowed;
nothing heavy has run by then. Each section's own ``validate()`` then checks value ranges.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar

import yaml

from gspo_megatron.errors import GspoError

T = TypeVar("T")


def parse_override(text: str) -> tuple:
    """'section.key=value' -> (['section', 'key'], parsed value)."""
    if "=" not in text:
        raise GspoError(f"override '{text}': expected section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise GspoError(f"override '{text}': expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def read_yaml(path: Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise GspoError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise GspoError(f"{path}{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise GspoError(f"{path}: expected a mapping of sections at the top level")
    return data


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise GspoError(f"override '{text}': '{p}' is not a section")
            node = child
        node[parts[-1]] = value
    return data


def build(cls: Type[T], data: Any, where: str = "") -> T:
    """Nested dict -> dataclass ``cls``, every key and type checked."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise GspoError(f"config {where or 'top level'}: expected a mapping, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise GspoError(f"unknown config key '{key}' (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _convert(hints[name], value, key)
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field left out
        raise GspoError(f"config {where or 'top level'}: {err}") from None


def _convert(tp, value, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, key)
        raise GspoError(f"config {key}: unsupported annotation {tp}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if origin in (list, tuple, List, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise GspoError(f"config {key}={_show(value)}: expected a list")
        item = args[0] if args else Any
        items = [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise GspoError(f"config {key}={_show(value)}: expected a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise GspoError(f"config {key}={_show(value)}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise GspoError(f"config {key}={_show(value)}: expected an integer")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise GspoError(f"config {key}={_show(value)}: expected a number")
        # Every float knob is a finite quantity (rates, clips, weights, timeouts): .nan, .inf
        # or '1e999' would pass range checks written as comparisons and poison the run later.
        if not math.isfinite(number):
            raise GspoError(f"config {key}={_show(value)}: expected a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise GspoError(f"config {key}={_show(value)}: expected a string")
    raise GspoError(f"config {key}: unsupported annotation {tp}")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def load(cls: Type[T], path: Optional[Path], overrides: Sequence[str] = ()) -> T:
    data = read_yaml(path) if path is not None else {}
    return build(cls, apply_overrides(data, overrides))


def to_dict(cfg) -> Dict[str, Any]:
    """The resolved config as plain data (written next to checkpoints and TensorBoard logs)."""

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))
