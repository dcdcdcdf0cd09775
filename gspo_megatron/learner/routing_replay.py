"""Routing replay and route agreement: what MoE layers route each token to, and forcing it.

Token-level importance ratios (GRPO) on a Mixture-of-Experts model swing when the experts chosen
for a token differ between pi_old and the policy being updated; "routing replay" forces the
update's forward passes onto recorded routes. GSPO does not need it (its sequence ratio stays
stable); it is here as the baseline every other MoE RL trainer offers, and to measure:

- ``r2``: the pi_old forward pass records each layer's top-k expert indices for every
  micro-batch, and every forward pass of that rollout batch's minibatch updates replays them (the
  GSPO paper's setting for its GRPO runs).
- ``r3``: the routes the rollout engine took while sampling (``Sample.routes``, recorded by
  ``rollout.routes``) are replayed in the pi_old forward and in every update (arXiv 2510.11370);
  positions the engine never fed (each response's last token, padding) keep the trainer's own.
- with or without replay, where the samples carry the engine's routes, the pi_old forward counts
  how many (response token, layer) top-k sets the trainer's own router chooses exactly as the
  engine did: ``rollout/route_agreement``.

The hook is megatron-core's own: ``topk_routing_with_score_function`` asks the router's
``router_replay`` object for the top-k (``get_replay_topk``), so replayed indices go through the
same probability computation as computed ones (softmax over the chosen logits, or the chosen
pre-softmax scores). Routes are kept on the micro-batch (``MicroBatch.routes``: local router
index -> [rows, top-k]), so they live exactly as long as the rollout batch. Router rows are this
rank's tokens: its CP share of the sequence (the engine's routes are CP-split with the tokens),
in megatron's [sequence, batch] order, its sequence-parallel chunk under TP; each pipeline stage
handles its own layers (the engine's routes are indexed by global MoE layer).

Without activation recompute (this project enables none) the backward pass does not route again,
so forward replay is all there is.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.router import Router
from megatron.core.transformer.transformer_layer import TransformerLayer

from gspo_megatron.distributed.ddp import unwrap
from gspo_megatron.learner.batch import MicroBatch


def router_rows(per_position: torch.Tensor, config) -> torch.Tensor:
    """[b, S, ...] per-position values -> this rank's router rows [S*b / TP, ...]: megatron's
    [sequence, batch] order, the sequence-parallel chunk of this TP rank."""
    b, seq = per_position.shape[:2]
    rows = per_position.transpose(0, 1).reshape((seq * b,) + tuple(per_position.shape[2:]))
    if getattr(config, "sequence_parallel", False):
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        n = rows.shape[0] // tp
        rows = rows[rank * n : (rank + 1) * n]
    return rows


class _LayerReplay:
    """What megatron's router consults for its top-k (the ``router_replay`` interface)."""

    def __init__(self, owner: "RoutingReplay", index: int, column: int):
        self.owner, self.index, self.column = owner, index, column

    def get_replay_topk(
        self,
        scores: torch.Tensor,
        topk: int,
        num_groups: Optional[int] = None,
        group_topk: Optional[int] = None,
        default_compute_topk: Optional[Callable] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        owner, mb = self.owner, self.owner.current
        if mb is None or owner.phase is None:
            return default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        if owner.phase == "update":
            if owner.mode == "none":
                return default_compute_topk(
                    scores, topk, num_groups=num_groups, group_topk=group_topk
                )
            indices = mb.routes[self.index].to(scores.device)
            if indices.shape != (scores.shape[0], topk):
                raise RuntimeError(
                    f"routing replay: layer {self.index} has {scores.shape[0]} router rows, the "
                    f"recorded routes {tuple(indices.shape)}"
                )
            return scores.gather(1, indices), indices
        # The pi_old forward ("old"), or under r3 a forward without replay ("observe"): the
        # router's own choice, compared with the engine's; under r3 the "old" pass replaces it
        # with the engine's; r2 and r3 record what the "old" pass routed.
        values, indices = default_compute_topk(
            scores, topk, num_groups=num_groups, group_topk=group_topk
        )
        replaced = owner.phase == "old" and owner.mode == "r3"
        if mb.engine_routes is not None:
            engine = router_rows(mb.engine_routes[:, :, self.column], owner.config)
            engine = engine.to(indices.device)
            if not replaced:  # the agreement of the router's own, unforced choice
                counted = router_rows(mb.route_rows, owner.config).to(indices.device)
                same = (engine.sort(-1).values == indices.sort(-1).values).all(-1)
                owner.agreement[0] += float((same & counted).sum())
                owner.agreement[1] += float(counted.sum())
                owner.note_differs(~same & counted, counted)
            else:
                indices = torch.where(engine >= 0, engine, indices)
                values = scores.gather(1, indices)
        elif replaced and bool(mb.loss_mask.any()):
            raise RuntimeError("loss.routing_replay=r3 but the samples carry no engine routes")
        if owner.phase == "old" and owner.mode != "none":
            mb.routes[self.index] = indices.detach().clone()
        return values, indices


class RoutingReplay:
    """Installed on one model's MoE routers (this rank's): observes them in the pi_old forward
    (route agreement with the engine) and, under ``mode`` r2 / r3, records and replays routes.

    ``old_pass()`` / ``update_pass()`` say which forward passes follow; ``forward``'s
    ``model_forward`` says which micro-batch is running (``micro_batch``)."""

    def __init__(self, model, mode: str = "none"):
        if mode not in ("none", "r2", "r3"):
            raise ValueError(f"routing replay mode '{mode}' (allowed: none, r2, r3)")
        unwrapped = unwrap(model)
        self.config, self.mode = unwrapped.config, mode
        layers = [
            m
            for m in unwrapped.modules()
            if isinstance(m, TransformerLayer)
            and isinstance(getattr(m.mlp, "router", None), Router)
        ]
        # Columns of the engine's routes: the global MoE layers in order.
        moe_global = self._global_moe_layers()
        self.num_layers = len(layers)
        for i, layer in enumerate(layers):
            column = moe_global.index(layer.layer_number - 1)
            layer.mlp.router.router_replay = _LayerReplay(self, i, column)
        self.phase: Optional[str] = None
        self.current: Optional[MicroBatch] = None
        self.agreement = torch.zeros(2, dtype=torch.float64)  # [same top-k sets, counted]
        self.forwards = 0  # micro-batch forwards so far: which one the routers are in
        self.differs: list = []
        """Per micro-batch of the pass, this rank's router rows: [whether any of this stage's
        MoE layers chose otherwise than the engine, counted] (``take_agreement`` combines the
        pipeline stages)."""
        unwrapped.routing_replay = self

    def _global_moe_layers(self) -> list:
        freq = self.config.moe_layer_freq
        n = self.config.num_layers
        if isinstance(freq, int):
            return [i for i in range(n) if i % freq == 0]
        return [i for i, moe in enumerate(freq) if moe]

    @contextlib.contextmanager
    def _phase(self, phase: str) -> Iterator[None]:
        self.phase = phase
        try:
            yield
        finally:
            self.phase = None

    def old_pass(self):
        """pi_old forward passes: count agreement (none, r2), record (r2) or replay the engine's
        routes (r3)."""
        return self._phase("old")

    def observe_pass(self):
        """Forward passes that only count agreement (r3, whose pi_old pass replays)."""
        return self._phase("observe")

    def update_pass(self):
        """The updates' forward passes: replay what the pi_old pass recorded (r2, r3)."""
        return self._phase("update")

    @contextlib.contextmanager
    def micro_batch(self, mb: MicroBatch) -> Iterator[None]:
        if self.phase == "old":
            mb.routes = {}
        elif self.phase == "observe":
            pass
        elif self.phase == "update" and self.mode != "none":
            if mb.routes is None or len(mb.routes) != self.num_layers:
                raise RuntimeError("routing replay: the micro-batch carries no recorded routes")
        self.current = mb
        self.forwards += 1
        try:
            yield
        finally:
            self.current = None

    def note_differs(self, differs: torch.Tensor, counted: torch.Tensor) -> None:
        """One MoE layer's verdict on the running micro-batch's rows: the layers of one forward
        run one after another, so its entry is the last one while they do."""
        if self.differs and self.differs[-1][0] == self.forwards:
            self.differs[-1][1] |= differs.cpu()
        else:
            self.differs.append([self.forwards, differs.cpu(), counted.cpu()])

    def take_agreement(self) -> dict:
        """Since the last call, over all ranks: ``rollout/route_agreement`` (the fraction of
        (token, MoE layer) top-k sets the trainer's router chose as the engine did) and
        ``rollout/route_differs_tokens`` (the fraction of tokens routed otherwise in at least one
        MoE layer); empty when no sample carried engine routes. Then reset. Collective."""
        total = torch.cat([self.agreement, self._tokens_differing()])
        if dist.is_initialized():
            dist.all_reduce(total)
        self.agreement.zero_()
        if total[1] == 0:
            return {}
        return {
            "rollout/route_agreement": float(total[0] / total[1]),
            "rollout/route_differs_tokens": float(total[2] / max(float(total[3]), 1.0)),
        }

    def _tokens_differing(self) -> torch.Tensor:
        """[tokens routed otherwise in some layer, tokens] of this rank's rows, the pipeline
        stages' layers combined (each stage routes only its own layers); counted on one stage
        of each pipeline, so that the sum over all ranks counts each token once."""
        mine = [(d, c) for _, d, c in self.differs]
        self.differs = []
        stages, me = [mine], 0
        if dist.is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
            stages = [None] * ps.get_pipeline_model_parallel_world_size()
            dist.all_gather_object(stages, mine, group=ps.get_pipeline_model_parallel_group())
            me = ps.get_pipeline_model_parallel_rank()
        routed = [k for k, stage in enumerate(stages) if stage]  # (a stage without MoE layers)
        out = torch.zeros(2, dtype=torch.float64)
        if not routed or routed[0] != me:
            return out
        for k, (_, counted) in enumerate(stages[me]):
            differs = torch.zeros_like(counted)
            for stage in routed:
                differs |= stages[stage][k][0]
            out[0] += float((differs & counted).sum())
            out[1] += float(counted.sum())
        return out


def of(model) -> Optional[RoutingReplay]:
    """The replay installed on ``model`` (DDP-wrapped or not), if any."""
    return getattr(unwrap(model), "routing_replay", None)
