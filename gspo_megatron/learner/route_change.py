"""How many MoE expert choices change between pi_old and pi_theta within one rollout batch.

This is the quantity that breaks token-level importance ratios on MoE models (about 10% per
update on Qwen3-30B-A3B, docs/gspo.md) and that GSPO is meant to tolerate, so a run reports
it: ``train/moe_route_change`` = changed (token, layer) expert choices / all choices, over the
response positions of one sampled micro-batch per rank, between the pi_old forward pass and
the forward pass of the last minibatch step (the policy that has drifted furthest from pi_old).

Forward hooks on megatron's routers keep one boolean routing map per layer for the sampled
micro-batch while recording, and count choices that differ while comparing. Rows of a routing
map are this rank's tokens in megatron's [sequence, batch] order (a tensor-parallel rank's
sequence-parallel chunk of it), so the micro-batch's loss mask is laid out the same way.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.router import Router

from gspo_megatron.distributed.ddp import unwrap
from gspo_megatron.learner.routing_replay import router_rows


class RouteChangeMeter:
    def __init__(self, model):
        unwrapped = unwrap(model)
        self.config = unwrapped.config
        self.routers = [m for m in unwrapped.modules() if isinstance(m, Router)]
        self.mode: Optional[str] = None
        self.rows: Optional[torch.Tensor] = None
        self.saved: Dict[int, torch.Tensor] = {}
        self.compared: set = set()
        self.changed = torch.zeros(2, dtype=torch.float64)  # [changed choices, all choices]
        # The hooks stay for the model's lifetime: one meter per run, watching only between
        # start() and stop().
        for i, router in enumerate(self.routers):
            router.register_forward_hook(self._hook(i))

    @property
    def active(self) -> bool:
        return bool(self.routers)

    def _hook(self, index: int):
        def hook(module, inputs, output):
            if self.mode is None or self.rows is None:
                return
            routing_map = output[1].detach()
            if routing_map.shape[0] != self.rows.numel():
                return  # not the sampled micro-batch's layout (should not happen)
            rows = self.rows.to(routing_map.device)
            chosen = routing_map[rows]
            # Only the first forward of each layer after start(): the sampled micro-batch is the
            # first of its minibatch (a recomputed forward would repeat it).
            if self.mode == "record" and index not in self.saved:
                self.saved[index] = chosen.clone()
            elif self.mode == "compare" and index in self.saved and index not in self.compared:
                self.compared.add(index)
                old = self.saved[index]
                self.changed[0] += float((old & ~chosen).sum())
                self.changed[1] += float(old.sum())

        return hook

    def rows_of(self, loss_mask: torch.Tensor) -> torch.Tensor:
        """[b, S] loss mask -> this rank's router rows ([S, b] order, SP chunk)."""
        return router_rows(loss_mask, self.config).bool()

    def start(self, mode: str, loss_mask: torch.Tensor) -> None:
        """Watch the next forward pass, whose first micro-batch has this loss mask."""
        self.mode, self.rows = mode, self.rows_of(loss_mask)

    def stop(self) -> None:
        self.mode, self.rows = None, None

    def result(self) -> Dict[str, float]:
        """The global fraction (all ranks and layers), then reset. Collective."""
        total = self.changed.clone()
        if dist.is_initialized():
            dist.all_reduce(total)
        self.changed.zero_()
        self.saved.clear()
        self.compared.clear()
        if not self.active or total[1] == 0:
            return {}
        return {"train/moe_route_change": float(total[0] / total[1])}
