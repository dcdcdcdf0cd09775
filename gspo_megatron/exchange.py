"""Python objects exchanged between ranks, and why a world of one exchanges nothing.

``torch.distributed.all_gather_object`` over gloo pickles the object into a byte tensor and
copies it on one of gloo's own worker threads. A copy of over 32768 elements is an ATen parallel
op, and the first one on a thread other than the main one starts a second OpenMP thread pool
for that thread, which lives as long as the process group. From then on libgomp manages more
threads than the process has CPUs whenever the trainer's own threads fill the machine (one
process of all the cores, as ``tools/bench_step.py`` runs it), and in that state libgomp stops
spinning between parallel regions: each of its threads sleeps on a futex at every barrier and
is woken for the next op. Measured on 2 cores (docs/benchmarks.md, 2026-12-06): ~5000
voluntary context switches per thread per RL update instead of none, and the same update,
ours or transformers' in the same process, 1.2-1.4 s before the first rollout's exchange and
1.45-1.7 s after it, for the rest of the run.

With one rank there is nothing to exchange: the object is returned as it is. (Other callers of
torch's object collectives, megatron's checkpoint save among them, are answered locally on a
one-rank group by ``cpu_perf``.)
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
