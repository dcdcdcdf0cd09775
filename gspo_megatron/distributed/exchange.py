"""Python objects exchanged between ranks: every rank's object, in rank order, on every rank.

One rank (or no process group) exchanges nothing: the object is returned as it is, with no
pickle round trip and no gloo collective. On CPU the gloo path must be avoided there, not only
saved: its copy of the pickle on gloo's own thread throttles OpenMP for the rest of the run
(``cpu_perf``, which also answers torch's own object collectives on a one-rank group, has the
mechanism and the figures).
"""

from __future__ import annotations

from typing import Any, List

import torch.distributed as dist


def all_gather_objects(obj: Any, group=None) -> List[Any]:
    """Every rank's ``obj`` in rank order, on every rank (collective). One rank, or no
    process group: ``[obj]``, the object itself, without torch.distributed."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [obj]
    out: List[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out
