"""Where megatron-core's CPU path (gloo) spends time for nothing, and what stands in.

``gspo_megatron.distributed.cpu_compat`` makes megatron-core run on CPU at all; this module makes it not
slower than it must be. Each change leaves every number as it was (bit for bit) and names what
it saves, measured with ``tools/bench_step.py`` (docs/benchmarks.md):

- Collectives over a group of one rank. With the distributed optimizer and a data-parallel size
  of 1 (one process, or TP/PP/EP alone), megatron still reduce-scatters every gradient bucket
  into its own shard and all-gathers the parameters back from it. NCCL makes these near no-ops;
  gloo copies the whole buffer through fresh memory, twice: 0.37 s + 0.75 s per optimizer step
  for a 123M-parameter model on 2 cores, a third of the update. On one rank the shard *is* the
  buffer (same storage), so the result already sits where the collective would put it.
- Object collectives over a group of one rank. gloo pickles the object into a byte tensor and
  copies it on its own worker thread; a copy of over 32768 elements is a parallel ATen op, and
  the first one on that thread gives it a second OpenMP thread pool for the process's life.
  libgomp then manages more threads than there are CPUs (a process whose own threads fill the
  machine), spins ~100 times instead of ~300k before sleeping at a barrier, and every later op
  pays the wake-ups: one RL update at shape ``m`` ~1.3 s -> 1.45-1.7 s on 2 cores. megatron's
  checkpoint save calls ``all_gather_object`` and ``gather_object`` (on a world of one, too);
  on one rank these now hand back the object through a pickle round trip, as the exchange
  would, without gloo. (The project's own exchanges use ``exchange.all_gather_objects``.)
"""

from __future__ import annotations

import functools
import pickle

import torch
import torch.distributed as dist

_APPLIED = False


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.numel() == b.numel()


def _skip_on_one_rank(collective):
    """A megatron shard collective ``fn(output, input, group=..., async_op=...)`` that does
    nothing when the group has one rank and output and input are the same memory."""

    @functools.wraps(collective)
    def wrapper(output, input, *args, group=None, async_op=False, **kwargs):
        if dist.get_world_size(group) == 1 and _same_storage(output, input):
            return None  # megatron waits on the coalescing manager, not on this handle
        return collective(output, input, *args, group=group, async_op=async_op, **kwargs)

    return wrapper


def _copy(obj):
    """What an object collective hands back on one rank: the object through a pickle round
    trip (a copy, as the exchange makes)."""
    return pickle.loads(pickle.dumps(obj))


def _all_gather_object_local(collective):
    @functools.wraps(collective)
    def wrapper(object_list, obj, group=None):
        if dist.get_world_size(group) == 1:
            object_list[0] = _copy(obj)
            return None
        return collective(object_list, obj, group=group)

    return wrapper


def _gather_object_local(collective):
    @functools.wraps(collective)
    def wrapper(obj, object_gather_list=None, dst=None, group=None, group_dst=None):
        if dist.get_world_size(group) == 1:
            if not object_gather_list:  # torch's own check: the destination needs the list
                raise ValueError("Argument ``gather_list`` must be specified on destination rank.")
            object_gather_list[0] = _copy(obj)
            return None
        return collective(obj, object_gather_list, dst=dst, group=group, group_dst=group_dst)

    return wrapper


def apply() -> None:
    """Install the stand-ins above (idempotent). CPU only: on GPU the collectives are NCCL's."""
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return
    import megatron.core.distributed.param_and_grad_buffer as buffers

    buffers.dist_reduce_scatter_func = _skip_on_one_rank(buffers.dist_reduce_scatter_func)
    buffers.dist_all_gather_func = _skip_on_one_rank(buffers.dist_all_gather_func)
    dist.all_gather_object = _all_gather_object_local(dist.all_gather_object)
    dist.gather_object = _gather_object_local(dist.gather_object)
    _APPLIED = True
