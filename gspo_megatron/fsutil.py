"""Write directories atomically: build under a temporary name, rename when complete.

A reader (a user, a resume, vLLM) must never see a half-written output that looks valid. The
temporary directory is a sibling of the target so the final rename stays on one filesystem.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from gspo_megatron.errors import GspoError

TMP_MARK = ".tmp-"


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an existing output directory unless overwrite is set (checked before heavy work)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise GspoError(f"{out}: output directory already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise GspoError(f"{out}: exists and is not a directory")
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK):
        raise GspoError(f"{parent}: directory is not writable")


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``out``, on failure it is removed."""
    out = Path(out)
    check_output_dir(out, overwrite)
    tmp = out.parent / f"{out.name}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f"{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file under a temporary name and rename it into place."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)
