"""The config reference, generated from the config dataclasses themselves.

    python -m gspo_megatron.config.doc            # print the Markdown reference
    python -m gspo_megatron.config.doc --update README.md

Each field's description is the docstring written under it in the source, so the reference in
the README cannot drift from the code (a test compares them).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from pathlib import Path
from typing import Dict, List

from gspo_megatron.config import Config

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"


def field_docs(cls) -> Dict[str, str]:
    """{field: the string literal that follows its annotated assignment in the class body}."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:] + [None]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(getattr(nxt, "value", None), ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_name(args[0])} or null"
    if origin in (list, List):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is tuple:
        return "list of int"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return ""
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
        value = [dataclasses.asdict(v) for v in value]
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def reference() -> str:
    hints_top = typing.get_type_hints(Config)
    lines: List[str] = []
    for section in dataclasses.fields(Config):
        cls = hints_top[section.name]
        doc = inspect.getdoc(cls) or ""
        lines += [
            f"**`{section.name}`**: {doc.splitlines()[0] if doc else ''}",
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            meaning = docs.get(f.name, "")
            if typing.get_origin(tp) in (list, List) and dataclasses.is_dataclass(
                typing.get_args(tp)[0]
            ):
                item = typing.get_args(tp)[0]
                sub = field_docs(item)
                parts = "; ".join(
                    f"`{k.name}`: {sub.get(k.name, '')}".rstrip(": ")
                    for k in dataclasses.fields(item)
                )
                meaning = f"{meaning} Each item: {parts}"
                tp_name = "list of {" + ", ".join(k.name for k in dataclasses.fields(item)) + "}"
            else:
                tp_name = _type_name(tp)
            meaning = meaning.replace("|", "\\|")
            lines.append(f"| `{section.name}.{f.name}` | {tp_name} | `{_default(f)}` | {meaning} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def update(path: Path) -> bool:
    """Rewrite the block between the markers in ``path``; returns whether it changed."""
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path}: no {START} ... {END} block to update")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{reference()}{END}{tail}"
    if new != text:
        path.write_text(new)
    return new != text


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--update", type=Path, help="rewrite the reference block in this Markdown file")
    args = ap.parse_args(argv)
    if args.update:
        print(f"{args.update}: {'updated' if update(args.update) else 'already up to date'}")
    else:
        print(reference(), end="")


if __name__ == "__main__":
    main()
