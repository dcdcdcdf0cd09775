"""Routing replay: pin the experts every MoE layer routes each token to.

Token-level importance ratios (GRPO) on a Mixture-of-Experts model swing when the experts chosen
for a token differ between pi_old and the policy being updated; "routing replay" forces the
update's forward passes onto recorded routes. GSPO does not need it (its sequence ratio stays
stable); it is here as the baseline every other MoE RL trainer offers.

- ``r2``: the pi_old forward pass records each layer's top-k expert indices for every
  micro-batch, and every forward pass of that rollout batch's minibatch updates replays them (the
  GSPO paper's setting for its GRPO runs).

The hook is megatron-core's own: ``topk_routing_with_score_function`` asks the router's
``router_replay`` object for the top-k (``get_replay_topk``), so the replayed indices go through
the same probability computation as computed ones (softmax over the chosen logits, or the chosen
pre-softmax scores). Routes are kept on the micro-batch (``MicroBatch.routes``: local router
index -> [rows, top-k] indices), so they live exactly as long as the rollout batch, and rows are
this rank's router rows: its CP share of the sequence, in megatron's [sequence, batch] order,
its sequence-parallel chunk under TP. Recording and replaying in the same layout therefore needs
no translation; each pipeline stage records and replays its own layers.

Without activation recompute (this project enables none) the backward pass does not route again,
so forward replay is all there is.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Tuple

import torch
from megatron.core.transformer.moe.router import Router

from gspo_megatron.batch import MicroBatch
from gspo_megatron.optim import unwrap


class _LayerReplay:
    """What megatron's router consults for its top-k (the ``router_replay`` interface)."""

    def __init__(self, owner: "RoutingReplay", index: int):
        self.owner, self.index = owner, index

    def get_replay_topk(
        self,
        scores: torch.Tensor,
        topk: int,
        num_groups: Optional[int] = None,
        group_topk: Optional[int] = None,
        default_compute_topk: Optional[Callable] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        mb, mode = self.owner.current, self.owner.mode
        if mb is None or mode is None:
            return default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        if mode == "record":
            values, indices = default_compute_topk(
                scores, topk, num_groups=num_groups, group_topk=group_topk
            )
            mb.routes[self.index] = indices.detach().clone()
            return values, indices
        indices = mb.routes[self.index].to(scores.device)
        if indices.shape != (scores.shape[0], topk):
            raise RuntimeError(
                f"routing replay: layer {self.index} has {scores.shape[0]} router rows, the "
                f"recorded routes {tuple(indices.shape)} (recorded in another layout?)"
            )
        return scores.gather(1, indices), indices


class RoutingReplay:
    """Records and replays the routes of one model's MoE layers (this rank's routers).

    ``recording()`` / ``replaying()`` choose what the next forward passes do; ``forward``'s
    ``model_forward`` tells it which micro-batch is running (``micro_batch``)."""

    def __init__(self, model):
        routers = [m for m in unwrap(model).modules() if isinstance(m, Router)]
        self.num_layers = len(routers)
        for i, router in enumerate(routers):
            router.router_replay = _LayerReplay(self, i)
        self.mode: Optional[str] = None
        self.current: Optional[MicroBatch] = None
        unwrap(model).routing_replay = self

    @contextlib.contextmanager
    def _mode(self, mode: str) -> Iterator[None]:
        self.mode = mode
        try:
            yield
        finally:
            self.mode = None

    def recording(self):
        """Forward passes in this context store each layer's top-k in ``mb.routes``."""
        return self._mode("record")

    def replaying(self):
        """Forward passes in this context route every token as ``mb.routes`` says."""
        return self._mode("replay")

    @contextlib.contextmanager
    def micro_batch(self, mb: MicroBatch) -> Iterator[None]:
        if self.mode == "record":
            mb.routes = {}
        elif self.mode == "replay" and (mb.routes is None or len(mb.routes) != self.num_layers):
            raise RuntimeError("routing replay: the micro-batch carries no recorded routes")
        self.current = mb
        try:
            yield
        finally:
            self.current = None


def of(model) -> Optional[RoutingReplay]:
    """The replay installed on ``model`` (DDP-wrapped or not), if any."""
    return getattr(unwrap(model), "routing_replay", None)
