"""Progress bars for long work: shown on rank 0 only, silent when disabled or under CI logs."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

from tqdm import tqdm


@contextlib.contextmanager
def progress_bar(total: int, desc: str, unit: str = "it", enabled: bool = True) -> Iterator[tqdm]:
    rank = int(os.environ.get("RANK", "0"))
    bar = tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        file=sys.stderr,
        disable=not enabled or rank != 0,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    try:
        yield bar
    finally:
        bar.close()
