"""Separate rollout ranks: who does what in one torchrun launch, and the groups that join them.

With ``rollout.placement: separate`` a launch of W ranks splits in two: ranks 0 .. T-1 train
(megatron model, optimizer, no vLLM), ranks T .. W-1 (``rollout.num_ranks`` of them) run vLLM
engines only. megatron-core and vLLM each assume they own the default process group, so each
side gets a default group of its own: the launch's store (torchrun's) is shared, with a key
prefix per side, and every process sees its side's ``RANK`` / ``WORLD_SIZE`` in the environment
(what megatron, vLLM's external launcher and the rest of gspo-train read). The launch-wide
identity stays in ``GSPO_LAUNCH_RANK`` / ``GSPO_LAUNCH_WORLD_SIZE``.

The two sides meet in one more group, made directly on the store (it belongs to neither
default group): the first training rank, which holds every full weight after the trainer's
gather, and every rollout rank. Weights go down it by broadcast, batches come up it from the
first rollout rank (``rollout.link``).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Optional

from gspo_megatron.errors import GspoError
from gspo_megatron.rollout.config import RolloutConfig

LAUNCH_RANK, LAUNCH_WORLD = "GSPO_LAUNCH_RANK", "GSPO_LAUNCH_WORLD_SIZE"


@dataclass(frozen=True)
class Role:
    """This process's place in the launch."""

    kind: str  # "trainer" or "rollout"
    launch_rank: int
    launch_world: int
    trainers: int  # T: the launch's first T ranks train

    @property
    def rank(self) -> int:
        """Rank within its side's default group."""
        return self.launch_rank - (self.trainers if self.kind == "rollout" else 0)

    @property
    def world(self) -> int:
        return self.trainers if self.kind == "trainer" else self.launch_world - self.trainers

    @property
    def link_rank(self) -> Optional[int]:
        """Rank in the link group (first trainer = 0, rollout ranks 1..), None outside it."""
        if self.kind == "rollout":
            return 1 + self.rank
        return 0 if self.rank == 0 else None

    @property
    def link_size(self) -> int:
        return 1 + self.launch_world - self.trainers


def role_of(cfg: RolloutConfig, env=os.environ) -> Optional[Role]:
    """This process's role under ``placement: separate`` (None when colocated)."""
    if cfg.placement != "separate":
        return None
    if "RANK" not in env:
        raise GspoError(
            "rollout.placement=separate needs a torchrun launch of training + rollout ranks "
            f"(rollout.num_ranks={cfg.num_ranks} of them): start gspo-train with torchrun"
        )
    rank = int(env.get(LAUNCH_RANK, env["RANK"]))
    world = int(env.get(LAUNCH_WORLD, env["WORLD_SIZE"]))
    cfg.validate(world)
    trainers = cfg.trainer_ranks(world)
    return Role("trainer" if rank < trainers else "rollout", rank, world, trainers)


def enter_role(role: Role, timeout_s: float):
    """Bring up this side's default group and the link group; returns the link group (None on
    training ranks outside it). Before megatron or vLLM start (they take the default group)."""
    import torch
    import torch.distributed as dist

    os.environ.setdefault(LAUNCH_RANK, str(role.launch_rank))
    os.environ.setdefault(LAUNCH_WORLD, str(role.launch_world))
    timeout = datetime.timedelta(seconds=timeout_s)
    # torchrun's store, as env:// finds it (MASTER_ADDR/PORT, the launch's RANK and WORLD_SIZE).
    os.environ.update(RANK=str(role.launch_rank), WORLD_SIZE=str(role.launch_world))
    store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
    os.environ.update(RANK=str(role.rank), WORLD_SIZE=str(role.world))
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(
        backend="nccl" if on_gpu else "gloo",
        store=dist.PrefixStore(f"gspo/{role.kind}/", store),
        rank=role.rank,
        world_size=role.world,
        timeout=timeout,
    )
    if role.link_rank is None:
        return None
    link_store = dist.PrefixStore("gspo/link/", store)
    # gloo for the batches (objects, CPU); the weights go over NCCL on GPU (rollout.link).
    cpu = dist.ProcessGroupGloo(link_store, role.link_rank, role.link_size, timeout)
    gpu = None
    if on_gpu:
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        gpu = dist.ProcessGroupNCCL(
            dist.PrefixStore("nccl/", link_store), role.link_rank, role.link_size, opts
        )
    return LinkGroups(cpu, gpu)


@dataclass
class LinkGroups:
    cpu: object  # ProcessGroupGloo
    gpu: Optional[object]  # ProcessGroupNCCL on GPU, else None (weights go over gloo)

    @property
    def weights(self):
        return self.gpu if self.gpu is not None else self.cpu
