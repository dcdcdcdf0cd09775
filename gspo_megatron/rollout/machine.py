"""What one machine holds of a run's rollout side: its engines' KV caches, its live environment
processes, and the memory each environment or reward process may take.

Planned per machine, not per process: a launch runs ``LOCAL_WORLD_SIZE`` ranks on each node, and
a colocated engine per ``rollout.engine_tp`` of them (under ``placement: separate``, one per
``engine_tp`` of the rollout ranks, the last ones of the launch: at most ``LOCAL_WORLD_SIZE`` of
them on one node). The figures below take the node that holds the most, the same on every rank,
so that every rank derives the same plan.

Memory limits are ``RLIMIT_DATA`` (heap and private mappings: what a runaway ``list.append``
or a leaking tool grows), set in the environment or reward worker once its modules are imported,
at what it holds then plus the limit: a module that imports torch keeps working, and an
allocation past the limit fails there (Python's MemoryError, counted as that episode's or
call's failure with a line saying so) instead of waking the kernel's OOM killer. An rlimit binds
each process on its own: a sandbox the environment starts gets the same cap, and the caps do not
add up to a total. A cgroup would bound the whole tree, but creating one needs privileges that
a training job rarely has (cgroup v2 delegation, or root): the rlimit works everywhere.
"""

from __future__ import annotations

import os
import resource

import psutil

from gspo_megatron.errors import GspoError

ENV_FOOTPRINT = 16 << 20
"""Memory one live episode's processes take (the environment's worker and its guard, forked
from a server that preloaded the module): 5.6 MB measured for a plain class, 9.1 MB for the agent
demo's tool environment (PSS of 64 episodes, 2026-12-07, the 2-core VM); planned at 16 MiB."""

AUTO_ENVS_PER_CPU = 32
"""agent.max_parallel_envs=0 holds 32 live episodes per CPU (most of an episode's life is
waiting for the engine or for a tool), at most ``AUTO_ENVS_MAX`` per machine."""
AUTO_ENVS_MAX = 256

ENV_MEMORY_SHARE = 0.5
"""Of the machine's available memory at start, what its live episodes' processes may plan to
take: the rest is the trainer's and the engines'."""


def local_ranks() -> int:
    """Ranks of the launch on one node (torchrun's LOCAL_WORLD_SIZE; the launch scripts set it
    for their pre-flight too)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or 1)


def engines_on_node(rollout) -> int:
    """Engines on the node that holds the most (``rollout``: a RolloutConfig)."""
    ranks = local_ranks()
    if rollout.placement == "separate":
        ranks = min(ranks, rollout.num_ranks)
    return max(1, -(-ranks // rollout.engine_tp))


def check_kv_caches(rollout) -> None:
    """On CPU vLLM reserves each engine's KV cache from host memory at start-up: the engines of
    one node together must fit in its free memory, or the kernel's OOM killer ends the run."""
    engines = engines_on_node(rollout)
    free = psutil.virtual_memory().available
    if rollout.kv_cache_gib * engines * (1 << 30) > free:
        each = f" for each of the {engines} engines on this node" if engines > 1 else ""
        raise GspoError(
            f"rollout.kv_cache_gib={rollout.kv_cache_gib:g}{each} is more than this "
            f"machine's free memory ({free / (1 << 30):.1f} GiB) can hold; lower it (the tiny "
            f"demo uses 0.05)"
        )


def machine_envs(agent) -> int:
    """Live episodes (environment processes) one machine holds: ``agent.max_parallel_envs``,
    or for 0 the machine's own figure (``AUTO_ENVS_PER_CPU``); GspoError (one line) for a
    setting the machine cannot hold, in memory or in processes."""
    free = psutil.virtual_memory().available
    by_memory = int(free * ENV_MEMORY_SHARE // ENV_FOOTPRINT)
    nproc, _ = resource.getrlimit(resource.RLIMIT_NPROC)
    # Each live episode is two processes (the environment and its guard).
    by_procs = (nproc - _user_processes() - 64) // 2 if nproc != resource.RLIM_INFINITY else None
    if agent.max_parallel_envs == 0:
        fits = [AUTO_ENVS_MAX, AUTO_ENVS_PER_CPU * (os.cpu_count() or 1), by_memory]
        return max(1, min(fits + ([by_procs] if by_procs is not None else [])))
    wanted = agent.max_parallel_envs
    if wanted > by_memory:
        raise GspoError(
            f"agent.max_parallel_envs={wanted}: {wanted} live episodes take about "
            f"{wanted * ENV_FOOTPRINT / (1 << 30):.1f} GiB, more than half of this machine's "
            f"free memory ({free / (1 << 30):.1f} GiB) holds; at most {by_memory} here (0 = "
            f"sized to the machine)"
        )
    if by_procs is not None and wanted > by_procs:
        raise GspoError(
            f"agent.max_parallel_envs={wanted}: {wanted} live episodes are {2 * wanted} "
            f"processes, more than this user's process limit (ulimit -u {nproc}) leaves room "
            f"for; at most {max(by_procs, 0)} here (0 = sized to the machine)"
        )
    return wanted


def envs_per_engine(agent, rollout) -> int:
    """Live episodes one engine's environment pool holds: the machine's share per engine."""
    return max(1, machine_envs(agent) // engines_on_node(rollout))


def _user_processes() -> int:
    uid = os.getuid()
    count = 0
    for p in psutil.process_iter(["uids"]):
        uids = p.info.get("uids")
        count += uids is not None and uids.real == uid
    return count
