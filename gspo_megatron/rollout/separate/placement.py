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
    """Bring up this side's default group and the link group; returns the link's groups (no
    process groups on training ranks outside it, only the start-up hand-shake). Before megatron or vLLM start (they take the default group)."""
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
    # The hand-shake's own keys (``LinkGroups.ready`` / ``wait_for_peers``): every rank reads
    # them, the link ranks write them.
    ready = dist.PrefixStore("gspo/ready/", store)
    if role.link_rank is None:
        return LinkGroups(None, None, ready, role)
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
    return LinkGroups(cpu, gpu, ready, role)


@dataclass
class LinkGroups:
    cpu: Optional[object]  # ProcessGroupGloo (None on training ranks outside the link)
    gpu: Optional[object]  # ProcessGroupNCCL on GPU, else None (weights go over gloo)
    store: Optional[object] = None  # the start-up hand-shake's keys
    role: Optional[Role] = None

    @property
    def weights(self):
        """The group the weights travel over (NCCL on GPU)."""
        return self.gpu if self.gpu is not None else self.cpu

    def ready(self, failure: str = "") -> None:
        """Say this side has started (its engine or model is up), or why it could not."""
        if self.role.link_rank is None:
            return
        self.store.set(f"{self.role.link_rank}", failure or "ok")

    def wait_for_peers(self, timeout_s: float) -> None:
        """Before the first transfer: wait until the other side has started (vLLM engines,
        a model and its checkpoint: minutes at scale) for up to ``rollout.start_timeout_s``,
        so that train.collective_timeout_s need only cover a step's waits. A peer that
        could not start ends the wait at once with its reason."""
        import time

        peers = [0] if self.role.kind == "rollout" else range(1, self.role.link_size)
        keys = [str(r) for r in peers]
        deadline = time.monotonic() + timeout_s
        while not self.store.check(keys):
            if time.monotonic() > deadline:
                missing = [k for k in keys if not self.store.check([k])]
                other = "the trainer" if self.role.kind == "rollout" else "the rollout ranks"
                raise LinkStartError(
                    f"{other} did not start within rollout.start_timeout_s={timeout_s:g} s "
                    f"(link ranks {', '.join(missing)} silent)"
                )
            time.sleep(0.2)
        for k in keys:
            said = self.store.get(k).decode()
            if said != "ok":
                raise LinkStartError(f"link rank {k} could not start: {said}")


class LinkStartError(RuntimeError):
    """The other side of the link never started, or said why it could not."""
