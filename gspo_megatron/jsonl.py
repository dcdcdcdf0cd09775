"""Reading JSON-lines input files with errors that name the file and the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Tuple

from gspo_megatron.errors import GspoError


def iter_objects(
    path: Path, expected: str = "a JSON object per line"
) -> Iterator[Tuple[int, dict]]:
    """(1-based line number, object) for every non-blank line; a line that is not valid JSON or
    not an object is one GspoError naming ``path:line`` (``expected`` says what a line holds)."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise GspoError(
                    f"{path}:{n}: not UTF-8 text (byte {raw[err.start]:#04x} at column "
                    f"{err.start + 1}); JSON lines must be UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise GspoError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise GspoError(f"{path}:{n}: expected {expected}")
            yield n, obj
